"""The typed surface: the native module's stub (torch_kvreg/_C.pyi) matches the module that
bindings.cpp builds, and the package ships its py.typed marker. (mypy itself runs in
`make lint`, with every function annotated: pyproject.toml's [tool.mypy].)"""

from __future__ import annotations

import ast
import pathlib

import torch_kvreg
from torch_kvreg import _C

PACKAGE = pathlib.Path(torch_kvreg.__file__).parent


def _arity(node: ast.FunctionDef) -> int:
    args = node.args
    return len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)


def _stub() -> tuple[dict[str, int], set[str], dict[str, dict[str, int]]]:
    """(function name -> parameter count, module attributes, class name -> {method or
    property -> parameter count, self included}) declared in _C.pyi."""
    tree = ast.parse((PACKAGE / "_C.pyi").read_text())
    functions: dict[str, int] = {}
    attributes: set[str] = set()
    classes: dict[str, dict[str, int]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            functions[node.name] = _arity(node)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            attributes.add(node.target.id)
        elif isinstance(node, ast.ClassDef):
            classes[node.name] = {
                member.name: _arity(member) for member in node.body if isinstance(member, ast.FunctionDef)
            }
    return functions, attributes, classes


def _pybind_arity(function: object) -> int:
    """The parameter count in pybind11's signature line, e.g. ``f(arg0: int, arg1: str) -> None``."""
    line = (function.__doc__ or "").splitlines()[0]
    inside = line[line.index("(") + 1 : line.rindex(")")]
    depth, count, seen = 0, 0, False
    for char in inside:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif char == "," and depth == 0:
            count += 1
        seen = seen or not char.isspace()
    return count + 1 if seen else 0


def test_the_stub_declares_exactly_what_the_native_module_has():
    functions, attributes, classes = _stub()
    # (test hooks, named _test_*, are declared too; dunders are the module's own)
    native = {name: getattr(_C, name) for name in dir(_C) if not name.startswith("__")}
    native_classes = {name for name, value in native.items() if isinstance(value, type)}
    assert set(classes) == native_classes
    for name in sorted(native_classes):
        members = {m for m in vars(native[name]) if not m.startswith("_")}
        assert set(classes[name]) - {"__init__"} == members, (name, members)
        for member in sorted(members):
            value = vars(native[name])[member]
            if not isinstance(value, property):  # a method: self and its parameters
                assert classes[name][member] == _pybind_arity(value), (name, member, value.__doc__)
        if (native[name].__init__.__doc__ or "").startswith("__init__("):
            assert classes[name]["__init__"] == _pybind_arity(native[name].__init__)
        else:  # made only by the module's functions: the stub declares no constructor either
            assert "__init__" not in classes[name], name
    native_functions = {name for name, value in native.items() if callable(value) and name not in native_classes}
    native_attributes = set(native) - native_functions - native_classes
    assert set(functions) == native_functions, (
        f"missing from _C.pyi: {sorted(native_functions - set(functions))}; "
        f"not in _C: {sorted(set(functions) - native_functions)}"
    )
    assert attributes >= native_attributes, sorted(native_attributes - attributes)
    for name in sorted(native_functions):
        assert functions[name] == _pybind_arity(native[name]), (name, native[name].__doc__.splitlines()[0])
    assert len(native_functions) >= 25  # the comparison saw the whole module


# Pairs (or lists of pairs) that every caller unpacks at once, never indexes.
UNPACKED_PAIRS = {"find_key", "peer_copy_peek", "notices_take"}


def test_native_functions_return_records_not_tuples():
    """Records cross the pybind boundary with named fields: no function of _C returns a
    positional tuple (bar the pairs above), so no caller reads a field by its index."""
    tree = ast.parse((PACKAGE / "_C.pyi").read_text())
    returns = {node.name: ast.unparse(node.returns) for node in tree.body if isinstance(node, ast.FunctionDef)}
    tuples = {name for name, annotation in returns.items() if "tuple[" in annotation}
    assert tuples <= UNPACKED_PAIRS, sorted(tuples - UNPACKED_PAIRS)
    assert {"get_cache", "config", "limits", "default_limits", "usage"} <= returns.keys()


def test_the_arity_parser_reads_nested_types():
    class Fake:
        __doc__ = "f(arg0: tuple[int, list[int]], arg1: str) -> None"

    class Empty:
        __doc__ = "g() -> int"

    assert _pybind_arity(Fake) == 2
    assert _pybind_arity(Empty) == 0


def test_the_package_is_marked_typed():
    assert (PACKAGE / "py.typed").is_file()
