"""Train a checkpoint and its same-parameter shallow baseline, evaluate both and count baselines on held-out text,
stage the checkpoint as a Hub repository folder whose card shows all of them.

    python scripts/build_checkpoint.py checkpoints/deepscalelm-48l-decoder --repo_id dslm-hf/deepscalelm-48l-decoder \\
        --text_file tinyshakespeare.txt --run_dir runs/decoder --baseline_layers 4 \\
        -- --objective clm --preset deep-48 --vocab_size 300 --block_size 128 --max_steps 2000 ...

or, with a shipped recipe (dslm_hf/recipes; its settings, recorded in the evaluation file's training["recipe"]):

    python scripts/build_checkpoint.py checkpoints/deepscalelm-48l-decoder --repo_id dslm-hf/deepscalelm-48l-decoder \\
        --text_file tinyshakespeare.txt --run_dir runs/decoder -- --recipe deepscalelm-48l-decoder

Everything after `--` goes to dslm-pretrain unchanged (its --output_dir, --dataset and --validation_fraction are set
here from --run_dir, --text_file and --validation_fraction, so training never sees the held-out text the card reports
on; --validation_fraction defaults to the recipe's, else 0.1). The baseline is the same command with --baseline-layers layers (encoder-decoder: in each stack) at the width
whose parameter count is closest to the model's, the model's tokenizer, the same seed and data, and exactly the
model's number of optimizer steps and learning-rate schedule (so the same training tokens), at
--baseline-learning-rate if given. Runs land in RUN_DIR/model and RUN_DIR/same-parameters.

If the twin or the evaluation fails after the model's run ended, rerun the same command with --reuse_model_run: the
model's weights and training record (RUN_DIR/model/build_training.json) are used as they are, and only the twin
trains.

Both runs are sized by --max_steps: --max_train_minutes is refused, because a time limit that fires cuts the model's
schedule mid-way while its twin, given the same steps, decays fully (a comparison tilted against the deep model).
"""

import argparse
import json
import sys
import time
from pathlib import Path

from accelerate.utils import set_seed
from transformers import AutoTokenizer

from dslm_hf import pretraining, run_recipes
from dslm_hf.baselines import held_out_baselines, same_parameter_shape, weight_gradient_spread
from dslm_hf.cli import UserError, run_command, usage_errors_as_user_errors
from dslm_hf.configuration_deepscalelm import DeepScaleLMConfig
from dslm_hf.data import hold_out_documents, load_corpus, pack_into_blocks
from dslm_hf.diagnostics import usefulness_sources
from dslm_hf.files import write_text_atomically
from dslm_hf.layer_usefulness import causal_lm_batches, measure_layer_usefulness, plot_usefulness, summary_line
from dslm_hf.monitoring import SCALARS as SIGNAL_SCALARS, plot_signals, read_signals
from dslm_hf.provenance import code_version
from dslm_hf.publishing import (describe_hardware, evaluate_checkpoint, parameter_count, stage_repository,
                                write_eval_file)
from dslm_hf.run_metrics import read_metrics

DEFAULT_HELD_OUT_FRACTION = 0.1  # without a recipe: the share the shipped checkpoints were evaluated on
REPOSITORY = Path(__file__).resolve().parents[1]
NOT_CODE = ("checkpoints/", "benchmarks/results/")  # staged outputs and result files: do not make the tree dirty
TRAINING_RECORD = "build_training.json"  # a run's training record, written when it ends (--reuse_model_run)
GRADIENT_SPREAD_BLOCKS = 4  # held-out blocks of the one step the per-layer gradient spread is measured on
SIGNAL_CURVES = 6  # measurements of the layer signals drawn in the staged figure
TRAINING_FIGURE, SIGNALS_FIGURE, USEFULNESS_FIGURE = "training_curve.png", "layer_signals.png", "usefulness.png"
TRAINING_CAPTION = ("Held-out loss during training (each run's evaluation blocks) against training tokens, for this "
                    "model and its same-parameter shallow twin; the count baselines, fitted on the whole training "
                    "split and scored on all held-out blocks, as horizontal lines.")
LAYER_SIGNALS_CAPTION = ("Per-layer weight-gradient norm, variance of the residual stream and its shared-across-tokens "
                         "fraction during training (dslm_hf.monitoring, measured on training batches), from the first "
                         "measurement to the last.")
USEFULNESS_CAPTION = ("Per-layer usefulness on the first {blocks} held-out blocks (dslm_hf.layer_usefulness): the loss "
                      "increase when the layer is skipped, the angular distance between its input and output stream, "
                      "and its share of the gradient norm^2; one curve per kept checkpoint and the final weights.")


def build_parser() -> argparse.ArgumentParser:
    """Flags are snake_case (as dslm-pretrain's); each kebab-case spelling still works as an alias."""
    parser = usage_errors_as_user_errors(
        argparse.ArgumentParser(prog="build_checkpoint.py", description=__doc__.split("\n")[0]))
    parser.add_argument("output", type=Path, nargs="?", default=None,
                        help="staged repository folder to create (e.g. checkpoints/NAME); the same as --output_dir")
    parser.add_argument("--output_dir", type=Path, default=None, help="staged repository folder to create")
    parser.add_argument("--repo_id", "--repo-id", required=True)
    parser.add_argument("--text_file", "--text-file", type=Path, required=True, help="training text; evenly spaced paragraphs are held out")
    parser.add_argument("--validation_fraction", "--held_out_fraction", "--held-out-fraction", dest="held_out_fraction",
                        type=float, default=None, help="share of the paragraphs held out, evenly spaced (passed to "
                        "dslm-pretrain as its --validation_fraction and recorded in the evaluation file); default: "
                        f"the --recipe's validation_fraction, else {DEFAULT_HELD_OUT_FRACTION}")
    parser.add_argument("--dataset_id", "--dataset-id", default="karpathy/tiny_shakespeare", help="Hub id of the text, for the card")
    parser.add_argument("--dataset_name", "--dataset-name", default="Tiny Shakespeare")
    parser.add_argument("--run_dir", "--run-dir", type=Path, required=True, help="the two dslm-pretrain runs go in model/ and same-parameters/")
    parser.add_argument("--baseline_layers", "--baseline-layers", type=int, default=4, help="depth of the same-parameter baseline")
    parser.add_argument("--baseline_learning_rate", "--baseline-learning-rate", type=float, default=None,
                        help="peak learning rate of the baseline (default: the model's)")
    parser.add_argument("--ngram_order", "--ngram-order", type=int, default=4, help="order of the Kneser-Ney baseline (causal LM)")
    parser.add_argument("--usefulness_blocks", type=int, default=0,
                        help="causal LM: measure the per-layer usefulness (dslm_hf.layer_usefulness: ablation cost, "
                        "angular distance, gradient share) of each checkpoint the model's run kept (--save_steps) and of "
                        "its final weights on the first N held-out blocks, staged as usefulness.png/usefulness.json "
                        "and summarised on the card (0: not measured; each measurement costs N/batch x layers forward "
                        "passes)")
    parser.add_argument("--reuse_model_run", action="store_true",
                        help=f"the model's run in RUN_DIR/model already finished (its {TRAINING_RECORD} names the "
                        "same command): use its weights and training record, and train only the twin")
    return parser


def parse_args(argv: list[str]):
    parser = build_parser()
    if "--" not in argv:
        parser.parse_args(argv)  # --help, or argparse's usage error for this script's own arguments
        raise UserError("give the dslm-pretrain arguments after --")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    args.pretrain_args = argv[split + 1:]
    for flag in ("--validation_fraction", "--validation-fraction", "--dataset"):
        if any(arg == flag or arg.startswith(flag + "=") for arg in args.pretrain_args):
            raise UserError(f"{flag} after --: build_checkpoint.py sets dslm-pretrain's held-out share and text itself "
                            "(so the card is evaluated on the paragraphs training never saw): give --validation_fraction "
                            "and --text_file before --")
    if args.output is not None and args.output_dir is not None and args.output != args.output_dir:
        raise UserError(f"OUTPUT {args.output} and --output_dir {args.output_dir} differ: give the staged folder once")
    args.output = args.output or args.output_dir
    if args.output is None:
        raise UserError("give the staged repository folder to create: --output_dir DIR (or as the first argument)")
    if args.held_out_fraction is None:  # the recipe's share is authoritative for the run it builds
        recipe = run_recipes.explicit_values(args.pretrain_args, ("recipe",), prog="build_checkpoint.py").get("recipe")
        recipe_share = (run_recipes.load_recipe(recipe, pretraining.PretrainingArguments).run.get("validation_fraction")
                        if recipe is not None else None)
        args.held_out_fraction = DEFAULT_HELD_OUT_FRACTION if recipe_share is None else recipe_share
    if args.baseline_layers < 1 or args.ngram_order < 1:
        raise UserError("--baseline-layers and --ngram-order must be >= 1")
    if args.usefulness_blocks < 0:
        raise UserError(f"--usefulness_blocks must be >= 0, got {args.usefulness_blocks}")
    return args


def without_option(argv: list[str], flag: str) -> list[str]:
    """`argv` without `flag VALUE` / `flag=VALUE`."""
    kept, skip = [], False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == flag:
            skip = index + 1 < len(argv)
        elif not arg.startswith(flag + "="):
            kept.append(arg)
    return kept


def train_run(pretrain_argv: list[str], dataset_name: str, held_out_fraction: float) -> tuple[Path, dict, object]:
    """(final folder, training record for the evaluation file, parsed settings) of one dslm-pretrain run."""
    settings = pretraining.parse_arguments(pretrain_argv)
    version = code_version(REPOSITORY, ignored=NOT_CODE)  # the code that trains, read before it starts
    started = time.monotonic()
    metrics = pretraining.train(settings)
    batch_blocks = settings.per_device_train_batch_size * settings.gradient_accumulation_steps
    training = {
        "tokens": metrics["step"] * batch_blocks * settings.block_size,
        "wall_time_seconds": round(time.monotonic() - started, 1),
        "hardware": describe_hardware(),
        "objective": settings.objective,
        "optimizer_steps": metrics["step"],
        "batch_size_blocks": batch_blocks,
        "block_size": settings.block_size,
        "peak_learning_rate": settings.learning_rate,
        "schedule": f"{settings.lr_scheduler_type}, {settings.warmup_ratio:.0%} warmup",
        "training_data": f"{dataset_name}, all but {held_out_fraction:.0%} of the paragraphs (evenly spaced, held out)",
        "command": pretrain_command(pretrain_argv),
        "git_commit": version["git_commit"],
        "git_dirty": version["git_dirty"],
    }
    if settings.recipe_content:  # {"name", "file", "content"}: the recipe as this run applied it
        training["recipe"] = json.loads(settings.recipe_content)
    write_text_atomically(Path(settings.output_dir) / TRAINING_RECORD, json.dumps(training, indent=1))
    return Path(metrics["final_dir"]), training, settings


def pretrain_command(pretrain_argv: list[str]) -> str:
    """The dslm-pretrain command line of a run, as its training record holds it (--reuse_model_run compares it)."""
    return "dslm-pretrain " + " ".join(pretrain_argv)


def finished_run(pretrain_argv: list[str]) -> tuple[Path, dict, object]:
    """train_run's result for a run it already finished with exactly this command (--reuse_model_run)."""
    settings = pretraining.parse_arguments(pretrain_argv)
    run, command = Path(settings.output_dir), pretrain_command(pretrain_argv)
    record_path, final_dir = run / TRAINING_RECORD, run / "final"
    if not record_path.is_file() or not (final_dir / "config.json").is_file():
        raise UserError(f"--reuse_model_run: {run} holds no finished run of this script ({TRAINING_RECORD} and "
                        "final/ are written when the model's run ends); leave the flag out to train it")
    training = json.loads(record_path.read_text())
    if training.get("command") != command:
        raise UserError(f"--reuse_model_run: {record_path} was trained by another command "
                        f"({training.get('command')!r}); give the same arguments, or leave the flag out to train anew")
    return final_dir, training, settings


def same_parameter_overrides(config: DeepScaleLMConfig, layers: int) -> tuple[str, int]:
    """(--config_overrides items, parameters) of the `layers`-deep model with the parameter count of `config`'s."""
    ffn_ratio = config.intermediate_size // config.hidden_size

    def shape(depth: int, width: int) -> dict:
        stacks = {"num_hidden_layers": depth} | ({"decoder_layers": depth} if config.is_encoder_decoder else {})
        return stacks | {"hidden_size": width, "intermediate_size": ffn_ratio * width}

    def count(depth: int, width: int) -> int:
        return parameter_count(DeepScaleLMConfig.from_dict(config.to_dict() | shape(depth, width)))

    def accepted(width: int) -> bool:
        try:
            DeepScaleLMConfig.from_dict(config.to_dict() | shape(layers, width))
        except ValueError:
            return False
        return True

    # the widths the configuration's own validation accepts (whole heads; an even head size for rotary positions)
    # are the multiples of the smallest one: search in steps of it (none accepted: the search below names why)
    heads = config.num_attention_heads
    multiple = next((width for width in range(heads, 8 * heads + 1, heads) if accepted(width)), heads)
    try:
        width, parameters = same_parameter_shape(count, parameter_count(config), layers, multiple)
    except ValueError as error:  # the configuration refuses the shape (e.g. too few layers for residual_k)
        raise UserError(f"--baseline-layers {layers}: {error}") from None
    return ",".join(f"{name}={value}" for name, value in shape(layers, width).items()), parameters


def baseline_argv(pretrain_argv: list[str], settings, overrides: str, run_dir: Path, tokenizer_dir: Path,
                  steps: int, learning_rate: float | None) -> list[str]:
    argv = without_option(pretrain_argv, "--output_dir")
    argv = without_option(without_option(argv, "--config_overrides"), "--max_steps")
    argv += ["--output_dir", str(run_dir), "--tokenizer_name", str(tokenizer_dir), "--max_steps", str(steps),
             "--config_overrides", ",".join(filter(None, [settings.config_overrides, overrides]))]
    return argv + (["--learning_rate", str(learning_rate)] if learning_rate is not None else [])


def gradient_spreads(final_dir: Path, settings, text_file: Path, held_out_fraction: float) -> dict:
    """Per-layer weight-gradient spread of the model at its initialisation (rebuilt from the run's seed) and
    trained, on the first held-out blocks."""
    tokenizer = AutoTokenizer.from_pretrained(final_dir, trust_remote_code=False)
    held_out = hold_out_documents(load_corpus(str(text_file)), held_out_fraction)["validation"]
    input_ids = pack_into_blocks(held_out, tokenizer, settings.block_size)[:GRADIENT_SPREAD_BLOCKS]["input_ids"]
    config = DeepScaleLMConfig.from_pretrained(final_dir)
    set_seed(settings.seed)
    initial = pretraining.build_model(config, settings.objective)
    trained = pretraining.AUTO_MODEL_CLASSES[settings.objective].from_pretrained(final_dir)
    return {"blocks": len(input_ids), "initialisation": weight_gradient_spread(initial, input_ids),
            "trained": weight_gradient_spread(trained, input_ids)}


def eval_curve(run: Path) -> list[tuple[int, float]]:
    """(optimizer step, held-out loss on the run's evaluation blocks) of every evaluation of a dslm-pretrain run."""
    return [(record["step"], record["eval_loss"]) for record in read_metrics(run / "metrics.jsonl") if "eval_loss" in record]


def training_figure(results: dict, run_dir: Path, path: Path) -> dict:
    """Held-out loss against training tokens of the model and its same-parameter twin, with the count baselines'
    losses (fitted on the whole training split) as horizontal lines; {file name: caption} for the card."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens_per_step = results["training"]["batch_size_blocks"] * results["training"]["block_size"]
    baselines = results["baselines"]
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for label, run in (("this model", run_dir / "model"), ("same-parameter shallow twin", run_dir / "same-parameters")):
        curve = eval_curve(run)
        axis.plot([step * tokens_per_step for step, _ in curve], [loss for _, loss in curve], marker="o", label=label)
    for key, style in (("ngram", "--"), ("unigram", ":")):
        if key in baselines:
            name = f"{baselines[key]['order']}-gram (Kneser-Ney)" if key == "ngram" else "unigram"
            axis.axhline(baselines[key]["loss"], linestyle=style, color="grey",
                         label=f"{name} on all training tokens: {baselines[key]['loss']:.3f}")
    axis.set(xlabel="training tokens", ylabel="held-out loss (nats per token)", xscale="log")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return {path.name: TRAINING_CAPTION}


def signals_figure(log: Path, path: Path) -> dict:
    """Plot (at most SIGNAL_CURVES measurements, first and last included) and summarise a run's layer signals."""
    rows = read_signals(log)
    picked = sorted({round(i * (len(rows) - 1) / max(1, SIGNAL_CURVES - 1)) for i in range(min(SIGNAL_CURVES, len(rows)))})
    plot_signals([rows[i] for i in picked], path)
    return {"measurements": len(rows), **{
        name: {"step": row["step"], **{key: row[key] for key in SIGNAL_SCALARS}}
        for name, row in (("first", rows[0]), ("last", rows[-1]))}}


def usefulness_figure(run: Path, final_dir: Path, settings, text_file: Path, held_out_fraction: float, blocks: int,
                      final_step: int, path: Path) -> list[dict]:
    """Per-layer usefulness of each kept checkpoint (not the final step's twice) and of the final model on the
    first `blocks` held-out blocks: usefulness.png, usefulness.json next to it, summaries for the evaluation file."""
    tokenizer = AutoTokenizer.from_pretrained(final_dir, trust_remote_code=False)
    held_out = hold_out_documents(load_corpus(str(text_file)), held_out_fraction)["validation"]
    blocks_ids = pack_into_blocks(held_out, tokenizer, settings.block_size)[:blocks]["input_ids"]
    batches = causal_lm_batches([token for block in blocks_ids for token in block], settings.block_size, blocks,
                                settings.per_device_eval_batch_size)
    sources, _ = usefulness_sources(str(run))
    measured = []
    for label, load in sources:
        if label == f"step {final_step}":  # the last checkpoint holds the final weights
            continue
        result = measure_layer_usefulness(load(), batches, progress=True)
        measured.append({"label": label, "summary": summary_line(result, label), **result})
    write_text_atomically(path.with_suffix(".json"), json.dumps({"blocks": len(blocks_ids), "measurements": measured}))
    plot_usefulness([(m["label"], m) for m in measured], path, title=f"Per-layer usefulness ({len(blocks_ids)} held-out blocks)")
    return [{"label": m["label"], "loss": m["loss"], "summary": m["summary"]} for m in measured]


def check_sized_by_steps(model_argv: list[str], usefulness_blocks: int) -> None:
    """Refuse a time limit (the model and its twin must train the same steps under the same schedule) and a
    usefulness measurement of a model it does not apply to, before anything trains."""
    settings = pretraining.parse_arguments(model_argv)
    if usefulness_blocks and settings.objective != "clm":
        raise UserError(f"--usefulness_blocks {usefulness_blocks}: the per-layer usefulness is measured here for causal "
                        f"LMs (--objective clm), not --objective {settings.objective}; measure other models with "
                        "dslm-diagnose --usefulness")
    minutes = settings.max_train_minutes
    if minutes is not None:
        raise UserError(f"--max_train_minutes {minutes:g}: a time limit that fires cuts the model's learning-rate "
                        "schedule mid-way, while its same-parameter twin trained for the same steps decays fully; "
                        "size both runs by --max_steps instead (time a few steps first to choose it)")


def build(argv: list[str]) -> None:
    args = parse_args(argv)
    common = ["--dataset", str(args.text_file), "--validation_fraction", str(args.held_out_fraction)]
    model_argv = without_option(args.pretrain_args, "--output_dir") + ["--output_dir", str(args.run_dir / "model")] + common
    check_sized_by_steps(model_argv, args.usefulness_blocks)
    final_dir, training, settings = (finished_run(model_argv) if args.reuse_model_run else
                                     train_run(model_argv, args.dataset_name, args.held_out_fraction))
    config = DeepScaleLMConfig.from_pretrained(final_dir)

    overrides, parameters = same_parameter_overrides(config, args.baseline_layers)
    print(f"same-parameter baseline: {overrides} ({parameters:,} parameters, the model has {parameter_count(config):,})")
    same_argv = baseline_argv(model_argv, settings, overrides, args.run_dir / "same-parameters",
                              args.run_dir / "model" / "tokenizer", training["optimizer_steps"],
                              args.baseline_learning_rate)
    same_dir, same_training, _ = train_run(same_argv, args.dataset_name, args.held_out_fraction)

    evaluation = {"dataset_id": args.dataset_id, "dataset_name": args.dataset_name,
                  "held_out_fraction": args.held_out_fraction, "block_size": settings.block_size}
    results = evaluate_checkpoint(final_dir, args.text_file, training, **evaluation)
    same_results = evaluate_checkpoint(same_dir, args.text_file, same_training, **evaluation)
    results["baselines"] = held_out_baselines(
        final_dir, same_dir, same_results, args.text_file, held_out_fraction=args.held_out_fraction,
        block_size=settings.block_size, batch_size=results["evaluation"]["batch_size"],
        seed=results["evaluation"]["seed"], ngram_order=args.ngram_order)
    results["gradient_spread"] = gradient_spreads(final_dir, settings, args.text_file, args.held_out_fraction)
    results["training_curve"] = [{"step": record["step"], "eval_loss": record["eval_loss"]}
                                 for record in read_metrics(args.run_dir / "model" / "metrics.jsonl")
                                 if "eval_loss" in record]
    model_run = args.run_dir / "model"
    results["figures"] = training_figure(results, args.run_dir, model_run / TRAINING_FIGURE)
    if (model_run / "layer_signals.jsonl").is_file():  # the run's --signal_every: per-layer signals over training
        results["layer_signals"] = signals_figure(model_run / "layer_signals.jsonl", model_run / SIGNALS_FIGURE)
        results["figures"][SIGNALS_FIGURE] = LAYER_SIGNALS_CAPTION
    if args.usefulness_blocks:
        results["layer_usefulness"] = usefulness_figure(
            model_run, final_dir, settings, args.text_file, args.held_out_fraction, args.usefulness_blocks,
            training["optimizer_steps"], model_run / USEFULNESS_FIGURE)
        results["figures"][USEFULNESS_FIGURE] = USEFULNESS_CAPTION.format(blocks=args.usefulness_blocks)
    write_eval_file(same_results, args.run_dir / "same-parameters" / "eval_results.json")
    eval_file = write_eval_file(results, args.run_dir / "model" / "eval_results.json")
    stage_repository(final_dir, args.output, args.repo_id, eval_file)
    print(json.dumps({"model": results["metrics"], **{name: {k: v for k, v in entry.items() if k != "training"}
                                                       for name, entry in results["baselines"].items()},
                      "gradient_spread": results["gradient_spread"]}), f"-> {args.output}")


def main(argv: list[str] | None = None) -> int:
    return run_command("build_checkpoint.py", build, argv)


if __name__ == "__main__":
    sys.exit(main())
