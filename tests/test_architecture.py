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
from lorakit.methods import Adapter, available_methods, get_method

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


def shown(path: Path) -> str:
    """``path`` relative to the checkout when it is inside it (planted probes live in a temporary folder)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def private_imports(path: Path) -> list[str]:
    """``from X import _name`` of a lorakit module (relative or absolute) in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("lorakit")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{shown(path)}:{node.lineno} imports {alias.name}")
    return found


def test_no_module_imports_another_modules_private_names():
    bad = [hit for path in modules() for hit in private_imports(path)]
    assert bad == []


def test_the_private_import_check_is_not_vacuous(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from ..model import _secret\nfrom lorakit.io import atomic_folder\n")
    assert [h.split(" imports ")[1] for h in private_imports(probe)] == ["_secret"]


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


def string_constants(node: ast.AST) -> list[str]:
    """The string constant ``node`` is, or those of a tuple/list/set of them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def name_branches(path: Path, names: set[str]) -> list[str]:
    """Branches on one of ``names`` in ``path``: a comparison (``==``, ``!=``, ``in``, ``not in``) with a string
    constant (or a tuple/list/set of them), a ``.startswith``/``.endswith`` test, or a ``match`` case."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        tested: list[str] = []
        if isinstance(node, ast.Compare):
            tested = [c for operand in [node.left, *node.comparators] for c in string_constants(operand)]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith") and node.args):
            tested = string_constants(node.args[0])
        elif isinstance(node, ast.MatchValue):
            tested = string_constants(node.value)
        hits = sorted(set(tested) & names)
        if hits:
            found.append(f"{shown(path)}:{node.lineno} branches on {hits}")
    return found


def method_and_init_names() -> set[str]:
    # "kaiming" is the neutral default init and "lora" the default method's name in argument defaults; a
    # comparison against them is still a branch on a method, so they count too
    return set(available_methods()) | set(INITS)


def outside_methods() -> list[Path]:
    return [p for p in modules() if "methods" not in p.relative_to(PACKAGE).parts]


def test_no_file_outside_methods_branches_on_a_method_or_init_name():
    names = method_and_init_names()
    bad = [hit for path in outside_methods() for hit in name_branches(path, names)]
    assert bad == []


def test_the_name_branch_check_is_not_vacuous(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('if cfg.method == "lora_drop": pass\n'
                     'if cfg.init in ("pissa", "loftq"): pass\n'
                     'if "dora" != cfg.method: pass\n'
                     'if init.lower().startswith("pissa"): pass\n'
                     'if init.startswith(("olora", "loftq")): pass\n'
                     'match cfg.method:\n    case "vera": pass\n'
                     'if cfg.method == "not_a_method" or path.endswith(".lora_A"): pass\n')
    hits = name_branches(probe, method_and_init_names())
    assert [h.split(" branches on ")[1] for h in hits] == [
        "['lora_drop']", "['loftq', 'pissa']", "['dora']", "['pissa']", "['loftq']", "['vera']"]


def strategy_classes() -> list[type]:
    return [Adapter] + [get_method(m) for m in available_methods()]


def strategy_attributes() -> tuple[set[str], set[str]]:
    """(public, private) names a strategy declares: its classes' own attributes (ClassVars, hooks, methods) and
    the private attributes the method files set on instances (``self._x = ...``)."""
    public: set[str] = set()
    private: set[str] = set()
    for cls in strategy_classes():
        for klass in cls.__mro__:
            if isinstance(klass, type) and issubclass(klass, Adapter):
                for attr in vars(klass):
                    if not attr.startswith("__"):
                        (private if attr.startswith("_") else public).add(attr)
    for path in (PACKAGE / "methods").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                private.add(node.attr)
    return public, private


def probes_and_private_reads(path: Path, public: set[str], private: set[str]) -> list[str]:
    """``getattr``/``hasattr`` of a name a strategy declares (a capability probed instead of asked), and reads of a
    method's private attribute on anything but ``self``/``cls``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in public | private):
            found.append(f"{shown(path)}:{node.lineno} probes {node.args[1].value!r}")
        if (isinstance(node, ast.Attribute) and node.attr in private
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(f"{shown(path)}:{node.lineno} reads private {node.attr}")
    return found


def test_no_file_outside_methods_probes_a_capability_or_reads_a_methods_private_state():
    public, private = strategy_attributes()
    bad = [hit for path in outside_methods() for hit in probes_and_private_reads(path, public, private)]
    assert bad == []


def test_the_probe_check_is_not_vacuous(tmp_path):
    public, private = strategy_attributes()
    assert {"hooks_done", "needs_hooks", "shifts_base"} <= public and "_compute_norm" in private
    probe = tmp_path / "probe.py"
    probe.write_text('done = getattr(adapter, "hooks_done", False)\n'
                     'if hasattr(adapter, "shifts_base"): pass\n'
                     'norm = adapter._compute_norm(layer)\n'
                     'bias = getattr(module, "bias", None)\n'
                     'self._compute_norm = None\n')
    assert [h.split(":", 1)[1] for h in probes_and_private_reads(probe, public, private)] == [
        "1 probes 'hooks_done'", "2 probes 'shifts_base'", "3 reads private _compute_norm"]


def name_lists(path: Path, methods: set[str], inits: set[str]) -> list[str]:
    """Literal collections (tuple/list/set, or a dict's keys) naming two or more methods, or any init."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Dict):
            named = {k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)}
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            named = set(string_constants(node))
        else:
            continue
        if len(named & methods) >= 2 or named & inits:
            found.append(f"{shown(path)}:{node.lineno} lists {sorted(named & (methods | inits))}")
    return found


def test_only_the_registry_and_the_contenders_table_list_methods():
    """Lists of methods or inits live in methods/ (the registry line; each init in its method's file) and in
    compare.py (the bake-off's contenders table and its presets). ``config.INITS`` is the schema's one list of
    the values ``AdapterConfig.init`` accepts."""
    methods, inits = set(available_methods()), set(INITS)
    allowed = {PACKAGE / "compare.py"}
    bad = [hit for path in outside_methods() if path not in allowed for hit in name_lists(path, methods, inits)]
    assert bad == [f"src/lorakit/config.py:{config_inits_line()} lists {sorted(inits)}"]


def config_inits_line() -> int:
    text = (PACKAGE / "config.py").read_text().splitlines()
    return next(i for i, line in enumerate(text, 1) if line.startswith("INITS = "))


def test_the_list_check_is_not_vacuous(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('CHOICES = ("lora", "dora", "vera")\nRULES = {"pissa": 1}\nONE = ["lora"]\n')
    hits = name_lists(probe, set(available_methods()), set(INITS))
    assert [h.split(" lists ")[1] for h in hits] == ["['dora', 'lora', 'vera']", "['pissa']"]


def lorakit_imports_inside_functions(path: Path) -> list[tuple[str, str]]:
    """(function, imported module) for each import of a lorakit module made inside a function of ``path``."""
    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("lorakit")):
                    found.append((fn.name, "." * node.level + (node.module or "")))
                elif isinstance(node, ast.Import):
                    found += [(fn.name, a.name) for a in node.names if a.name.startswith("lorakit")]
    return found


#: the only places a lorakit module is imported inside a function (with imports running one way, none is needed to
#: dodge a cycle): the CLI imports a command's machinery when that command runs, so ``lorakit --help`` stays quick;
#: quant/'s package ``__getattr__`` forwards the 0.1.0 names; compare imports a contender's optional procedure
#: when it runs, so ``availability()`` can report a build without it
DELIBERATE_INNER_IMPORTS = {
    "cli.py": None,  # every command
    "quant/__init__.py": {"__getattr__"},
    "compare.py": {"_quantise_base", "_lora_drop_two_stages"},
}


def test_imports_inside_functions_are_only_the_deliberate_ones():
    bad = []
    for path in modules():
        rel = str(path.relative_to(PACKAGE))
        allowed = DELIBERATE_INNER_IMPORTS.get(rel, set())
        bad += [f"{rel}: {fn} imports {mod}" for fn, mod in lorakit_imports_inside_functions(path)
                if allowed is not None and fn not in allowed]
    assert bad == []


def test_the_inner_import_check_is_not_vacuous(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import json\n\ndef f():\n    from ..model import attach\n    import lorakit.io\n    import yaml\n")
    assert lorakit_imports_inside_functions(probe) == [("f", "..model"), ("f", "lorakit.io")]


def rule_sites(pattern: str) -> list[str]:
    """Lines of the package matching ``pattern`` (a regex), as ``file:line``."""
    import re

    rx = re.compile(pattern)
    return [f"{p.relative_to(PACKAGE)}:{i}" for p in modules()
            for i, line in enumerate(p.read_text().splitlines(), 1) if rx.search(line)]


def test_one_rule_one_place():
    """Each rule is written once: what a Conv1D is, what a norm is, the suffix-or-regex name rule (PEFT's own key
    rule is PEFT's, in methods/peft_lora.py and io/peft.py), which model a name means, the loader's rollback."""
    assert [s.split(":")[0] for s in rule_sites(r'"Conv1D"')] == ["quant/linear4bit.py"]
    assert [s.split(":")[0] for s in rule_sites(r"def _?is_norm\b|_NORM_NAME = ")] == ["layers.py", "layers.py"]
    assert [s.split(":")[0] for s in rule_sites(r'endswith\("\." \+ name\)')] == ["config.py"]
    assert [s.split(":")[0] for s in rule_sites(r"def (resolve_model_path|_?resolve_model\w*)\b")] == [
        "compare.py", "train/job.py"]  # compare.resolve_model only forwards to train.job's
    assert [s.split(":")[0] for s in rule_sites(r"def roll_back\b|def _?rollback\b")] == ["io/loader.py"]


def test_architecture_md_names_every_module_and_only_real_ones():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    unnamed = [str(p.relative_to(PACKAGE)) for p in modules() if p.name != "__init__.py"
               and str(p.relative_to(PACKAGE)) not in text and f"`{p.name}`" not in text]
    assert unnamed == []
    import re

    named = set(re.findall(r"`((?:[a-z_]+/)*[a-z_0-9]+\.py)`", text))
    real = {str(p.relative_to(PACKAGE)) for p in modules()} | {p.name for p in modules()}
    # the walk-through's file is the one a member *would* have in the package; tests/ files are named with their path
    missing = sorted(n for n in named if not any(r == n or r.endswith("/" + n) for r in real)
                     and not (ROOT / n).exists() and n != "src/lorakit/methods/row_scaled_lora.py")
    assert missing == []


def test_architecture_md_walk_through_is_the_tested_member():
    """Every line of code in ARCHITECTURE.md's walk-through is a line of tests/test_family_member.py's member."""
    import re

    text = (ROOT / "ARCHITECTURE.md").read_text()
    block = re.search(r"```python\n(class RowScaledLora.*?)```", text, re.S).group(1)
    member = {line.split("  #")[0].strip().replace("method = NAME", 'method = "row_scaled_lora"')
              for line in (ROOT / "tests" / "test_family_member.py").read_text().splitlines()}
    code = [line.split("  #")[0].strip() for line in block.splitlines()]
    code = [line for line in code if line and not line.startswith("#")]
    assert len(code) > 15 and [line for line in code if line not in member] == []
