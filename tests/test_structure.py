"""The shape of the code: kseg's modules import each other without cycles,
and each package only from the packages below it."""

import ast
import collections
from pathlib import Path

KSEG = Path(__file__).resolve().parents[1] / "kseg"
# Lowest first: a package imports only from those before it.
LAYERS = ("layers", "backbones", "models", "data", "training", "export", "inference")
# Semantic evaluation runs kseg.inference's test-time augmentation and
# sliding windows (multi-scale mIoU, as PAN and SegModel report it).
KNOWN_UPWARD = {("kseg.training.semantic", "kseg.inference")}


def _imports():
    graph = collections.defaultdict(set)
    for path in KSEG.rglob("*.py"):
        module = ".".join(path.relative_to(KSEG.parent).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            graph[module].update(n for n in names if n.startswith("kseg."))
    return graph


def _package(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_package_imports_from_a_higher_one():
    upward = set()
    for module, imported in _imports().items():
        for name in imported:
            low, high = _package(module), _package(name)
            if low and high and LAYERS.index(high) > LAYERS.index(low):
                upward.add((module, name))
    assert upward == KNOWN_UPWARD


def test_no_import_cycles():
    graph = _imports()
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for name in sorted(graph.get(module, ())):
            # A package's __init__ only re-exports its modules.
            if name not in graph or name == module or name + "." in module + ".":
                continue
            if state.get(name) == "open":
                cycles.append(path[path.index(name) :] + [name])
            elif name not in state:
                visit(name, path + [name])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_module_is_over_800_lines():
    long = {
        str(path.relative_to(KSEG)): count
        for path in KSEG.rglob("*.py")
        if (count := len(path.read_text().splitlines())) > 800
    }
    assert long == {}, long
