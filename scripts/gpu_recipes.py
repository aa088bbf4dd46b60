"""Time the GPU recipes (dslm_hf/recipes/*-gpu.json) on this machine before a long run.

    python scripts/gpu_recipes.py --text_file tinyshakespeare.txt --out gpu_recipes.json          # on one GPU
    python scripts/gpu_recipes.py --text_file tests/data/tinyshakespeare_excerpt.txt --smoke      # CPU, tiny sizes

Each recipe trains for --steps optimizer steps as written (bf16 autocast, sdpa attention, compiled layers, its
batch, block and model), in its own `dslm-pretrain` process, logging every --log_every steps. The first logging
window holds the compilation; the median tokens/s of the later windows gives the seconds per step and the projected
minutes of the recipe's own max_steps (training only: evaluation, the final save and the sample come on top).
`--smoke` shrinks each model to 2 layers of width 32 and compiles with aot_eager (the wiring, no code generation),
which is what tests/test_gpu_recipes.py runs on CPU. Prints one Markdown table and writes a JSON record with the
commit, the dirty flag, the machine, the command and the wall time. Exit status 1 when a recipe's run failed.

A full build of one recipe, with its twin and baselines: `python scripts/build_checkpoint.py OUT --repo_id ID
--text_file tinyshakespeare.txt --run_dir RUNS --baseline_layers 4 --ngram_order 6 -- --recipe NAME-gpu`.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dslm_hf import run_recipes
from dslm_hf.pretraining import PretrainingArguments
from dslm_hf.provenance import code_version
from dslm_hf.cli import UserError, run_command, usage_errors_as_user_errors
from dslm_hf.files import write_json_atomically
from dslm_hf.run_metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
GPU_SUFFIX = "-gpu"
SMOKE_MODEL = "num_hidden_layers=2,hidden_size=32,num_attention_heads=2,intermediate_size=64"
SMOKE = ["--torch_compile_backend", "aot_eager", "--block_size", "32", "--per_device_train_batch_size", "4",
         "--max_eval_blocks", "8", "--per_device_eval_batch_size", "8", "--r0_sample_blocks", "8"]


def smoke_arguments(recipe: dict) -> list[str]:
    """Tiny sizes for --smoke: 2 layers of width 32 (and 2 decoder layers for an encoder-decoder)."""
    model = SMOKE_MODEL + (",decoder_layers=2" if recipe["objective"] == "seq2seq" else "")
    return ["--config_overrides", model, *SMOKE]


def gpu_recipes() -> list[str]:
    return [name for name in run_recipes.shipped_recipes() if name.endswith(GPU_SUFFIX)]


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_recipes.py", description=__doc__.split("\n")[0])
    usage_errors_as_user_errors(parser)
    parser.add_argument("--text_file", type=Path, required=True, help="the recipes' corpus (tinyshakespeare's input.txt)")
    parser.add_argument("--recipes", nargs="+", default=None, help=f"default: every shipped *{GPU_SUFFIX} recipe")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps each recipe trains for")
    parser.add_argument("--log_every", type=int, default=5, help="logging window (steps)")
    parser.add_argument("--smoke", action="store_true", help="tiny models, aot_eager: the CPU check of the wiring")
    parser.add_argument("--run_dir", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="JSON record to write")
    args = parser.parse_args(argv)
    if not args.text_file.is_file():
        raise UserError(f"--text_file {args.text_file}: no such file; give the recipes' text (tinyshakespeare's input.txt)")
    unknown = sorted(set(args.recipes or ()) - set(gpu_recipes()))
    if unknown:
        raise UserError(f"--recipes {' '.join(unknown)}: not a shipped GPU recipe; shipped: {', '.join(gpu_recipes())}")
    if args.steps < 2 * args.log_every or args.log_every < 1:
        raise UserError(f"--steps {args.steps} --log_every {args.log_every}: need at least two logging windows "
                        "(the first holds the compilation): raise --steps or lower --log_every")
    return args


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible)"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def probe(name: str, args: argparse.Namespace, run_dir: Path) -> dict:
    """Train recipe `name` for args.steps steps; its timing from metrics.jsonl."""
    recipe = run_recipes.load_recipe(name, PretrainingArguments).content
    output = run_dir / name
    command = [sys.executable, str(REPO / "scripts" / "pretrain.py"), "--recipe", name, "--dataset", str(args.text_file),
               "--output_dir", str(output), "--overwrite_output_dir", "--max_steps", str(args.steps),
               "--logging_steps", str(args.log_every), "--eval_steps", str(args.steps), "--save_steps", "0",
               "--sample_max_new_tokens", "0", *(smoke_arguments(recipe) if args.smoke else [])]
    started = time.monotonic()
    finished = subprocess.run(command, capture_output=True, text=True)
    row = {"recipe": name, "command": " ".join(command[1:]), "wall_time_s": round(time.monotonic() - started, 1),
           "returncode": finished.returncode}
    if finished.returncode != 0:
        return row | {"error": (finished.stderr.strip().splitlines() or ["(no output)"])[-1][:300]}
    records = read_metrics(output / "metrics.jsonl")
    config = records[0]["config"]
    windows = [r["tokens_per_second"] for r in records if "tokens_per_second" in r]
    tokens_per_step = config["per_device_train_batch_size"] * config["block_size"] * config["gradient_accumulation_steps"]
    tokens_per_second = statistics.median(windows[1:])
    seconds_per_step = tokens_per_step / tokens_per_second
    evaluated = [r["eval_loss"] for r in records if "eval_loss" in r]
    return row | {
        "tokens_per_step": tokens_per_step, "first_window_tokens_per_second": windows[0],
        "tokens_per_second": tokens_per_second, "seconds_per_step": seconds_per_step,
        "recipe_max_steps": recipe["max_steps"],
        "projected_training_minutes": recipe["max_steps"] * seconds_per_step / 60,
        "eval_loss": evaluated[-1] if evaluated else None,
        "settings": {key: config.get(key) for key in ("mixed_precision", "attn_implementation", "torch_compile",
                                                        "torch_compile_backend", "per_device_train_batch_size",
                                                        "block_size")},
    }


def table(rows: list[dict]) -> str:
    lines = ["| recipe | s/step | tokens/s | recipe steps | projected training minutes | held-out loss after probe |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['recipe']} | failed: {row['error']} | | | | |")
        else:
            lines.append(f"| {row['recipe']} | {row['seconds_per_step']:.4f} | {row['tokens_per_second']:,.0f} | "
                         f"{row['recipe_max_steps']:,} | {row['projected_training_minutes']:.1f} | "
                         f"{row['eval_loss']:.4f} |")
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    args = parse_arguments(argv)
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = args.run_dir or Path(scratch)
        rows = [probe(name, args, run_dir) for name in (args.recipes or gpu_recipes())]
    print(table(rows))
    if args.out is not None:
        write_json_atomically(args.out, {
            "rows": rows, "device": device_name(), "torch": torch.__version__, "smoke": args.smoke,
            "steps": args.steps, "command": " ".join(["scripts/gpu_recipes.py", *argv]), "wall_time_s": round(time.time() - started, 1),
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **code_version(REPO)})
    return 1 if any("error" in row for row in rows) else 0


def main(argv=None) -> int:
    status = 0

    def remember(arguments):
        nonlocal status
        status = run(arguments)

    run_command("gpu_recipes.py", remember, argv)
    return status


if __name__ == "__main__":
    sys.exit(main())
