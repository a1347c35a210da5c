#!/usr/bin/env bash
# Runs openai_client.py (the official `openai` package against a running server), installing the
# client first into a venv of its own: ${RECOMPOSE_HOME:-~/.cache/recompose}/openai-venv.
#
#   run_openai_client.sh BASE_URL MODEL [openai_client.py options]
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${RECOMPOSE_HOME:-$HOME/.cache/recompose}/openai-venv"
OPENAI_VERSION="3.57.0"
HTTPX_VERSION="0.28.1"
if ! "$VENV/bin/python" -c "import openai, httpx; assert openai.__version__ == '$OPENAI_VERSION'" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet "openai==$OPENAI_VERSION" "httpx==$HTTPX_VERSION" >&2
fi
exec "$VENV/bin/python" "$HERE/openai_client.py" "$@"
