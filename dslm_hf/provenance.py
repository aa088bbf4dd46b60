"""Which code produced a result: the git commit of a checkout and whether its tree differed from it, for the result
files of the benchmarks (benchmarks/common.py) and the scripts that time or measure (scripts/gpu_recipes.py)."""

import os
import subprocess
from pathlib import Path

# A copy sent to a device machine: its .git (if any) is not the sender's, so the sender sets these to the commit and
# the uncommitted paths (comma-separated) of the tree it sent.
COMMIT_ENVIRONMENT, DIRTY_PATHS_ENVIRONMENT = "BENCH_GIT_COMMIT", "BENCH_GIT_DIRTY_PATHS"


def code_version(root: str | os.PathLike, ignored=("benchmarks/results/",)) -> dict:
    """{"git_commit", "git_dirty", "git_dirty_paths"} of the checkout at `root` (a dirty tree is not a recorded
    version). Paths under `ignored` (result files, not code) do not make it dirty; without git all three are None."""
    if os.environ.get(COMMIT_ENVIRONMENT):
        dirty = [path for path in os.environ.get(DIRTY_PATHS_ENVIRONMENT, "").split(",") if path]
        return {"git_commit": os.environ[COMMIT_ENVIRONMENT], "git_dirty": bool(dirty), "git_dirty_paths": dirty}

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(root), capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": None, "git_dirty": None, "git_dirty_paths": None}
    dirty = [line[3:] for line in status.splitlines() if not line[3:].startswith(tuple(ignored))]
    return {"git_commit": commit, "git_dirty": bool(dirty), "git_dirty_paths": dirty}
