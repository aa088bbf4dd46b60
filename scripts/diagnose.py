"""Thin wrapper of `dslm-diagnose` (dslm_hf.diagnostics) for a checkout without the console script installed.

    python scripts/diagnose.py MODEL --output_dir DIR
    python scripts/diagnose.py --plan --hidden_size 256 --output_dir DIR
"""

import sys

from dslm_hf.diagnostics import main

if __name__ == "__main__":
    sys.exit(main())
