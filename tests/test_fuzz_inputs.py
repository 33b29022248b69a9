"""A bounded run of the `inputs` fuzz family (tools/fuzz/inputs.py) in the default test run:
odd images, bad sampling / generate parameters, bad token / mask / pixel arrays, bad quants and
backend arguments, hostile chat templates and mutated converter configs. Fixed seed, a few
hundred cases in worker processes (a crash or a hang is counted, not fatal to the session);
every case must succeed or be refused with a ValueError. The long run is
`python tools/fuzz/inputs.py -n 10000` (see its docstring)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the config cases build their tiny checkpoint with transformers

ROOT = Path(__file__).resolve().parents[1]


def _family():
    spec = importlib.util.spec_from_file_location("fuzz_inputs", ROOT / "tools" / "fuzz" / "inputs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_inputs_fuzz_bounded():
    fam = _family()
    fam.fuzz_checkpoint()  # built once (cached), before the worker needs it
    res = fam.drive(seed=8, n=400, timeout=60, jobs=1)
    c = res["counts"]
    assert c["unclean"] == c["crash"] == c["hang"] == 0, res["failures"][:5]
    assert sum(c.values()) == 400
    assert set(res["by_kind"]) == set(fam.KINDS)  # every kind ran
    assert c["ok"] > 40 and c["clean"] > 200  # both outcomes are exercised: the cases are not all trivially refused


def test_generate_is_deterministic():
    fam = _family()
    assert list(fam.generate(3, 50)) == list(fam.generate(3, 50))
    assert list(fam.generate(3, 50)) != list(fam.generate(4, 50))
