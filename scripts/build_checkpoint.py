"""Train a checkpoint with dslm-pretrain, evaluate it on held-out text, stage it as a Hub repository folder.

How checkpoints/ was made (see docs/publishing.md for the exact commands):

    python scripts/build_checkpoint.py checkpoints/deepscalelm-48l-decoder --repo-id dslm-hf/deepscalelm-48l-decoder \
        --text-file ../shared/data/tinyshakespeare/input.txt -- --objective clm --preset deep-48 ...

Everything after `--` goes to dslm-pretrain unchanged (its --dataset and --validation_fraction are set here from
--text-file and --held-out-fraction, so training never sees the held-out text the card reports on).
"""

import argparse
import json
import sys
import time
from pathlib import Path

from dslm_hf import pretraining
from dslm_hf.publishing import describe_hardware, evaluate_checkpoint, stage_repository, write_eval_file


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="staged repository folder to create (e.g. checkpoints/NAME)")
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--text-file", type=Path, required=True, help="training text; its tail is held out")
    parser.add_argument("--held-out-fraction", type=float, default=0.1)
    parser.add_argument("--dataset-id", default="karpathy/tiny_shakespeare", help="Hub id of the text, for the card")
    parser.add_argument("--dataset-name", default="Tiny Shakespeare")
    parser.add_argument("--run-dir", type=Path, required=True, help="dslm-pretrain --output_dir")
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        parser.error("give the dslm-pretrain arguments after --")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    args.pretrain_args = argv[split + 1:]
    return args


def main(argv=None):
    args = parse_args(argv)
    pretrain_argv = args.pretrain_args + ["--output_dir", str(args.run_dir), "--dataset", str(args.text_file),
                                          "--validation_fraction", str(args.held_out_fraction)]
    settings = pretraining.parse_arguments(pretrain_argv)
    started = time.monotonic()
    metrics = pretraining.train(settings)
    wall_time = time.monotonic() - started
    training = {
        "tokens": metrics["step"] * settings.per_device_train_batch_size * settings.gradient_accumulation_steps
        * settings.block_size,
        "wall_time_seconds": round(wall_time, 1),
        "hardware": describe_hardware(),
        "objective": settings.objective,
        "optimizer_steps": metrics["step"],
        "batch_size_blocks": settings.per_device_train_batch_size * settings.gradient_accumulation_steps,
        "block_size": settings.block_size,
        "peak_learning_rate": settings.learning_rate,
        "schedule": f"{settings.lr_scheduler_type}, {settings.warmup_ratio:.0%} warmup",
        "training_data": f"{args.dataset_name}, all but {args.held_out_fraction:.0%} of the paragraphs (evenly spaced, held out)",
        "command": "dslm-pretrain " + " ".join(pretrain_argv),
    }
    final_dir = Path(metrics["final_dir"])
    results = evaluate_checkpoint(final_dir, args.text_file, training, dataset_id=args.dataset_id,
                                  dataset_name=args.dataset_name, held_out_fraction=args.held_out_fraction,
                                  block_size=settings.block_size)
    eval_file = write_eval_file(results, args.run_dir / "eval_results.json")
    stage_repository(final_dir, args.output, args.repo_id, eval_file)
    print(json.dumps(results["metrics"]), f"-> {args.output}")


if __name__ == "__main__":
    main()
