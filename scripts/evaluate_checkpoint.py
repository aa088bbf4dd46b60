"""Write the evaluation file a model card is rendered from: held-out loss/perplexity of a checkpoint, plus the
record of the training run that produced it (the card reports both, and nothing else).

    python scripts/evaluate_checkpoint.py runs/deep-48/final --text_file tinyshakespeare.txt \
        --training '{"tokens": 2457600, "wall_time_seconds": 600, "hardware": "2 CPU cores"}'

The held-out split is --validation_fraction of the text's paragraphs, evenly spaced: train with the same
`dslm-pretrain --validation_fraction` so that it was never trained on. Without the flag, the fraction recorded in
an existing evaluation file at the output path is used (so re-evaluating reproduces the record's split), else
0.1 (the shipped checkpoints' records; dslm-pretrain's own default is 0.05, so give the run's fraction).
"""

import argparse
import json
import sys
from pathlib import Path

from dslm_hf.cli import UserError, run_command, usage_errors_as_user_errors
from dslm_hf.data import read_text_file
from dslm_hf.publishing import EVAL_FILE_NAME, evaluate_checkpoint, write_eval_file


DEFAULT_VALIDATION_FRACTION = 0.1  # the shipped checkpoints' records; dslm-pretrain's own default is 0.05


def build_parser() -> argparse.ArgumentParser:
    """Flags are snake_case (as dslm-pretrain's); each kebab-case spelling still works as an alias."""
    parser = argparse.ArgumentParser(prog="evaluate_checkpoint.py", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint_dir", type=Path)
    parser.add_argument("--text_file", "--text-file", type=Path, required=True)
    parser.add_argument("--training", required=True,
                        help="JSON object (or a path to one) with at least tokens, wall_time_seconds, hardware")
    parser.add_argument("--validation_fraction", "--held_out_fraction", "--held-out-fraction", dest="held_out_fraction",
                        type=float, default=None, help="share of the paragraphs held out, evenly spaced (default: the "
                        f"fraction an existing record at the output path holds, else {DEFAULT_VALIDATION_FRACTION})")
    parser.add_argument("--block_size", "--block-size", type=int, default=None, help="default: the config's init_sequence_length")
    parser.add_argument("--dataset_id", "--dataset-id", default="karpathy/tiny_shakespeare")
    parser.add_argument("--dataset_name", "--dataset-name", default="Tiny Shakespeare")
    parser.add_argument("--output_file", "--output", dest="output", type=Path, default=None,
                        help=f"the evaluation file to write (default: CHECKPOINT_DIR/{EVAL_FILE_NAME})")
    return usage_errors_as_user_errors(parser)


def recorded_fraction(path: Path) -> float | None:
    """The held-out fraction an existing evaluation file records, or None when there is no readable record."""
    try:
        fraction = json.loads(path.read_text(encoding="utf-8"))["dataset"]["held_out_fraction"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return fraction if isinstance(fraction, float) and 0.0 < fraction < 1.0 else None


def evaluate(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    output = args.output or args.checkpoint_dir / EVAL_FILE_NAME
    if args.held_out_fraction is None:
        recorded = recorded_fraction(output)
        args.held_out_fraction = recorded or DEFAULT_VALIDATION_FRACTION
        print(f"--validation_fraction {args.held_out_fraction:g} (not given: "
              f"{f'the fraction recorded in {output}' if recorded else 'the default'})")
    read_text_file(args.text_file, "--text_file")
    training_text = read_text_file(args.training, "--training") if Path(args.training).is_file() else args.training
    try:
        training = json.loads(training_text)
    except json.JSONDecodeError as error:
        raise UserError(f"--training is not a JSON object ({error}): give one inline or as a file") from None
    results = evaluate_checkpoint(args.checkpoint_dir, args.text_file, training, dataset_id=args.dataset_id,
                                  dataset_name=args.dataset_name, held_out_fraction=args.held_out_fraction,
                                  block_size=args.block_size)
    path = write_eval_file(results, output)
    print(json.dumps(results["metrics"]), f"-> {path}")


def main(argv: list[str] | None = None) -> int:
    return run_command("evaluate_checkpoint.py", evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
