#!/usr/bin/env bash
# Developer build: compiles mllama_q._core into ./build-dev and copies it into
# ./mllama_q so that `PYTHONPATH=. python ...` imports the fresh module. Also links
# mllama_q/convert -> ../convert (git-ignored), the path the wheel installs the
# converter at (pyproject.toml [tool.scikit-build.wheel.packages]).
# Usage: tools/dev_build.sh [extra cmake -D options], e.g. -DMLLAMA_Q_CUDA=OFF
# NO_COPY=1: build only (a compile check, e.g. BUILD_DIR=build-cuda ... -DMLLAMA_Q_CUDA=ON).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=${BUILD_DIR:-build-dev}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v $PY)" "$@" >/dev/null
cmake --build "$BUILD" -j"${JOBS:-2}"
[ -n "${NO_COPY:-}" ] && { echo "built $(ls "$BUILD"/_core*.so) (not copied: NO_COPY)"; exit 0; }
# Copy then rename: processes that have the old module mapped (a test run) keep its
# inode; copying over it in place would change the code under them (SIGBUS / crashes).
for so in "$BUILD"/_core*.so; do
  tmp=$(mktemp "mllama_q/.$(basename "$so").XXXXXX")
  cp "$so" "$tmp" && mv -f "$tmp" "mllama_q/$(basename "$so")"
done
[ -e mllama_q/convert ] || ln -s ../convert mllama_q/convert
echo "built $(ls mllama_q/_core*.so)"
