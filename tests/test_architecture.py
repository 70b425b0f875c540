"""The layering of docs/architecture.md holds in the code: every module of src/sds is listed there, and no
module imports (at module level or inside a function) from a layer below it in that table."""
import ast
import re

from conftest import ROOT

SRC = ROOT / "src" / "sds"


def documented_layers() -> dict[str, int]:
    table = (ROOT / "docs" / "architecture.md").read_text()
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\| `([\w]+)` \| (\d) ", table, re.M)}


def imported_modules(path) -> set[str]:
    """The sds modules a file imports, from its syntax tree (relative and absolute forms)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("sds."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("sds."))
    return found


def test_every_module_is_documented_with_its_layer():
    modules = {p.stem for p in SRC.glob("*.py")}
    layers = documented_layers()
    assert modules - set(layers) == set(), "modules missing from docs/architecture.md"
    assert set(layers) - modules == set(), "docs/architecture.md lists modules that do not exist"


def test_no_module_imports_from_a_layer_below_it():
    layers = documented_layers()
    upward = []
    for path in sorted(SRC.glob("*.py")):
        mine = layers[path.stem]
        for name in imported_modules(path):
            if name in layers and layers[name] > mine:
                upward.append(f"{path.stem} (layer {mine}) imports {name} (layer {layers[name]})")
    assert upward == []


def test_the_check_sees_function_level_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from .stages import prune1\n    from . import cli\n    import sds.io\n")
    assert imported_modules(probe) == {"stages", "cli", "io"}
