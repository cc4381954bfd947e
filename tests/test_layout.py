"""Repository layout rules that only a whole-suite run would otherwise reveal."""
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_test_module_basenames_are_unique():
    # tests/ has no __init__.py files: pytest imports each test module by its basename, so two
    # test_x.py in different folders cannot both be collected in one run.
    names = Counter(p.name for p in TESTS.rglob("*.py") if p.name != "conftest.py")
    assert [n for n, c in names.items() if c > 1] == []


ROOT = TESTS.parent
PACKAGES = ("megatron_skpo", "checkpoint_convert")


def _package(module: str) -> str:
    """``megatron_skpo.x.y`` -> ``megatron_skpo.x``; ``checkpoint_convert.y`` -> ``checkpoint_convert``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "megatron_skpo" and len(parts) > 1 else parts[0]


def _runtime_imports(tree) -> list[str]:
    """Every import in a module, function-level (lazy) ones included; ``if TYPE_CHECKING:`` blocks excluded."""
    import ast

    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def package_graph() -> dict[str, set[str]]:
    import ast

    graph: dict[str, set[str]] = {}
    for base in PACKAGES:
        for path in (ROOT / base).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for name in _runtime_imports(ast.parse(path.read_text())):
                if name.startswith(PACKAGES) and _package(name) != _package(module):
                    graph.setdefault(_package(module), set()).add(_package(name))
    return graph


def test_no_import_cycles_between_packages():
    """Layers import downwards only (lazy imports count: a cycle through a function-level import is
    still a cycle), e.g. skpo builds on algo and methods, never the reverse."""
    graph, cycles = package_graph(), []

    def visit(node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt == path[0]:
                cycles.append(" -> ".join(path + [nxt]))
            elif nxt not in path:
                visit(nxt, path + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert cycles == []
    assert "megatron_skpo.skpo" not in graph.get("megatron_skpo.algo", set())
    assert "checkpoint_convert" not in graph.get("megatron_skpo.model", set())
