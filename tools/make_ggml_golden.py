#!/usr/bin/env python3
"""Golden bytes from ggml itself for tests/test_quants.py.

CI cannot build llama.cpp (~10 min), so this script is run ONCE by a developer
with a llama.cpp build at hand and its output committed:

    python tools/make_ggml_golden.py [--lib path/to/libggml-base.so]

It writes tests/data/ggml_golden.npz holding, per type, the bytes ggml's
`ggml_quantize_chunk` (no importance matrix: for q8_0 / q4_K / q6_K that is
quantize_row_*_ref; for f16 ggml_fp32_to_fp16_row; for bf16
ggml_fp32_to_bf16_row_ref; for the activation format q8_K, which
ggml_quantize_chunk does not handle, quantize_row_q8_K_ref) writes for the rows `make_rows(type, GOLDEN_SEED,
GOLDEN_RANDOM_ROWS[type])` returns, and a sha256 of those input rows.

The input rows are NOT stored: they are regenerated from the seed. To keep
them identical across numpy versions and platforms, they are built only from
the raw PCG64 stream (`bit_generator.random_raw`, stable by numpy's policy)
and exactly rounded IEEE operations (+, -, *, /, casts); no transcendental
functions, no Generator distribution methods (whose streams may change).
The test checks the stored sha256 first, so a drift in inputs is reported as
such, not as a quantizer mismatch.

The ggml library is found, in order: --lib, $MLLAMA_Q_GGML_LIB, the lib/ of a
llama_cpp package importable by this Python (the golden data came from
llama-cpp-python 0.3.36 built from source with GGML_NATIVE=OFF). It is never a
dependency of mllama-q.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GOLDEN_PATH = ROOT / "tests" / "data" / "ggml_golden.npz"
GOLDEN_SEED = 20261122
# random rows per type (plus all adversarial rows); f16/bf16 rows are 512 bytes each
GOLDEN_RANDOM_ROWS = {"q8_0": 1000, "q4_k": 1000, "q6_k": 1000, "f16": 300, "bf16": 300, "q8_k": 300}
COLS = 256  # values per row: one K-quant super-block, 8 q8_0 blocks

# ggml's enum ggml_type ids (ggml.h), which GGUF stores on disk.
GGML_TYPE_ID = {"f16": 1, "q8_0": 8, "q4_k": 12, "q6_k": 14, "q8_k": 15, "bf16": 30}
# q8_k is the activation format of the K-quant dot products (never stored in files).
TYPES = ("q8_0", "q4_k", "q6_k", "f16", "bf16", "q8_k")

F32_MAX = float(np.finfo(np.float32).max)


# --------------------------------------------------------------------- inputs
class _Stream:
    """Uniform and Irwin-Hall values from the raw PCG64 stream (exact ops only)."""

    def __init__(self, seed: int):
        self.bg = np.random.default_rng(seed).bit_generator

    def raw(self, n: int) -> np.ndarray:
        return self.bg.random_raw(n)  # uint64, stable across numpy versions

    def uniform(self, n: int) -> np.ndarray:
        """float64 in [0, 1): the top 53 bits of each raw draw."""
        return (self.raw(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def normalish(self, n: int) -> np.ndarray:
        """Irwin-Hall(4), centred and scaled to unit variance: bell-shaped, |x| < 3.47."""
        u = self.uniform(4 * n).reshape(4, n)
        return (u[0] + u[1] + u[2] + u[3] - 2.0) * 1.7320508075688772

    def ints(self, n: int, lo: int, hi: int) -> np.ndarray:
        """Integers in [lo, hi) (modulo bias irrelevant here)."""
        return (self.raw(n) % np.uint64(hi - lo)).astype(np.int64) + lo


def _f32(a) -> np.ndarray:
    with np.errstate(over="ignore"):  # float64 -> float32 may round up to inf on purpose (f16 edge rows)
        return np.asarray(a, dtype=np.float64).astype(np.float32)


def adversarial_rows(qtype: str) -> list[tuple[str, np.ndarray]]:
    """Fixed hard cases, each a float32 row of COLS values."""
    n = COLS
    i = np.arange(n, dtype=np.float64)
    rows: list[tuple[str, np.ndarray]] = []

    def add(label, values):
        rows.append((label, _f32(np.broadcast_to(values, (n,)))))

    add("zeros", 0.0)
    add("negative zeros", -0.0)
    for c in (1.0, -1.0, 0.5, -3e5, 1e-20, 7.0, -0.1):
        add(f"constant {c:g}", c)
    for pos in (0, 17, 255):
        for v in (1.0, -1.0, 1e30, -2.5e-7):
            r = np.zeros(n)
            r[pos] = v
            add(f"spike {v:g} at {pos}", r)
    r = np.zeros(n)
    r[100] = 1e-45
    add("single min subnormal", r)
    add("alternating +-1", np.where(i % 2 == 0, 1.0, -1.0))
    add("alternating +-i", np.where(i % 2 == 0, i, -i))
    add("ramp -32..31.75", i * 0.25 - 32.0)
    add("ramp 0..255", i)
    add("ramp -255..0", -i)
    # Ties: values exactly halfway between quantization levels.
    add("half-integers, max 127", np.where(i == 0, 127.0, (i % 64) - 31.5))  # q8_0: d = 1 exactly
    add("half-integers, max -127", np.where(i == 5, -127.0, 0.5 - (i % 50)))
    add("half-integers 0..15.5", (i % 32) * 0.5)  # q4_K grid ties
    add("half-integers -32..31.5", (i % 128) * 0.5 - 32.0)  # q6_K grid ties
    add("quarter grid", (i % 17) * 0.25 - 2.0)
    add("two levels", np.where(i % 3 == 0, 2.0, 1.0))
    add("two levels negative", np.where(i % 3 == 0, -2.0, -1.0))
    # Magnitudes: huge (x^2 overflows to inf inside the K-quant searches), near
    # float max, near float max / 127, tiny, subnormal, and mixtures.
    sign = np.where((i * 7) % 5 < 2, -1.0, 1.0)
    frac = ((i * 37) % 101) / 101.0 + 0.01
    for s in (1e30, -1e30, 1e36, F32_MAX / 127, F32_MAX):
        add(f"huge {s:g}", s * sign * frac)
    add("float max constant", F32_MAX)
    add("minus float max constant", -F32_MAX)
    add("float max spike", np.where(i == 3, F32_MAX, frac))
    for s in (1e-30, 1e-38, 1e-40, 1e-44):
        add(f"tiny {s:g}", s * sign * frac)
    add("huge among tiny", np.where(i == 77, 1e30, 1e-30 * sign * frac))
    add("tiny with zeros", np.where(i % 2 == 0, 0.0, 1e-38 * sign * frac))  # q8_0: 0 * (id = inf) = NaN
    for s in (3.6e-37, 3.8e-37):  # q8_0: id = 1/d near float max
        add(f"near id overflow {s:g}", np.where(i % 32 == 0, s, s * sign * frac))
    add("tiny among ones", np.where(i % 9 == 0, 1e-30, sign * frac))
    # Scale fields at the edges of fp16: d overflows (inf) or becomes subnormal / 0.
    for s in (8.4e6, 1e8, 1e12, 1e-5, 1e-7, 1e-9):
        add(f"fp16 scale edge {s:g}", s * sign * frac)
    # Sub-blocks whose magnitudes differ so much that some 6-bit scales round to 0.
    add("sub-block magnitudes 10^-k", sign * frac * 10.0 ** -(i // 32))
    add("sub-block magnitudes 4^-k", sign * frac * 4.0 ** -(i // 16))
    add("one large sub-block", np.where(i // 32 == 5, 100.0, 1e-3) * sign * frac)
    add("positive only", frac)
    add("negative only", -frac)
    add("positive with offset", 10.0 + frac)
    return rows


def f16_special_rows() -> list[tuple[str, np.ndarray]]:
    """f16 / bf16 conversion edge cases (inf, nan, overflow, subnormals, ties)."""
    u32 = lambda a: np.asarray(a, dtype=np.uint32).view(np.float32)  # noqa: E731
    specials = [
        0.0,
        -0.0,
        np.inf,
        -np.inf,
        1.0,
        -1.0,
        65504.0,
        -65504.0,
        65519.99,
        65520.0,
        -65520.0,
        1e5,
        3e38,
        -3e38,
        2.0**-14,
        2.0**-24,
        2.0**-25,
        3 * 2.0**-26,
        2.0**-25 + 2.0**-40,
        3 * 2.0**-25,
        5 * 2.0**-25,
        2.0**-14 - 2.0**-25,
        6.1e-5,
        1e-8,
        1e-40,
        1e-45,
        -1e-45,
        1 + 2.0**-11,
        1 + 3 * 2.0**-11,
        1 + 2.0**-11 + 2.0**-23,
        -(1 + 2.0**-11),  # f16 ties
        1 + 2.0**-8,
        1 + 3 * 2.0**-8,
        1 + 2.0**-8 + 2.0**-23,
        -(1 + 3 * 2.0**-8),  # bf16 ties
        float(np.finfo(np.float32).max),
        float(np.finfo(np.float32).tiny),
    ]
    nan_bits = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FC0FFFF, 0x7F80FFFF, 0x7FFFFFFF]
    bf16_edge = [0x7F7F8000, 0x7F7FFFFF, 0x3F808000, 0x3F818000, 0x00008000, 0x80018000]
    row = np.zeros(COLS, dtype=np.float32)
    vals = np.concatenate([_f32(specials), u32(nan_bits), u32(bf16_edge)])
    row[: len(vals)] = vals
    rows = [("f16/bf16 specials", row)]
    # Every f16 tie pattern near the subnormal/normal boundary and in [1, 2).
    k = np.arange(COLS, dtype=np.float64)
    rows.append(("f16 subnormal ties", _f32((2 * k + 1) * 2.0**-25)))
    rows.append(("f16 ties in [1,2)", _f32(1.0 + (2 * k + 1) * 2.0**-11)))
    rows.append(("f16 ties near 65504", _f32(65504.0 - (2 * k + 1) * 8.0 / (1 + k % 4))))
    rows.append(("bf16 ties in [1,2)", _f32(1.0 + (2 * k + 1) * 2.0**-8)))
    return rows


def random_rows(qtype: str, seed: int, count: int) -> list[tuple[str, np.ndarray]]:
    """`count` random rows from several families and magnitudes."""
    st = _Stream(seed)
    rows: list[tuple[str, np.ndarray]] = []
    if qtype in ("f16", "bf16"):
        # Raw bit patterns (all floats, NaNs included) and values around the f16 range.
        fams = ("bits", "normal")
    else:
        fams = ("normal", "uniform+", "uniform-", "outliers", "sparse", "offset", "grid", "subblock-scales")
    scales = (1e-6, 1e-3, 0.02, 1.0, 30.0, 1e3, 1e6)
    for r in range(count):
        fam = fams[r % len(fams)]
        scale = scales[(r // len(fams)) % len(scales)]
        if fam == "bits":
            v = st.raw(COLS).astype(np.uint32).view(np.float32)
            rows.append((f"random bits #{r}", v))
            continue
        g = st.normalish(COLS)
        if fam == "uniform+":
            g = st.uniform(COLS) * 2.0
        elif fam == "uniform-":
            g = st.uniform(COLS) * -2.0
        elif fam == "outliers":
            g = np.where(st.uniform(COLS) < 0.02, g * 40.0, g)
        elif fam == "sparse":
            g = np.where(st.uniform(COLS) < 0.9, 0.0, g)
        elif fam == "offset":
            g = g + 3.0
        elif fam == "grid":  # multiples of 1/4: many rounding ties
            g = st.ints(COLS, -64, 64) * 0.25
        elif fam == "subblock-scales":
            g = g * (2.0 ** -st.ints(COLS // 16, 0, 12).astype(np.float64)).repeat(16)
        rows.append((f"random {fam} x{scale:g} #{r}", _f32(g * scale)))
    return rows


def make_rows(qtype: str, seed: int, n_random: int) -> tuple[np.ndarray, list[str]]:
    """All test rows for `qtype`: float32 [n_rows, COLS] and a label per row."""
    cases = adversarial_rows(qtype)
    if qtype in ("f16", "bf16"):
        cases += f16_special_rows()
    cases += random_rows(qtype, seed + GGML_TYPE_ID[qtype], n_random)
    x = np.stack([c[1] for c in cases]).astype(np.float32)
    return np.ascontiguousarray(x), [c[0] for c in cases]


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# --------------------------------------------------------------------- ggml
def find_ggml_lib(path: str | None = None) -> str:
    """--lib, else $MLLAMA_Q_GGML_LIB, else the libggml-base.so of a llama_cpp package
    (llama-cpp-python) importable by this Python."""
    cands = [path, os.environ.get("MLLAMA_Q_GGML_LIB")]
    spec = importlib.util.find_spec("llama_cpp")
    if spec is not None and spec.origin:
        cands.append(os.path.join(os.path.dirname(spec.origin), "lib", "libggml-base.so"))
    for c in cands:
        if c and os.path.exists(c):
            return c
    raise FileNotFoundError(
        "libggml-base.so not found: pass --lib, set MLLAMA_Q_GGML_LIB, or install llama-cpp-python into this Python"
    )


class Ggml:
    """ctypes view of the few libggml-base functions we compare against."""

    def __init__(self, path: str | None = None):
        self.path = find_ggml_lib(path)
        self.lib = ctypes.CDLL(self.path)
        f = self.lib.ggml_quantize_chunk
        f.restype = ctypes.c_size_t
        f.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        # ggml_quantize_chunk has no Q8_K case: call its reference quantizer directly.
        self.lib.quantize_row_q8_K_ref.restype = None
        self.lib.quantize_row_q8_K_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]

    def row_size(self, qtype: str, n: int) -> int:
        return int(self.lib.ggml_row_size(GGML_TYPE_ID[qtype], n))

    def quantize(self, x: np.ndarray, qtype: str) -> np.ndarray:
        """ggml_quantize_chunk(type, x, ...) with no importance matrix: uint8 [rows, row_size]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        out = np.zeros((rows, self.row_size(qtype, cols)), dtype=np.uint8)
        if qtype == "q8_k":
            # (ggml leaves bsums untouched for an all-zero block: the zeroed buffer keeps them 0)
            self.lib.quantize_row_q8_K_ref(x.ctypes.data, out.ctypes.data, rows * cols)
            return out
        n = self.lib.ggml_quantize_chunk(GGML_TYPE_ID[qtype], x.ctypes.data, out.ctypes.data, 0, rows, cols, None)
        assert n == out.nbytes, (n, out.nbytes)
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", help="path to ggml's libggml-base.so")
    ap.add_argument("--out", default=str(GOLDEN_PATH))
    args = ap.parse_args(argv)
    g = Ggml(args.lib)
    data = {"seed": np.int64(GOLDEN_SEED), "cols": np.int64(COLS)}
    for t in TYPES:
        x, labels = make_rows(t, GOLDEN_SEED, GOLDEN_RANDOM_ROWS[t])
        data[f"{t}/random_rows"] = np.int64(GOLDEN_RANDOM_ROWS[t])
        data[f"{t}/bytes"] = g.quantize(x, t)
        data[f"{t}/input_sha256"] = np.array(digest(x))
        print(f"{t}: {x.shape[0]} rows -> {data[f'{t}/bytes'].nbytes} bytes")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **data)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes) from {g.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
