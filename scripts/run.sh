#!/usr/bin/env bash
# `make run`: prepare the model, then run the daemon in the foreground (Ctrl-C stops it).
#
# When nothing listens on the configured MQTT broker address (mqtt.host/mqtt.port of
# $CONFIG after EDGED_MQTT_* overrides) and that address is on this machine, a mosquitto
# is started for the session on it, so the daemon serves MQTT beside the socket on a
# machine where apt installed mosquitto but started no service. That broker runs in its
# own session (the terminal's Ctrl-C reaches the daemon, which may still send replies
# while it stops) and is stopped when the daemon has exited.
#
# Environment: VENV (.venv), MODEL (smollm2-135m), CONFIG (examples/edged.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
MODEL=${MODEL:-smollm2-135m}
CONFIG=${CONFIG:-examples/edged.yaml}
EDGED="$VENV/bin/edged"
say() { echo "run: $*" >&2; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/edged-run-XXXXXX")
broker=""
daemon=""
cleanup() {
  if [ -n "$broker" ] && kill -0 "$broker" 2>/dev/null; then
    kill -TERM "$broker" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$broker" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$broker" 2>/dev/null || true
    say "stopped the session's mosquitto (pid $broker)"
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# The broker probe runs beside the pull (its imports take ~0.4 s, an up-to-date pull
# longer). It reads the address with the daemon's own config loader and prints
# "<enabled> <host> <port> <loopback address to bind, or -> <listening>".
"$VENV/bin/python" - "$CONFIG" >"$tmp/probe" <<'PY' &
import ipaddress, socket, sys

from edged.serve.config import Config

try:
    m = Config.load(sys.argv[1]).mqtt
except Exception:  # `edged serve` reports a bad config itself
    print("false - - - -")
    sys.exit()
try:
    infos = socket.getaddrinfo(m.host, m.port, type=socket.SOCK_STREAM)
except OSError:
    infos = []
bind = "-"
if infos and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos):
    v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
    bind = v4[0] if v4 else infos[0][4][0]
listening = "no"
for family, kind, proto, _, addr in infos:
    try:
        with socket.socket(family, kind, proto) as s:
            s.settimeout(1.0)
            s.connect(addr)
        listening = "yes"
        break
    except OSError:
        pass
print(str(m.enabled).lower(), m.host, m.port, bind, listening)
PY
probe=$!
"$EDGED" pull "$MODEL"
wait "$probe" || true
read -r enabled host port bind listening <"$tmp/probe" || enabled=false
export EDGED_MODEL="$MODEL"
# A developer's session also serves Ollama's HTTP API on 127.0.0.1:11434 (off by default: examples/edged.yaml).
export EDGED_HTTP="${EDGED_HTTP:-true}"

serve_alone() {
  rm -rf "$tmp"
  exec "$EDGED" serve --config "$CONFIG"
}
if [ "$enabled" != true ] || [ "$listening" = yes ]; then
  serve_alone
fi
if [ "$bind" = - ]; then
  say "nothing listens on the MQTT broker $host:$port; the daemon keeps retrying it (the socket serves meanwhile)"
  serve_alone
fi
MOSQUITTO=$(command -v mosquitto || { [ -x /usr/sbin/mosquitto ] && echo /usr/sbin/mosquitto; } || true)
if [ -z "$MOSQUITTO" ]; then
  say "nothing listens on the MQTT broker $host:$port and mosquitto is not installed (make setup installs it); the socket serves alone"
  serve_alone
fi

chmod 755 "$tmp"  # mosquitto started as root reads its config after dropping to its own user
cat >"$tmp/mosquitto.conf" <<EOF
listener $port $bind
allow_anonymous true
persistence false
log_dest stderr
EOF
# As root, mosquitto drops to the user "mosquitto" (Debian's package makes it); without that user it would not start.
if [ "$(id -u)" -eq 0 ] && ! id -u mosquitto >/dev/null 2>&1; then
  echo "user root" >>"$tmp/mosquitto.conf"
fi
chmod 644 "$tmp/mosquitto.conf"
# setsid: its own session, so the terminal's Ctrl-C does not stop the broker before the daemon.
setsid "$MOSQUITTO" -c "$tmp/mosquitto.conf" </dev/null 2>"$tmp/mosquitto.log" &
broker=$!
# The daemon starts at once: it connects to MQTT after loading the model (about a second),
# long after mosquitto listens (milliseconds); had it not, the daemon would retry.
"$EDGED" serve --config "$CONFIG" &
daemon=$!
# The shell gets the terminal's Ctrl-C too, and a TERM may be sent to it alone: either is
# passed on as TERM (the daemon's graceful stop); the shell waits until the daemon has exited.
trap 'kill -TERM "$daemon" 2>/dev/null || true' INT TERM HUP
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/$bind/$port") 2>/dev/null && break
  kill -0 "$broker" 2>/dev/null || break
  sleep 0.05
done
if kill -0 "$broker" 2>/dev/null; then
  say "nothing listened on the MQTT broker $host:$port: started mosquitto (pid $broker) on $bind:$port for this session; it stops when the daemon does"
else
  say "nothing listens on the MQTT broker $host:$port and mosquitto could not start there:"
  sed 's/^/  mosquitto: /' "$tmp/mosquitto.log" >&2
  broker=""
  say "the socket serves alone; the daemon keeps retrying the broker"
fi
rc=0
while :; do
  wait "$daemon" && rc=0 || rc=$?
  kill -0 "$daemon" 2>/dev/null || break
done
exit "$rc"
