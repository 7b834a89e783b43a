#!/usr/bin/env bash
# Installs edged on a Raspberry Pi from this bundle (made by build-arm.sh on any x86 box).
# Needs: aarch64, Raspberry Pi OS bookworm / Debian 12 (python3.11, python3-venv), root.
# Nothing is downloaded: the venv is created from the bundled wheels with --no-index.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/edged
STATE=/var/lib/edged
UNITS=1
START=0
FORCE=0
BOARD=""

usage() {
  cat <<EOF
usage: sudo ./install.sh [--board pi4|pi5|zero2w|generic] [--prefix DIR] [--state-dir DIR] [--no-units] [--start] [--force]

  --board B         board profile of firmware-config/ (default: from the CPU in /proc/cpuinfo)

  --prefix DIR      venv and shared files (default $PREFIX); edged is linked to /usr/local/bin
  --state-dir DIR   EDGED_HOME of the service; models go to DIR/models (default $STATE)
  --no-units        do not install the systemd units
  --start           enable and start the units after installing them
  --force           install on a CPU this bundle was not verified for
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --board) BOARD=$2; shift 2 ;;
    --prefix) PREFIX=$2; shift 2 ;;
    --state-dir) STATE=$2; shift 2 ;;
    --no-units) UNITS=0; shift ;;
    --start) START=1; shift ;;
    --force) FORCE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }

[ "$(uname -m)" = aarch64 ] || die "this bundle is for aarch64 (64-bit Raspberry Pi OS); this machine is $(uname -m)"
[ "$(id -u)" -eq 0 ] || die "run as root (sudo ./install.sh)"
command -v python3.11 >/dev/null || die "python3.11 is missing (Raspberry Pi OS bookworm has it: apt install python3)"
python3.11 -c 'import venv, ensurepip' 2>/dev/null || die "python3-venv is missing: apt install python3-venv"

# The bundled onnxruntime was chosen for ARMv8.0 without dot product (Pi 4, Cortex-A72)
# and runs on the Pi 5 (Cortex-A76) too; see docs/arm.md. Other CPUs: warn.
part=$(awk -F: '/CPU part/ {gsub(/ /, "", $2); print $2; exit}' /proc/cpuinfo)
case "$part" in
  0xd08) BOARD=${BOARD:-pi4}; say "CPU: Cortex-A72 (Raspberry Pi 4)" ;;
  0xd0b) BOARD=${BOARD:-pi5}; say "CPU: Cortex-A76 (Raspberry Pi 5)" ;;
  0xd03) BOARD=${BOARD:-zero2w}; say "CPU: Cortex-A53 (Zero 2 W / Pi 3): not verified under emulation, slow"
         [ "$FORCE" -eq 1 ] || die "use --force to install on a Cortex-A53" ;;
  *) BOARD=${BOARD:-generic}; [ "$FORCE" -eq 1 ] || die "CPU part ${part:-unknown} was not verified for this bundle (use --force)" ;;
esac

# 1. venv from the bundled wheels only, with every version pinned by constraints.txt.
say "creating $PREFIX/venv"
mkdir -p "$PREFIX"
python3.11 -m venv --clear "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install --quiet --no-index --find-links "$HERE/wheels" \
  --constraint "$HERE/constraints.txt" edged
"$PREFIX/venv/bin/python" -c 'import onnxruntime, tokenizers, edged; print("install.sh: onnxruntime", onnxruntime.__version__)'
ln -sf "$PREFIX/venv/bin/edged" /usr/local/bin/edged
cp "$HERE/bundle.json" "$PREFIX/bundle.json"
if [ -d "$HERE/firmware-config" ]; then rm -rf "${PREFIX:?}/firmware-config"; cp -r "$HERE/firmware-config" "$PREFIX/firmware-config"; fi

# 2. user, groups, /etc/edged/edged.yaml, units and the board's drop-in: the project's own
#    installer (scripts/install.sh, bundled as it was at build time), without its venv step
#    and without starting anything before the model is in place.
if [ "$UNITS" -eq 1 ] && [ -f "$HERE/scripts/install.sh" ]; then
  bash "$HERE/scripts/install.sh" --board "$BOARD" --prefix "$PREFIX" --skip-venv --no-enable
elif [ "$UNITS" -eq 1 ] && [ -d "$HERE/systemd" ]; then
  for u in "$HERE"/systemd/*.service "$HERE"/systemd/*.socket; do
    [ -f "$u" ] && install -m 0644 "$u" /etc/systemd/system/
  done
  say "installed the units of systemd/ (no scripts/install.sh in this bundle)"
fi
getent group edged >/dev/null || groupadd --system edged
getent passwd edged >/dev/null || useradd --system --gid edged --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin edged

# 3. models: staged next to the store, then one rename (the store's own rule), then verified.
mkdir -p "$STATE/models"
for src in "$HERE"/models/*/; do
  name=$(basename "$src")
  stage="$STATE/models/.staging-install-$name"
  rm -rf "$stage"
  cp -r "$src" "$stage"
  rm -rf "${STATE:?}/models/$name"
  mv "$stage" "$STATE/models/$name"
  EDGED_HOME="$STATE" "$PREFIX/venv/bin/edged" show "$name" --verify >/dev/null
  say "model $name -> $STATE/models/$name (sha256 verified)"
done
chown -R edged:edged "$STATE"

# 4. start
if [ "$UNITS" -eq 1 ] && [ -f /etc/systemd/system/edged.service ]; then
  systemctl daemon-reload
  if [ "$START" -eq 1 ]; then
    systemctl enable --now edged.socket edged.service
    say "enabled and started: systemctl status edged"
  else
    say "not started: systemctl enable --now edged.socket edged.service"
  fi
fi
if [ -d "$HERE/firmware-config/$BOARD" ]; then
  say "boot settings for $BOARD are in $PREFIX/firmware-config/$BOARD (see its README; nothing was changed in /boot)"
fi
first_model=$(find "$HERE/models" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort | head -1)
say "done: try  sudo -u edged EDGED_HOME=$STATE edged run $first_model 'What is the capital of France?'"
