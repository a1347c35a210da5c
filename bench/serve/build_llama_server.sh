#!/usr/bin/env bash
# Build llama.cpp's own native `llama-server` and `llama-bench` (the peer of `recompose serve`)
# from the llama.cpp vendored in the llama-cpp-python 0.3.36 sdist (vendor/llama.cpp): the same
# llama.cpp that bench/setup_peers.sh builds into the Python peer, without the Python layer.
#
#   bench/serve/build_llama_server.sh               # build (idempotent: ~10 min on 2 cores)
#   BIN=$(bench/serve/build_llama_server.sh --print-bin)   # directory of the two binaries
#   SIMD=avx2 bench/serve/build_llama_server.sh     # pick the SIMD level (avx512 | avx2)
#
# SIMD defaults to avx512 when /proc/cpuinfo lists avx512f and avx512_vnni, else avx2. The
# flags are explicit (GGML_NATIVE=OFF) so the binary does not depend on what the build machine
# is: avx2 = SSE4.2 AVX AVX2 FMA F16C BMI2; avx512 = those + AVX512 (ggml's GGML_AVX512 is
# -mavx512f/cd/vl/dq/bw together; this ggml has no separate AVX512_BW option) + AVX512_VNNI.
# AVX512_VBMI, AVX512_BF16, AVX_VNNI and AMX (TILE/INT8/BF16; unusable inside these VMs) stay
# OFF. Static, Release, CPU only (no CUDA/Vulkan/Metal/BLAS), no HTTPS (LLAMA_OPENSSL=OFF), no
# web UI download (LLAMA_USE_PREBUILT_UI=OFF: the build must not need the network).
#
# Layout under ${RECOMPOSE_HOME:-~/.cache/recompose}/llama-server/:
#   dl/llama_cpp_python-0.3.36.tar.gz   the sdist (sha256 checked)
#   src/                                its unpacked tree
#   tools-venv/                         cmake + ninja from PyPI (wheels only)
#   build-$SIMD/bin/                    llama-server, llama-bench; build-$SIMD/recompose-flags.txt
#                                       records what they were built with (a rebuild is skipped
#                                       when the binaries exist and it matches)
set -euo pipefail

VERSION="0.3.36"
SDIST="llama_cpp_python-$VERSION.tar.gz"
SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CMAKE_VERSION="3.31.10"
NINJA_VERSION="1.13.0"
JOBS="${JOBS:-2}"

RECOMPOSE_HOME="${RECOMPOSE_HOME:-$HOME/.cache/recompose}"
ROOT="$RECOMPOSE_HOME/llama-server"

cpu_has() { grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | grep -qw "$1"; }
if [[ -z "${SIMD:-}" ]]; then
    if cpu_has avx512f && cpu_has avx512_vnni; then SIMD=avx512; else SIMD=avx2; fi
fi
case "$SIMD" in
    avx2)   AVX512=OFF ;;
    avx512) AVX512=ON ;;
    *) echo "SIMD must be avx512 or avx2, not '$SIMD'" >&2; exit 2 ;;
esac
BUILD="$ROOT/build-$SIMD"
BIN="$BUILD/bin"

if [[ "${1:-}" == "--print-bin" ]]; then
    echo "$BIN"
    exit 0
fi
[[ $# -eq 0 ]] || { echo "usage: $0 [--print-bin]" >&2; exit 2; }

FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_NATIVE=OFF
    -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
    -DGGML_AVX_VNNI=OFF
    -DGGML_AVX512="$AVX512" -DGGML_AVX512_VNNI="$AVX512"
    -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_BF16=OFF
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
    -DGGML_CPU=ON -DGGML_BACKEND_DL=OFF -DGGML_CPU_ALL_VARIANTS=OFF
    -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DGGML_RPC=OFF
    -DGGML_CCACHE=OFF
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON
)
STAMP="llama-cpp-python $VERSION sha256 $SDIST_SHA256 cmake $CMAKE_VERSION ninja $NINJA_VERSION SIMD $SIMD ${FLAGS[*]}"

if [[ -x "$BIN/llama-server" && -x "$BIN/llama-bench" && -f "$BUILD/recompose-flags.txt" ]] \
    && [[ "$(cat "$BUILD/recompose-flags.txt")" == "$STAMP" ]]; then
    echo "llama-server ($SIMD) up to date in $BIN" >&2
    exit 0
fi

mkdir -p "$ROOT/dl"
PYTHON="${PYTHON:-python3}"

# cmake and ninja from PyPI, wheels only (never build cmake itself from source).
TOOLS="$ROOT/tools-venv"
if [[ ! -x "$TOOLS/bin/cmake" ]] || [[ "$("$TOOLS/bin/cmake" --version | head -n1)" != "cmake version $CMAKE_VERSION" ]] \
    || [[ "$("$TOOLS/bin/ninja" --version)" != "$NINJA_VERSION" ]]; then
    [[ -x "$TOOLS/bin/python" ]] || "$PYTHON" -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install --quiet --only-binary :all: \
        "cmake==$CMAKE_VERSION" "ninja==$NINJA_VERSION"
fi

sha_ok() { [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$SDIST_SHA256" ]]; }

# The sdist. `--no-binary llama-cpp-python` (rather than `:all:`) so that pip may use wheels
# for the build backend it runs to read the sdist's metadata: with `:all:` it compiles cmake
# from source first (more than 10 minutes on 2 cores).
if ! sha_ok "$ROOT/dl/$SDIST"; then
    rm -f "$ROOT/dl/$SDIST"
    tmp="$(mktemp -d "$ROOT/dl/tmp.XXXXXX")"
    "$TOOLS/bin/python" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
        -d "$tmp" "llama-cpp-python==$VERSION"
    if ! sha_ok "$tmp/$SDIST"; then
        echo "sha256 of the downloaded $SDIST is $(sha256sum "$tmp/$SDIST" 2>/dev/null | cut -d' ' -f1), expected $SDIST_SHA256" >&2
        rm -rf "$tmp"; exit 1
    fi
    mv "$tmp/$SDIST" "$ROOT/dl/$SDIST"
    rm -rf "$tmp"
fi

SRC="$ROOT/src"
if [[ ! -f "$SRC/.sdist-sha256" ]] || [[ "$(cat "$SRC/.sdist-sha256")" != "$SDIST_SHA256" ]]; then
    rm -rf "$SRC" "$SRC.tmp"
    mkdir -p "$SRC.tmp"
    tar -xzf "$ROOT/dl/$SDIST" -C "$SRC.tmp" --strip-components=1
    echo "$SDIST_SHA256" > "$SRC.tmp/.sdist-sha256"
    mv "$SRC.tmp" "$SRC"
fi
LLAMA="$SRC/vendor/llama.cpp"
[[ -f "$LLAMA/CMakeLists.txt" ]] || { echo "no vendor/llama.cpp in $SDIST" >&2; exit 1; }

echo "building llama-server + llama-bench ($SIMD, -j$JOBS) in $BUILD" >&2
start=$SECONDS
rm -f "$BUILD/recompose-flags.txt"
rm -f "$BUILD/CMakeCache.txt"   # flags changed or first build: configure from scratch
PATH="$TOOLS/bin:$PATH" cmake -S "$LLAMA" -B "$BUILD" -G Ninja \
    -DCMAKE_MAKE_PROGRAM="$TOOLS/bin/ninja" "${FLAGS[@]}" > "$ROOT/configure-$SIMD.log" 2>&1 \
    || { tail -n 40 "$ROOT/configure-$SIMD.log" >&2; exit 1; }
PATH="$TOOLS/bin:$PATH" cmake --build "$BUILD" --target llama-server llama-bench -j "$JOBS"
echo "$STAMP" > "$BUILD/recompose-flags.txt"
echo "built in $(( SECONDS - start )) s: $BIN" >&2
"$BIN/llama-server" --version
