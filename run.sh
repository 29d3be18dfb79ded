#!/usr/bin/env bash
# One entry point for a fresh machine. Creates .venv (idempotently), then runs what you ask for:
#   ./run.sh main   -> the main job on its embedded default: lorakit compare (all methods, MiniLM, movie reviews)
#   ./run.sh test   -> the whole test suite (fast tests, then the slow integration tests)
#   ./run.sh bench  -> the benchmarks
#   ./run.sh setup  -> only build the environment
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY="$VENV/bin/python"

setup() {
    local stamp="$VENV/.lorakit-stamp" want
    want=$(cat pyproject.toml run.sh | sha256sum | cut -d' ' -f1)
    if [[ -x "$PY" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    echo "[run.sh] building the environment in $VENV (once) ..." >&2
    [[ -x "$PY" ]] || python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    # Torch first, pinned to the CPU build on local disk, so nothing later re-resolves it to a CUDA build.
    "$PY" -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
    "$PY" -c "import torch" || { echo "[run.sh] torch failed to install" >&2; exit 1; }
    "$PY" -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
    "$PY" -c "import lorakit, transformers, peft, pytest" || { echo "[run.sh] dependencies failed to install" >&2; exit 1; }
    echo "$want" > "$stamp"
}

# Headless Chromium for the HTML-report test (Debian's package); skipped quietly where apt is unavailable.
ensure_chromium() {
    command -v chromium >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]] || return 0
    echo "[run.sh] installing Debian's chromium for the report test (once) ..." >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } ||
        { echo "[run.sh] could not install chromium, which the HTML report tests need" >&2; exit 1; }
}

cmd="${1:-main}"; shift || true
case "$cmd" in
    setup) setup ;;
    main)  setup; exec "$PY" -m lorakit.cli compare "$@" ;;
    quickstart) setup; exec "$PY" examples/quickstart.py "$@" ;;
    test)
        setup
        ensure_chromium
        "$PY" -m pytest -m "not slow" "$@"
        "$PY" -m pytest -m slow "$@" || [[ $? == 5 ]]
        ;;
    bench) setup; exec "$PY" benchmarks/run_all.py "$@" ;;
    *) echo "usage: ./run.sh [main|test|bench|setup|quickstart]" >&2; exit 2 ;;
esac
