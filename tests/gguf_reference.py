"""Our GGUF reader (mllama_q.gguf_file) against gguf-py's GGUFReader, the format reference.

    from gguf_reference import assert_matches_gguf_py
    assert_matches_gguf_py(path)      # every key, type, value, tensor, offset and byte equal

Used on every file the tests write (converter outputs, synthetic models, the real tokenizer,
hand-built files with every value type) and on the real SmolLM2 GGUF. Test-only (gguf-py).
"""

from __future__ import annotations

import numpy as np


def gguf_py_type(field) -> str:
    """gguf-py's field.types ([ARRAY, ARRAY, INT32]) spelled as GGUFFile.metadata_type does."""
    names = [t.name.lower() for t in field.types]
    out = names[-1]
    for n in reversed(names[:-1]):
        assert n == "array"
        out = f"array[{out}]"
    return out


def flatten(v) -> list:
    """Our nested-array value flattened the way gguf-py's contents() flattens it."""
    if isinstance(v, list):
        return [x for item in v for x in flatten(item)]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if hasattr(v, "tolist"):
        return v.tolist()
    return [v]


def assert_matches_gguf_py(path, check_data: bool = True) -> None:
    import gguf

    from mllama_q.gguf_file import open_gguf

    ref = gguf.GGUFReader(str(path))
    ours = open_gguf(path)
    try:
        assert ours.version == ref.fields["GGUF.version"].contents()
        assert ours.alignment == ref.alignment and ours.data_offset == ref.data_offset
        ref_fields = [(k, f) for k, f in ref.fields.items() if not k.startswith("GGUF.")]
        assert list(ours.metadata) == [k for k, _ in ref_fields]
        for key, field in ref_fields:
            v = ours.metadata[key]
            want = field.contents()
            if field.types == [gguf.GGUFValueType.ARRAY]:
                # an empty array: gguf-py learns the element type only from element 0
                assert ours.metadata_type(key).startswith("array[") and len(v) == 0 == len(want), key
            else:
                assert ours.metadata_type(key) == gguf_py_type(field), key
            if isinstance(v, np.ndarray):
                # a read-only view of the file, of gguf-py's element type
                if field.types != [gguf.GGUFValueType.ARRAY]:
                    assert v.dtype == ref.gguf_scalar_to_np[field.types[-1]], key
                assert not v.flags.writeable and not v.flags.owndata, key
                assert np.array_equal(v, np.asarray(want, dtype=v.dtype), equal_nan=v.dtype.kind == "f"), key
            elif isinstance(v, list):
                assert flatten(v) == want, key
            elif isinstance(v, (str, bool, int, float)):
                same = v == want or (isinstance(v, float) and v != v and want != want)  # NaN is NaN here
                assert type(v) is type(want) and same, (key, v, want)
            else:  # string array
                assert len(v) == len(want) and v.tolist() == want, key
                if want:
                    assert v[0] == want[0] and v[-1] == want[-1] and list(v) == want
        assert list(ours.tensors) == [t.name for t in ref.tensors]
        for t in ref.tensors:
            o = ours.tensors[t.name]
            assert o.ggml_type == int(t.tensor_type), t.name
            assert o.shape == tuple(int(d) for d in reversed(t.shape.tolist())), t.name
            assert o.offset == int(t.data_offset) and o.nbytes == int(t.n_bytes), t.name
            assert o.n_elements == int(t.n_elements), t.name
            if not check_data:
                continue
            d = o.data
            assert not d.flags.writeable and not d.flags.owndata, t.name
            if int(t.tensor_type) == int(gguf.GGMLQuantizationType.BF16):
                # gguf-py gives BF16 as raw bytes, we give its uint16 bits (CONTRACTS.md A)
                assert d.dtype == np.uint16 and d.shape == o.shape, t.name
                np.testing.assert_array_equal(d.view(np.uint8).reshape(t.data.shape), t.data)
            else:
                assert d.dtype == t.data.dtype and d.shape == t.data.shape, t.name
                np.testing.assert_array_equal(d, t.data, err_msg=t.name)
    finally:
        ours.close()
