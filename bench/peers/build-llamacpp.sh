#!/usr/bin/env bash
# llama.cpp for the decode rows of run.py, from package registries only: the llama.cpp
# source vendored in the PyPI sdist of llama-cpp-python 0.3.36 (llama.cpp 0c1e570, ggml
# 0.25.3), built with cmake and ninja from PyPI (requirements-llama.txt), `-march=native`
# (GGML_NATIVE: AVX-512 and VNNI where the CPU has them). Then the Q8_0 variant of the
# SmolLM2 GGUF (requantized from its Q4_1: the original weights are not on a registry).
#
#   bash bench/peers/build-llamacpp.sh            # ~9 min on 2 cores; everything under $DIR
#
# DIR defaults to /tmp/covey-peers/llama (run.py's --llama default); GGUF to the file
# scripts/fetch-smollm2.sh fetches.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${COVEY_PEERS_LLAMA:-/tmp/covey-peers/llama}
GGUF=${GGUF:-$ROOT/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
VERSION=0.3.36
[ -f "$GGUF" ] || { echo "$GGUF not found: run scripts/fetch-smollm2.sh" >&2; exit 1; }
mkdir -p "$DIR/sdist"
[ -x "$DIR/venv/bin/python" ] || python3 -m venv "$DIR/venv"
"$DIR/venv/bin/pip" install -q -r "$ROOT/bench/peers/requirements-llama.txt"
export PATH="$DIR/venv/bin:$PATH"
# --no-deps, and not --no-binary :all: (that would build cmake itself from source).
[ -f "$DIR/sdist/llama_cpp_python-$VERSION.tar.gz" ] ||
  pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d "$DIR/sdist"
[ -d "$DIR/sdist/llama_cpp_python-$VERSION" ] || tar xzf "$DIR/sdist/llama_cpp_python-$VERSION.tar.gz" -C "$DIR/sdist"
cmake -S "$DIR/sdist/llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$DIR/build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF > "$DIR/cmake.log"
ninja -C "$DIR/build" -j"$(nproc)" llama-bench llama-quantize > "$DIR/ninja.log"
Q8="$DIR/SmolLM2-135M-Instruct.Q8_0.gguf"
[ -f "$Q8" ] || LD_LIBRARY_PATH="$DIR/build/bin" "$DIR/build/bin/llama-quantize" --allow-requantize "$GGUF" "$Q8" Q8_0 > "$DIR/quantize.log" 2>&1
echo "llama.cpp: $DIR/build/bin/llama-bench; Q8_0 GGUF: $Q8"
