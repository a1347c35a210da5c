#!/usr/bin/env bash
# Set up the Python side of the `recompose serve` tests and benchmarks:
#   1. a venv "serve-venv" with the official OpenAI client, httpx, numpy and psutil
#      (used by crates/recompose-serve/tests/python/openai_client.py and bench/serve/load.py);
#   2. llama.cpp's OpenAI-compatible server as a peer: the `[server]` extras of
#      llama-cpp-python, installed into the existing peers-venv (bench/setup_peers.sh
#      builds llama-cpp-python itself; this script never rebuilds it).
#
#   bench/serve/setup_serve_peers.sh                 # create/update, idempotent
#   VENV=$(bench/serve/setup_serve_peers.sh --print-venv)
#
# Venvs live under ${RECOMPOSE_HOME:-~/.cache/recompose} (override with SERVE_VENV / PEERS_VENV).
set -euo pipefail

RECOMPOSE_HOME="${RECOMPOSE_HOME:-$HOME/.cache/recompose}"
VENV="${SERVE_VENV:-$RECOMPOSE_HOME/serve-venv}"
PEERS_VENV="${PEERS_VENV:-$RECOMPOSE_HOME/peers-venv}"

if [[ "${1:-}" == "--print-venv" ]]; then
    echo "$VENV"
    exit 0
fi

# Client side (Python 3.11, x86-64 Linux).
OPENAI_VERSION="3.57.0"
HTTPX_VERSION="0.28.1"
NUMPY_VERSION="2.4.4"
PSUTIL_VERSION="7.2.2"
# llama_cpp.server dependencies (llama-cpp-python 0.3.36 `[server]` extra).
UVICORN_VERSION="0.54.0"
FASTAPI_VERSION="0.165.0"
SSE_STARLETTE_VERSION="3.7.0"
STARLETTE_CONTEXT_VERSION="0.3.6"   # llama-cpp-python requires <0.4
PYDANTIC_SETTINGS_VERSION="2.16.3"
PYYAML_VERSION="6.0.4"

PYTHON="${PYTHON:-python3}"
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating venv at $VENV" >&2
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet \
    "openai==$OPENAI_VERSION" \
    "httpx==$HTTPX_VERSION" \
    "numpy==$NUMPY_VERSION" \
    "psutil==$PSUTIL_VERSION"
"$VENV/bin/python" -c 'import openai, httpx, numpy, psutil; print("serve-venv: openai", openai.__version__, "httpx", httpx.__version__)'

# llama.cpp server peer.
if [[ ! -x "$PEERS_VENV/bin/python" ]] || ! "$PEERS_VENV/bin/python" -c 'import llama_cpp' 2>/dev/null; then
    echo "no llama-cpp-python in $PEERS_VENV: run bench/setup_peers.sh first (skipping llama.cpp server)" >&2
    exit 0
fi
"$PEERS_VENV/bin/python" -m pip install --quiet \
    "uvicorn==$UVICORN_VERSION" \
    "fastapi==$FASTAPI_VERSION" \
    "sse-starlette==$SSE_STARLETTE_VERSION" \
    "starlette-context==$STARLETTE_CONTEXT_VERSION" \
    "pydantic-settings==$PYDANTIC_SETTINGS_VERSION" \
    "PyYAML==$PYYAML_VERSION"
"$PEERS_VENV/bin/python" -c 'import llama_cpp.server.app, llama_cpp; print("peers-venv: llama_cpp", llama_cpp.__version__, "server ok")'

GGUF="$(ls "$RECOMPOSE_HOME"/smollm2-135m/*.gguf 2>/dev/null | head -n1 || true)"
echo "smollm2 gguf: ${GGUF:-<not found>}" >&2
echo "serve venv ready: $VENV/bin/python" >&2
