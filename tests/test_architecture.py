"""The layering of docs/architecture.md holds in the code: every module of src/sds is listed there with its
layer, no module imports (at module level or inside a function) from a layer below it in that table, the
modules of one package share a layer, no group of modules imports itself in a circle, and no module is
longer than 400 lines."""
import ast
import re
import shutil
import subprocess

import pytest

from conftest import ROOT

SRC = ROOT / "src"
PACKAGE = SRC / "sds"
MAX_LINES = 400


def documented_layers() -> dict[str, int]:
    table = (ROOT / "docs" / "architecture.md").read_text()
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\| `([\w.]+)` \| (\d) ", table, re.M)}


def _docstring_only(path) -> bool:
    body = ast.parse(path.read_text()).body
    return len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)


def module_files() -> dict[str, object]:
    """Dotted name below `sds` ("core.config"; "sds" for the package itself) → file; task data and the
    package `__init__` files that hold only a docstring left out."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[:2] == ("evaluation", "tasks"):  # lm-eval's task files, data
            continue
        if parts[-1] == "__init__":
            if parts[:-1] and _docstring_only(path):
                continue
            parts = parts[:-1]
        out[".".join(parts) or "sds"] = path
    return out


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> list[str]:
    """Dotted names below `sds` that a relative import of `importer` names (before adding imported names)."""
    base = [] if importer == "sds" else importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return base + (module.split(".") if module else [])


def imported_modules(path, name: str | None = None) -> set[str]:
    """The sds modules a file imports (dotted below `sds`; "sds" for the package), from its syntax tree:
    relative and absolute forms, `from X import submodule` resolved to the submodule."""
    known = module_files()
    name = name or "sds"
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve(name, is_package, node.level, node.module)
            elif node.module and (node.module == "sds" or node.module.startswith("sds.")):
                base = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                sub = ".".join(base + [alias.name])
                found.add(sub if sub in known else (".".join(base) or "sds"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "sds" or alias.name.startswith("sds."):
                    found.add(".".join(alias.name.split(".")[1:]) or "sds")
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: {m for m in imported_modules(path, name) if m != name} for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_documented_with_its_layer():
    modules = set(module_files())
    layers = documented_layers()
    assert modules - set(layers) == set(), "modules missing from docs/architecture.md"
    assert set(layers) - modules == set(), "docs/architecture.md lists modules that do not exist"


def test_the_modules_of_a_package_share_its_layer():
    by_package: dict[str, set[int]] = {}
    for name, layer in documented_layers().items():
        if "." in name:
            by_package.setdefault(name.split(".")[0], set()).add(layer)
    assert {p: ls for p, ls in by_package.items() if len(ls) > 1} == {}


def test_no_module_imports_from_a_layer_below_it():
    layers = documented_layers()
    upward = [f"{name} (layer {layers[name]}) imports {target} (layer {layers[target]})"
              for name, targets in sorted(import_graph().items()) for target in sorted(targets)
              if target in layers and layers[target] > layers[name]]
    assert upward == []


def test_no_import_circle_anywhere():
    assert cycles(import_graph()) == []


def test_no_module_is_longer_than_400_lines():
    long = {name: n for name, path in module_files().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_checks_see_function_level_and_relative_imports(tmp_path):
    probe = PACKAGE / "stages" / "compress.py"
    found = imported_modules(probe, "stages.compress")
    assert {"algorithms.method", "core.layout", "model.passes", "stages.common"} <= found  # `..`, `.`, in functions
    written = tmp_path / "probe.py"
    written.write_text("def f():\n    from ..core import layout\n    from . import common\n    import sds.cli\n")
    assert imported_modules(written, "stages.probe") == {"core.layout", "stages.common", "cli"}


def test_a_circle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.skipif(shutil.which("duplicates") is None, reason="the `duplicates` tool is not on this machine")
def test_src_repeats_no_six_lines():
    out = subprocess.run(["duplicates", "--repo", str(PACKAGE), "--seconds", "60"], capture_output=True, text=True,
                         timeout=120).stdout
    assert out.startswith("no duplicates"), out
