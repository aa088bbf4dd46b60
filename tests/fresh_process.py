"""Python code run in a fresh process that cannot import dslm_hf: the path of a Hub user without the package.

The package is installed (editable) on this machine, so the process refuses it with a meta-path finder placed ahead
of every other one (the editable install's own finder included), runs outside the repository and with PYTHONPATH
cleared: only a checkpoint's own code files (trust_remote_code) can build a DeepScaleLM model there.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

# Prepended to the code of every fresh process: any import of dslm_hf raises ImportError.
BLOCK_DSLM_HF = textwrap.dedent("""
    import importlib.abc, sys

    class BlockDslmHf(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "dslm_hf" or name.startswith("dslm_hf."):
                raise ImportError(f"{name} is blocked: the model must come from the repository's own code")

    sys.meta_path.insert(0, BlockDslmHf())
""")


def run_without_dslm_hf(code: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """stdout of `python -c BLOCK_DSLM_HF + code args...` (one torch thread, offline); fails the test on an error."""
    environment = dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(cwd / "hf-home"))
    completed = subprocess.run([sys.executable, "-c", BLOCK_DSLM_HF + code, *args], cwd=cwd,
                               env=environment | (env or {}), capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout
