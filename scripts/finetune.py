"""Fine-tune a DeepScaleLM checkpoint with Trainer (optionally LoRA): `python scripts/finetune.py --help`
(the same as `dslm-finetune`; multi-process: `accelerate launch scripts/finetune.py ...`).

Tasks, data handling and metrics live in dslm_hf.finetuning; docs/finetuning.md shows the data formats.
"""

import sys

from dslm_hf.finetuning import main

if __name__ == "__main__":
    sys.exit(main())
