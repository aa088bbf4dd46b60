"""Pieces every benchmark script shares: tinyshakespeare at character level, DeepScaleLM configs for it, the one
bounded training loop every benchmark trains through (`train`: the package's AdamW groups, `build_adamw`, and its
held-out loss, `dslm_hf.evaluation.held_out_loss`) that reports loss, held-out curve, divergence and the per-layer
gradient-norm spread, and the run metadata (machine, versions, date, git commit and dirty-tree flag at start,
command, wall time, the text used) that goes with every result file.

The scripts import this as `common`: Python puts a script's own folder first on sys.path, so each one runs from the
repository root in one command, `python benchmarks/<name>.py --out benchmarks/results/<name>.json` (the tests add
benchmarks/ through pytest's `pythonpath`, setup.cfg).
"""

import concurrent.futures as futures
import hashlib
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import get_scheduler

import dslm_hf
from dslm_hf.data import CausalLMCollator, MaskedLMCollator
from dslm_hf.evaluation import held_out_loss, to_device
from dslm_hf.files import write_text_atomically
from dslm_hf.layers import find_layer_stacks
from dslm_hf.measurements import weight_gradient_norm
from dslm_hf.optimization import build_adamw
from dslm_hf.provenance import code_version

REPO_ROOT = Path(__file__).resolve().parents[1]
# The whole tinyshakespeare where ../shared sits beside the repository, else the 300 KB excerpt shipped for the tests
# (its first 2095 paragraphs): every result file records which one it used (write_results, "text").
SHARED_TEXT = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
SHIPPED_TEXT = REPO_ROOT / "tests" / "data" / "tinyshakespeare_excerpt.txt"
DEFAULT_TEXT = SHARED_TEXT if SHARED_TEXT.is_file() else SHIPPED_TEXT
VALIDATION_FRACTION = 0.1
OBJECTIVES = ("clm", "mlm")


# ----------------------------------------------------------------------------------------------------------------
# Data: characters as tokens, first 90% of the text for training, the last 10% held out
# ----------------------------------------------------------------------------------------------------------------
class CharTokenizer:
    """One id per distinct character of the corpus (65 for tinyshakespeare), then the special tokens that
    dslm_hf's masked-LM collator needs (they never occur in the text)."""

    pad_token, eos_token, mask_token = "<pad>", "<eos>", "<mask>"

    def __init__(self, text: str):
        self.symbols = sorted(set(text))
        self.special_tokens = [self.pad_token, self.eos_token, self.mask_token]
        self.char_ids = {c: i for i, c in enumerate(self.symbols)}
        self.pad_token_id, self.eos_token_id, self.mask_token_id = range(len(self.symbols), len(self.symbols) + 3)
        self.all_special_ids = [self.pad_token_id, self.eos_token_id, self.mask_token_id]

    def __len__(self) -> int:
        return len(self.symbols) + len(self.special_tokens)

    def encode(self, text: str) -> list[int]:
        return [self.char_ids[c] for c in text]

    def decode(self, ids) -> str:
        vocabulary = self.symbols + self.special_tokens
        return "".join(vocabulary[i] for i in ids)


class CharCorpus:
    """Token ids of a text file, split into a training head and a held-out tail."""

    def __init__(self, path: str | os.PathLike = DEFAULT_TEXT):
        path = Path(path)
        if not path.is_file():
            raise SystemExit(f"text file {path} not found: pass --text PATH to a plain-text file")
        text = path.read_text(encoding="utf-8")
        self.tokenizer = CharTokenizer(text)
        ids = torch.tensor(self.tokenizer.encode(text))
        cut = int(len(ids) * (1 - VALIDATION_FRACTION))
        self.train_ids, self.validation_ids = ids[:cut], ids[cut:]

    def random_blocks(self, batch: int, context: int, generator: torch.Generator) -> torch.Tensor:
        """(batch, context) windows of the training text at random offsets."""
        starts = torch.randint(len(self.train_ids) - context, (batch,), generator=generator)
        return torch.stack([self.train_ids[s:s + context] for s in starts.tolist()])

    def validation_blocks(self, context: int, count: int) -> torch.Tensor:
        """`count` evenly spaced, non-overlapping (count, context) windows of the held-out text."""
        available = len(self.validation_ids) // context
        if count > available:
            raise SystemExit(f"the held-out text has only {available} blocks of {context} tokens, {count} requested")
        stride = available // count
        return torch.stack([self.validation_ids[i * stride * context:(i * stride + 1) * context] for i in range(count)])


def make_collator(objective: str, tokenizer):
    if objective == "clm":
        return CausalLMCollator()
    if objective == "mlm":
        return MaskedLMCollator(tokenizer)
    raise SystemExit(f"objective {objective!r} is not one of {OBJECTIVES}")


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
def deepscalelm_config(corpus: CharCorpus, objective: str, *, layers: int, hidden: int, heads: int, context: int,
                       init_scheme: str = "deepscalelm", norm_placement: str = "pre", r0: float | str = "data",
                       **overrides) -> "dslm_hf.DeepScaleLMConfig":
    """A char-level config; `r0="data"` sets embedding_correlation from 256 training blocks (the recipe needs the
    data's r0), a number uses that value."""
    config = dslm_hf.DeepScaleLMConfig(
        vocab_size=len(corpus.tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        max_position_embeddings=context, init_sequence_length=context, is_decoder=objective == "clm",
        init_scheme=init_scheme, norm_placement=norm_placement, pad_token_id=corpus.tokenizer.pad_token_id,
        eos_token_id=corpus.tokenizer.eos_token_id, **overrides,
    )
    if r0 == "data":
        sample = corpus.random_blocks(256, context, torch.Generator().manual_seed(1234))
        config.embedding_correlation = config.estimate_embedding_correlation(sample)
    else:
        config.embedding_correlation = float(r0)
    return config


def build_deepscalelm(config, seed: int = 0):
    torch.manual_seed(seed)
    head = dslm_hf.DeepScaleLMForCausalLM if config.is_decoder else dslm_hf.DeepScaleLMForMaskedLM
    return head._from_config(config, attn_implementation="sdpa")


def parameter_count(model, exclude_embeddings: bool = False) -> int:
    skip = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} if exclude_embeddings else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def layer_gradient_norms(model) -> list[float]:
    """Norm of the weight-matrix gradients of each layer of the model's (first) layer stack, input side first."""
    (_, layers), *_ = find_layer_stacks(model)
    norms = [weight_gradient_norm(layer) for layer in layers]
    return [float("nan") if n is None else n for n in norms]


def norm_spread(norms: list[float]) -> float:
    """max/min of per-layer gradient norms: 1 is perfectly flat; inf/nan when a layer has no finite gradient."""
    if not norms or not all(math.isfinite(n) for n in norms):
        return float("nan")
    return max(norms) / min(norms) if min(norms) > 0 else float("inf")


@dataclass
class TrainingSettings:
    """What `train` does with a model: every benchmark trains through it, so a field here, not a loop in a script,
    is how a benchmark trains differently.

    eval_every: measure the held-out loss every that many steps (before the step) and after the last one
    (`TrainingResult.held_out_curve`); None measures it once, after training. eval_batch: blocks per held-out batch
    (for masked LM it also fixes which masks each block gets). bf16: forward passes (training and held-out) under
    torch.autocast(bfloat16) on the model's device. deadline_s: a run still training after that many seconds stops
    (`cut_at`) and reports no validation_loss (its curve keeps what it measured).
    """

    steps: int
    batch: int
    context: int
    learning_rate: float
    warmup_steps: int
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    schedule: str = "linear"
    validation_blocks: int = 64
    seed: int = 0
    log_every: int = 25
    eval_every: int | None = None
    eval_batch: int = 16
    bf16: bool = False
    deadline_s: float | None = None


@dataclass
class TrainingResult:
    steps_done: int
    diverged: bool
    diverged_at: int | None
    final_train_loss: float
    validation_loss: float
    wall_s: float
    layer_grad_norms_init: list[float]
    layer_grad_norms_end: list[float]
    grad_norm_spread_init: float
    grad_norm_spread_end: float
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    held_out_curve: list[tuple[int, float]] = field(default_factory=list)
    cut_at: int | None = None


def train(model, corpus, objective: str, settings: TrainingSettings) -> TrainingResult:
    """Train `model` (on its device) for `settings.steps` steps and measure its held-out loss.

    The optimizer is `dslm_hf.optimization.build_adamw` (betas (0.9, 0.98), eps 1e-8, decay on matrices only, the
    model config's depth and width rules: the parameter groups dslm-pretrain trains with); warmup then
    `settings.schedule` (transformers.get_scheduler), clipping at `max_grad_norm`; stops at the first non-finite loss.
    `corpus` is a CharCorpus or anything with its `random_blocks` and `validation_blocks` (and `tokenizer` for mlm).

    The data order, masks and dropout depend only on `settings.seed`, so every model of a comparison sees the same
    batches. The loss reported as final is the mean over the last 10% of the steps (a single batch is noisy). Every
    held-out number is `dslm_hf.evaluation.held_out_loss` over the same `validation_blocks` evenly spaced blocks,
    `eval_batch` at a time, with masks seeded per batch from `settings.seed` (until this function used it, masked-LM
    held-out masks came from one generator seeded with `settings.seed`: other masks, so mlm validation losses of
    earlier result files differ from new ones by that sampling; causal-LM numbers are the same). `wall_s` is the
    training loop's time, held-out measurements along the curve included, the final one not.
    """
    collator = make_collator(objective, getattr(corpus, "tokenizer", None))
    device = next(model.parameters()).device
    optimizer = build_adamw(model, settings.learning_rate, settings.weight_decay)
    scheduler = get_scheduler(settings.schedule, optimizer, num_warmup_steps=settings.warmup_steps,
                              num_training_steps=settings.steps)
    held_out = corpus.validation_blocks(settings.context, settings.validation_blocks)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16)
    tokens_per_step = settings.batch * settings.context

    def measure() -> float:
        with autocast:
            return held_out_loss(model, held_out, collator, settings.seed, settings.eval_batch)

    data_generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    model.train()
    losses, curve, held_out_curve, norms_init, norms_end = [], [], [], [], []
    diverged_at = cut_at = None
    start = time.perf_counter()
    for step in range(settings.steps):
        if settings.eval_every and step % settings.eval_every == 0:
            held_out_curve.append((step * tokens_per_step, measure()))
        if settings.deadline_s is not None and time.perf_counter() - start > settings.deadline_s:
            cut_at = step
            break
        batch = to_device(collator(corpus.random_blocks(settings.batch, settings.context, data_generator),
                                   data_generator), device)
        with autocast:
            loss = model(**batch).loss
        if not torch.isfinite(loss):
            diverged_at = step
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            norms_init = layer_gradient_norms(model)
        if step == settings.steps - 1:
            norms_end = layer_gradient_norms(model)
        if settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % settings.log_every == 0 or step == settings.steps - 1:
            curve.append((step, losses[-1]))
    wall = time.perf_counter() - start
    tail = losses[-max(1, len(losses) // 10):] if losses else [float("nan")]
    diverged = diverged_at is not None
    final = float("nan") if diverged else measure()
    if settings.eval_every:  # a cut run's last point at the tokens it trained on, else at the full budget
        held_out_curve.append(((settings.steps if cut_at is None else cut_at) * tokens_per_step, final))
    return TrainingResult(
        steps_done=len(losses), diverged=diverged, diverged_at=diverged_at,
        final_train_loss=float("nan") if diverged else sum(tail) / len(tail),
        validation_loss=final if cut_at is None else float("nan"), wall_s=wall,
        layer_grad_norms_init=norms_init, layer_grad_norms_end=norms_end,
        grad_norm_spread_init=norm_spread(norms_init), grad_norm_spread_end=norm_spread(norms_end), train_curve=curve,
        held_out_curve=held_out_curve, cut_at=cut_at,
    )


# ----------------------------------------------------------------------------------------------------------------
# Bookkeeping
# ----------------------------------------------------------------------------------------------------------------
# Taken when a benchmark script imports this module: the code its runs use, and the start of its wall time.
RUN_STARTED = time.time()
RUN_CODE = code_version(REPO_ROOT)


def machine_description() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()[:10]
    except (OSError, subprocess.CalledProcessError):
        lscpu = [platform.processor()]
    return {
        "lscpu": lscpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
        "hostname": platform.node(), "started_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(RUN_STARTED)),
        "wall_time_s": round(time.time() - RUN_STARTED, 1), **RUN_CODE,
    }


def text_description(path: str | os.PathLike) -> dict:
    """Which text a run trained on: its path, size and sha256, and whether it is the shipped excerpt."""
    path = Path(path)
    data = path.read_bytes()
    return {"path": str(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "shipped_excerpt": path.resolve() == SHIPPED_TEXT}


def write_results(path: str | os.PathLike, results: dict) -> Path:
    """Write {"machine": machine_description(), "text": ... (when settings name one), **results} atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine_description()}
    text = results.get("settings", {}).get("text")
    if text and Path(text).is_file():
        record["text"] = text_description(text)
    return write_text_atomically(path, json.dumps(record | results, indent=1))


def run_tasks(function, tasks: list, shared: dict, workers: int, budget_s: float, on_result) -> list:
    """`function(task, shared)` for each task in `workers` spawned processes (one torch thread each), in order;
    `on_result(record)` as each finishes. No task starts after `budget_s` seconds: those are returned as skipped."""
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending, queue = set(), list(tasks)
        while queue or pending:
            while queue and len(pending) < workers and time.perf_counter() - started <= budget_s:
                pending.add(pool.submit(function, queue.pop(0), shared))
            if not pending:
                break
            done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
            for future in done:
                on_result(future.result())
    return queue


def add_common_arguments(parser, default_out: str, trains_on_text: bool = True):
    parser.add_argument("--out", default=default_out, help="result JSON (plots, where a script makes one, go next to it)")
    if trains_on_text:
        parser.add_argument("--text", default=str(DEFAULT_TEXT), help="training text (character level)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: the machine's 2 cores are shared with other work)")
    parser.add_argument("--smoke", action="store_true", help="trivial sizes: checks that the script runs, measures nothing")
    return parser
