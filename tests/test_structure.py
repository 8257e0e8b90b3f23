"""The shape of the house: no import circles anywhere in the package (imports inside
functions and under TYPE_CHECKING count), the remote layer split into modules of about 600
lines at most, each with one job, and its package's __init__ re-exporting only."""

import ast
import importlib.util
import pathlib

import torch_kvreg as kv

ROOT = pathlib.Path(kv.__file__).parent
MAX_REMOTE_MODULE_LINES = 620


def modules() -> dict[str, pathlib.Path]:
    """Every Python module of the package, by dotted name (a package by its __init__)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ["torch_kvreg", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, wherever the import stands. ``from .
    import x`` imports the module x (not the package) when x is a module. Packages that
    contain ``name`` do not count: Python runs them before ``name`` whatever it imports."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            submodules = {f"{module}.{alias.name}" for alias in node.names} & known
            found |= submodules or {module}
    parents = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
    return found & known - {name} - parents


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of ``graph``, or [] if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str]:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target, path + [target])):
                return found
        state[module] = 2
        return []

    for module in sorted(graph):
        if module not in state and (found := visit(module, [module])):
            return found
    return []


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, set(known)) for name, path in known.items()}


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) >= 30  # every module was read
    assert "torch_kvreg.remote.api" in graph["torch_kvreg.remote.kernels"]  # edges were found
    assert cycle(graph) == [], " -> ".join(cycle(graph))


def test_the_circle_finder_finds_a_planted_circle():
    graph = import_graph()
    graph["torch_kvreg.registry"] = graph["torch_kvreg.registry"] | {"torch_kvreg.remote.api"}
    found = cycle(graph)
    assert found[0] == found[-1] and "torch_kvreg.registry" in found


def test_the_layers_below_the_remote_layer_do_not_import_it():
    graph = import_graph()
    below = ("torch_kvreg.registry", "torch_kvreg._ops", "torch_kvreg.transfer", "torch_kvreg.types")
    for name in below:
        assert not {m for m in graph[name] if m.startswith("torch_kvreg.remote")}, name


def test_the_remote_layer_is_split_into_modules_of_about_600_lines():
    folder = ROOT / "remote"
    sizes = {path.name: len(path.read_text().splitlines()) for path in folder.glob("*.py")}
    assert {"api.py", "engine.py", "control.py", "protocol.py", "jobs.py", "progress.py"} <= sizes.keys()
    assert max(sizes.values()) <= MAX_REMOTE_MODULE_LINES, sizes
    # __init__ re-exports: imports, __all__ and its docstring, nothing else.
    tree = ast.parse((folder / "__init__.py").read_text())
    for node in tree.body:
        is_docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        is_all = isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__all__"]
        assert isinstance(node, (ast.Import, ast.ImportFrom)) or is_docstring or is_all, ast.dump(node)[:200]


def test_no_remote_class_grows_into_a_god_object():
    """The engine before the split was one class of 63 methods; no class now has 40."""
    for path in (ROOT / "remote").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                methods = [n for n in node.body if isinstance(n, ast.FunctionDef)]
                assert len(methods) < 40, (path.name, node.name, len(methods))


def test_every_mutant_still_applies():
    """`make test-mutants` is too slow for CI, so a code change that moves a mutant's text
    would leave its bug unplanted unseen: each original text occurs exactly once in its file
    (what scripts/mutants.py needs to plant it), and names are unique."""
    repo = ROOT.parent
    spec = importlib.util.spec_from_file_location("mutants", repo / "scripts" / "mutants.py")
    mutants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutants)
    stale = []
    for name, path, original, planted, _first in mutants.MUTANTS:
        count = (repo / path).read_text().count(original)
        if count != 1 or planted == original:
            stale.append(f"{name}: {path} has its text {count} times")
    assert not stale, stale
    names = [mutant[0] for mutant in mutants.MUTANTS]
    assert len(names) == len(set(names)) and len(names) > 100
