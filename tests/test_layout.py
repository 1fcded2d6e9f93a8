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
