#!/usr/bin/env bash
# Install edged as a systemd service (docs/operations.md).
#
#   sudo ./scripts/install.sh [--board generic|pi4|pi5|zero2w] [--prefix /opt/edged]
#                             [--wheels DIR] [--pull MODEL] [--no-enable] [--root DIR] [--skip-venv]
#
# Creates the `edged` user and the `edged-clients` group, a venv in $PREFIX/venv with
# edged[systemd], /etc/edged/edged.yaml (never overwritten: a changed default lands in
# edged.yaml.new), the units in /etc/systemd/system (+ the board's memory drop-in),
# then enables and starts edged.socket and edged.service.
# --root DIR stages everything under DIR without touching users or systemd (for packaging/tests).
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BOARD=generic PREFIX=/opt/edged WHEELS="" PULL="" ENABLE=1 ROOT="" SKIP_VENV=0
PYTHON="${PYTHON:-python3}"

while [ $# -gt 0 ]; do
  case "$1" in
    --board) BOARD="$2"; shift 2 ;;
    --prefix) PREFIX="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --pull) PULL="$2"; shift 2 ;;
    --no-enable) ENABLE=0; shift ;;
    --root) ROOT="$2"; ENABLE=0; shift 2 ;;
    --skip-venv) SKIP_VENV=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

case "$BOARD" in generic|pi4|pi5|zero2w) ;; *) echo "install.sh: unknown board $BOARD" >&2; exit 2 ;; esac
if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (sudo make install), or stage with --root DIR" >&2
  exit 1
fi
say() { echo "install.sh: $*"; }

# 1. user and groups (system accounts, no login, home = the state directory)
if [ -z "$ROOT" ]; then
  getent group edged >/dev/null || groupadd --system edged
  getent group edged-clients >/dev/null || groupadd --system edged-clients
  if ! getent passwd edged >/dev/null; then
    useradd --system --gid edged --home-dir /var/lib/edged --no-create-home \
            --shell /usr/sbin/nologin --comment "edged LLM daemon" edged
  fi
  say "user edged, groups edged and edged-clients (add local apps: usermod -aG edged-clients USER)"
fi

# 2. the venv with edged[systemd]
VENV="$ROOT$PREFIX/venv"
if [ "$SKIP_VENV" = 0 ]; then
  "$PYTHON" -m venv "$VENV"
  if [ -n "$WHEELS" ]; then
    "$VENV/bin/pip" install -q --no-index --find-links "$WHEELS" "edged[systemd]"
  else
    "$VENV/bin/pip" install -q "$SRC[systemd]" || "$VENV/bin/pip" install -q "$SRC"  # no compiler: no extra
  fi
  say "venv $PREFIX/venv"
fi
install -d -m 0755 "$ROOT$PREFIX/docs"
install -m 0644 "$SRC/docs/operations.md" "$ROOT$PREFIX/docs/operations.md"

# 3. configuration (an existing one is kept)
ETC="$ROOT/etc/edged"
install -d -m 0755 "$ETC"
CFG_SRC="$SRC/firmware-config/$BOARD/edged.yaml"
if [ -f "$ETC/edged.yaml" ] && ! cmp -s "$CFG_SRC" "$ETC/edged.yaml"; then
  install -m 0640 "$CFG_SRC" "$ETC/edged.yaml.new"
  say "kept /etc/edged/edged.yaml; the new default is /etc/edged/edged.yaml.new"
else
  install -m 0640 "$CFG_SRC" "$ETC/edged.yaml"
  say "config /etc/edged/edged.yaml ($BOARD)"
fi
[ -z "$ROOT" ] && chgrp edged "$ETC/edged.yaml"* 2>/dev/null || true

# 4. units (+ the board's memory limits, matching its governor settings)
UNITS="$ROOT/etc/systemd/system"
install -d -m 0755 "$UNITS"
sed "s#/opt/edged/venv/bin/edged#$PREFIX/venv/bin/edged#; s#/opt/edged/docs#$PREFIX/docs#" \
  "$SRC/systemd/edged.service" > "$UNITS/edged.service"
chmod 0644 "$UNITS/edged.service"
install -m 0644 "$SRC/systemd/edged.socket" "$UNITS/edged.socket"
if [ "$BOARD" != generic ]; then
  install -d -m 0755 "$UNITS/edged.service.d"
  install -m 0644 "$SRC/firmware-config/$BOARD/edged.service.d/memory.conf" "$UNITS/edged.service.d/memory.conf"
fi
say "units edged.service, edged.socket in /etc/systemd/system"

# 5. a model, as the service user, into the state directory
if [ -n "$PULL" ] && [ -z "$ROOT" ]; then
  install -d -o edged -g edged -m 0750 /var/lib/edged
  runuser -u edged -- env EDGED_HOME=/var/lib/edged "$PREFIX/venv/bin/edged" pull "$PULL"
fi

# 6. enable and start
if [ "$ENABLE" = 1 ]; then
  systemctl daemon-reload
  systemctl enable --now edged.socket edged.service
  say "enabled and started: systemctl status edged; journalctl -u edged -f; edged status"
else
  say "not enabled (systemctl daemon-reload && systemctl enable --now edged.socket edged.service)"
fi
if [ "$BOARD" != generic ]; then
  say "boot settings for $BOARD (reboot needed): firmware-config/$BOARD/{config.txt,cmdline.txt}, sysctl.conf, zram.conf"
fi
