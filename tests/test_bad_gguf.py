"""Bad model files give a clear Python exception (ModelFileError, a ValueError) before any
tensor is used: never a crash, a hang or a cryptic error from deep inside a parser."""
from __future__ import annotations

import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("torch")
pytest.importorskip("transformers")

import mllama_q  # noqa: E402
from mllama_q import ModelFileError, ModelFileNotFoundError  # noqa: E402
from mllama_q import gguf_keys as K  # noqa: E402


@pytest.fixture(scope="module")
def good(tiny_checkpoint, tiny_gguf):
    """A valid tiny mllama GGUF written by our converter."""
    return tiny_gguf(tiny_checkpoint(seed=3, dtype="float32"), "q8_0")


def rewrite(src, dst, *, arch=None, drop_keys=(), drop_tensors=(), tensor_override=None):
    """Copy a GGUF with gguf-py, optionally changing the architecture, dropping metadata keys or
    tensors, or replacing one tensor: tensor_override = (name, array, raw_dtype or None)."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch or r.fields[K.GENERAL_ARCHITECTURE].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == K.GENERAL_ARCHITECTURE or key in drop_keys:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub_type=sub)
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
    expect_error(tmp_path, "not a regular file")


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
    data[16:24] = (2 ** 62).to_bytes(8, "little")  # metadata entries
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
    expect_error(p, "missing metadata key")


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


@pytest.mark.parametrize("key,value", [(K.BLOCK_COUNT, 10 ** 9), (K.HEAD_COUNT, 0), (K.HEAD_COUNT_KV, 3),
                                       (K.V_BLOCK_COUNT, 10 ** 8)])
def test_absurd_hyperparameters(good, tmp_path, key, value):
    """Corrupt hyper-parameters are refused before anything is sized from them."""
    r = gguf.GGUFReader(str(good))
    p = tmp_path / "hp.gguf"
    w = gguf.GGUFWriter(str(p), K.ARCH)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == K.GENERAL_ARCHITECTURE:
            continue
        vt = f.types[0]
        val = value if k == key else f.contents()
        w.add_key_value(k, val, vt, sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        raw = None if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else t.tensor_type
        w.add_tensor(t.name, np.array(t.data), raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expect_error(p, "block_count|head_count|must be positive|vision layer counts")
