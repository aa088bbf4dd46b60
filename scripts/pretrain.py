"""Pretrain a DeepScaleLM model: `accelerate launch scripts/pretrain.py --help` (the same as `dslm-pretrain`).

The loop lives in dslm_hf.pretraining, data in dslm_hf.data, checkpoints in dslm_hf.checkpointing, the run-folder
lock and stop signals in dslm_hf.run_control. For status 2 on user errors, run `dslm-pretrain` itself
(docs/failure_modes.md).
"""

import sys

from dslm_hf.pretraining import main

if __name__ == "__main__":
    sys.exit(main())
