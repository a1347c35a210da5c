#!/usr/bin/env bash
# Set up the reference implementation for `recompose merge`: mergekit (CPU, PyTorch) in its own venv.
#
#   bench/merge/setup_mergekit.sh                 # creates/updates the venv
#   VENV=$(bench/merge/setup_mergekit.sh --print-venv)
#
# Idempotent: re-running only installs what is missing or at another version.
# The venv lives at ${RECOMPOSE_HOME:-~/.cache/recompose}/mergekit-venv (override with MERGEKIT_VENV).
#
# PyTorch is large (the default Linux wheel pulls the CUDA libraries; only the CPU is used). If the
# peers venv of bench/setup_peers.sh already holds the pinned torch/transformers, this venv reuses
# them through a .pth path entry instead of downloading them again (its own site-packages still come
# first). Set MERGEKIT_REUSE_VENV=none to always install torch into this venv, or to another venv
# path to reuse that one. PIP_INDEX_URL / PIP_EXTRA_INDEX_URL are honoured by pip as usual.
set -euo pipefail

RECOMPOSE_HOME="${RECOMPOSE_HOME:-$HOME/.cache/recompose}"
VENV="${MERGEKIT_VENV:-$RECOMPOSE_HOME/mergekit-venv}"

if [[ "${1:-}" == "--print-venv" ]]; then
    echo "$VENV"
    exit 0
fi

# Pinned versions (Python 3.11, x86-64 Linux, CPU). 0.1.5 is the newest mergekit release.
MERGEKIT_VERSION="0.1.5"
TORCH_VERSION="2.15.0"
TRANSFORMERS_VERSION="5.24.0"
TOKENIZERS_VERSION="0.23.3"
SAFETENSORS_VERSION="0.8.0"
NUMPY_VERSION="2.4.4"
ACCELERATE_VERSION="1.15.0"
PSUTIL_VERSION="7.2.2"
PYYAML_VERSION="6.0.4"
GGUF_VERSION="0.19.0"            # for bench/merge/speed.sh (GGUF -> HF dequantisation)
PEFT_VERSION="0.21.2"
SCIPY_VERSION="1.17.1"
DATASETS_VERSION="5.2.0"
IMMUTABLES_VERSION="0.21"

PYTHON="${PYTHON:-python3}"
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating venv at $VENV" >&2
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

# Optionally reuse torch & co. from another venv with the same Python and the same torch pin.
REUSE="${MERGEKIT_REUSE_VENV:-$RECOMPOSE_HOME/peers-venv}"
rm -f "$SITE/_recompose_reuse.pth"
if [[ "$REUSE" != "none" && -x "$REUSE/bin/python" ]]; then
    reuse_site="$("$REUSE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    reuse_torch="$("$REUSE/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)"
    if [[ "${reuse_torch%%+*}" == "$TORCH_VERSION" && "$("$REUSE/bin/python" -V)" == "$("$PY" -V)" ]]; then
        echo "reusing torch $reuse_torch from $reuse_site" >&2
        echo "$reuse_site" > "$SITE/_recompose_reuse.pth"
    fi
fi

"$PY" -m pip install --quiet \
    "mergekit==$MERGEKIT_VERSION" \
    "torch==$TORCH_VERSION" \
    "transformers==$TRANSFORMERS_VERSION" \
    "tokenizers==$TOKENIZERS_VERSION" \
    "safetensors==$SAFETENSORS_VERSION" \
    "numpy==$NUMPY_VERSION" \
    "accelerate==$ACCELERATE_VERSION" \
    "psutil==$PSUTIL_VERSION" \
    "pyyaml==$PYYAML_VERSION" \
    "gguf==$GGUF_VERSION" \
    "peft==$PEFT_VERSION" \
    "scipy==$SCIPY_VERSION" \
    "datasets==$DATASETS_VERSION" \
    "immutables==$IMMUTABLES_VERSION"

"$PY" - <<'PYEOF'
import importlib.metadata as m
for p in ["mergekit", "torch", "transformers", "tokenizers", "safetensors", "numpy", "accelerate",
          "psutil", "pyyaml", "gguf", "peft"]:
    print(f"{p}=={m.version(p)}")
import mergekit.merge, torch, yaml  # noqa: F401  (import check)
PYEOF
test -x "$VENV/bin/mergekit-yaml"
echo "mergekit venv ready: $VENV/bin/mergekit-yaml" >&2
