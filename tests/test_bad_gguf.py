"""Bad model files give a clear Python exception (ModelFileError, a ValueError) before any
tensor is used: never a crash, a hang or a cryptic error from deep inside a parser."""

from __future__ import annotations

import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from gguf_reference import assert_matches_gguf_py  # noqa: E402

import mllama_q  # noqa: E402
from mllama_q import ModelFileError, ModelFileNotFoundError  # noqa: E402
from mllama_q import gguf_keys as K  # noqa: E402


@pytest.fixture(scope="module")
def good(tiny_checkpoint, tiny_gguf):
    """A valid tiny mllama GGUF written by our converter."""
    path = tiny_gguf(tiny_checkpoint(seed=3, dtype="float32"), "q8_0")
    assert_matches_gguf_py(path)
    return path


def _typed_value(v, vtype, sub):
    """set_keys entry -> (value, GGUFValueType, sub-type): a (value, type, sub) triple as given,
    a plain value with the key's own type (vtype, sub)."""
    if isinstance(v, tuple) and len(v) == 3 and isinstance(v[1], gguf.GGUFValueType):
        return v
    return v, vtype, sub


def rewrite(src, dst, *, arch=None, drop_keys=(), drop_tensors=(), tensor_override=None, set_keys=None, compare=True):
    """Copy a GGUF with gguf-py, optionally changing the architecture, dropping metadata keys or
    tensors, replacing one tensor (tensor_override = (name, array, raw_dtype or None)) or
    setting metadata values: set_keys = {key: (value, GGUFValueType, array sub-type or None)}
    (value may be a function of the current value) or {key: value} (the key's own type; new
    keys: float32). compare: check our reader against gguf-py on the result (gguf-py cannot
    decode a string that is not UTF-8)."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch or r.fields[K.GENERAL_ARCHITECTURE].contents())
    set_keys = dict(set_keys or {})
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == K.GENERAL_ARCHITECTURE or key in drop_keys:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = f.contents()
        if key in set_keys:
            new, vtype, sub = _typed_value(set_keys.pop(key), vtype, sub)
            value = new(value) if callable(new) else new
        w.add_key_value(key, value, vtype, sub_type=sub)
    for key, v in set_keys.items():
        value, vtype, sub = _typed_value(v, gguf.GGUFValueType.FLOAT32, None)
        w.add_key_value(key, value, vtype, sub_type=sub)
    for t in r.tensors:
        if t.name in drop_tensors:
            continue
        if tensor_override and t.name == tensor_override[0]:
            _, arr, raw = tensor_override
            w.add_tensor(t.name, arr, raw_dtype=raw)
            continue
        raw = None if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else t.tensor_type
        w.add_tensor(t.name, np.array(t.data), raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if compare:
        assert_matches_gguf_py(dst)  # a valid GGUF: both readers agree before Model() judges it
    return dst


def write_bytes(path, data: bytes):
    path.write_bytes(data)
    return path


def expect_error(path, match, **kw):
    with pytest.raises(ModelFileError, match=match):
        mllama_q.Model(path, **kw)


def test_good_file_loads(good):
    m = mllama_q.Model(good)
    assert m.forward([0, 5, 6]).shape[0] == 3


def test_missing_file(tmp_path):
    p = tmp_path / "nope.gguf"
    with pytest.raises(ModelFileNotFoundError, match="not found"):
        mllama_q.Model(p)
    # Catchable both ways.
    assert issubclass(ModelFileNotFoundError, FileNotFoundError)
    assert issubclass(ModelFileError, ValueError)


def test_directory(tmp_path):
    expect_error(tmp_path, "is a directory, not a GGUF file")  # mllama_q.store: a path that is no file nor name


def test_zero_length(tmp_path):
    expect_error(write_bytes(tmp_path / "empty.gguf", b""), "too small")


def test_corrupt_magic(good, tmp_path):
    data = bytearray(good.read_bytes())
    data[:4] = b"GGML"
    expect_error(write_bytes(tmp_path / "magic.gguf", bytes(data)), "not a GGUF file")


def test_unsupported_version(good, tmp_path):
    data = bytearray(good.read_bytes())
    data[4:8] = (99).to_bytes(4, "little")
    expect_error(write_bytes(tmp_path / "version.gguf", bytes(data)), "version 99")


def test_absurd_counts(good, tmp_path):
    data = bytearray(good.read_bytes())
    data[16:24] = (2**62).to_bytes(8, "little")  # metadata entries
    expect_error(write_bytes(tmp_path / "counts.gguf", bytes(data)), "corrupt or truncated GGUF header")


@pytest.mark.parametrize("keep", [10, 24, 100, 2000])
def test_truncated_header_and_metadata(good, tmp_path, keep):
    data = good.read_bytes()[:keep]
    expect_error(write_bytes(tmp_path / f"trunc{keep}.gguf", data), "too small|corrupt|truncated")


@pytest.mark.parametrize("cut", [1, 4096])
def test_truncated_tensor_data(good, tmp_path, cut):
    data = good.read_bytes()
    expect_error(write_bytes(tmp_path / f"cut{cut}.gguf", data[:-cut]), "truncated")


def test_corrupt_metadata_bytes(good, tmp_path):
    """Garbage over the metadata (after a valid header): an error, no hang."""
    data = bytearray(good.read_bytes())
    rng = np.random.default_rng(0)
    data[24:4096] = rng.integers(0, 256, 4096 - 24, dtype=np.uint8).tobytes()
    expect_error(write_bytes(tmp_path / "meta.gguf", bytes(data)), "corrupt|truncated|missing|architecture|key")


@pytest.mark.parametrize("seed", range(3))
def test_random_garbage(tmp_path, seed):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()
    expect_error(write_bytes(tmp_path / f"garbage{seed}.gguf", raw), "not a GGUF")
    # Also with a valid magic and version in front.
    raw = b"GGUF" + (3).to_bytes(4, "little") + raw[8:]
    expect_error(write_bytes(tmp_path / f"garbage{seed}v3.gguf", raw), "corrupt|truncated")


def test_wrong_architecture(tmp_path):
    """A small llama GGUF (written with gguf-py) is refused with a message naming its architecture."""
    p = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_tensor("token_embd.weight", np.zeros((16, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expect_error(p, "architecture is 'llama', expected 'mllama'")


def test_architecture_not_a_string(good, tmp_path):
    p = rewrite(
        good,
        tmp_path / "arch.gguf",
        arch="x",
        set_keys={K.GENERAL_ARCHITECTURE: ([1, 2], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)},
    )
    expect_error(p, "general.architecture.*must be a string, got an array of 2 int32")


def test_no_architecture_key(tmp_path):
    p = tmp_path / "noarch.gguf"
    w = gguf.GGUFWriter(str(p), "mllama")
    for kv in w.kv_data:  # GGUFWriter always adds general.architecture: take it out
        kv.pop(K.GENERAL_ARCHITECTURE, None)
    w.add_uint32(K.BLOCK_COUNT, 1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert K.GENERAL_ARCHITECTURE not in gguf.GGUFReader(str(p)).fields
    expect_error(p, "no 'general.architecture' key")


def test_mllama_file_without_hyperparameters(tmp_path):
    p = tmp_path / "empty_mllama.gguf"
    w = gguf.GGUFWriter(str(p), "mllama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # mllama_q.ollama.detect_layout: neither our layout nor Ollama's; names what is missing
    expect_error(p, r"Recognised: nothing; missing: mllama\.block_count, mllama\.embedding_length")


def test_missing_required_key(good, tmp_path):
    p = rewrite(good, tmp_path / "nokey.gguf", drop_keys=(K.HEAD_COUNT,))
    expect_error(p, K.HEAD_COUNT)


def test_missing_tensor(good, tmp_path):
    name = K.blk(K.FFN_DOWN, 2)
    p = rewrite(good, tmp_path / "notensor.gguf", drop_tensors=(name,))
    expect_error(p, name.replace(".", r"\."))


def test_misshaped_tensor(good, tmp_path):
    name = K.OUTPUT_NORM
    p = rewrite(good, tmp_path / "shape.gguf", tensor_override=(name, np.ones(17, dtype=np.float32), None))
    expect_error(p, "output_norm")


def test_unsupported_tensor_type(good, tmp_path):
    name = K.OUTPUT_NORM
    r = gguf.GGUFReader(str(good))
    n = int(next(t for t in r.tensors if t.name == name).n_elements)
    p = rewrite(good, tmp_path / "i32.gguf", tensor_override=(name, np.ones(n, dtype=np.int32), None))
    expect_error(p, "not supported")


def test_text_only_never_needs_vision_tensors(good, tmp_path):
    """vision=False loads a file whose vision tensors are gone; vision=True says why it cannot."""
    r = gguf.GGUFReader(str(good))
    vis = tuple(t.name for t in r.tensors if t.name.startswith(("v.", "mm.")))
    p = rewrite(good, tmp_path / "novision.gguf", drop_tensors=vis)
    m = mllama_q.Model(p, vision=False)
    assert m.forward([0, 1, 2]).shape[0] == 3
    expect_error(p, "no vision tensors")


def test_missing_vision_tensor(good, tmp_path):
    name = K.vblk(K.V_FFN_UP_W, 1, True)
    p = rewrite(good, tmp_path / "novtensor.gguf", drop_tensors=(name,))
    expect_error(p, "missing vision tensor.*" + name.replace(".", r"\."))
    mllama_q.Model(p, vision=False)  # the text model alone is fine


def test_misshaped_vision_tensor(good, tmp_path):
    """Checked when the vision weights are first used (they are not read before)."""
    name = K.V_CLASS_EMBD
    p = rewrite(good, tmp_path / "vshape.gguf", tensor_override=(name, np.ones(3, dtype=np.float32), None))
    m = mllama_q.Model(p)
    T = m.vision_hparams["max_num_tiles"]
    S = m.vision_hparams["image_size"]
    with pytest.raises(ModelFileError, match="class_embd"):
        m.encode_images(np.zeros((1, T, 3, S, S), np.float32), [1], [[1] + [0] * (T - 1)])


def test_file_is_not_modified(good):
    before = os.path.getmtime(good), good.stat().st_size
    mllama_q.Model(good, vision=False)
    assert (os.path.getmtime(good), good.stat().st_size) == before


# Hyper-parameters out of range (mllama_q/hparams.py), refused at load before anything is sized
# from them. Regressions: max_image_tiles = 100000 without an aspect-ratio list built the grid
# list in O(n^2) (a hang); a 20000-px tile made every image 19 GB of pixel_values; rms_eps = inf
# made every logit equal; an <|image|> id past the embedding read no row at all.
ABSURD = [
    (K.BLOCK_COUNT, 10**9, "block_count"),
    (K.HEAD_COUNT, 0, "head_count"),
    (K.HEAD_COUNT_KV, 3, "head_count_kv"),
    (K.V_BLOCK_COUNT, 10**8, "vision.block_count"),
    (K.BLOCK_COUNT, 2**31, "block_count"),
    (K.VOCAB_SIZE, 2**31, "vocab_size"),
    (K.EMBEDDING_LENGTH, 0, "embedding_length"),
    (K.RMS_EPS, float("inf"), "rms_epsilon"),
    (K.RMS_EPS, float("nan"), "rms_epsilon"),
    (K.RMS_EPS, 0.0, "rms_epsilon"),
    (K.ROPE_FREQ_BASE, float("inf"), "freq_base"),
    (K.V_LN_EPS, -1.0, "layer_norm_epsilon"),
    (K.CROSS_ATTENTION_LAYERS, [1, 1], "not distinct"),
    (K.CROSS_ATTENTION_LAYERS, [99], "cross_attention_layers"),
    (K.Q_ROPE_SCALING_FACTOR, float("nan"), "scaling.factor"),
    (K.Q_ROPE_SCALING_HIGH_FREQ_FACTOR, 1.0, "must differ"),
    (K.V_PATCH_SIZE, 0, "patch_size"),
    (K.V_IMAGE_SIZE, 100000, "image_size"),
    (K.V_MAX_NUM_TILES, 100000, "max_num_tiles"),
    (K.Q_IMG_MAX_TILES, 100000, "max_image_tiles"),
    (K.Q_IMG_TILE_SIZE, 20000, "tile_size"),
    (K.Q_IMG_STD, [0.0, 0.5, 0.5], "std"),
    (K.Q_IMG_MEAN, [float("nan"), 0.5, 0.5], "mean"),
    (K.Q_IMG_RESCALE_FACTOR, float("inf"), "rescale_factor"),
    (K.Q_IMG_RESAMPLE, 77, "resample"),
    (K.Q_IMAGE_TOKEN_ID, 10**9, "image_token_id"),
    (K.Q_V_ASPECT_RATIOS, [1, 1, 9, 9], "supported_aspect_ratios"),
    (K.GENERAL_SAMPLING_TEMP, float("nan"), "temperature"),
]


@pytest.mark.parametrize("key,value,match", ABSURD, ids=[f"{k}={v}" for k, v, _ in ABSURD])
def test_absurd_hyperparameters(good, tmp_path, key, value, match, within):
    """Corrupt hyper-parameters are refused before anything is sized from them (within
    seconds: the hangs they caused are regressions)."""
    # the llama3 scaling keys are read only when the file has no rope_freqs tensor
    drop = (K.ROPE_FREQS,) if key.startswith("mllama_q.rope.scaling") else ()
    p = rewrite(good, tmp_path / "hp.gguf", set_keys={key: value}, drop_tensors=drop)
    within(30, lambda: expect_error(p, match))


def test_huge_tile_count_without_aspect_ratio_list_is_refused_fast(good, tmp_path, within):
    p = rewrite(
        good,
        tmp_path / "tiles.gguf",
        drop_keys=(K.Q_V_ASPECT_RATIOS,),
        set_keys={K.Q_IMG_MAX_TILES: 100000, K.V_MAX_NUM_TILES: 100000},
    )
    within(30, lambda: expect_error(p, "max_num_tiles|max_image_tiles"))


def test_image_token_outside_the_tokenizer(good, tmp_path):
    """Found by the inputs fuzzer: an <|image|> id inside the embedding table but past the
    tokenizer's tokens was an IndexError in the processor."""
    vocab = int(gguf.GGUFReader(str(good)).fields[K.VOCAB_SIZE].contents())
    p = rewrite(good, tmp_path / "img.gguf", set_keys={K.Q_IMAGE_TOKEN_ID: vocab + 7})
    expect_error(p, "not one of the tokenizer")


V = gguf.GGUFValueType


def _with(i, value):
    def edit(tokens):
        tokens = list(tokens)
        tokens[i] = value
        return tokens

    return edit


# Corrupt tokenizer metadata: a ModelFileError naming the key at load, never an IndexError /
# AttributeError later (each would otherwise surface at the first encode or decode).
BAD_TOKENIZER = {
    "bos past tokens": ({K.TOKENIZER_BOS_ID: (10**6, V.UINT32, None)}, "bos_token_id = 1000000 is outside the"),
    "eos past tokens": ({K.TOKENIZER_EOS_ID: (2**32 - 1, V.UINT32, None)}, "eos_token_id = 4294967295 is outside"),
    "eot negative": ({K.TOKENIZER_EOT_ID: (-1, V.INT32, None)}, "eot_token_id = -1 is outside"),
    "pad past tokens": ({K.TOKENIZER_PAD_ID: (10**9, V.UINT64, None)}, "padding_token_id = 1000000000"),
    "bos not an int": ({K.TOKENIZER_BOS_ID: ("0", V.STRING, None)}, "bos_token_id.*must be an integer"),
    "tokens not strings": (
        {K.TOKENIZER_TOKENS: ([1, 2, 3], V.ARRAY, V.INT32)},
        r"tokenizer\.ggml\.tokens.*must be an array of strings",
    ),
    "tokens a string": ({K.TOKENIZER_TOKENS: ("abc", V.STRING, None)}, "must be an array of strings"),
    "tokens nested": ({K.TOKENIZER_TOKENS: ([["a"], ["b"]], V.ARRAY, V.ARRAY)}, "must be an array of strings"),
    "duplicate token": (
        {K.TOKENIZER_TOKENS: (lambda t: _with(7, t[6])(t), V.ARRAY, V.STRING)},
        r"tokenizer\.ggml\.tokens', element 7 of \d+: duplicate of element 6",
    ),
    "token not utf-8": (
        {K.TOKENIZER_TOKENS: (_with(9, b"\xff\xfe"), V.ARRAY, V.STRING)},
        r"tokenizer\.ggml\.tokens', element 9 of \d+: the string is not valid UTF-8",
    ),
    "merges not strings": (
        {K.TOKENIZER_MERGES: ([1.5, 2.5], V.ARRAY, V.FLOAT32)},
        r"tokenizer\.ggml\.merges.*must be an array of strings",
    ),
    "merge without space": (
        {K.TOKENIZER_MERGES: (_with(3, "abc"), V.ARRAY, V.STRING)},
        r"merges', element 3 of \d+: merge abc has no space",
    ),
    "merge of unknown tokens": (
        {K.TOKENIZER_MERGES: (_with(0, "nosuch token"), V.ARRAY, V.STRING)},
        "bad tokenizer metadata",
    ),
    "types wrong length": ({K.TOKENIZER_TOKEN_TYPE: ([1, 1, 3], V.ARRAY, V.INT32)}, "token_type has 3 entries for"),
    "types not ints": (
        {K.TOKENIZER_TOKEN_TYPE: (lambda t: ["x"] * len(t), V.ARRAY, V.STRING)},
        "token_type must be an array of integers, not array.string",
    ),
    "model not gpt2": ({K.TOKENIZER_MODEL: ("llama", V.STRING, None)}, "tokenizer model is 'llama'; expected 'gpt2'"),
    "model not a string": ({K.TOKENIZER_MODEL: (2, V.UINT32, None)}, "tokenizer.ggml.model.*must be a string"),
    "pre-tokenizer": ({K.TOKENIZER_PRE: ("qwen2", V.STRING, None)}, "unsupported pre-tokenizer"),
    "add_bos not bool": ({K.TOKENIZER_ADD_BOS: (1, V.UINT8, None)}, "add_bos_token.*must be a bool"),
    "chat template not a string": ({K.TOKENIZER_CHAT_TEMPLATE: (7, V.UINT32, None)}, "chat_template.*must be a string"),
    "image token past tokens": (
        {K.Q_IMAGE_TOKEN_ID: (10**6, V.UINT32, None)},
        r"image_token_id = 1000000 is outside the \d+ embedding rows",
    ),
    "stop ids not ints": (
        {K.Q_STOP_TOKEN_IDS: (["a"], V.ARRAY, V.STRING)},
        "stop_token_ids.*must be a list of integers",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TOKENIZER))
def test_corrupt_tokenizer_metadata(good, tmp_path, case):
    set_keys, match = BAD_TOKENIZER[case]
    p = rewrite(good, tmp_path / "tok.gguf", set_keys=set_keys, compare=case != "token not utf-8")
    expect_error(p, match)
    expect_error(p, match, vision=False)


@pytest.mark.parametrize("key", [K.TOKENIZER_TOKENS, K.TOKENIZER_MERGES, K.TOKENIZER_MODEL])
def test_missing_tokenizer_key(good, tmp_path, key):
    """A file with tokenizer keys but without the vocabulary / merges / model is refused."""
    p = rewrite(good, tmp_path / "notok.gguf", drop_keys=(key,))
    expect_error(p, "tokenizer")


def test_no_tokenizer_at_all_loads(good, tmp_path):
    """Without any tokenizer.ggml.* key the model loads (no tokenizer, ids in and out)."""
    r = gguf.GGUFReader(str(good))
    p = rewrite(good, tmp_path / "none.gguf", drop_keys=tuple(k for k in r.fields if k.startswith("tokenizer.ggml.")))
    m = mllama_q.Model(p, vision=False)
    assert m.tokenizer is None and m.forward([1, 2]).shape[0] == 2
