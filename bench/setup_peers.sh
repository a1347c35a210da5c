#!/usr/bin/env bash
# Set up the Python "peers" used by bench/make_fixtures.py and bench/bench_peers.py:
# HF transformers on PyTorch (CPU) and llama.cpp through llama-cpp-python built from source.
#
#   bench/setup_peers.sh                # creates/updates the venv, prints its python
#   VENV=$(bench/setup_peers.sh --print-venv)
#
# Idempotent: re-running only installs what is missing or at another version.
# The venv lives at ${RECOMPOSE_HOME:-~/.cache/recompose}/peers-venv (override with PEERS_VENV).
# llama-cpp-python is compiled from its sdist with explicit SIMD flags (AVX2, AVX-512, VNNI) and AMX
# off: a native build on a Xeon whose flags list AMX, which the VM does not let programs use, dies
# with SIGILL. That takes ~10-20 minutes on 2 cores the first time. Set LLAMA_CMAKE_ARGS to change
# the CMake flags.
set -euo pipefail

RECOMPOSE_HOME="${RECOMPOSE_HOME:-$HOME/.cache/recompose}"
VENV="${PEERS_VENV:-$RECOMPOSE_HOME/peers-venv}"

if [[ "${1:-}" == "--print-venv" ]]; then
    echo "$VENV"
    exit 0
fi

# Versions known to work together here (Python 3.11, x86-64 Linux, CPU).
NUMPY_VERSION="2.4.4"
TORCH_VERSION="2.15.0"          # the default Linux wheel (pulls CUDA libraries; only the CPU is used)
TRANSFORMERS_VERSION="5.24.0"   # loads llama and gemma3 GGUFs with gguf_file=
TOKENIZERS_VERSION="0.23.3"
HF_HUB_VERSION="2.4.0"
SAFETENSORS_VERSION="0.8.0"
ACCELERATE_VERSION="1.15.0"     # transformers requires it to load a GGUF
GGUF_VERSION="0.19.0"
SENTENCEPIECE_VERSION="0.2.2"
PROTOBUF_VERSION="7.35.1"
PSUTIL_VERSION="7.2.2"
PEFT_VERSION="0.21.2"           # LoRA parity fixture and training benchmark
MATPLOTLIB_VERSION="3.11.2"     # the loss-curve plot
LLAMA_CPP_PYTHON_VERSION="0.3.36"

PYTHON="${PYTHON:-python3}"
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating venv at $VENV" >&2
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"


"$PY" -m pip install --quiet \
    "numpy==$NUMPY_VERSION" \
    "torch==$TORCH_VERSION" \
    "transformers==$TRANSFORMERS_VERSION" \
    "tokenizers==$TOKENIZERS_VERSION" \
    "huggingface_hub==$HF_HUB_VERSION" \
    "safetensors==$SAFETENSORS_VERSION" \
    "accelerate==$ACCELERATE_VERSION" \
    "gguf==$GGUF_VERSION" \
    "sentencepiece==$SENTENCEPIECE_VERSION" \
    "protobuf==$PROTOBUF_VERSION" \
    "psutil==$PSUTIL_VERSION" \
    "peft==$PEFT_VERSION" \
    "matplotlib==$MATPLOTLIB_VERSION"

# llama-cpp-python: always from source, explicit CPU flags, no GPU backends.
SIMD_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
have_llama="$("$PY" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)"
if [[ "$have_llama" != "$LLAMA_CPP_PYTHON_VERSION" ]]; then
    echo "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION from source (slow)" >&2
    CMAKE_ARGS="${LLAMA_CMAKE_ARGS:-$SIMD_FLAGS -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    FORCE_CMAKE=1 \
        "$PY" -m pip install --no-cache-dir --no-binary llama-cpp-python --verbose \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
fi

"$PY" - <<'PYEOF'
import importlib.metadata as m
for p in ["numpy", "torch", "transformers", "tokenizers", "huggingface_hub", "safetensors", "accelerate", "gguf", "sentencepiece", "protobuf", "psutil", "peft", "llama_cpp_python"]:
    print(f"{p}=={m.version(p)}")
import llama_cpp, torch, transformers, peft  # noqa: F401  (import check)
PYEOF
echo "peers venv ready: $PY" >&2
