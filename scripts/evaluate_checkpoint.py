"""Write the evaluation file a model card is rendered from: held-out loss/perplexity of a checkpoint, plus the
record of the training run that produced it (the card reports both, and nothing else).

    python scripts/evaluate_checkpoint.py runs/deep-48/final --text-file tinyshakespeare.txt \
        --training '{"tokens": 2457600, "wall_time_seconds": 600, "hardware": "2 CPU cores"}'

The held-out split is --held-out-fraction of the text's paragraphs, evenly spaced: train with the same
`dslm-pretrain --validation_fraction` so that it was never trained on.
"""

import argparse
import json
import sys
from pathlib import Path

from dslm_hf.cli import UserError, run_command, usage_errors_as_user_errors
from dslm_hf.data import read_text_file
from dslm_hf.publishing import EVAL_FILE_NAME, evaluate_checkpoint, write_eval_file


def evaluate(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="evaluate_checkpoint.py", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint_dir", type=Path)
    parser.add_argument("--text-file", type=Path, required=True)
    parser.add_argument("--training", required=True,
                        help="JSON object (or a path to one) with at least tokens, wall_time_seconds, hardware")
    parser.add_argument("--held-out-fraction", type=float, default=0.1)
    parser.add_argument("--block-size", type=int, default=None, help="default: the config's init_sequence_length")
    parser.add_argument("--dataset-id", default="karpathy/tiny_shakespeare")
    parser.add_argument("--dataset-name", default="Tiny Shakespeare")
    parser.add_argument("--output", type=Path, default=None, help=f"default: CHECKPOINT_DIR/{EVAL_FILE_NAME}")
    args = usage_errors_as_user_errors(parser).parse_args(argv)
    read_text_file(args.text_file, "--text-file")
    training_text = read_text_file(args.training, "--training") if Path(args.training).is_file() else args.training
    try:
        training = json.loads(training_text)
    except json.JSONDecodeError as error:
        raise UserError(f"--training is not a JSON object ({error}): give one inline or as a file") from None
    results = evaluate_checkpoint(args.checkpoint_dir, args.text_file, training, dataset_id=args.dataset_id,
                                  dataset_name=args.dataset_name, held_out_fraction=args.held_out_fraction,
                                  block_size=args.block_size)
    path = write_eval_file(results, args.output or args.checkpoint_dir / EVAL_FILE_NAME)
    print(json.dumps(results["metrics"]), f"-> {path}")


def main(argv: list[str] | None = None) -> int:
    return run_command("evaluate_checkpoint.py", evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
