"""Nothing in the repository points at a file that is not there: scripts, docs and docstrings
name repository paths (docs/cluster.md, slurm/common.sh, tests/cluster/local-slurm.sh, ...) that a
reader will open, so a move must update every mention."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# a repository-relative path with a file extension, not part of a longer path or URL
PATH = re.compile(r"(?<![\w/.])((?:docs|slurm|tests|benchmarks|hpc_bkd|launch)/[\w./-]*\w\.(?:md|sh|py|sbatch|yaml))")


def _texts() -> list[Path]:
    found = [REPO / n for n in ("README.md", "Makefile", "pytest.ini", "setup.py") if (REPO / n).is_file()]
    for pattern in ("docs/**/*.md", "slurm/*", "hpc_bkd/**/*.py", "tests/**/*.py", "tests/**/*.sh", "benchmarks/**/*.py"):
        found += [p for p in REPO.glob(pattern) if p.is_file()]
    return found


def test_mentioned_repository_paths_exist():
    missing = sorted({f"{f.relative_to(REPO)}: {m.group(1)}" for f in _texts()
                      for m in PATH.finditer(f.read_text(errors="replace")) if not (REPO / m.group(1)).exists()})
    assert not missing, "paths mentioned but not in the repository:\n" + "\n".join(missing)


# Each package imports only from those after it (the order of ``hpc_bkd/__init__.py``'s map).
LAYERS = ["__main__", "launch", "cli", "job", "selection", "deploy", "costs", "distill", "data", "store", "config",
          "distributed", "blocks", "planning", "errors"]


def _import_graph() -> dict[str, set[str]]:
    """Every hpc_bkd module -> the hpc_bkd modules it imports anywhere in its text (module level,
    in functions, under TYPE_CHECKING: a cycle hidden in a function is still a cycle)."""
    import ast

    root = REPO / "hpc_bkd"
    names = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names]
            for target in targets:
                while target not in names and "." in target:
                    target = target.rpartition(".")[0]
                if target in names and target not in (name, "hpc_bkd"):
                    deps.add(target)
        graph[name] = deps
    return graph


def test_no_module_imports_another_in_a_cycle():
    graph = _import_graph()
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                walk(dep, [*path, dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_packages_import_only_the_layers_below_them():
    def layer(module: str) -> str:
        return module.split(".")[1] if "." in module else module

    upward = sorted(f"{m} imports {d}" for m, deps in _import_graph().items() for d in deps
                    if LAYERS.index(layer(d)) < LAYERS.index(layer(m)))
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)
    assert {layer(m) for m in _import_graph()} - {"hpc_bkd"} <= set(LAYERS), "a package missing from LAYERS"
