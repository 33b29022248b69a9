"""mllama_q/_core.pyi stays in sync with the compiled module: the same public names at module and
class level, and for every function and method the same parameter names in the same order as
the signature pybind11 writes into its docstring (csrc/bindings/)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import mllama_q
from mllama_q import _core

STUB = Path(mllama_q.__file__).with_name("_core.pyi")


def _stub():
    """{name: FunctionDef | ClassDef} of the stub's public top-level definitions."""
    tree = ast.parse(STUB.read_text(encoding="utf-8"))
    return {
        n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")
    }


def _public(obj) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


def _split_top(s: str) -> list[str]:
    """Split at commas outside brackets (types such as Annotated[ArrayLike, int32] hold commas)."""
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "[(" and 1 or (ch in "])" and -1 or 0)
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return out + ([cur] if cur.strip() else [])


def _pybind_params(fn, name: str) -> list[str]:
    """Parameter names from pybind11's docstring signature line `name(a: T, b: T = d) -> R`."""
    line = next(ln for ln in (fn.__doc__ or "").splitlines() if ln.startswith(name + "("))
    inner = line[len(name) + 1 : line.rindex(") ->")]
    return [p.split(":")[0].strip() for p in _split_top(inner) if p.strip()]


def _stub_params(node: ast.FunctionDef) -> list[str]:
    return [a.arg for a in node.args.args]


def test_module_names_match():
    stub = _stub()
    assert set(stub) == _public(_core), (
        f"in _core but not in the stub: {sorted(_public(_core) - set(stub))}; "
        f"in the stub but not in _core: {sorted(set(stub) - _public(_core))}"
    )


@pytest.mark.parametrize("name", sorted(n for n, v in _stub().items() if isinstance(v, ast.FunctionDef)))
def test_function_signature_matches(name):
    fn = getattr(_core, name)
    assert _stub_params(_stub()[name]) == _pybind_params(fn, name), name
    assert ast.get_docstring(_stub()[name]), f"{name}: the stub documents every function"


@pytest.mark.parametrize("name", sorted(n for n, v in _stub().items() if isinstance(v, ast.ClassDef)))
def test_class_members_match(name):
    cls = getattr(_core, name)
    node = _stub()[name]
    members = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
    # an exception class (StepAborted): its own members, not those it inherits from BaseException
    public = {n for n in vars(cls) if not n.startswith("_")} if issubclass(cls, BaseException) else _public(cls)
    assert {m for m in members if not m.startswith("_")} == public, name
    for m, fn_node in members.items():
        attr = inspect.getattr_static(cls, m)
        if isinstance(attr, property):
            assert any(isinstance(d, ast.Name) and d.id == "property" for d in fn_node.decorator_list), f"{name}.{m}"
            continue
        assert _stub_params(fn_node) == _pybind_params(getattr(cls, m), m), f"{name}.{m}"
    assert ast.get_docstring(node), f"{name}: the stub documents every class"
