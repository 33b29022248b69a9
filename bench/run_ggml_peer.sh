#!/usr/bin/env bash
# Build and run the llama.cpp (ggml) peer benchmark, bench/ggml_peer.c.
#
# Needs ggml's headers and shared libraries; NOT a dependency of mllama-q.
#   GGML_INC  ggml include dir   (default: llama-cpp-python 0.3.36 sdist, fetched
#             with `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`)
#   GGML_LIB  dir with libggml.so, libggml-base.so, libggml-cpu.so
#             (default: the lib/ dir of a llama_cpp package importable by $PYTHON or python3)
#   LLSRC     where the sdist is unpacked (default: build-bench/llsrc, git-ignored)
# Usage: bench/run_ggml_peer.sh [ggml_peer options: --threads 2 --types q4_k --shapes 4096x4096 --m 1,512]
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${LLSRC:-build-bench/llsrc}
if [ -z "${GGML_INC:-}" ]; then
  if [ ! -d "$SRC/llama_cpp_python-0.3.36" ]; then
    mkdir -p "$SRC"
    ${PIP:-pip} download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$SRC" >&2
    tar xzf "$SRC"/llama_cpp_python-0.3.36.tar.gz -C "$SRC"
  fi
  GGML_INC="$SRC/llama_cpp_python-0.3.36/vendor/llama.cpp/ggml/include"
fi
if [ -z "${GGML_LIB:-}" ]; then
  GGML_LIB=$(${PYTHON:-python3} -c 'import importlib.util as u, os; s = u.find_spec("llama_cpp")
print(os.path.join(os.path.dirname(s.origin), "lib") if s and s.origin else "")')
  if [ -z "$GGML_LIB" ]; then
    echo "run_ggml_peer.sh: set GGML_LIB to the directory of libggml*.so (or install llama-cpp-python)" >&2
    exit 2
  fi
fi
OUT=${OUT_DIR:-build-bench}
mkdir -p "$OUT"
BIN="$OUT/ggml_peer_$(echo "$GGML_LIB" | md5sum | cut -c1-8)"
if [ ! -x "$BIN" ] || [ bench/ggml_peer.c -nt "$BIN" ]; then
  ${CC:-cc} -O2 -std=c11 bench/ggml_peer.c -I"$GGML_INC" -L"$GGML_LIB" -lggml -lggml-base -lggml-cpu \
    -Wl,-rpath,"$GGML_LIB" -lm -o "$BIN"
fi
exec "$BIN" "$@"
