#!/usr/bin/env bash
# One command for a session that has a GPU: build the CUDA backend, check it,
# test it against the CPU backend, and benchmark its kernels. Writes everything
# under $OUT (the device tool brings $OUT back) and prints a short summary last.
#
#   bench/cuda_device_run.sh [steps...]     steps: build ptxas test sanitize ceil bench (default: all
#                                            but sanitize)
#
# Prerequisites on the device machine (CUDA 13, PyTorch, pybind11,
# scikit-build-core, CMake; no internet): pytest and gguf may be missing there,
# so carry pure-Python wheels; on the dev machine, in the repository root:
#   python -m pip download gguf pytest pluggy iniconfig packaging \
#       exceptiongroup typing_extensions --no-deps -d .whl
#   python -m pip download tomli --no-deps -d .whl --only-binary=:all: \
#       --platform any --python-version 3.10 --implementation py
# and pass carry=[".whl"] to the device tool (.whl/ is git-ignored, ~1 MB).
#
# Build: the extension with -DMLLAMA_Q_CUDA=ON -DMLLAMA_Q_CUDA_ARCHS=90 into
# build-gpu/ (the steps of tools/dev_build.sh, copied into mllama_q/), and the
# standalone kernel benchmark bench/cuda_kernel_bench.cu with nvcc. Between
# calls on a warm machine build-gpu/ and mllama_q/_core*.so are kept, so later
# steps (test, bench) need no rebuild; on a fresh machine run `build` again.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
ARCH=${MLLAMA_Q_CUDA_ARCHS:-90}
STEPS=${*:-build ptxas test ceil bench}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
has() { [[ " $STEPS " == *" $1 "* ]]; }

note "== $(date -u +%FT%TZ) steps: $STEPS"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
note "gpu: $(tail -n +2 "$OUT/gpu.csv" | head -1)"
nvcc --version | tail -1 >> "$SUMMARY"

# pytest and gguf from carried pure-Python wheels (.whl/, see above) when the image
# lacks them; numpy and torch are on the image. gguf needs pyyaml at import;
# without a working gguf, tests/test_backend_ops.py takes its reference dequantization
# from mllama_q.quants (tied to gguf-py by test_quants.py).
if ! $PY -c "import pytest, gguf" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  for w in .whl/*.whl; do   # one by one: a wheel the image already has (or cannot use) must not block the rest
    PIP_BREAK_SYSTEM_PACKAGES=1 $PY -m pip install -q --no-index --no-deps "$w" >> "$OUT/pip_wheels.log" 2>&1 || echo "skip $w" >> "$OUT/pip_wheels.log"
  done
fi
$PY -c "import pytest" 2>/dev/null || note "WARNING: pytest not importable (carry .whl/): the test step cannot run"
$PY -c "import gguf" 2>/dev/null || note "NOTE: gguf not importable: references use mllama_q.quants.dequantize"

if has build; then
  t0=$(date +%s)
  # tools/dev_build.sh's steps, without assuming ninja is installed on the device image
  GEN=""; command -v ninja >/dev/null 2>&1 && GEN="-G Ninja"
  { cmake -S . -B build-gpu $GEN -DCMAKE_BUILD_TYPE=Release -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" \
      -DPython_EXECUTABLE="$(command -v $PY)" -DMLLAMA_Q_CUDA=ON -DMLLAMA_Q_CUDA_ARCHS="$ARCH" \
    && cmake --build build-gpu -j"$(nproc)" && cp build-gpu/_core*.so mllama_q/; } > "$OUT/build.log" 2>&1
  rc=$?
  note "build extension (sm_$ARCH): rc=$rc in $(( $(date +%s) - t0 )) s"
  [ $rc -eq 0 ] || { tail -30 "$OUT/build.log"; exit 1; }
  t0=$(date +%s)
  nvcc -O3 --use_fast_math -std=c++17 -arch=sm_$ARCH -lineinfo -Icsrc --threads 0 bench/cuda_kernel_bench.cu \
    csrc/cuda/cuda_backend.cu csrc/cuda/kernels_*.cu csrc/cuda/cuda_sampling.cu csrc/common/formats.cpp csrc/common/env.cpp \
    -o build-gpu/cuda_kernel_bench > "$OUT/build_bench.log" 2>&1
  note "build cuda_kernel_bench: rc=$? in $(( $(date +%s) - t0 )) s"
  $PY -c "import mllama_q, json; print(json.dumps(mllama_q.backends()['cuda']))" 2>&1 | tee -a "$SUMMARY"
fi

if has ptxas; then
  # Register / spill / shared-memory report and a check that the GEMM uses the tensor cores (HMMA in SASS).
  for f in kernels_mmv kernels_gemm kernels_attention kernels_ops cuda_sampling; do
    nvcc -O3 --use_fast_math -std=c++17 -arch=sm_$ARCH -Icsrc -Xptxas -v -c csrc/cuda/$f.cu -o "$OUT/$f.o" 2>&1 \
      | grep -E "Compiling entry|registers|spill" | sed 's/ptxas info    : //'
  done > "$OUT/ptxas.txt" 2>&1
  cuobjdump -sass "$OUT/kernels_gemm.o" > "$OUT/gemm.sass" 2>/dev/null
  note "gemm SASS: $(grep -c HMMA "$OUT/gemm.sass") HMMA, $(grep -c 'LDL\|STL' "$OUT/gemm.sass") local-memory ops"
  cuobjdump -sass "$OUT/kernels_mmv.o" > "$OUT/mmv.sass" 2>/dev/null
  note "mmv SASS: $(grep -c IDP "$OUT/mmv.sass") IDP (dp4a), $(grep -c 'LDG.E.128\|LDG.E.CONSTANT.128\|LDG.E.128.CONSTANT' "$OUT/mmv.sass") 16-byte loads"
  rm -f "$OUT"/*.o
fi

if has test; then
  # Every CUDA op vs float64 references and the CPU backend (outputs NaN-poisoned).
  t0=$(date +%s)
  XDIST=""; $PY -c "import xdist" 2>/dev/null && XDIST="-n 4"
  MLLAMA_Q_CUDA_POISON=1 PYTHONPATH=. timeout 540 $PY -m pytest -q -rs $XDIST tests/test_backend_ops.py -k cuda \
    --junitxml="$OUT/test_cuda.xml" > "$OUT/test_cuda.log" 2>&1
  note "tests/test_backend_ops.py -k cuda: rc=$? in $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/test_cuda.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/test_cuda.log" | head -20 | tee -a "$SUMMARY"
fi

if has sanitize; then
  # Out-of-bounds / race checks on a small subset (slow under the sanitizer).
  PYTHONPATH=. timeout 500 compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -q -x tests/test_backend_ops.py \
    -k "cuda and (attention or get_rows or rms_norm or (matmul_vs and 1024-200 and (-1- or -7-)))" > "$OUT/memcheck.log" 2>&1
  note "compute-sanitizer memcheck: rc=$? ($(grep -c 'Invalid' "$OUT/memcheck.log") invalid accesses)"
  PYTHONPATH=. timeout 300 compute-sanitizer --tool racecheck --error-exitcode 9 $PY -m pytest -q -x tests/test_backend_ops.py \
    -k "cuda and matmul_vs and 256-64 and -64-" > "$OUT/racecheck.log" 2>&1
  note "compute-sanitizer racecheck (gemm): rc=$?"
fi

if has ceil; then
  # The two ceilings (METHOD.md): device-to-device copy bandwidth and a library f16 GEMM, through torch.
  $PY - > "$OUT/ceilings.txt" 2>&1 <<'EOF'
import torch
dev = torch.device("cuda")
def bench(fn, reps=20):
    for _ in range(3): fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(7):
        s.record()
        for _ in range(reps): fn()
        e.record(); e.synchronize()
        ts.append(s.elapsed_time(e) / reps / 1e3)
    return sorted(ts)[3]
n = 1 << 28  # 1 GiB of float32
a = torch.randn(n, device=dev); b = torch.empty_like(a)
t = bench(lambda: b.copy_(a))
print(f"torch d2d copy: {2 * a.numel() * 4 / t / 1e9:.0f} GB/s (read + write)")
for m, k, nn in [(512, 4096, 4096), (6432, 1280, 5120), (8192, 8192, 8192)]:
    x = torch.randn(m, k, device=dev, dtype=torch.float16); w = torch.randn(nn, k, device=dev, dtype=torch.float16)
    t = bench(lambda: x @ w.T)
    print(f"torch f16 GEMM {m}x{nn}x{k}: {2 * m * nn * k / t / 1e12:.1f} TFLOP/s")
EOF
  cat "$OUT/ceilings.txt" | tee -a "$SUMMARY"
fi

if has bench; then
  timeout 400 build-gpu/cuda_kernel_bench --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1
  note "cuda_kernel_bench: rc=$?"
  cat "$OUT/bench.txt" >> "$SUMMARY"
fi

echo
echo "===================== summary ($OUT/summary.txt) ====================="
cat "$SUMMARY"
