"""Pretrain a DeepScaleLM model: `accelerate launch scripts/pretrain.py --help` (the same as `dslm-pretrain`).

The loop, data and checkpointing live in dslm_hf.pretraining and dslm_hf.data.
"""

import sys

from dslm_hf.pretraining import main

if __name__ == "__main__":
    sys.exit(main())
