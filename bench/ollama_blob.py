"""Rewrite an mllama-q GGUF as the blob Ollama's one-file converter would have made of the same
weights, for benchmarks (developer script; uses gguf-py).

    python bench/ollama_blob.py SRC.gguf OUT.gguf [--position-embd f16|f32]

Same text tensors byte for byte (so decode reads exactly the same weights), and Ollama's
differences (ollama/ollama 9db4bdbad^, see mllama_q/ollama.py): the vision tower and projector
matrices and v.patch_embd F16 (server/quantization.go never quantizes v.* / mm.*),
v.position_embd.weight F16 (convert/reader.go before 96b202d34; --position-embd f32 after),
tile tables / 1-D tensors F32; no mllama_q.* keys; tokenizer keys as convert/tokenizer.go writes
them (add_bos_token false, eos_token_ids = the stop list, no eot/eom ids); keys sorted and
tensors sorted by (block, name) as fs/ggml/gguf.go WriteGGUF. The cross-attention norms are
permuted back to HF order (Ollama never permuted them). Streams: memory stays small.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    import gguf
    from gguf import GGMLQuantizationType as T

    from mllama_q import gguf_keys as K
    from mllama_q import quants

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--position-embd", choices=("f16", "f32"), default="f16")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    r = gguf.GGUFReader(args.src)
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    stop = [int(x) for x in fields[K.Q_STOP_TOKEN_IDS].contents()] if K.Q_STOP_TOKEN_IDS in fields else None

    tmp = Path(args.out + ".tmp")
    w = gguf.GGUFWriter(str(tmp), K.ARCH)
    drop = {K.GENERAL_ARCHITECTURE, "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"}
    for key in sorted(fields):
        if key in drop or key.startswith("mllama_q."):
            continue
        f = fields[key]
        val = f.contents()
        if key == "tokenizer.ggml.add_bos_token":
            val = False
        vt = f.types[0]
        w.add_key_value(key, val, vt, sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    if stop:
        w.add_key_value(K.OLLAMA_EOS_TOKEN_IDS, stop, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)

    def block(name):
        m = re.match(r"blk\.(\d+)\.", name)
        return int(m.group(1)) if m else 1 << 62

    plan = []  # (name, numpy shape, out type, source tensor)
    for t in sorted(r.tensors, key=lambda t: (block(t.name), t.name)):
        shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
        typ = T(int(t.tensor_type))
        if (
            t.name.startswith(("v.", "mm."))
            and len(shape) >= 2
            and t.name not in (K.V_TILE_POS_EMBD, K.V_PRE_TILE_EMBD, K.V_POST_TILE_EMBD)
        ):
            typ = T.F32 if t.name == K.V_POS_EMBD and args.position_embd == "f32" else T.F16
        plan.append((t.name, shape, typ, t))
    for name, shape, typ, _ in plan:
        w.add_tensor_info(name, shape, np.dtype(np.float32), K.nbytes(K.GGMLType(int(typ)), shape), raw_dtype=typ)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    qname = {T.Q8_0: "q8_0", T.Q4_K: "q4_k", T.Q6_K: "q6_k"}
    try:
        for name, shape, typ, t in plan:
            w.write_padding(f, f.tell())
            src_t = T(int(t.tensor_type))
            if typ == src_t and not name.endswith(("cross_attn_q_norm.weight", "cross_attn_k_norm.weight")):
                data = np.asarray(t.data)
                step = max(1, (256 << 20) // max(1, data.nbytes // max(1, data.shape[0])))
                for i in range(0, data.shape[0], step):  # rows in chunks: page cache, little RAM
                    f.write(np.ascontiguousarray(data[i : i + step]).tobytes())
            else:
                if src_t in qname:
                    vals = quants.dequantize(np.ascontiguousarray(t.data), qname[src_t], shape)
                else:
                    vals = np.asarray(t.data, dtype=np.float32).reshape(shape)
                if name.endswith(("cross_attn_q_norm.weight", "cross_attn_k_norm.weight")):
                    vals = K.unpermute_head_vector(vals)
                f.write(np.ascontiguousarray(vals, dtype=np.float16 if typ == T.F16 else np.float32).tobytes())
            w.write_padding(f, K.nbytes(K.GGMLType(int(typ)), shape))
        w.tensors[0].clear()
        w.close()
        os.replace(tmp, args.out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    print(
        f"wrote {args.out} ({os.path.getsize(args.out) / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
