"""The conversion plan: every HF tensor the config implies, its GGUF name(s), type and transform.

One `Out` per GGUF tensor. Names, shapes and transforms follow mllama_q/gguf_keys.py
(the single declaration of the layout); this module only maps HF's hub names onto it:

  language_model.model.embed_tokens.weight          -> token_embd.weight
  language_model.model.norm.weight                  -> output_norm.weight
  language_model.lm_head.weight                     -> output.weight
  language_model.model.layers.N.input_layernorm     -> blk.N.attn_norm
  ...post_attention_layernorm                       -> blk.N.ffn_norm
  ...mlp.gate_proj / up_proj / down_proj            -> blk.N.ffn_gate / ffn_up / ffn_down
  ...self_attn.q_proj / k_proj / v_proj / o_proj    -> blk.N.attn_q / attn_k / attn_v / attn_output
  ...cross_attn.{q,k,v,o}_proj, q_norm, k_norm      -> blk.N.cross_attn_{q,k,v,o}_proj, cross_attn_{q,k}_norm
  ...cross_attn_attn_gate / cross_attn_mlp_gate     -> blk.N.cross_attn_attn_gate / cross_attn_mlp_gate
  vision_model.*                                    -> v.*   (see gguf_keys for each)
  multi_modal_projector.{weight,bias}               -> mm.0.{weight,bias}
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllama_q import gguf_keys as K

from .errors import ConvertError
from .hf import Checkpoint

# Transforms (see gguf_keys): applied to float32 rows read from the checkpoint.
COPY = "copy"
PERMUTE_QK = "permute_qk"  # rows: gguf_keys.permute_qk(w, n_head)
PERMUTE_VEC = "permute_vec"  # gguf_keys.permute_head_vector
TANH = "tanh"
ONE_MINUS_TANH = "one_minus_tanh"
CONST = "const"  # computed by the converter (rope_freqs)


@dataclass
class Out:
    name: str  # GGUF tensor name
    shape: tuple  # numpy order
    kind: str  # mix kinds: f32 | conv | text | vision
    src: str | None  # HF hub tensor name (None for CONST)
    transform: str = COPY
    n_head: int = 0  # for PERMUTE_QK
    role: str = ""  # mix roles: output | attn_v | ffn_down
    layer: int = -1
    v_index: int = -1
    data: np.ndarray | None = None  # for CONST
    gtype: object = None  # gguf.GGMLQuantizationType, filled by assign_types

    @property
    def rows(self) -> int:
        return int(self.shape[0]) if self.shape else 1

    @property
    def row_len(self) -> int:
        """Values per row when the tensor is viewed as [shape[0], prod(shape[1:])]."""
        n = 1
        for s in self.shape[1:]:
            n *= int(s)
        return n

    @property
    def block_row(self) -> int:
        """Length of a quantization row (ggml ne[0]) = the last numpy axis."""
        return int(self.shape[-1]) if self.shape else 1


def build_plan(ck: Checkpoint) -> list:
    """All output tensors in a canonical order (text, then vision), types not yet assigned."""
    t, v = ck.text, ck.vision
    D, F, hd = t.hidden, t.intermediate, t.head_dim
    q_rows, kv_rows = t.n_head * hd, t.n_head_kv * hd
    outs = []

    def add(name, shape, kind, src, **kw):
        outs.append(Out(name=name, shape=tuple(int(s) for s in shape), kind=kind, src=src, **kw))

    lm = "language_model.model."
    add(K.TOKEN_EMBD, (t.vocab_size + 8, D), "text", lm + "embed_tokens.weight")
    if t.rope_scaling is not None:
        rs = t.rope_scaling
        freqs = K.rope_freqs_llama3(
            hd, t.rope_theta, rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_context_length"]
        )
        add(K.ROPE_FREQS, (hd // 2,), "f32", None, transform=CONST, data=freqs)
    n_self = t.n_layer - len(t.cross_layers)
    v_index = 0
    for bid in range(t.n_layer):
        p = f"{lm}layers.{bid}."
        add(K.blk(K.ATTN_NORM, bid), (D,), "f32", p + "input_layernorm.weight")
        if bid in t.cross_layers:
            x = p + "cross_attn."
            add(K.blk(K.XATTN_Q, bid), (q_rows, D), "text", x + "q_proj.weight", transform=PERMUTE_QK, n_head=t.n_head)
            add(
                K.blk(K.XATTN_K, bid),
                (kv_rows, D),
                "text",
                x + "k_proj.weight",
                transform=PERMUTE_QK,
                n_head=t.n_head_kv,
            )
            add(K.blk(K.XATTN_V, bid), (kv_rows, D), "text", x + "v_proj.weight")
            add(K.blk(K.XATTN_O, bid), (D, q_rows), "text", x + "o_proj.weight")
            add(K.blk(K.XATTN_Q_NORM, bid), (hd,), "f32", x + "q_norm.weight", transform=PERMUTE_VEC)
            add(K.blk(K.XATTN_K_NORM, bid), (hd,), "f32", x + "k_norm.weight", transform=PERMUTE_VEC)
            add(K.blk(K.XATTN_ATTN_GATE, bid), (1,), "f32", p + "cross_attn_attn_gate")
            add(K.blk(K.XATTN_MLP_GATE, bid), (1,), "f32", p + "cross_attn_mlp_gate")
        else:
            a = p + "self_attn."
            add(K.blk(K.ATTN_Q, bid), (q_rows, D), "text", a + "q_proj.weight", transform=PERMUTE_QK, n_head=t.n_head)
            add(
                K.blk(K.ATTN_K, bid),
                (kv_rows, D),
                "text",
                a + "k_proj.weight",
                transform=PERMUTE_QK,
                n_head=t.n_head_kv,
            )
            add(K.blk(K.ATTN_V, bid), (kv_rows, D), "text", a + "v_proj.weight", role="attn_v", v_index=v_index)
            add(K.blk(K.ATTN_OUTPUT, bid), (D, q_rows), "text", a + "o_proj.weight")
            v_index += 1
        add(K.blk(K.FFN_NORM, bid), (D,), "f32", p + "post_attention_layernorm.weight")
        add(K.blk(K.FFN_GATE, bid), (F, D), "text", p + "mlp.gate_proj.weight")
        add(K.blk(K.FFN_UP, bid), (F, D), "text", p + "mlp.up_proj.weight")
        add(K.blk(K.FFN_DOWN, bid), (D, F), "text", p + "mlp.down_proj.weight", role="ffn_down", layer=bid)
    assert v_index == n_self
    add(K.OUTPUT_NORM, (D,), "f32", lm + "norm.weight")
    if t.tie_word_embeddings:
        raise ConvertError(
            f"{ck.dir / 'config.json'}: tie_word_embeddings=true is not supported "
            "(Mllama checkpoints have a separate lm_head)"
        )
    add(K.OUTPUT, (t.vocab_size, D), "text", "language_model.lm_head.weight", role="output")

    # Vision tower.
    Dv, Fv, P, T_, A = v.hidden, v.intermediate, v.n_patches, v.max_tiles, len(v.aspect_ratios)
    vm = "vision_model."
    add(K.V_PATCH_EMBD, (Dv, v.n_channels, v.patch_size, v.patch_size), "conv", vm + "patch_embedding.weight")
    add(K.V_CLASS_EMBD, (Dv,), "f32", vm + "class_embedding")
    g = vm + "gated_positional_embedding."
    add(K.V_POS_EMBD, (P, Dv), "f32", g + "embedding")
    add(K.V_POS_EMBD_GATE, (1,), "f32", g + "gate", transform=ONE_MINUS_TANH)
    add(K.V_TILE_POS_EMBD, (A + 1, T_ * P * Dv), "f32", g + "tile_embedding.weight")
    add(K.V_TILE_POS_EMBD_GATE, (1,), "f32", g + "gate", transform=TANH)
    for which, wname, gname in (
        ("pre", K.V_PRE_TILE_EMBD, K.V_PRE_TILE_EMBD_GATE),
        ("post", K.V_POST_TILE_EMBD, K.V_POST_TILE_EMBD_GATE),
    ):
        s = f"{vm}{which}_tile_positional_embedding."
        add(wname, (A + 1, T_ * Dv), "f32", s + "embedding.weight")
        add(gname, (1,), "f32", s + "gate", transform=TANH)
    add(K.V_PRE_LN_W, (Dv,), "f32", vm + "layernorm_pre.weight")
    add(K.V_PRE_LN_B, (Dv,), "f32", vm + "layernorm_pre.bias")
    add(K.V_POST_LN_W, (Dv,), "f32", vm + "layernorm_post.weight")
    add(K.V_POST_LN_B, (Dv,), "f32", vm + "layernorm_post.bias")
    for is_global, n in ((False, v.n_layer), (True, v.n_global)):
        for bid in range(n):
            hf = f"{vm}{'global_transformer' if is_global else 'transformer'}.layers.{bid}."

            def vadd(name, shape, kind, src, _bid=bid, _glob=is_global, _hf=hf, **kw):
                add(K.vblk(name, _bid, _glob), shape, kind, _hf + src, **kw)

            vadd(K.V_ATTN_NORM_W, (Dv,), "f32", "input_layernorm.weight")
            vadd(K.V_ATTN_NORM_B, (Dv,), "f32", "input_layernorm.bias")
            vadd(K.V_ATTN_Q, (Dv, Dv), "vision", "self_attn.q_proj.weight", transform=PERMUTE_QK, n_head=v.n_head)
            vadd(K.V_ATTN_K, (Dv, Dv), "vision", "self_attn.k_proj.weight", transform=PERMUTE_QK, n_head=v.n_head)
            vadd(K.V_ATTN_V, (Dv, Dv), "vision", "self_attn.v_proj.weight")
            vadd(K.V_ATTN_OUTPUT, (Dv, Dv), "vision", "self_attn.o_proj.weight")
            vadd(K.V_FFN_NORM_W, (Dv,), "f32", "post_attention_layernorm.weight")
            vadd(K.V_FFN_NORM_B, (Dv,), "f32", "post_attention_layernorm.bias")
            vadd(K.V_FFN_UP_W, (Fv, Dv), "vision", "mlp.fc1.weight")
            vadd(K.V_FFN_UP_B, (Fv,), "f32", "mlp.fc1.bias")
            vadd(K.V_FFN_DOWN_W, (Dv, Fv), "vision", "mlp.fc2.weight")
            vadd(K.V_FFN_DOWN_B, (Dv,), "f32", "mlp.fc2.bias")
            if is_global:
                vadd(K.V_ATTN_GATE, (1,), "f32", "gate_attn", transform=TANH)
                vadd(K.V_FFN_GATE, (1,), "f32", "gate_ffn", transform=TANH)
    add(K.MM_PROJ_W, (D, v.output_dim), "vision", "multi_modal_projector.weight")
    add(K.MM_PROJ_B, (D,), "f32", "multi_modal_projector.bias")
    return outs


def check_tensors(ck: Checkpoint, outs: list) -> None:
    """Every expected HF tensor present with the config's shape and a supported dtype; nothing extra."""
    from .safetensors_io import SUPPORTED_DTYPES

    expected = {}
    for o in outs:
        if o.src is not None:
            expected[o.src] = o.shape
    for name, shape in expected.items():
        e = ck.tensors.get(name)
        if e is None:
            raise ConvertError(f"{ck.dir}: tensor {name} is missing from the checkpoint")
        # Gates are [1] in HF; accept a scalar too.
        if tuple(e.shape) != shape and not (shape == (1,) and tuple(e.shape) == ()):
            raise ConvertError(f"{e.path}: tensor {name} has shape {list(e.shape)}, config.json implies {list(shape)}")
        if e.dtype not in SUPPORTED_DTYPES:
            raise ConvertError(
                f"{e.path}: tensor {name} has unsupported dtype {e.dtype} (supported: {', '.join(SUPPORTED_DTYPES)})"
            )
    for name, e in ck.tensors.items():
        if name not in expected:
            raise ConvertError(
                f"{e.path}: unexpected tensor {name} (not part of the Mllama layout for this config.json)"
            )


def assign_types(outs: list, ck: Checkpoint, ftype: str, vision_type: str | None) -> list:
    """Set every Out's gtype (gguf_keys.tensor_type). Returns the fallbacks: [(name, requested,
    stored, row)] for each tensor whose rows the requested block type cannot tile."""
    n_self = ck.text.n_layer - len(ck.text.cross_layers)
    fell_back = []
    for o in outs:
        kw = dict(layer=o.layer, n_layer=ck.text.n_layer, v_index=o.v_index, n_v=n_self)
        o.gtype = K.tensor_type(o.kind, o.role, o.block_row, ftype, vision_type, **kw)
        wanted = K.requested_type(o.kind, o.role, ftype, vision_type, **kw)
        if o.gtype != wanted:
            fell_back.append((o.name, wanted, o.gtype, o.block_row))
    return fell_back
