"""Every console command answers --help (argparse formats help strings with %: a stray % breaks it)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["pretraining", "finetuning", "publishing", "diagnostics"])
def test_console_command_prints_help(module):
    result = subprocess.run([sys.executable, "-m", f"dslm_hf.{module}", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()
