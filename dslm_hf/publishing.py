"""Publish a trained DeepScaleLM checkpoint to the Hugging Face Hub: evaluate, validate, stage, card, push.

    # 1. numbers for the card: held-out loss of the weights on the paragraphs dslm-pretrain held out
    #    (its --validation_fraction, 5% by default) + the run's record
    python scripts/evaluate_checkpoint.py runs/deep-48/final --text-file tinyshakespeare.txt \
        --held-out-fraction 0.05 --training '{"tokens": 2457600, "wall_time_seconds": 600, "hardware": "2 CPU cores"}'
    # 2. stage the repository folder and list it without any network
    dslm-publish runs/deep-48/final --repo-id org/deepscalelm-48 --dry-run
    # 3. the same, pushed (create_repo + upload_folder)
    dslm-publish runs/deep-48/final --repo-id org/deepscalelm-48 --token hf_...

Staging refuses, before anything is uploaded, whatever would break users: pickle files, truncated or corrupt
safetensors, weights that do not match the architecture the config describes, and a card whose numbers do not
come from an evaluation file of exactly these weights.
"""

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import AutoTokenizer

from .checkpointing import REMOTE_CODE_FILES, CorruptFileError, file_sha256, give_normal_permissions, loading, save_tokenizer
from .cli import UserError, run_command, usage_errors_as_user_errors
from .configuration_deepscalelm import DeepScaleLMConfig
from .data import hold_out_documents, load_corpus, make_collator, pack_into_blocks, stack_blocks
from .evaluation import evaluate
from .export import stage_native_twin
from .files import write_text_atomically
from .folder_checks import PublishRefusal, check_checkpoint, weights_digest
from .heads import HEADS, OBJECTIVE_OF_TASK, architecture_class, parameter_count, task_of
from .recipe_deepscalelm import deepscalelm_residual_scales, residual_branch_total

CARD_TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
EVAL_FILE_NAME = "eval_results.json"
LICENSE = "apache-2.0"  # the published model's, native twin included

TASK_DESCRIPTIONS = {
    "causal-lm": ("causal language model (decoder)", "Causal Language Modeling"),
    "masked-lm": ("masked language model (encoder)", "Masked Language Modeling"),
    "seq2seq-lm": ("encoder-decoder (span-corruption denoiser)", "Text-to-Text Generation"),
}
USAGE_EXAMPLES = {
    "causal-lm": (
        'inputs = tokenizer("ROMEO:", return_tensors="pt")\n'
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40, do_sample=True)[0]))"
    ),
    "masked-lm": (
        "from transformers import pipeline\n\n"
        'fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)\n'
        'print(fill(f"ROMEO: I will {tokenizer.mask_token} thee."))'
    ),
    "seq2seq-lm": (
        "# transformers 5.24 removed the text2text-generation pipeline: generate() fills the masked spans\n"
        'inputs = tokenizer("ROMEO: I will <extra_id_0> thee.", return_tensors="pt")\n'
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))"
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: the only source of the numbers a card reports
# ----------------------------------------------------------------------------------------------------------------
WHAT_IT_DOES = {"causal-lm": "continues text", "masked-lm": "fills masked tokens in text",
                "seq2seq-lm": "fills masked spans of text"}
REQUIRED_TRAINING_FIELDS = {"tokens": int, "wall_time_seconds": (int, float), "hardware": str}


def describe_hardware() -> str:
    """What a CPU run trained or evaluated on, in words: processor, cores torch used, torch version."""
    processor = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        processor = names[0] if names else processor
    threads = torch.get_num_threads()
    return (f"{threads} CPU thread{'s' if threads > 1 else ''} of a {os.cpu_count()}-core machine ({processor}), "
            f"torch {torch.__version__}")


def held_out_metrics(model, tokenizer, text_file: Path, task: str, *, held_out_fraction: float, block_size: int,
                     batch_size: int, seed: int) -> tuple[dict, int]:
    """({"eval_loss", "eval_perplexity"}, blocks) of `model` on the held-out tail of `text_file`.

    The split is the one pretraining holds out with the same `--validation_fraction`
    (`dslm_hf.data.hold_out_documents`: that fraction of the text's documents, evenly spaced, never trained on),
    and the loss is `dslm_hf.evaluation.evaluate`, the token-level loss pretraining reports, whose masking / span
    corruption is seeded per batch from `seed`: reproducible.
    """
    held_out = hold_out_documents(load_corpus(str(text_file)), held_out_fraction)["validation"]
    blocks = pack_into_blocks(held_out, tokenizer, block_size)
    loader = torch.utils.data.DataLoader(blocks, batch_size=batch_size, collate_fn=stack_blocks)
    collator = make_collator(OBJECTIVE_OF_TASK[task], tokenizer, block_size)
    return evaluate(Accelerator(cpu=True), model, loader, collator, seed), len(blocks)


def evaluate_checkpoint(checkpoint_dir: Path, text_file: Path, training: dict, *, dataset_id: str,
                        dataset_name: str, held_out_fraction: float = 0.1, block_size: int | None = None,
                        batch_size: int = 8, seed: int = 0) -> dict:
    """Measure a checkpoint on held-out text and return the evaluation record a model card is rendered from.

    `training` describes the run that produced the weights (at least `tokens`, `wall_time_seconds`, `hardware`);
    it is copied as given. The record names the weights it measured by `weights_digest`, so a card can never show
    numbers of other weights.
    """
    checkpoint_dir, text_file = Path(checkpoint_dir), Path(text_file)
    config = check_checkpoint(checkpoint_dir)
    check_training_record(training, source="training")
    task = task_of(config)
    block_size = block_size or config.init_sequence_length
    with loading("the tokenizer", checkpoint_dir):
        tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir, trust_remote_code=False)
    with loading("the weights", checkpoint_dir):
        model = architecture_class(config).from_pretrained(checkpoint_dir)
    measured, blocks = held_out_metrics(
        model, tokenizer, text_file, task, held_out_fraction=held_out_fraction, block_size=block_size,
        batch_size=batch_size, seed=seed,
    )
    return {
        "weights_sha256": weights_digest(checkpoint_dir),
        "task": task,
        "metrics": {"loss": measured["eval_loss"], "perplexity": measured["eval_perplexity"]},
        "dataset": {
            "id": dataset_id,
            "name": dataset_name,
            "file": text_file.name,
            "file_sha256": file_sha256(text_file),
            "split": "validation",
            "held_out_fraction": held_out_fraction,
            "block_size": block_size,
            "blocks": blocks,
            "tokens": blocks * block_size,
        },
        "evaluation": {"batch_size": batch_size, "seed": seed, "hardware": describe_hardware()},
        "training": dict(training),
    }


def write_eval_file(results: dict, path: Path) -> Path:
    """Written atomically: a reader sees the previous file or the complete new one."""
    return write_text_atomically(path, json.dumps(results, indent=2) + "\n")


# Relative difference allowed between recorded and recomputed numbers: the evaluation is seeded and deterministic,
# so only float summation order (thread count, kernels of another torch build) may differ, far below 1e-4.
VERIFY_RELATIVE_TOLERANCE = 1e-4


def verify_eval_file(results: dict, checkpoint_dir: Path, text_file: Path) -> dict:
    """Recompute the evaluation record's numbers from the weights in `checkpoint_dir` on the held-out data it names
    (the same text by sha256, held-out fraction, block size, batch size and seed); refuse any disagreement.
    Returns the recomputed record."""
    dataset, evaluation = results["dataset"], results.get("evaluation", {})
    if file_sha256(text_file) != dataset["file_sha256"]:
        raise PublishRefusal(f"--verify-eval {text_file} is not the text the evaluation measured (its sha256 differs "
                             f"from dataset.file_sha256 {dataset['file_sha256'][:16]}...): give {dataset['file']}")
    recomputed = evaluate_checkpoint(
        checkpoint_dir, text_file, results["training"], dataset_id=dataset["id"], dataset_name=dataset["name"],
        held_out_fraction=dataset["held_out_fraction"], block_size=dataset["block_size"],
        batch_size=evaluation.get("batch_size", 8), seed=evaluation.get("seed", 0))
    if recomputed["dataset"]["tokens"] != dataset["tokens"]:
        raise PublishRefusal(f"--verify-eval: the held-out data has {recomputed['dataset']['tokens']} tokens, the "
                             f"evaluation file records {dataset['tokens']}: re-evaluate this checkpoint")
    for metric in ("loss", "perplexity"):
        recorded, measured = results["metrics"][metric], recomputed["metrics"][metric]
        if not math.isclose(recorded, measured, rel_tol=VERIFY_RELATIVE_TOLERANCE):
            raise PublishRefusal(f"--verify-eval: the weights give held-out {metric} {measured:.6g}, the evaluation "
                                 f"file (and the card) say {recorded:.6g}: re-evaluate this checkpoint")
    return recomputed


def check_training_record(training, source: str) -> None:
    if not isinstance(training, dict):
        raise PublishRefusal(f"{source} must be a JSON object describing the training run, got {type(training).__name__}")
    for field, kinds in REQUIRED_TRAINING_FIELDS.items():
        value = training.get(field)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise PublishRefusal(f"{source}.{field} is {value!r}: the card needs it from the evaluation file")


def _number(results: dict, dotted: str, path: Path) -> float:
    value = results
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise PublishRefusal(f"evaluation file {path} has no {dotted}: the card can only report measured numbers")
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PublishRefusal(f"evaluation file {path}: {dotted}={value!r} is not a finite number")
    return value


def load_eval_file(path: Path | None, checkpoint_dir: Path, config: DeepScaleLMConfig) -> dict:
    """The evaluation record of exactly the weights in `checkpoint_dir`, refusing a missing, malformed or
    mismatched file (numbers of other weights, of another task, or a perplexity that is not exp(loss))."""
    if path is None:
        raise PublishRefusal(
            "no evaluation file: the card's numbers must come from one. Write it with "
            "scripts/evaluate_checkpoint.py (dslm_hf.publishing.evaluate_checkpoint) and pass --eval-file"
        )
    path = Path(path)
    if not path.is_file():
        raise PublishRefusal(f"evaluation file {path} does not exist")
    try:
        results = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PublishRefusal(f"evaluation file {path} is not valid JSON ({error})") from None
    if not isinstance(results, dict):
        raise PublishRefusal(f"evaluation file {path} must hold a JSON object")
    loss = _number(results, "metrics.loss", path)
    perplexity = _number(results, "metrics.perplexity", path)
    if not math.isclose(perplexity, math.exp(loss), rel_tol=1e-6):
        raise PublishRefusal(f"evaluation file {path}: perplexity {perplexity} is not exp(loss) = {math.exp(loss)}")
    for field in ("id", "name", "split", "file", "file_sha256"):
        if not isinstance(results.get("dataset", {}).get(field), str):
            raise PublishRefusal(f"evaluation file {path} has no dataset.{field} (a string)")
    _number(results, "dataset.held_out_fraction", path)
    _number(results, "dataset.block_size", path)
    _number(results, "dataset.tokens", path)
    check_training_record(results.get("training"), source=f"evaluation file {path}: training")
    if results.get("task") != task_of(config):
        raise PublishRefusal(
            f"evaluation file {path} measured task {results.get('task')!r} but the checkpoint is a {task_of(config)} "
            f"({config.architectures[0]})"
        )
    if results.get("weights_sha256") != weights_digest(checkpoint_dir):
        raise PublishRefusal(
            f"evaluation file {path} measured other weights than those in {checkpoint_dir} (weights_sha256 differs): "
            "re-evaluate this checkpoint"
        )
    return results


# ----------------------------------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------------------------------
def architecture_rows(config: DeepScaleLMConfig) -> list[tuple[str, str]]:
    rows = [
        ("architecture", config.architectures[0]),
        ("parameters", f"{parameter_count(config):,}"),
    ]
    for stack, layers, branches in config.residual_stacks():
        rows.append((f"{stack} layers", str(layers)))
    rows += [
        ("hidden size", str(config.hidden_size)),
        ("attention heads", str(config.num_attention_heads)),
        ("FFN size", f"{config.intermediate_size} ({config.hidden_act})"),
        ("vocabulary", str(config.vocab_size)),
        ("positions", f"{config.position_embedding_type}, up to {config.max_position_embeddings} tokens"),
        ("LayerNorm placement", f"{config.norm_placement}-LN"),
        ("initialisation", config.init_scheme),
    ]
    if config.init_scheme == "deepscalelm":
        for stack, layers, branches in config.residual_stacks():
            total = residual_branch_total(layers, branches, config.residual_branch_count)
            lam, beta = deepscalelm_residual_scales(config.residual_k, total, config.residual_beta2)
            rows.append((f"{stack} residual scales", f"lambda^2 = {lam * lam:.5f}, beta^2 = {beta * beta:.5f}"))
        rows.append(("embedding correlation r0 (from the data)", f"{config.embedding_correlation:.4f}"))
    rows += [
        ("dropout (hidden / attention)", f"{config.hidden_dropout_prob} / {config.attention_probs_dropout_prob}"),
        ("tied word embeddings", str(config.tie_word_embeddings)),
    ]
    return rows


TRAINING_LABELS = {"tokens": "training tokens", "wall_time_seconds": "wall time", "hardware": "hardware",
                   "batch_size_blocks": "batch size (blocks)", "optimizer_steps": "optimizer steps",
                   "git_commit": "code (dslm_hf git commit)", "git_dirty": "uncommitted code changes"}


def _format_training_value(name: str, value) -> str:
    if name == "wall_time_seconds":
        return f"{value:.0f} s ({value / 60:.1f} min)"
    if name == "recipe" and isinstance(value, dict):  # build_checkpoint's record of `dslm pretrain --recipe`
        return f"{value.get('name')} (dslm pretrain --recipe; its settings are in eval_results.json)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def twin_stacks(same: dict) -> str:
    """'4-layer decoder' (' + '-joined per stack) of a same-parameter baseline record."""
    return " + ".join(f"{layers}-layer {name.removesuffix('_layers')}" for name, layers in same.items()
                      if name.endswith("_layers"))


def baseline_and_training_rows(results: dict) -> list[tuple[str, str]]:
    """Card rows of the baselines, gradient spread and training curve an evaluation record holds
    (scripts/build_checkpoint.py writes them; the baselines with dslm_hf.baselines.held_out_baselines, on the same
    held-out split as the model's numbers)."""
    baselines, rows = results.get("baselines", {}), []
    if "same_parameters" in baselines:
        same = baselines["same_parameters"]
        rows.append((f"same-parameter shallow model ({twin_stacks(same)}, width-{same['hidden_size']}, {same['parameters']:,} "
                     "parameters; same data, tokens and steps): held-out loss / perplexity",
                     f"{same['loss']:.4f} / {same['perplexity']:.2f}"))
    if "ngram" in baselines:
        ngram = baselines["ngram"]
        rows.append((f"{ngram['order']}-gram, {ngram['smoothing']}, fitted on the training split: loss / perplexity",
                     f"{ngram['loss']:.4f} / {ngram['perplexity']:.2f}"))
    if "unigram" in baselines:
        rows.append(("token frequencies (add-one unigram of the training split): loss / perplexity",
                     f"{baselines['unigram']['loss']:.4f} / {baselines['unigram']['perplexity']:.2f}"))
    for key, what in (("fill_mask", "held-out mask-token positions"), ("spans", "hidden span tokens, teacher-forced")):
        if key in baselines:
            scored = baselines[key]
            sources = [scored["model"], scored["same_parameters"], scored["unigram"]]
            rows.append((f"top-1 accuracy on {scored['tokens']:,} {what}: this model / same-parameter model / token "
                         "frequencies", " / ".join(f"{source['accuracy']:.1%}" for source in sources)))
            rows.append(("loss on those tokens (nats): this model / same-parameter model / token frequencies",
                         " / ".join(f"{source['loss']:.4f}" for source in sources)))
    spread = results.get("gradient_spread")
    for stack, initial in (spread or {}).get("initialisation", {}).items():
        rows.append((f"per-layer weight-gradient spread (max/min, {stack}): at initialisation -> trained",
                     f"{initial:.2f} -> {spread['trained'][stack]:.2f}"))
    signals = results.get("layer_signals")  # build_checkpoint.py: the run's --signal_every measurements
    if signals:
        first, last = signals["first"], signals["last"]
        rows.append(("per-layer weight gradient during training (training batches), first / last layer norm and "
                     "max / min over layers, at steps "
                     f"{first['step']:,} -> {last['step']:,}",
                     f"{first['grad_first_last']:.2f} -> {last['grad_first_last']:.2f}; "
                     f"{first['grad_spread']:.2f} -> {last['grad_spread']:.2f}"))
    for measured in results.get("layer_usefulness", []):  # build_checkpoint.py --usefulness_blocks
        rows.append((f"per-layer usefulness ({measured['label']})", measured["summary"]))
    curve = results.get("training_curve")
    if curve:
        rows.append(("held-out loss during training (its evaluation blocks), step: loss",
                     ", ".join(f"{point['step']:,}: {point['eval_loss']:.3f}" for point in curve)))
    return rows


def baseline_comparison(results: dict, task: str) -> str | None:
    """One sentence: whether the model beats the count baseline its evaluation record holds, and by how much."""
    baselines, loss = results.get("baselines", {}), results["metrics"]["loss"]
    if task == "causal-lm" and "ngram" in baselines:
        ngram = baselines["ngram"]
        gap = loss - ngram["loss"]
        return (f"On the same held-out blocks it {'does not beat' if gap > 0 else 'beats'} the {ngram['order']}-gram "
                f"({ngram['smoothing']}) fitted on the same training text: held-out loss {loss:.4f} against "
                f"{ngram['loss']:.4f}, {abs(gap):.4f} nats per token {'worse' if gap > 0 else 'better'}.")
    scored = baselines.get("fill_mask" if task == "masked-lm" else "spans")
    if scored is not None:
        gap = scored["model"]["accuracy"] - scored["unigram"]["accuracy"]
        return (f"At the same held-out positions its top-1 accuracy is {scored['model']['accuracy']:.1%}, "
                f"{abs(gap) * 100:.1f} percentage points {'above' if gap > 0 else 'below or at'} always predicting "
                f"the most frequent "
                f"training token ({scored['unigram']['accuracy']:.1%}).")
    return None


def depth_comparison(results: dict) -> str | None:
    """One sentence: whether depth paid against the record's same-parameter shallow model, and by how much."""
    same = results.get("baselines", {}).get("same_parameters")
    if same is None:
        return None
    loss, gap = results["metrics"]["loss"], results["metrics"]["loss"] - same["loss"]
    model_rate = results.get("training", {}).get("peak_learning_rate")
    same_rate = same.get("training", {}).get("peak_learning_rate")
    how = "Trained identically (same data, steps and tokens)" if same_rate == model_rate else \
        f"Trained on the same data, steps and tokens at peak learning rate {same_rate:g} (this model: {model_rate:g})"
    verdict = ("depth did not pay at this budget, the shallow model is {:.4f} nats per token better." if gap > 0
               else "this deeper model is {:.4f} nats per token better." if gap < 0 else "a tie ({:.4f}).")
    return (f"{how}, its same-parameter {twin_stacks(same)}, width-{same['hidden_size']} model scores held-out loss "
            f"{same['loss']:.4f} against {loss:.4f}: " + verdict.format(abs(gap)))


def card_limitations(config: DeepScaleLMConfig, results: dict, task: str) -> str:
    """The card's Limitations section, a Markdown list: what the model is, its measured standing against the count
    baselines of its evaluation record, its tokenizer and context, what its held-out numbers can be compared with,
    and what loading it runs."""
    training, dataset = results["training"], results["dataset"]
    items = [
        f"A demonstration of depth, not a useful language model: {training['tokens']:,} training tokens in "
        f"{training['wall_time_seconds'] / 60:.1f} minutes on {training['hardware']}. It {WHAT_IT_DOES[task]} "
        f"in the style of {dataset['name']} and knows nothing else.",
        baseline_comparison(results, task),
        depth_comparison(results),
        f"Its vocabulary has {config.vocab_size:,} tokens"
        + (" (a byte-level BPE this small is close to character level)" if config.vocab_size <= 512 else "")
        + f"; it reads at most {config.max_position_embeddings} tokens at once (`max_position_embeddings`).",
        f"The held-out text is {dataset['held_out_fraction']:.0%} of the paragraphs of the same text, evenly spaced: "
        "it shares scenes, speakers and phrasing with the training text, so its numbers are not comparable with "
        "numbers on a contiguous held-out split (such as the last 10% of the text).",
        "Loading runs this repository's Python files (`trust_remote_code=True`): read them first, or pin a "
        "`revision` you have read.",
    ]
    if task == "seq2seq-lm":
        items.append("transformers 5.x has no `text2text-generation` pipeline (the Hub's pipeline tag still names "
                     "the task): call `generate()` as in the example above.")
    return "\n".join(f"- {item}" for item in items if item)


def render_model_card(config: DeepScaleLMConfig, results: dict, repo_id: str) -> ModelCard:
    """The README of the Hub repository: metadata (pipeline, tags, datasets, model-index) and text, with every
    reported number read from the evaluation record `results`."""
    auto_class, pipeline_tag, task = HEADS[config.architectures[0]]
    task_description, task_name = TASK_DESCRIPTIONS[task]
    dataset, metrics, training = results["dataset"], results["metrics"], results["training"]
    model_name = repo_id.split("/")[-1]
    eval_results = [
        EvalResult(task_type=pipeline_tag, task_name=task_name, dataset_type=dataset["id"], dataset_name=dataset["name"],
                   dataset_split=dataset["split"], metric_type=metric, metric_name=f"held-out {metric}",
                   metric_value=round(metrics[metric], 4))
        for metric in ("loss", "perplexity")
    ]
    scored = results.get("baselines", {}).get({"masked-lm": "fill_mask", "seq2seq-lm": "spans"}.get(task, ""))
    if scored is not None:  # scripts/build_checkpoint.py measures it at the held-out mask / span positions
        eval_results.append(EvalResult(
            task_type=pipeline_tag, task_name=task_name, dataset_type=dataset["id"], dataset_name=dataset["name"],
            dataset_split=dataset["split"], metric_type="accuracy", metric_value=round(scored["model"]["accuracy"], 4),
            metric_name=f"held-out top-1 accuracy ({'masked tokens' if task == 'masked-lm' else 'hidden span tokens'})"))
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=LICENSE,
        language="en",
        tags=["deepscalelm", "deep-transformer", "transformers-get-stable", "custom_code", task],
        datasets=[dataset["id"]],
        metrics=["perplexity"],
        model_name=model_name,
        eval_results=eval_results,
    )
    depths = " + ".join(f"{layers}-layer {stack}" for stack, layers, _ in config.residual_stacks())
    evaluation_rows = [
        (f"held-out loss ({'masked tokens' if task == 'masked-lm' else 'per token'}, nats)", f"{metrics['loss']:.4f}"),
        ("held-out perplexity", f"{metrics['perplexity']:.2f}"),
        ("held-out tokens", f"{dataset['tokens']:,}"),
    ] + baseline_and_training_rows(results)
    held_out = (
        f"{dataset['name']} (`{dataset['file']}`, sha256 `{dataset['file_sha256'][:16]}`): "
        f"{dataset['held_out_fraction']:.0%} of its paragraphs, evenly spaced and never trained on, in "
        f"{dataset['block_size']}-token blocks."
    )
    training_rows = [(TRAINING_LABELS.get(name, name.replace("_", " ")), _format_training_value(name, value))
                     for name, value in training.items()]
    limitations = card_limitations(config, results, task)
    return ModelCard.from_template(
        card_data,
        template_path=str(CARD_TEMPLATE_PATH),
        model_name=model_name,
        repo_id=repo_id,
        auto_class=auto_class,
        depth_description=f"{depths}, width-{config.hidden_size}",
        task_description=task_description,
        usage_example=USAGE_EXAMPLES[task],
        weights_sha256=results["weights_sha256"],
        evaluation_rows=evaluation_rows,
        eval_dataset_description=held_out,
        architecture_rows=architecture_rows(config),
        training_rows=training_rows,
        figures=sorted(results.get("figures", {}).items()),
        limitations=limitations,
    )


# ----------------------------------------------------------------------------------------------------------------
# Staging and pushing
# ----------------------------------------------------------------------------------------------------------------
def check_tokenizer_files(folder: Path) -> None:
    if not any((Path(folder) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise PublishRefusal(
            f"{folder} has no tokenizer (tokenizer.json / tokenizer_config.json): users could not encode text. "
            "Save the tokenizer next to the weights (tokenizer.save_pretrained)."
        )


def check_staged_repository(staging_dir: Path, config: DeepScaleLMConfig, results: dict) -> None:
    """What the Hub repository needs for `Auto*.from_pretrained(repo_id, trust_remote_code=True)` to work."""
    check_checkpoint(staging_dir)
    auto_class = HEADS[config.architectures[0]][0]
    auto_map = json.loads((staging_dir / "config.json").read_text()).get("auto_map", {})
    if auto_class not in auto_map or "AutoConfig" not in auto_map:
        raise PublishRefusal(f"staged config.json has auto_map={auto_map}: it must map AutoConfig and {auto_class}")
    missing_code = [name for name in REMOTE_CODE_FILES if not (staging_dir / name).is_file()]
    if missing_code:
        raise PublishRefusal(f"staged repository lacks the remote code files {missing_code} (trust_remote_code)")
    if task_of(config) != "masked-lm" and not (staging_dir / "generation_config.json").is_file():
        raise PublishRefusal("staged repository lacks generation_config.json, which generate() reads")
    check_tokenizer_files(staging_dir)
    if weights_digest(staging_dir) != results["weights_sha256"]:
        raise PublishRefusal("the staged weights differ from the evaluated ones: staging must not change the weights")


def find_evaluated_text(results: dict, eval_file: Path, checkpoint_dir: Path) -> Path:
    """The text an evaluation record measured (its dataset.file with the recorded sha256), looked for next to the
    record, in the checkpoint folder and in the current folder; a PublishRefusal naming them when it is in none."""
    name, digest = Path(results["dataset"]["file"]).name, results["dataset"]["file_sha256"]
    places = list(dict.fromkeys(Path(folder) for folder in (Path(eval_file).parent, checkpoint_dir, Path.cwd())))
    for folder in places:
        if (folder / name).is_file() and file_sha256(folder / name) == digest:
            return folder / name
    raise PublishRefusal(f"the evaluation file's numbers are recomputed before publishing, but the text it measured "
                         f"({name}, sha256 {digest[:16]}...) is not in {', '.join(map(str, places))}: give it with "
                         "--verify-eval TEXT_FILE, or pass --no-verify-eval to publish the recorded numbers unverified")


def figure_files(results: dict, folder: Path) -> list[str]:
    """The figures (and their data files) an evaluation record's card shows, each checked to be a plain file name
    present in `folder` (the record's own folder) before anything is staged."""
    names = []
    for name in results.get("figures", {}):
        if Path(name).name != name or not name.endswith(".png"):
            raise PublishRefusal(f"evaluation file names figure {name!r}: figures are .png files beside it")
        names += [name] + ([Path(name).with_suffix(".json").name]
                           if (folder / Path(name).with_suffix(".json").name).is_file() else [])
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise PublishRefusal(f"the card shows {', '.join(missing)}, which {folder} lacks: keep the figures beside the "
                             "evaluation file")
    return names


def stage_repository(checkpoint_dir: Path, staging_dir: Path, repo_id: str, eval_file: Path | None,
                     max_shard_size: str = "5GB", verify_text_file: Path | None = None, verify: bool = False) -> Path:
    """Write the Hub repository folder for `checkpoint_dir` into the empty or new `staging_dir`, refusing
    (PublishRefusal) anything that would break users before a byte is written. With `verify` (dslm-publish's
    default), the evaluation file's numbers are first recomputed from the weights (`verify_eval_file`) on
    `verify_text_file`, or on the text the record names when found (`find_evaluated_text`)."""
    checkpoint_dir, staging_dir = Path(checkpoint_dir), Path(staging_dir)
    if staging_dir.exists() and (not staging_dir.is_dir() or any(staging_dir.iterdir())):
        raise PublishRefusal(f"staging folder {staging_dir} is not empty: choose a new or empty --staging-dir")
    config = check_checkpoint(checkpoint_dir)
    check_tokenizer_files(checkpoint_dir)
    results = load_eval_file(eval_file, checkpoint_dir, config)
    figure_files(results, Path(eval_file).parent)
    if verify and verify_text_file is None:
        verify_text_file = find_evaluated_text(results, eval_file, checkpoint_dir)
    if verify or verify_text_file is not None:
        verify_eval_file(results, checkpoint_dir, verify_text_file)
    staging_dir.mkdir(parents=True, exist_ok=True)
    with loading("the weights", checkpoint_dir):
        model = architecture_class(config).from_pretrained(checkpoint_dir)
    with loading("the tokenizer", checkpoint_dir):
        tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir, trust_remote_code=False)
    model.save_pretrained(staging_dir, max_shard_size=max_shard_size)  # safetensors, auto_map, remote code
    save_tokenizer(tokenizer, staging_dir, config)
    render_model_card(config, results, repo_id).save(staging_dir / "README.md")
    shutil.copyfile(eval_file, staging_dir / EVAL_FILE_NAME)
    for name in figure_files(results, Path(eval_file).parent):
        shutil.copyfile(Path(eval_file).parent / name, staging_dir / name)
    check_staged_repository(staging_dir, config, results)
    give_normal_permissions(staging_dir)
    return staging_dir


def list_files(folder: Path) -> list[tuple[str, int]]:
    """(path relative to `folder`, size in bytes) of every file, sorted: what upload_folder sends."""
    folder = Path(folder)
    return sorted((path.relative_to(folder).as_posix(), path.stat().st_size) for path in folder.rglob("*") if path.is_file())


def push_repository(staging_dir: Path, repo_id: str, *, token: str | None, revision: str | None, private: bool):
    """create_repo(exist_ok=True), the branch if one is named, then one upload_folder commit."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=staging_dir, revision=revision,
                             commit_message=f"Publish {repo_id} with dslm-publish")


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PublishRefusal(f"--repo-id {repo_id!r} is not a valid Hub repository id: {error}") from None
    if repo_id.count("/") != 1:
        raise PublishRefusal(f"--repo-id {repo_id!r} must be 'owner/name' (a user or organisation and a model name)")


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """Flags are snake_case (as dslm-pretrain's); each kebab-case spelling still works as an alias."""
    parser = argparse.ArgumentParser(
        prog="dslm-publish",
        description="Stage a trained DeepScaleLM checkpoint as a Hugging Face Hub repository (safetensors, remote "
                    "code, tokenizer, model card from an evaluation file) and push it.",
    )
    parser.add_argument("checkpoint_dir", type=Path, help="a save_pretrained folder (config.json, safetensors, tokenizer)")
    parser.add_argument("--repo_id", "--repo-id", required=True, help="Hub repository, owner/name")
    parser.add_argument("--eval_file", "--eval-file", type=Path, default=None,
                        help=f"evaluation record of these weights (default: CHECKPOINT_DIR/{EVAL_FILE_NAME} if present)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login)")
    parser.add_argument("--revision", "--branch", dest="revision", default=None, help="branch to push to (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="stage and list what would be uploaded; no network")
    parser.add_argument("--output_dir", "--staging_dir", "--staging-dir", dest="staging_dir", type=Path, default=None,
                        help="empty folder to stage the repository into (default: a new temporary folder)")
    parser.add_argument("--max_shard_size", "--max-shard-size", default="5GB", help="weights are sharded past this size (e.g. 500MB)")
    parser.add_argument("--verify_eval", "--verify-eval", type=Path, default=None, metavar="TEXT_FILE",
                        help="the text the evaluation file measured (checked by sha256). Before staging, its numbers "
                             "are recomputed from the weights on the held-out part of that text and a mismatch is "
                             "refused. Default: the file the record names, found next to the record, in "
                             "CHECKPOINT_DIR or in the current folder")
    parser.add_argument("--no_verify_eval", "--no-verify-eval", action="store_true",
                        help="publish the evaluation file's numbers without recomputing them (the record must still "
                             "name exactly these weights)")
    parser.add_argument("--native", choices=("also", "only"), default=None,
                        help="also: stage the native transformers twin (dslm-export: GPT-2, BERT, Bart...) in native/, "
                             "loadable without trust_remote_code (subfolder='native'); only: publish the twin instead")
    return usage_errors_as_user_errors(parser)


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def publish(argv: list[str]) -> Path:
    """Stage, list and (unless --dry-run) push; returns the staging folder."""
    args = parse_args(argv)
    eval_file = args.eval_file
    if eval_file is None and (args.checkpoint_dir / EVAL_FILE_NAME).is_file():
        eval_file = args.checkpoint_dir / EVAL_FILE_NAME
    check_repo_id(args.repo_id)
    if args.verify_eval is not None and not args.verify_eval.is_file():
        raise PublishRefusal(f"--verify-eval {args.verify_eval} does not exist: give the text file the evaluation "
                             "file was measured on")
    if args.verify_eval is not None and args.no_verify_eval:
        raise PublishRefusal("give either --verify-eval TEXT_FILE or --no-verify-eval, not both")
    staging_dir = args.staging_dir or Path(tempfile.mkdtemp(prefix="dslm-publish-"))
    try:
        if args.native != "only":
            stage_repository(args.checkpoint_dir, staging_dir, args.repo_id, eval_file, args.max_shard_size,
                             verify_text_file=args.verify_eval, verify=not args.no_verify_eval)
        if args.native is not None:
            stage_native_twin(args.checkpoint_dir, staging_dir, args.repo_id, args.native, license=LICENSE)
    except (PublishRefusal, CorruptFileError) as refusal:
        raise PublishRefusal(f"refusing to publish: {refusal}") from None
    if args.native != "only":
        print("--no-verify-eval: the evaluation file's numbers were published as recorded, not recomputed"
              if args.no_verify_eval else "verified: the evaluation file's numbers were recomputed from the weights on "
                                          "the held-out text it names")
    files = list_files(staging_dir)
    print(f"staged {args.repo_id} in {staging_dir}:")
    for path, size in files:
        print(f"  {size:>12,}  {path}")
    print(f"  {sum(size for _, size in files):>12,}  bytes in {len(files)} files")
    if args.dry_run:
        print("dry run: nothing uploaded")
        return staging_dir
    try:
        commit = push_repository(staging_dir, args.repo_id, token=args.token, revision=args.revision, private=args.private)
    except Exception as error:  # network, authentication and Hub errors all end the command the same way
        from huggingface_hub import constants

        raise UserError(
            f"upload of {args.repo_id} to {constants.ENDPOINT} failed: {type(error).__name__}: {error} "
            f"(the staged folder {staging_dir} is kept)"
        ) from None
    print(f"uploaded: {commit.commit_url}")
    return staging_dir


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`dslm-publish`): 0 on success; a refusal is one stderr line and status 2."""
    return run_command("dslm-publish", publish, argv)


if __name__ == "__main__":
    sys.exit(main())
