"""Which of our packages import which, and the import cycles between modules (read from the source with ast).

    python -m bench.import_graph          # package -> the packages it imports, then the module-level cycles

Counts every `import` and `from ... import` of a first-party module, at any depth in a file (imports inside
functions too: they are dependencies all the same). Relative imports are resolved against the file's package.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("parclean", "prompts", "generation", "cleaning", "flows", "toyworld", "bench", "tests")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """First-party modules that `path` imports."""
    found = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    """Module -> the first-party modules it imports (only names that are modules of this repository)."""
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def package_edges(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in modules.items():
        for target in targets:
            if target.split(".")[0] != module.split(".")[0]:
                edges[module.split(".")[0]].add(target.split(".")[0])
    return edges


def cycles(modules: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(modules.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for node in sorted(modules):
        if node not in index:
            visit(node)
    return found


def main() -> int:
    modules = graph()
    for package, targets in sorted(package_edges(modules).items()):
        print(f"{package} -> {', '.join(sorted(targets))}")
    found = cycles({m: t for m, t in modules.items() if not m.startswith("tests")})
    print("\nimport cycles: " + ("none" if not found else "; ".join(" <-> ".join(group) for group in found)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
