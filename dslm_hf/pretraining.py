"""Pretraining of DeepScaleLM models through accelerate: causal LM, masked LM or seq2seq span corruption.

One process (CPU or GPU):
    dslm-pretrain --preset deep-48 --max_steps 300 --output_dir runs/deep-48
A run's settings from a recipe file (dslm_hf/recipes, dslm_hf.run_recipes; flags given win):
    dslm pretrain --recipe deepscalelm-16x64-byte-decoder --dataset tinyshakespeare.txt --output_dir runs/decoder-16x64
Two gloo ranks on CPU, launched by dslm-pretrain itself (signals reach every rank; a user error exits with 2):
    ACCELERATE_USE_CPU=true dslm-pretrain --num_processes 2 --preset tiny --output_dir runs/tiny
The same through accelerate (whose launcher turns any failure into status 1 with a CalledProcessError traceback):
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --main_process_port 29511 scripts/pretrain.py --preset tiny --output_dir runs/tiny
Several GPUs: `accelerate launch --config_file accelerate_configs/ddp.yaml scripts/pretrain.py ...`.

The loop reads as four steps: `setup` (model, optimizer, scheduler, data), `resume` (a verified checkpoint),
`train_step` (one optimizer step), `finish` (evaluate, save final/, print a sample); `train` wires them together
with the run-folder lock and the stop signals (dslm_hf.run_control). Checkpoints are dslm_hf.checkpointing's
safetensors + JSON folders, metrics go to metrics.jsonl (dslm_hf.run_metrics), held-out numbers come from
dslm_hf.evaluation.

What makes runs reproducible and resumable: the data order is a permutation seeded by (seed, epoch); every step
seeds dropout and the collator's masking from (seed, step, rank); so the RNG needs no checkpointing, and the data
position follows from the step. A resumed run therefore replays the uninterrupted one exactly.
"""

import dataclasses
import gc
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed.nn  # noqa: F401  imported before any process group exists: see release_the_process_group
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from huggingface_hub.errors import StrictDataclassError
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    GenerationConfig,
    HfArgumentParser,
    get_scheduler,
)

from . import data, run_recipes
from .baselines import KneserNeyLM
from .checkpointing import (CheckpointError, ForeignCodeError, check_no_foreign_code, checkpoint_folders, describe_error,
                            describe_os_error, fit_tokenizer_to_model, load_checkpoint, refuse_links, resolve_checkpoint,
                            save_checkpoint, save_tokenizer)
from .cli import (COUNT, NON_NEGATIVE, NON_NEGATIVE_COUNT, POSITIVE, SHARE, Range, UserError, check_known_keys,
                  check_output_dir, range_problems, run_command, usage_errors_as_user_errors)
from .configuration_deepscalelm import DeepScaleLMConfig
from .evaluation import evaluate, to_device
from .files import write_json_atomically
from .layers import find_layer_stacks
from .model_size import check_training_fits
from .modeling_deepscalelm import IGNORE_INDEX
from .monitoring import LayerSignalMonitor
from .optimization import (
    PRETRAINING_PARAMETERIZATION,
    PRETRAINING_WIDTH_PARAMETERIZATION,
    default_learning_rate,
    depth_parameter_groups,
    describe_groups,
    describe_rules,
)
from .pipeline import SCHEDULES as PIPELINE_SCHEDULES
from .pipeline import check_pipeline_layout
from .recipe_deepscalelm import DEPTH_PARAMETERIZATIONS
from .run_control import (RunLock, StopSignals, failures_reported_to_the_launcher, launch_workers,
                          stop_when_the_launcher_dies)
from .run_metrics import JsonlTracker, drop_records_after
from .training_modes import TrainingMode, training_mode

PRESETS_DIR = Path(__file__).parent / "presets"
AUTO_MODEL_CLASSES = {"clm": AutoModelForCausalLM, "mlm": AutoModelForMaskedLM, "seq2seq": AutoModelForSeq2SeqLM}
SCHEDULES = ("linear", "cosine", "constant_with_warmup")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2")
# torch.compile backends that need no extra package (inductor first: the default); eager and aot_eager check the
# wiring without generating code.
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")
COMPILE_RECOMPILE_LIMIT = 64
# What a run writes into its folder: a fresh run refuses a folder holding any of them (without --overwrite_output_dir,
# which deletes them), so that no finished model or metric record is replaced silently.
RUN_OUTPUTS = ("checkpoints", "tokenizer", "model_config", "final", "metrics.jsonl", "layer_signals.jsonl",
               "tensorboard", "eval_results.json", "corpus_manifest.json")
CORPUS_MANIFEST = "corpus_manifest.json"  # how the training and held-out text were made (data.load_split_corpus)
COUNT_BASELINE_ORDER = 4  # the README's main command prints the model's held-out loss next to this n-gram's


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


@dataclass
class PretrainingArguments:
    output_dir: str = field(metadata={"help": "Run folder: tokenizer/, checkpoints/, final/, metrics.jsonl, tensorboard/."})
    recipe: str | None = field(default=None, metadata={
        "help": "A recipe: a shipped one's name (dslm_hf/recipes: " + ", ".join(run_recipes.shipped_recipes()) + ") or "
                "a recipe JSON file. Its values become the defaults, flags given here win; --preset/--config_name "
                "replace its model section, --config_overrides applies on top of it. Recorded in metrics.jsonl."})
    # The recipe's name, file and content as applied (JSON text, so that every tracker can store it): set by
    # parse_arguments, not a flag.
    recipe_content: str | None = field(default=None, init=False, metadata={"help": "Set from --recipe."})
    objective: str = field(default="clm", metadata={"help": f"One of {data.OBJECTIVES}: causal LM, masked LM (15%%, "
                                                            "80/10/10) or encoder-decoder span corruption."})
    preset: str | None = field(default=None, metadata={"help": "Model preset from dslm_hf/presets (tiny, deep-48, "
                                                                "deep-192, deep-1000). Default tiny unless --config_name."})
    config_name: str | None = field(default=None, metadata={"help": "JSON file of DeepScaleLMConfig kwargs instead of a preset."})
    config_overrides: str | None = field(default=None, metadata={
        "help": "Comma-separated key=value config overrides, e.g. 'num_hidden_layers=4,hidden_dropout_prob=0'."})
    dataset: str = field(default=data.DEFAULT_CORPUS, metadata={
        "help": "'default' (the Python standard library's source text, offline), comma-separated local text files, "
                "or a Hub dataset id."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    default_corpus_megabytes: float = field(default=4.0, metadata={"help": "Size of the embedded default corpus."})
    validation_fraction: float = field(default=0.05, metadata={"help": "Share of the documents held out (evenly spaced) when the dataset has no validation split."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Existing tokenizer (path or Hub id). "
                                                                        "Unset: train a byte-level BPE on the training text."})
    vocab_size: int = field(default=4096, metadata={"help": "Vocabulary of the trained byte-level BPE."})
    block_size: int = field(default=128, metadata={"help": "Tokens per packed training block (sequence length)."})
    mlm_probability: float = field(default=0.15, metadata={"help": "MLM: share of tokens selected for prediction."})
    whole_word_mask: bool = field(default=False, metadata={
        "help": "MLM: select whole words (every token of a word, each word with --mlm_probability) instead of single "
                "tokens; words are read from the tokens' text (dslm_hf.data.word_joints). Held-out evaluation "
                "and the sample keep token masking, so held-out losses compare across runs (the training loss is "
                "then a harder task than the held-out one)."})
    noise_density: float = field(default=0.15, metadata={"help": "seq2seq: share of tokens hidden in spans."})
    mean_span_length: float = field(default=3.0, metadata={"help": "seq2seq: mean length of a hidden span."})
    r0_sample_blocks: int = field(default=256, metadata={"help": "Training blocks sampled to estimate the embedding correlation r0."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Blocks per process per micro-step."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Blocks per process per evaluation batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-steps per optimizer step."})
    learning_rate: float | None = field(default=None, metadata={
        "help": "Peak base learning rate (AdamW): embeddings, final norm, heads, and the layers at the config's "
                "depth_base_layers and width_base; the depth rule scales it inside deeper layers, the width rule "
                "(width_parameterization='mup', the default for Pre-LN DeepScaleLM) for the hidden matrices of wider "
                "models. Unset: picked from depth and width (dslm_hf.optimization.default_learning_rate) and said so "
                "in the log."})
    depth_parameterization: str | None = field(default=None, metadata={
        "help": "How branches and learning rates scale with depth: 'depth_mup' (default for DeepScaleLM inits: "
                "DeepScaleLM's init and beta with the depth-muP AdamW rule), 'deepscalelm' (one learning rate), "
                "'completep'. Sets the config field of the same name."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases or LayerNorm)."})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-8
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables clipping)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": f"One of {SCHEDULES} (transformers.get_scheduler)."})
    warmup_ratio: float = field(default=0.01, metadata={"help": "Warmup steps as a share of max_steps (the paper: 1%%)."})
    max_steps: int = field(default=200, metadata={"help": "Optimizer steps; the schedule decays over them."})
    max_train_minutes: float | None = field(default=None, metadata={
        "help": "Stop (evaluate, save) after this many minutes even before max_steps; the schedule stays set by max_steps."})
    mixed_precision: str = field(default="no", metadata={"help": f"One of {MIXED_PRECISIONS} (through Accelerator)."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": f"Attention kernel, one of {ATTENTION_IMPLEMENTATIONS} (from_config's attn_implementation); default: "
                "transformers' choice (sdpa where torch has it). flash_attention_2 needs a GPU and the flash-attn package."})
    torch_compile: bool = field(default=False, metadata={
        "help": "Compile each layer in place (nn.Module.compile: regional compilation, the layers share one graph, "
                "parameter names and checkpoints unchanged). The first steps are slow while it compiles. One process "
                "or DDP; not with --fully_shard or --pipeline_parallel_size."})
    torch_compile_backend: str = field(default="inductor", metadata={
        "help": "torch.compile backend for --torch_compile ('inductor'; 'aot_eager' or 'eager' check the wiring "
                "without generating code)."})
    seed: int = 42
    num_threads: int | None = field(default=None, metadata={
        "help": "CPU threads of each process (torch.set_num_threads); default: torch's (OMP_NUM_THREADS, else the "
                "cores; dslm-pretrain --num_processes N sets OMP_NUM_THREADS to cores/N and accelerate launch to 1 "
                "when it is unset). On a quiet 2-core machine two threads stepped 1.1-1.4x faster than one; beside "
                "another busy process one thread was up to 5x faster."})
    logging_steps: int = field(default=10, metadata={"help": "Log train metrics every N steps."})
    eval_steps: int = field(default=100, metadata={"help": "Evaluate every N steps (and at the end)."})
    max_eval_blocks: int = field(default=256, metadata={"help": "Held-out blocks evaluated each time."})
    save_steps: int = field(default=100, metadata={"help": "Checkpoint every N steps (0: none; a stop signal still writes one)."})
    checkpoints_total_limit: int | None = field(default=3, metadata={"help": "Keep only the newest N checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "'latest' (newest complete checkpoint in output_dir, or a fresh start if there is none and no final/) "
                "or a checkpoint path. The checkpoint's learning rate, weight decay, betas and epsilon stay: other "
                "values of those flags are refused."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start fresh in an output_dir that holds a previous run's outputs (checkpoints/, final/, "
                "metrics.jsonl, ...): they are deleted. Without it such a folder is refused unless resuming."})
    max_nonfinite_steps: int = field(default=10, metadata={
        "help": "Steps with a NaN/inf loss or gradient are skipped; the run stops when more than this many were skipped."})
    signal_every: int = field(default=0, metadata={
        "help": "Every N steps, measure per-layer gradient norms, each pre-LN sum's variance and shared-across-tokens "
                "fraction (dslm_hf.monitoring): summaries to the trackers, profiles to layer_signals.jsonl. 0: off."})
    fully_shard: bool = field(default=False, metadata={
        "help": "Shard parameters, gradients and optimizer state with FSDP2 fully_shard over the launched processes "
                "(each DeepScaleLMLayer, then the root); works on gloo/CPU; --mixed_precision bf16 computes in bf16 "
                "with fp32 master weights. Checkpoints are gathered into the one-process layout."})
    pipeline_parallel_size: int = field(default=1, metadata={
        "help": "Pipeline stages (torch.distributed.pipelining), one per launched process: the layers are split into "
                "this many contiguous runs. Causal LM, fp32; launch exactly this many processes."})
    pipeline_microbatches: int = field(default=4, metadata={
        "help": "Micro-batches each batch is split into in the pipeline (must divide the train and eval batch sizes)."})
    pipeline_schedule: str = field(default="1f1b", metadata={"help": f"Pipeline schedule: one of {sorted(PIPELINE_SCHEDULES)}."})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute each layer's activations during backward (model.activation_checkpointing_enable()): "
                "activation memory of one layer instead of all, for very deep stacks; about a third more compute."})
    report_to: str = field(default="tensorboard", metadata={"help": "'tensorboard' or 'none'; metrics.jsonl is always written."})
    sample_max_new_tokens: int = field(default=48, metadata={"help": "Length of the generated sample printed at the end."})
    num_processes: int = field(default=1, metadata={
        "help": "Processes (ranks) dslm-pretrain starts on this machine and supervises: signals reach every rank and "
                "a user error exits with status 2. Leave at 1 under accelerate launch or torchrun."})

    def __post_init__(self):
        if self.preset is None and self.config_name is None:
            self.preset = "tiny"
        problem = next(self.problems(), None)
        if problem is not None:
            name, allowed = problem
            raise UserError(f"--{name}={getattr(self, name)!r} is invalid: {allowed}")

    def problems(self):
        """(argument, what is allowed) for each invalid argument, in the order of the checks."""
        if self.objective not in data.OBJECTIVES:
            yield "objective", f"expected one of {data.OBJECTIVES}"
        if self.preset is not None and self.config_name is not None:
            yield "config_name", "give either --preset or --config_name, not both"
        if self.preset is not None and self.preset not in available_presets():
            yield "preset", f"expected one of {available_presets()}"
        if self.config_name is not None and not Path(self.config_name).is_file():
            yield "config_name", "no such file"
        yield from range_problems(self, PRETRAINING_RANGES)
        if self.whole_word_mask and self.objective != "mlm":
            yield "whole_word_mask", "whole-word masking is a masked-LM objective: use --objective mlm or drop it"
        if self.signal_every and self.fully_shard:
            yield "signal_every", "layer signals read whole gradients: not available with --fully_shard"
        if self.lr_scheduler_type not in SCHEDULES:
            yield "lr_scheduler_type", f"expected one of {SCHEDULES}"
        if self.mixed_precision not in MIXED_PRECISIONS:
            yield "mixed_precision", f"expected one of {MIXED_PRECISIONS}"
        if self.depth_parameterization is not None and self.depth_parameterization not in DEPTH_PARAMETERIZATIONS:
            yield "depth_parameterization", f"expected one of {DEPTH_PARAMETERIZATIONS}"
        if self.attn_implementation is not None and self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            yield "attn_implementation", f"expected one of {ATTENTION_IMPLEMENTATIONS}"
        if self.torch_compile and (self.fully_shard or self.pipeline_parallel_size > 1):
            yield "torch_compile", ("regional compilation is wired to the one-process and DDP loops: drop "
                                    "--torch_compile, or --fully_shard/--pipeline_parallel_size")
        if self.torch_compile_backend != COMPILE_BACKENDS[0] and not self.torch_compile:
            yield "torch_compile_backend", "it applies to --torch_compile only: add --torch_compile or drop it"
        if self.torch_compile:
            problem = compile_backend_problem(self.torch_compile_backend)
            if problem:
                yield "torch_compile_backend", problem
        if self.fully_shard and self.mixed_precision == "fp16":
            yield "mixed_precision", "--fully_shard computes in bf16 or fp32: use --mixed_precision bf16 or no"
        yield from self.pipeline_problems()
        if self.tokenizer_name is not None and Path(self.tokenizer_name).is_dir():
            try:
                check_no_foreign_code(Path(self.tokenizer_name))
            except ForeignCodeError as error:
                yield "tokenizer_name", str(error)
        if self.report_to not in ("tensorboard", "none"):
            yield "report_to", "expected 'tensorboard' or 'none'"


    def pipeline_problems(self):
        if self.pipeline_schedule not in PIPELINE_SCHEDULES:
            yield "pipeline_schedule", f"expected one of {sorted(PIPELINE_SCHEDULES)}"
        if self.pipeline_parallel_size == 1:
            return
        if self.objective != "clm" or self.fully_shard or self.mixed_precision != "no" or self.signal_every:
            yield "pipeline_parallel_size", "pipelines train the causal LM in fp32 without --fully_shard or " \
                                            "--signal_every: use --objective clm --mixed_precision no"


# The numeric arguments' allowed values, checked by `PretrainingArguments.problems` before any data is read (an unset
# optional one, None, is left alone). NaN and infinity are outside every range.
PRETRAINING_RANGES = {
    **{name: COUNT for name in ("block_size", "per_device_train_batch_size", "per_device_eval_batch_size",
                                "gradient_accumulation_steps", "max_steps", "logging_steps", "eval_steps",
                                "max_eval_blocks", "r0_sample_blocks", "num_processes", "checkpoints_total_limit",
                                "pipeline_parallel_size", "pipeline_microbatches", "num_threads")},
    **{name: NON_NEGATIVE_COUNT for name in ("save_steps", "max_nonfinite_steps", "sample_max_new_tokens",
                                             "signal_every")},
    "vocab_size": Range(data.BYTE_LEVEL_MIN_VOCAB, integer=True),  # every byte and the special tokens
    "learning_rate": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": Range(0, 1, high_open=True),
    "adam_beta2": Range(0, 1, high_open=True),
    "adam_epsilon": POSITIVE,
    "max_grad_norm": NON_NEGATIVE,  # 0: no clipping
    "warmup_ratio": Range(0, 1, high_open=True),
    "max_train_minutes": POSITIVE,
    "validation_fraction": SHARE,
    "default_corpus_megabytes": POSITIVE,
    "mlm_probability": SHARE,
    "noise_density": SHARE,
    "mean_span_length": Range(1),
}


def parse_arguments(argv=None) -> PretrainingArguments:
    """Command line -> PretrainingArguments; an unknown flag or an invalid value is a UserError (`main` prints it as
    one line and exits with status 2). With --recipe, the recipe's values are the parser's defaults
    (dslm_hf.run_recipes), so the flags given win."""
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    parser = HfArgumentParser(PretrainingArguments)
    parser.prog = "dslm-pretrain"
    parser.allow_abbrev = False  # an abbreviated --preset would slip past the recipe's check for an explicit one
    usage_errors_as_user_errors(parser)
    recipe_name = run_recipes.explicit_values(argv, ("recipe",)).get("recipe")
    recipe = model = None
    if recipe_name is not None:
        recipe = run_recipes.load_recipe(recipe_name, PretrainingArguments)
        defaults, model = run_recipes.recipe_defaults(recipe, argv)
        parser.set_defaults(**defaults)
    args, unused = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unused:
        raise UserError(f"unrecognized arguments: {' '.join(unused)} (see dslm-pretrain --help)")
    if recipe is not None:
        args.recipe_content = json.dumps(run_recipes.resolved_content(recipe, model), sort_keys=True)
    return args


def recipe_model(args: PretrainingArguments) -> dict:
    """The DeepScaleLMConfig fields the run's recipe lays over its preset ({} without a recipe, or when --preset or
    --config_name replaced the recipe's model section)."""
    if not args.recipe_content:
        return {}
    model = json.loads(args.recipe_content)["content"].get(run_recipes.MODEL_SECTION) or {}
    return {key: value for key, value in model.items() if key != "preset"}


def learning_rate_source(args: PretrainingArguments) -> str:
    """Where a given learning rate comes from, for the log: the flag, or the recipe that pins it."""
    content = json.loads(args.recipe_content)["content"] if args.recipe_content else {}
    return f"recipe {args.recipe}'s learning_rate" if content.get("learning_rate") == args.learning_rate \
        else "--learning_rate"


def model_source(args: PretrainingArguments) -> str:
    """Where the model's settings come from, for messages."""
    if args.config_name:
        return f"--config_name {args.config_name}"
    return f"recipe {args.recipe} (preset {args.preset})" if recipe_model(args) else f"preset {args.preset}"


# ----------------------------------------------------------------------------------------------------------------
# Model configuration
# ----------------------------------------------------------------------------------------------------------------
parse_config_overrides = run_recipes.parse_config_overrides  # transformers' PretrainedConfig.update_from_string


def preset_kwargs(args: PretrainingArguments) -> dict:
    """The preset's (or --config_name's) config kwargs, the recipe's model fields laid over them (--recipe) and
    --config_overrides applied, refusing keys the config
    does not have (with the closest valid name) and a --block_size beyond max_position_embeddings: cheap checks
    that `train` runs first, before any tokenizer is trained."""
    path = PRESETS_DIR / f"{args.preset}.json" if args.preset else Path(args.config_name)
    try:
        kwargs = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"--config_name {path} is not a JSON file ({error}): give a JSON object of config kwargs") from None
    if not isinstance(kwargs, dict):
        raise UserError(f"--config_name {path} holds a JSON {type(kwargs).__name__}: give a JSON object of config kwargs")
    known = {config_field.name for config_field in dataclasses.fields(DeepScaleLMConfig)}
    check_known_keys(kwargs, known, f"--config_name {path}" if args.config_name else f"preset {args.preset}")
    kwargs.update(recipe_model(args))  # checked against the config's fields when the recipe was loaded
    overrides = parse_config_overrides(args.config_overrides)
    kwargs.update(overrides)
    if args.depth_parameterization is not None:
        kwargs["depth_parameterization"] = args.depth_parameterization
    elif kwargs.get("init_scheme", "deepscalelm") == "deepscalelm" and kwargs.get("norm_placement", "pre") == "pre":
        kwargs.setdefault("depth_parameterization", PRETRAINING_PARAMETERIZATION)
    if kwargs.get("init_scheme", "deepscalelm") == "deepscalelm" and kwargs.get("norm_placement", "pre") == "pre":
        kwargs.setdefault("width_parameterization", PRETRAINING_WIDTH_PARAMETERIZATION)
    if args.pipeline_parallel_size > 1:
        try:
            check_pipeline_layout(kwargs.get("num_hidden_layers", DeepScaleLMConfig.num_hidden_layers),
                                  args.pipeline_parallel_size, {f"--{name}": getattr(args, name) for name in (
                                      "per_device_train_batch_size", "per_device_eval_batch_size")},
                                  args.pipeline_microbatches)
        except ValueError as error:
            raise UserError(str(error)) from None
    positions = kwargs.get("max_position_embeddings", DeepScaleLMConfig.max_position_embeddings)
    if isinstance(positions, int) and positions < args.block_size:
        raise UserError(f"--block_size={args.block_size} exceeds the model's max_position_embeddings={positions}: "
                        "lower it or pass --config_overrides max_position_embeddings=N")
    check_config_values(args, kwargs, overrides)
    return kwargs


def check_config_values(args: PretrainingArguments, kwargs: dict, overrides: dict) -> None:
    """Build the config once with stand-ins for what the tokenizer decides later (vocabulary, special ids), so that
    a value the config refuses (hidden_size=abc, nan, 3 heads for width 64) stops the run before the tokenizer is
    trained, naming the option it came from."""
    trial = dict(kwargs, vocab_size=args.vocab_size, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                 decoder_start_token_id=None, is_decoder=args.objective == "clm",
                 is_encoder_decoder=args.objective == "seq2seq", init_sequence_length=args.block_size)
    try:
        DeepScaleLMConfig(**trial)
    except (StrictDataclassError, ValueError, TypeError, AttributeError, KeyError) as error:
        field = re.search(r"field '(\w+)'|DeepScaleLMConfig\.(\w+)=", str(error))
        field = field and (field.group(1) or field.group(2))
        source = "--config_overrides" if field in overrides or not field and overrides else model_source(args)
        raise UserError(f"{source} gives an invalid model configuration ({describe_error(error)}): fix the value") from None


def check_model_fits(args: PretrainingArguments, accelerator, kwargs: dict, shards: int = 1) -> None:
    """Refuse, in microseconds and before any data is read, a model whose weights, gradients and AdamW moments
    alone exceed the memory of a process's device (dslm_hf.model_size): a failed 69 GB allocation after the
    tokenizer was trained helps nobody. The vocabulary is the BPE's --vocab_size (or the config's, for
    --tokenizer_name). `shards`: the parts the training mode splits the weights into."""
    source = model_source(args)
    if args.config_overrides:
        source += f" with --config_overrides {args.config_overrides}"
    described = {**kwargs, "is_decoder": args.objective == "clm", "is_encoder_decoder": args.objective == "seq2seq"}
    if not args.tokenizer_name:
        described["vocab_size"] = args.vocab_size
    try:
        config = DeepScaleLMConfig(**described)
    except (TypeError, ValueError):
        return  # a value the config refuses is reported where the run's config is built, with its own message
    sharing = accelerator.num_processes if accelerator.device.type == "cpu" else 1  # ranks on one host share its memory
    check_training_fits(config, source, accelerator.device, processes_on_device=sharing, shards=shards)


def build_model_config(args: PretrainingArguments, tokenizer, train_blocks) -> DeepScaleLMConfig:
    """The preset, made concrete for this data: vocabulary and special ids from the tokenizer, the objective's
    architecture, init_sequence_length = block size, and r0 estimated from a sample of the training blocks."""
    kwargs = preset_kwargs(args)
    kwargs.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        is_decoder=args.objective == "clm",
        is_encoder_decoder=args.objective == "seq2seq",
        init_sequence_length=args.block_size,
    )
    if args.objective == "seq2seq":
        kwargs["decoder_start_token_id"] = tokenizer.bos_token_id
    config = DeepScaleLMConfig(**kwargs)
    config.embedding_correlation = config.estimate_embedding_correlation(data.token_sample(train_blocks, args.r0_sample_blocks))
    return config


def compile_backend_problem(backend: str) -> str | None:
    """Why `backend` cannot compile here (None when it can): the backends torch ships without extra packages, and
    inductor's code generator (a C++ compiler on CPU, triton on a GPU)."""
    if backend not in COMPILE_BACKENDS:
        return f"expected one of {COMPILE_BACKENDS}"
    if backend != "inductor":
        return None
    if torch.cuda.is_available():
        from torch.utils._triton import has_triton

        return None if has_triton() else "inductor needs triton on a GPU: install it or use --torch_compile_backend aot_eager"
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) or shutil.which("clang++"):
        return None
    return f"inductor on CPU needs a C++ compiler ({compiler}, not found): install one or use --torch_compile_backend aot_eager"


def build_model(config, objective: str, attn_implementation: str | None = None):
    """The objective's model from the config, with the asked attention kernel (a kernel this machine lacks, such
    as flash_attention_2 without a GPU or the flash-attn package, is a user error naming the flag)."""
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    try:
        return AUTO_MODEL_CLASSES[objective].from_config(config, **kwargs)
    except (ImportError, ValueError) as error:
        if attn_implementation is None:
            raise
        raise UserError(f"--attn_implementation {attn_implementation}: {str(error).splitlines()[0]} "
                        f"(pick another of {', '.join(ATTENTION_IMPLEMENTATIONS)})") from None


def compile_layers(model, backend: str) -> int:
    """Regional compilation: each layer of every residual stack compiled in place (nn.Module.compile), so the
    repeated layer's graph is traced once and reused, and state_dict names, checkpoints and the final folder stay
    those of the eager model. Returns the number of layers compiled."""
    import torch._dynamo.config  # only when compiling

    # Every layer calls the same code object, Module._call_impl, and dynamo gives up on a code object (runs it eager,
    # with a log line only) after recompile_limit graphs: an encoder-decoder in training and evaluation needs ~4, and
    # shape or autocast changes add more. The limit is raised for this process.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
    layers = [layer for _, stack in find_layer_stacks(model) for layer in stack]
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


# ----------------------------------------------------------------------------------------------------------------
# Data order: a permutation per epoch, a position that follows from the step
# ----------------------------------------------------------------------------------------------------------------
class EpochPermutationSampler(torch.utils.data.Sampler):
    """A random order that depends only on (seed, epoch): the data position after a resume follows from the step."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(data.derived_seed(self.seed, "epoch", self.epoch))
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self):
        return self.num_samples


def micro_batches(accelerator, dataloader, sampler, start: int):
    """Endless stream of per-process micro-batches across epochs, starting after `start` consumed ones."""
    per_epoch = len(dataloader)
    epoch, offset = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        yield from accelerator.skip_first_batches(dataloader, offset) if offset else dataloader
        epoch, offset = epoch + 1, 0


def describe_manifest(manifest: dict) -> str:
    """One line: the split sizes and, for the default corpus, what its cleaning dropped."""
    sizes = ", ".join(f"{name} {entry.get('files', entry.get('rows'))} {'files' if 'files' in entry else 'rows'} "
                      f"{entry['bytes'] / 1e6:.2f} MB" for name, entry in manifest.items()
                      if name in ("train", "validation"))
    if "dropped_counts" not in manifest:
        return sizes
    dropped = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in manifest["dropped_counts"].items())
    return (f"{sizes} (cleaned: dropped {dropped or 'no'} files and {manifest['repeated_paragraphs_dropped']} "
            "repeated paragraphs)")


def prepare_data(args: PretrainingArguments, accelerator, run_dir: Path, resuming: bool):
    """(tokenizer, train blocks, held-out blocks). Rank 0 goes first: it trains (or loads) the tokenizer and saves it
    to run_dir/tokenizer; the other ranks, and resumed runs, load that saved tokenizer."""
    tokenizer_dir = run_dir / "tokenizer"
    if resuming and not tokenizer_dir.is_dir():
        raise UserError(f"cannot resume: the run's tokenizer {tokenizer_dir} is missing, and the checkpoint's token "
                        "ids mean nothing without it; restore the folder or start over with --overwrite_output_dir")
    with accelerator.main_process_first():
        splits, manifest = data.load_split_corpus(
            args.dataset, dataset_config_name=args.dataset_config_name, text_column=args.text_column,
            default_corpus_megabytes=args.default_corpus_megabytes, validation_fraction=args.validation_fraction)
        if accelerator.is_main_process:  # the recipe, sizes and text hashes, so anyone can rebuild the same data
            write_json_atomically(run_dir / CORPUS_MANIFEST, manifest)
            accelerator.print(f"corpus {args.dataset!r}: {describe_manifest(manifest)}; recipe in {run_dir / CORPUS_MANIFEST}")
        reuse_saved = tokenizer_dir.is_dir() and (resuming or not accelerator.is_main_process)
        if reuse_saved:
            tokenizer = data.load_tokenizer(str(tokenizer_dir))
        elif args.tokenizer_name:
            tokenizer = data.load_tokenizer(args.tokenizer_name)
        else:
            tokenizer = data.train_byte_level_bpe(splits["train"]["text"], args.vocab_size)
        if args.objective == "seq2seq":
            data.add_sentinel_tokens(tokenizer, data.span_corruption_sentinel_count(
                args.block_size, args.noise_density, args.mean_span_length))
        data.check_tokenizer_for_objective(tokenizer, args.objective)
        if accelerator.is_main_process and not reuse_saved:
            model_kwargs = preset_kwargs(args)  # the model's positions and segments, known before its config
            fit_tokenizer_to_model(
                tokenizer, model_kwargs.get("max_position_embeddings", DeepScaleLMConfig.max_position_embeddings),
                model_kwargs.get("type_vocab_size", DeepScaleLMConfig.type_vocab_size))
            tokenizer.save_pretrained(tokenizer_dir)
        train_blocks = data.pack_into_blocks(splits["train"], tokenizer, args.block_size)
        eval_blocks = data.pack_into_blocks(splits["validation"], tokenizer, args.block_size)
    return tokenizer, train_blocks, eval_blocks


def make_dataloaders(args: PretrainingArguments, num_processes: int, train_blocks, eval_blocks):
    """(sampler, train loader, eval loader) before accelerator.prepare. Evaluation takes whole rounds of
    per_device_eval_batch_size x processes blocks, so no rank sees a padded or duplicated block and 1 and N
    processes evaluate the same blocks."""
    sampler = EpochPermutationSampler(len(train_blocks), args.seed)
    train_loader = torch.utils.data.DataLoader(train_blocks, batch_size=args.per_device_train_batch_size,
                                               sampler=sampler, drop_last=True, collate_fn=data.stack_blocks)
    eval_round = args.per_device_eval_batch_size * num_processes
    eval_count = min(len(eval_blocks), args.max_eval_blocks) // eval_round * eval_round
    if eval_count == 0 and args.max_eval_blocks < min(len(eval_blocks), eval_round):
        raise UserError(f"--max_eval_blocks {args.max_eval_blocks} is fewer than one evaluation round ({eval_round} "
                        f"blocks: --per_device_eval_batch_size x processes): raise --max_eval_blocks or lower "
                        "--per_device_eval_batch_size")
    if eval_count == 0:
        raise UserError(f"the validation split has {len(eval_blocks)} blocks, fewer than one evaluation round "
                        f"({eval_round}): lower --per_device_eval_batch_size or raise --validation_fraction")
    eval_loader = torch.utils.data.DataLoader(eval_blocks.select(range(eval_count)),
                                              batch_size=args.per_device_eval_batch_size, collate_fn=data.stack_blocks)
    return sampler, train_loader, eval_loader


# ----------------------------------------------------------------------------------------------------------------
# Agreement across ranks
# ----------------------------------------------------------------------------------------------------------------
def replica_spread(accelerator, model) -> float:
    """Largest difference across ranks of (sum, sum of squares) of all parameters: 0 when the replicas agree."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    fingerprint = torch.stack([flat.sum(), flat.square().sum()]).view(1, 2)
    everyone = accelerator.gather(fingerprint)
    return (everyone.max(0).values - everyone.min(0).values).max().item()


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one: how all ranks agree to stop at the same step."""
    return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum").item() > 0


# ----------------------------------------------------------------------------------------------------------------
# The run: setup, resume, step, finish
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything one pretraining run holds; `step` and `nonfinite_steps` are the loop's state (checkpointed)."""

    args: PretrainingArguments
    accelerator: Accelerator
    run_dir: Path
    tokenizer: object
    config: DeepScaleLMConfig
    mode: TrainingMode  # how the model is trained over the processes (dslm_hf.training_modes)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    collator: object
    eval_collator: object  # the collator with token masking (--whole_word_mask trains on words only)
    sampler: EpochPermutationSampler
    train_loader: object
    eval_loader: object
    eval_blocks: object
    layout: dict
    step: int = 0
    nonfinite_steps: int = 0
    monitor: LayerSignalMonitor | None = None

    def say(self, message: str) -> None:
        self.accelerator.print(message)

    def trainer_state(self) -> dict:
        return {"step": self.step, "nonfinite_steps": self.nonfinite_steps, "layout": self.layout,
                "masking": masking_settings(self.args), "scheduler": self.scheduler.state_dict()}


# The objective's masking flags: a resume replays the uninterrupted run only with the same ones.
MASKING_FLAGS = {"mlm": ("mlm_probability", "whole_word_mask"), "seq2seq": ("noise_density", "mean_span_length"),
                 "clm": ()}


def masking_settings(args: PretrainingArguments) -> dict:
    return {name: getattr(args, name) for name in MASKING_FLAGS[args.objective]}


def claim_output_dir(args: PretrainingArguments, accelerator, lock: RunLock) -> Path | None:
    """Lock the run folder (rank 0; every rank stops when it is taken), then find the checkpoint to resume from, or
    clear the previous run's outputs under --overwrite_output_dir. Returns the checkpoint folder or None."""
    run_dir = Path(args.output_dir)
    refusal = None
    if accelerator.is_main_process:
        try:
            lock.acquire(accelerator.print)
        except UserError as error:
            refusal = error
    if any_rank(accelerator, refusal is not None):
        raise refusal if refusal is not None else SystemExit(2)
    resume_dir = resolve_checkpoint(args.resume_from_checkpoint, run_dir, accelerator.print)
    previous = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    accelerator.wait_for_everyone()  # every rank has looked before rank 0 deletes anything
    # `latest` without a checkpoint starts over an interrupted run, never a finished one (its final/ would be lost).
    starting_over_allowed = args.overwrite_output_dir or (args.resume_from_checkpoint == "latest"
                                                          and "final" not in previous)
    if resume_dir is None and previous and not starting_over_allowed:
        if checkpoint_folders(run_dir):
            raise UserError(f"{run_dir} already holds checkpoints: pass --resume_from_checkpoint latest to continue, "
                            "or --overwrite_output_dir to start over")
        raise UserError(f"{run_dir} holds a previous run's {', '.join(previous)} and no checkpoint to resume from: "
                        "choose a new --output_dir, or pass --overwrite_output_dir to delete them and start over")
    if resume_dir is None and previous and args.overwrite_output_dir:
        # Starting over: a stale checkpoint of the old run must never be taken for `latest` of the new one.
        if accelerator.is_main_process:
            refuse_links([run_dir / name for name in RUN_OUTPUTS], "--overwrite_output_dir")
            for name in RUN_OUTPUTS:
                path = run_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            accelerator.print(f"--overwrite_output_dir: removed the previous run's {', '.join(RUN_OUTPUTS)} from {run_dir}")
        accelerator.wait_for_everyone()
    return resume_dir


def check_accelerate_plugin_support(args: PretrainingArguments, accelerator) -> None:
    """What accelerate's own FSDP and DeepSpeed configs (accelerate launch --config_file ...) cannot do here:
    compiled layers, and checkpoints (their sharded states are pickles)."""
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return
    if args.torch_compile:
        raise UserError(f"--torch_compile is wired to the one-process and DDP loops, not to accelerate's "
                        f"{accelerator.distributed_type.value}: drop --torch_compile or launch without that config")
    if args.save_steps or args.resume_from_checkpoint:
        raise UserError(f"checkpoints under accelerate's {accelerator.distributed_type.value} are not supported (its "
                        "sharded states are pickles, which dslm-pretrain never loads): pass --save_steps 0 and no "
                        "--resume_from_checkpoint")


def setup(args: PretrainingArguments, accelerator, mode: TrainingMode, resuming: bool) -> Run:
    """Data, tokenizer, model config (r0 from the data), model, optimizer, scheduler and loaders, prepared."""
    run_dir = Path(args.output_dir)
    tokenizer, train_blocks, eval_blocks = prepare_data(args, accelerator, run_dir, resuming)
    collator = data.make_collator(args.objective, tokenizer, args.block_size, args.mlm_probability,
                                  args.noise_density, args.mean_span_length, args.whole_word_mask)
    eval_collator = data.make_collator(args.objective, tokenizer, args.block_size, args.mlm_probability,
                                       args.noise_density, args.mean_span_length) if args.whole_word_mask else collator
    config = build_model_config(args, tokenizer, train_blocks)
    accelerator.print(f"embedding correlation r0 estimated from the training blocks: {config.embedding_correlation:.4f}")
    set_seed(args.seed)
    model = build_model(config, args.objective, args.attn_implementation)
    if args.activation_checkpointing:
        model.activation_checkpointing_enable()
    if args.torch_compile:
        compiled = compile_layers(model, args.torch_compile_backend)
        accelerator.print(f"--torch_compile: {compiled} layers compiled in place ({args.torch_compile_backend}); "
                          "the first steps compile")
    accelerator.print(f"attention: {model.config._attn_implementation}")
    accelerator.print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                      f"{', '.join(f'{n} {l} layers' for n, l, _ in config.residual_stacks())}; "
                      f"{accelerator.num_processes} process(es), {accelerator.distributed_type.value}"
                      f"{mode.description}")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and args.gradient_accumulation_steps > 1:
        raise UserError("with DeepSpeed the engine steps inside backward: use --gradient_accumulation_steps 1 and a "
                        "larger --per_device_train_batch_size (gradient accumulation here is not wired to DeepSpeed)")
    learning_rate, why = (args.learning_rate, f"{args.learning_rate:g} ({learning_rate_source(args)}; "
                          f"{describe_rules(config)})") if args.learning_rate is not None else default_learning_rate(config)
    args.learning_rate = learning_rate  # recorded with the run's arguments

    def parameter_groups(module):  # of the whole model: depth-dependent groups see the whole stack
        groups = depth_parameter_groups(module, learning_rate, args.weight_decay, eps=args.adam_epsilon)
        accelerator.print(f"learning rate: {why}; {describe_groups(groups)}")
        return groups

    groups = mode.wrap(model, parameter_groups)  # this rank's share of the groups
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon)
    # Stepped once per optimizer step on every rank and not given to prepare(), which would step it
    # num_processes times; its state travels in trainer_state.json.
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_training_steps=args.max_steps,
                              num_warmup_steps=math.ceil(args.warmup_ratio * args.max_steps))
    data_parallel = mode.data_parallel_size
    sampler, train_loader, eval_loader = make_dataloaders(args, data_parallel, train_blocks, eval_blocks)
    train_loader, eval_loader = mode.prepare(optimizer, train_loader, eval_loader)
    if len(train_loader) == 0:
        raise UserError(f"the training split has {len(train_blocks)} blocks, fewer than one batch of "
                        f"--per_device_train_batch_size={args.per_device_train_batch_size} on each of "
                        f"{accelerator.num_processes} processes: use more text or a smaller batch")
    layout = {"num_processes": data_parallel, "per_device_train_batch_size": args.per_device_train_batch_size,
              "gradient_accumulation_steps": args.gradient_accumulation_steps, "block_size": args.block_size}
    monitor = LayerSignalMonitor(mode.model, args.signal_every) if args.signal_every else None
    return Run(args, accelerator, run_dir, tokenizer, config, mode, mode.model, mode.optimizer, scheduler, collator,
               eval_collator, sampler, train_loader, eval_loader, eval_blocks, layout, monitor=monitor)


# What a checkpoint's optimizer state fixes for the rest of the run: each group's peak learning rate (the schedule
# scales it), weight decay, betas and epsilon. Loading the state restores them, so other values on a resumed
# command line would be logged but never used; they are refused instead.
OPTIMIZER_SETTINGS = {"learning_rate": "--learning_rate", "weight_decay": "--weight_decay",
                      "betas": "--adam_beta1/--adam_beta2", "eps": "--adam_epsilon"}


def optimizer_settings(optimizer, peak_learning_rates: list[float]) -> list[dict]:
    """Per parameter group: its peak learning rate (the scheduler's base rate) and AdamW's settings."""
    return [{"learning_rate": rate, "weight_decay": group["weight_decay"], "betas": group["betas"], "eps": group["eps"]}
            for group, rate in zip(optimizer.param_groups, peak_learning_rates)]


def check_same_optimizer_settings(folder: Path, asked: list[dict], stored: list[dict]) -> None:
    """Refuse a resume whose learning rate, weight decay, betas or epsilon differ from the checkpoint's."""
    for group, (wanted, kept) in enumerate(zip(asked, stored)):
        for key, flag in OPTIMIZER_SETTINGS.items():
            if not np.allclose(np.asarray(wanted[key], float), np.asarray(kept[key], float),
                                                 rtol=1e-9, atol=0):
                raise UserError(f"checkpoint {folder} was trained with {key}={kept[key]} in parameter group {group}, "
                                f"this command asks for {wanted[key]} ({flag}): a resume keeps the checkpoint's "
                                f"optimizer settings and schedule, so the new value would not be applied; resume with "
                                f"the original {flag}, or start a new run in another --output_dir")


def resume(run: Run, folder: Path) -> None:
    """Load a verified checkpoint into the run: weights, optimizer, scheduler, step and counters."""
    asked = optimizer_settings(run.optimizer, run.scheduler.base_lrs)
    state = load_checkpoint(folder, run.mode)
    scheduler_keys = set(run.scheduler.state_dict())
    if not (isinstance(state.get("scheduler"), dict) and set(state["scheduler"]) == scheduler_keys
            and isinstance(state.get("nonfinite_steps"), int) and isinstance(state.get("layout"), dict)):
        raise CheckpointError(f"checkpoint {folder} is corrupt: its trainer_state.json lacks this run's layout, "
                              f"counters or scheduler state ({', '.join(sorted(scheduler_keys))})")
    check_same_optimizer_settings(folder, asked, optimizer_settings(run.optimizer, state["scheduler"]["base_lrs"]))
    if state["layout"] != run.layout:
        raise UserError(f"checkpoint {folder} was written with {state['layout']}, this run has {run.layout}: "
                        "resuming with another batch layout would change the data order; use the original settings")
    stored_masking = state.get("masking")  # absent in checkpoints written before it was recorded
    if isinstance(stored_masking, dict) and stored_masking != masking_settings(run.args):
        differ = [name for name, value in masking_settings(run.args).items() if stored_masking.get(name) != value]
        flags = ", ".join(f"--{name} {stored_masking.get(name)} (this command: {getattr(run.args, name)})"
                          for name in differ)
        raise UserError(f"checkpoint {folder} was trained with {flags}: resuming with other masking would change "
                        "the training task mid-run; resume with the original flags, or start a new run in another "
                        "--output_dir")
    run.scheduler.load_state_dict(state["scheduler"])  # only the scheduler's own keys: JSON values, nothing callable
    run.step, run.nonfinite_steps = state["step"], state["nonfinite_steps"]
    run.say(f"resumed at step {run.step} ({run.nonfinite_steps} non-finite steps skipped so far)")


def train_step(run: Run, batches) -> dict:
    """One optimizer step (forward/backward over the accumulation window, clipping, AdamW, scheduler); returns what
    was measured: {"loss", "grad_norm"} when finite, {} for a skipped non-finite step."""
    args, accelerator = run.args, run.accelerator
    # Dropout and masking of this step depend only on (seed, step, rank): a resumed run replays them.
    step_seed = data.derived_seed(args.seed, "step", run.step, accelerator.process_index)
    generator = torch.Generator().manual_seed(step_seed)
    window = [to_device(run.collator(next(batches).cpu(), generator), accelerator.device)
              for _ in range(args.gradient_accumulation_steps)]
    # Seeded after fetching: starting a DataLoader iterator (a new epoch, a resume) draws from the global RNG.
    torch.manual_seed(step_seed)
    if run.monitor is not None:
        run.monitor.arm(run.step)
    loss, finite = run.mode.train_window(window, run.collator)
    signals = run.monitor.measure(run.step) if run.monitor is not None and finite else None
    grad_norm = None
    if finite and args.max_grad_norm > 0:
        grad_norm = run.mode.clip_grad_norm_(args.max_grad_norm)  # None where the engine clips (DeepSpeed)
        finite = grad_norm is None or bool(torch.isfinite(grad_norm))
    if finite:
        run.optimizer.step()
    else:
        run.nonfinite_steps += 1
        run.say(f"step {run.step + 1}: non-finite loss or gradient, step skipped ({run.nonfinite_steps} so far)")
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()  # also on skipped steps: the learning rate stays a function of the step
    run.step += 1
    if run.nonfinite_steps > args.max_nonfinite_steps:
        accelerator.end_training()
        raise UserError(f"stopping at step {run.step}: {run.nonfinite_steps} steps had a non-finite loss or gradient, "
                        f"more than --max_nonfinite_steps={args.max_nonfinite_steps}")
    measured = {"tokens": sum(b["input_ids"].numel() for b in window) * run.layout["num_processes"]}
    if signals is not None:
        measured["signals"] = signals
    if finite:
        measured["loss"] = loss.item()
        if grad_norm is not None:
            measured["grad_norm"] = float(grad_norm)
    return measured


def record_signals(run: Run, signals: dict) -> None:
    """Layer-signal summaries to the trackers, the per-layer profiles to <run>/layer_signals.jsonl (main process)."""
    run.accelerator.log(LayerSignalMonitor.scalars(signals), step=run.step)
    if run.accelerator.is_main_process:
        with (run.run_dir / "layer_signals.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({**signals, "step": run.step}) + "\n")


def nonfinite_parameters(run: Run) -> list[str]:
    """Names of the parameters holding a NaN or an infinity on any rank ([] on every rank when all are finite):
    such weights are never checkpointed nor saved as the final model."""
    local = [name for name, parameter in run.mode.named_parameters()
             if not bool(torch.isfinite(parameter.to_local() if hasattr(parameter, "to_local") else parameter).all())]
    anywhere = any_rank(run.accelerator, bool(local))  # a collective: every rank takes part, whatever it found
    return local or (["(on another rank)"] if anywhere else [])


def newest_checkpoint_note(run: Run) -> str:
    folders = checkpoint_folders(run.run_dir)
    return f"the newest checkpoint, {folders[0]}, is kept" if folders else "there is no earlier checkpoint"


def save(run: Run) -> Path | None:
    """A checkpoint of the current step, or None (said in one line) when its weights are not finite: a broken
    checkpoint must never rotate a good one away."""
    broken = nonfinite_parameters(run)
    if broken:
        run.say(f"step {run.step}: {len(broken)} parameter tensors are not finite (first: {broken[0]}); no checkpoint "
                f"written, {newest_checkpoint_note(run)}")
        return None
    return save_checkpoint(run.accelerator, run.run_dir, run.mode, run.trainer_state(), run.args.checkpoints_total_limit)


def train_loop(run: Run, stop: StopSignals) -> tuple[dict, str | None]:
    """Steps until max_steps, the time limit or a stop signal (all ranks agree on the step they stop after).
    Returns the last held-out metrics and the reason for stopping early (None when max_steps was reached)."""
    args, accelerator = run.args, run.accelerator
    batches = micro_batches(accelerator, run.train_loader, run.sampler, run.step * args.gradient_accumulation_steps)
    progress = tqdm(total=args.max_steps, initial=run.step, disable=not accelerator.is_main_process, desc="pretraining")
    started = window_started = time.monotonic()
    window_tokens, metrics, stopped_by = 0, {}, None
    run.model.train()
    while run.step < args.max_steps:
        measured = train_step(run, batches)
        window_tokens += measured.pop("tokens")
        if "signals" in measured:
            record_signals(run, measured.pop("signals"))
        tokens_per_second = window_tokens / max(time.monotonic() - window_started, 1e-9)
        progress.update(1)
        if "loss" in measured:
            progress.set_postfix(loss=f"{measured['loss']:.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}",
                                 tok_s=f"{tokens_per_second:.0f}")
        if run.step % args.logging_steps == 0 or run.step == args.max_steps:
            accelerator.log({"lr": run.scheduler.get_last_lr()[0], "nonfinite_steps": run.nonfinite_steps,
                             "tokens_per_second": tokens_per_second, **measured}, step=run.step)
            window_started, window_tokens = time.monotonic(), 0
        out_of_time = args.max_train_minutes is not None and time.monotonic() - started > 60 * args.max_train_minutes
        if any_rank(accelerator, stop.received is not None):
            stopped_by = stop.received or "a stop signal on another rank"
            break
        out_of_time = any_rank(accelerator, out_of_time)  # every rank stops at the same step: the slowest clock
        last = run.step == args.max_steps or out_of_time
        if run.step % args.eval_steps == 0 or last:
            metrics = evaluate(accelerator, run.model, run.eval_loader, run.eval_collator, args.seed)
            accelerator.log(metrics, step=run.step)
            run.say(f"step {run.step}: held-out loss {metrics['eval_loss']:.4f}, "
                    f"perplexity {metrics['eval_perplexity']:.2f}")
        if args.save_steps and (run.step % args.save_steps == 0 or last):
            save(run)
        if out_of_time:
            run.say(f"--max_train_minutes={args.max_train_minutes} reached at step {run.step}: stopping")
            break
    progress.close()
    return metrics, stopped_by


def stop_on_signal(run: Run, signal_name: str) -> dict:
    """After a stop signal: a checkpoint of the step just finished, and how to resume."""
    folder = save(run)
    written = f"checkpoint {folder}" if folder is not None else f"non-finite weights, {newest_checkpoint_note(run)}"
    run.say(f"dslm-pretrain: stopped by {signal_name} after step {run.step}; {written}. To continue, "
            "run the same command with --resume_from_checkpoint latest")
    run.accelerator.end_training()
    return {"step": run.step, "nonfinite_steps": run.nonfinite_steps, "stopped_by": signal_name}


def count_baseline(run: Run) -> dict:
    """The causal LM's count-based baseline: an interpolated Kneser-Ney n-gram fitted on the training blocks, scored
    like the model on the held-out blocks it was evaluated on (each block on its own, tokens 1..T)."""
    train = run.train_loader.dataset["input_ids"]
    model = KneserNeyLM(run.config.vocab_size, order=COUNT_BASELINE_ORDER).fit(np.concatenate([np.asarray(b) for b in train]))
    scored = model.causal_lm_metrics(np.asarray(run.eval_loader.dataset["input_ids"]))
    return {"baseline_eval_loss": scored["loss"], "baseline_eval_perplexity": scored["perplexity"]}


def finish(run: Run, metrics: dict) -> dict:
    """Held-out metrics (if the loop had none), replica check, final/ (model, tokenizer) and a sample."""
    args, accelerator = run.args, run.accelerator
    broken = nonfinite_parameters(run)
    if broken:
        accelerator.end_training()
        raise UserError(f"training ended at step {run.step} with non-finite weights ({len(broken)} parameter tensors, "
                        f"first: {broken[0]}): final/ was not written and {newest_checkpoint_note(run)}; resume from "
                        "it with a lower --learning_rate or --max_grad_norm, or start over")
    if not metrics:  # resumed at the end: nothing trained, still report the held-out numbers
        metrics = evaluate(accelerator, run.model, run.eval_loader, run.eval_collator, args.seed)
    metrics.update(step=run.step, nonfinite_steps=run.nonfinite_steps, final_dir=str(run.run_dir / "final"))
    if run.mode.has_replicas:
        metrics["replica_spread"] = replica_spread(accelerator, run.model)
        accelerator.log({"replica_spread": metrics["replica_spread"]}, step=run.step)
        if metrics["replica_spread"] > 0:
            run.say(f"warning: the model replicas differ across processes (spread {metrics['replica_spread']:.3g})")
    if args.objective == "clm" and accelerator.is_main_process and "eval_loss" in metrics:
        metrics.update(count_baseline(run))
        run.say(f"held-out loss {metrics['eval_loss']:.4f} (perplexity {metrics['eval_perplexity']:.2f}); an "
                f"interpolated Kneser-Ney {COUNT_BASELINE_ORDER}-gram fitted on the training blocks scores "
                f"{metrics['baseline_eval_loss']:.4f} (perplexity {metrics['baseline_eval_perplexity']:.2f}) on the "
                "same held-out blocks")
    try:
        save_final_model(run, run.run_dir / "final")
    except OSError as error:  # disk full, file too large, permissions changed during the run
        shutil.rmtree(run.run_dir / "final", ignore_errors=True)  # a half-written model must not pass for the result
        raise UserError(f"could not write the final model to {run.run_dir / 'final'} ({describe_os_error(error)}): "
                        f"it was removed, and {newest_checkpoint_note(run)}; free space or fix the folder's "
                        "permissions, then rerun the same command with --resume_from_checkpoint latest") from None
    if accelerator.is_main_process and args.sample_max_new_tokens:
        prompt = run.eval_blocks[0]["input_ids"].tolist()[: args.block_size if args.objective != "clm" else 16]
        sample = generate_sample(run.run_dir / "final", args.objective, prompt, args.sample_max_new_tokens,
                                 run.eval_collator)
        print(f"\n=== generated sample (greedy, from {run.run_dir / 'final'}) ===\n{sample}\n", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def train(args: PretrainingArguments) -> dict:
    """Run pretraining; returns the final metrics (step, eval_loss, eval_perplexity, nonfinite_steps, paths), or
    {"step", "nonfinite_steps", "stopped_by"} when a SIGTERM/SIGINT stopped it after writing a checkpoint."""
    run_dir = Path(args.output_dir)
    check_output_dir(run_dir)
    kwargs = preset_kwargs(args)  # unknown config keys, block_size vs positions: refused before any data is read
    trackers = [JsonlTracker(run_dir / "metrics.jsonl")] + (["tensorboard"] if args.report_to == "tensorboard" else [])
    accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=trackers, project_config=ProjectConfiguration(
        project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")))
    check_accelerate_plugin_support(args, accelerator)
    threads = torch.get_num_threads()
    set_cpu_threads(args, accelerator)
    mode = training_mode(args, accelerator)
    check_model_fits(args, accelerator, kwargs, mode.weight_shards)
    lock = RunLock(run_dir)
    try:
        resume_dir = claim_output_dir(args, accelerator, lock)
        run = setup(args, accelerator, mode, resuming=resume_dir is not None)
        if resume_dir is not None:
            resume(run, resume_dir)
        if accelerator.is_main_process:
            for log in ("metrics.jsonl", "layer_signals.jsonl"):  # the steps after the checkpoint are redone
                drop_records_after(run_dir / log, run.step)
            run.config.save_pretrained(run_dir / "model_config")
        accelerator.init_trackers("pretrain", config={k: v for k, v in asdict(args).items() if v is not None})
        with StopSignals(announce=accelerator.is_main_process) as stop:
            metrics, stopped_by = train_loop(run, stop)
            if stopped_by is not None:
                result = stop_on_signal(run, stopped_by)
            else:
                result = finish(run, metrics)  # a signal now is noted and ignored: the run is about to end anyway
        release_the_process_group(run)
        return result
    finally:
        lock.release()
        torch.set_num_threads(threads)  # --num_threads is this run's, not the calling process's (in-process use)


def set_cpu_threads(args: PretrainingArguments, accelerator) -> None:
    """Apply --num_threads and say how many CPU threads each process computes with; when the machine's load average
    shows other busy processes, say that oversubscribed threads slow every step and how to avoid it."""
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    if accelerator.device.type != "cpu":
        return
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))  # the ranks on this machine
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    line = (f"CPU threads: {threads} per process x {local} process(es) on {cores} cores"
            + (" (--num_threads)" if args.num_threads is not None else " (torch's default; --num_threads sets it)"))
    if threads * local > cores:
        line += (f"; {threads * local} threads on {cores} cores: oversubscribed threads can make each step several "
                 f"times slower (--num_threads {max(1, cores // local)})")
    elif load >= 1 and threads * local + load > cores + 0.5:
        line += (f"; the 1-minute load average is {load:.1f}: other processes use these cores, and threads that "
                 "outnumber the free cores can make each step several times slower (--num_threads 1 or fewer processes)")
    accelerator.print(line)


def release_the_process_group(run: Run) -> None:
    """Free the prepared model, optimizer and loaders, and with them the process group, right after the run's last
    collective, not whenever the interpreter gets to it. A gloo group's destructor joins its worker threads while
    holding the GIL; a worker that needs the GIL then (to free a tensor of a finished collective, or at all once the
    interpreter is finalizing) never gets it, and the rank hangs (torch 2.13; rare, seen once after a stop signal).
    The group's last reference is DDP's reducer, or, when torch.distributed.nn is first imported after the group
    exists (DDP imports it), that module's default arguments, which live until interpreter teardown: hence its
    import at the top of this module."""
    run.accelerator.free_memory()
    run.mode.model = run.mode.optimizer = None
    run.mode = run.model = run.optimizer = run.scheduler = run.train_loader = run.eval_loader = run.monitor = None
    gc.collect()
    run.accelerator.state.destroy_process_group()  # a no-op when finish or stop_on_signal's end_training did it


# ----------------------------------------------------------------------------------------------------------------
# The final folder
# ----------------------------------------------------------------------------------------------------------------
def generate_sample(folder: Path, objective: str, prompt_ids: list[int], max_new_tokens: int, collator=None) -> str:
    """Reload the saved folder (proving it loads) and produce text: a continuation (clm), the filled spans
    (seq2seq) or the predictions at masked positions (mlm)."""
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    model = AUTO_MODEL_CLASSES[objective].from_pretrained(folder).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if objective == "clm":
            prompt = torch.tensor([prompt_ids])
            output = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens, do_sample=False)
            return tokenizer.decode(output[0])
        batch = collator(torch.tensor([prompt_ids]), generator)
        if objective == "seq2seq":
            output = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                    max_new_tokens=batch["labels"].shape[1], do_sample=False)
            return f"input: {tokenizer.decode(batch['input_ids'][0])}\nspans: {tokenizer.decode(output[0])}"
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        masked = batch["labels"][0] != IGNORE_INDEX
        filled = batch["input_ids"][0].clone()
        filled[masked] = logits[0].argmax(-1)[masked]
        return f"input: {tokenizer.decode(batch['input_ids'][0])}\nfilled: {tokenizer.decode(filled)}"


def save_final_model(run: Run, folder: Path) -> None:
    """save_pretrained (safetensors, config with auto_map, remote code, generation config) + tokenizer. The model
    card is written by dslm-publish, from an evaluation record tied to these exact weights (docs/publishing.md).

    The whole model and its state dict come from the training mode (gathered onto rank 0 where it is split)."""
    args, accelerator, config = run.args, run.accelerator, run.config
    model, state_dict = run.mode.full_model()  # a collective: every rank takes part
    if model is None:  # a rank that does not write
        return
    if model.can_generate():
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
            decoder_start_token_id=config.decoder_start_token_id, max_new_tokens=args.sample_max_new_tokens or None)
    model.save_pretrained(folder, state_dict=state_dict, is_main_process=accelerator.is_main_process,
                          save_function=accelerator.save)
    if accelerator.is_main_process:
        save_tokenizer(run.tokenizer, folder, config)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def run_command_line(argv: list[str]) -> None:
    """Parse, then either supervise --num_processes workers (each runs this same command line) or train."""
    args = parse_arguments(argv)
    if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        status = launch_workers("dslm_hf.pretraining", argv, args.num_processes)
        if status:
            raise SystemExit(status)
        return
    stop_when_the_launcher_dies()
    try:
        with failures_reported_to_the_launcher():  # a rank of --num_processes: the launcher says it once
            train(args)
    except KeyboardInterrupt:  # Ctrl-C before the loop took over the signal: nothing to save yet
        print("dslm-pretrain: interrupted before training started; nothing was written to resume from",
              file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def main(argv=None) -> int:
    """Console entry point (`dslm-pretrain`): 0 on success, 2 with one stderr line for a user error."""
    return run_command("dslm-pretrain", run_command_line, argv)


if __name__ == "__main__":
    sys.exit(main())
