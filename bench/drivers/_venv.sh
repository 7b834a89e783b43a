# Sourced by setup_*.sh. `new_venv NAME PROBE` makes $VENV (.cache/bench/venv-NAME) with a
# current pip, or exits 0 when the Python code PROBE already runs there (idempotent).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${EDGED_BENCH_CACHE:-$ROOT/.cache/bench}"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"

new_venv() {
  VENV="$CACHE/venv-$1"
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "$2" 2>/dev/null; then
    echo "$1 already in $VENV"; exit 0
  fi
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
}
