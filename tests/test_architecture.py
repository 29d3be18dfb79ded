"""The architecture's rules, enforced (issue 12; ARCHITECTURE.md explains them).

* imports run one way: the import contracts in pyproject.toml (import-linter), which count imports inside functions,
  and no import cycle at all among lorakit's modules (inside a floor too, where the layers contract does not look);
* no module imports another module's ``_private`` names;
* no file outside ``methods/`` branches on a method's or an init's name (the registry line and the bake-off's
  contenders table list methods; they do not compare against them).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import lorakit
from lorakit.config import INITS
from lorakit.methods import available_methods

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "lorakit"


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_package_under_test_is_this_checkout():
    assert Path(lorakit.__file__).resolve().parent == PACKAGE


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "kept" in proc.stdout


def test_the_contracts_catch_an_upward_import(tmp_path):
    """Not vacuous: a copy of the package where layers.py imports model (an upward import) breaks a contract."""
    import shutil

    copy = tmp_path / "src" / "lorakit"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    layers = copy / "layers.py"
    layers.write_text(layers.read_text() + "\n\ndef _upward():\n    from . import model  # noqa: F401\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    proc = subprocess.run([str(lint), "--no-cache"], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode != 0 and "lorakit.layers is not allowed to import lorakit.model" in proc.stdout


def private_imports(path: Path, root: Path = ROOT) -> list[str]:
    """``from X import _name`` of a lorakit module (relative or absolute) in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("lorakit")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(root)}:{node.lineno} imports {alias.name}")
    return found


def test_no_module_imports_another_modules_private_names():
    bad = [hit for path in modules() for hit in private_imports(path)]
    assert bad == []


def test_the_private_import_check_is_not_vacuous(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from ..model import _secret\nfrom lorakit.io import atomic_folder\n")
    assert [h.split(" imports ")[1] for h in private_imports(probe, tmp_path)] == ["_secret"]


# Run in a child process: grimp imports nothing, but it finds the package through sys.path, and the copy in the
# planted-cycle test must not be shadowed by the lorakit this process already imported.
CYCLES = """
import json, grimp
graph = grimp.build_graph("lorakit", exclude_type_checking_imports=True, cache_dir=None)
cycles = []
for importer in sorted(graph.modules):
    for imported in sorted(graph.find_modules_directly_imported_by(importer)):
        back = graph.find_shortest_chain(importer=imported, imported=importer)
        if back:
            cycles.append([importer, *back])
print(json.dumps(cycles))
"""


def import_cycles(src: Path) -> list[list[str]]:
    """Every import edge that closes a cycle, as the cycle's modules (imports inside functions count; imports under
    ``if TYPE_CHECKING:`` do not, since they never run)."""
    import json

    env = {**os.environ, "PYTHONPATH": str(src)}
    proc = subprocess.run([sys.executable, "-c", CYCLES], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_no_import_cycle_among_lorakit_modules():
    assert import_cycles(ROOT / "src") == []


def test_the_cycle_check_catches_a_cycle_inside_one_floor(tmp_path):
    """Not vacuous, and it sees what the layers contract cannot: methods/base.py importing methods/lora.py (which
    imports base) inside a function is a cycle within one floor."""
    import shutil

    copy = tmp_path / "src" / "lorakit"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    base = copy / "methods" / "base.py"
    base.write_text(base.read_text() + "\n\ndef _planted():\n    from . import lora  # noqa: F401\n")
    cycles = import_cycles(tmp_path / "src")
    assert ["lorakit.methods.base", "lorakit.methods.lora", "lorakit.methods.base"] in cycles


def name_branches(path: Path, names: set[str]) -> list[str]:
    """Comparisons (``==``, ``!=``, ``in``, ``not in``) against a string constant, or a tuple/list/set of them,
    that is one of ``names``."""
    found = []

    def constants(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        return []

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                hits = sorted(set(constants(operand)) & names)
                if hits:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} compares with {hits}")
    return found


def test_no_file_outside_methods_branches_on_a_method_or_init_name():
    # "kaiming" is the neutral default init and "lora" the default method's name in argument defaults; a
    # comparison against them is still a branch on a method, so they count too
    names = set(available_methods()) | set(INITS)
    outside = [p for p in modules() if "methods" not in p.relative_to(PACKAGE).parts]
    bad = [hit for path in outside for hit in name_branches(path, names)]
    assert bad == []
