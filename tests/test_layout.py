"""The package layout the README describes holds: `chain` talks to the contract and imports nothing of ours,
`devstack` runs local services, `fednode` never reaches into the research harness, the hospital side never imports
the verifier, and no module imports (directly or through others) a module that imports it back."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("chain", "devstack", "fednode", "research")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """First-party modules `path` imports anywhere in its body (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t.split(".")[0] in PACKAGES}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {name: {t for t in imports_of(path, name) if t in files and t != name} for name, path in files.items()}


def test_chain_imports_nothing_of_fednode_and_devstack_only_chain(graph):
    for name, targets in graph.items():
        tops = {t.split(".")[0] for t in targets}
        if name.startswith("chain"):
            assert tops <= {"chain"}, (name, targets)
        if name.startswith("devstack"):
            assert tops <= {"chain", "devstack"}, (name, targets)
        if name.startswith("fednode"):
            assert "research" not in tops, (name, targets)


def test_the_hospital_side_never_imports_the_verifier(graph):
    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for t in graph[todo.pop()] - seen:
                seen.add(t)
                todo.append(t)
        return seen

    assert "fednode.protocol.verify" not in reach("fednode.protocol.node")
    assert not {m for m in reach("fednode.learning.training") if not m.startswith(("fednode.learning", "fednode.canonical",
                                                                                    "fednode.tables"))}


def test_no_import_cycles(graph):
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for t in sorted(graph[name]):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
