"""The layout's rules, read from the source: imports run one way and never in a circle."""
import ast
from pathlib import Path

from model.settings import REPO_ROOT

PACKAGES = ("app", "model", "training", "deploy", "harness", "bench", "tests")

#: What each package may import of ours (its own modules always).
ALLOWED = {
    "model": set(),
    "app": {"model"},
    "training": {"model"},
    "deploy": {"app", "model"},  # the DICOM node answers through the app's service and record
    "harness": {"model"},
    "bench": {"model", "app", "training", "deploy", "harness"},
    "tests": {"model", "app", "training", "deploy", "harness"},
}


#: Modules held to a narrower rule than their package's: the launcher starts the servers and
#: must stay light (the standard library alone, never torch).
MODULE_ALLOWED = {"deploy.serve": set()}


def our_imports(path: Path, module: str) -> set[str]:
    """Modules of this project that ``path`` (the module ``module``) imports, as dotted names,
    relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found |= {name for name in names if name.split(".")[0] in PACKAGES}
    return found


def sources() -> dict[str, Path]:
    return {".".join(p.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py")}


def test_imports_run_one_way():
    assert wrong_imports(sources()) == []


def wrong_imports(modules: dict[str, Path]) -> list[str]:
    wrong = []
    for module, path in modules.items():
        top = module.split(".")[0]
        allowed = MODULE_ALLOWED.get(module, ALLOWED[top] | {top})
        for imported in our_imports(path, module):
            if imported.split(".")[0] not in allowed:
                wrong.append(f"{module} imports {imported}")
    return sorted(wrong)


def test_no_module_imports_itself_through_a_circle():
    modules = sources()
    graph = {name: {i for i in our_imports(path, name) if i in modules and i != name}
             for name, path in modules.items()}
    assert find_circle(graph) is None


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module -> modules it imports), or None."""
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return trail + [node, nxt]
            if nxt not in state and (circle := visit(nxt, trail + [node])):
                return circle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node, [])):
            return circle
    return None


def test_a_circle_is_found():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_rules_see_a_wrong_import(tmp_path):
    """Relative imports are resolved: ``from ..app import config`` in model/ is an import of app."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..app import config\nfrom . import network\nimport bench.serve\n")
    assert our_imports(probe, "model.probe") == {"app.config", "app", "model.network", "model", "bench.serve"}
    assert wrong_imports({"model.probe": probe}) == ["model.probe imports app", "model.probe imports app.config",
                                                     "model.probe imports bench.serve"]
    assert wrong_imports({"harness.probe": probe}) != []  # harness may import model alone
    assert wrong_imports({"deploy.serve": probe}) != []  # the launcher imports nothing of ours
