"""`dslm-diagnose`: measure signal propagation through any Hugging Face transformer and overlay the theory.

    dslm-diagnose MODEL --output-dir DIR                 # MODEL: a model id, a folder, or a config.json
    dslm-diagnose MODEL --output-dir DIR --text-file tinyshakespeare.txt --tokenizer bytes
    dslm-diagnose --plan --hidden-size 256 --output-dir DIR
    dslm-diagnose MODEL_OR_RUN --usefulness --text_file FILE --output-dir DIR   # per-layer usefulness (below)

For every layer of every stack (decoder-only, encoder-only, or both stacks of an encoder-decoder) one training-mode
forward and backward pass measures the residual stream's variance and the correlation between positions (rank
collapse: correlation -> 1), the norm of the gradient of the layer's weight matrices, and the gradient reaching the
layer's output; a separate eval-mode pass (eager attention, no dropout on the probabilities) measures the variance of
the attention logits within a row and the attention entropy. For DeepScaleLM configs the predictions of
`dslm_hf.theory` are overlaid; any other model is "not covered" and gets the measurements alone.
Writes DIR/report.json and DIR/signal_propagation.png (`--plan`: DIR/depth_plan.json and DIR/depth_plan.png).
`--usefulness` measures, on held-out text, what each layer is worth (`dslm_hf.layer_usefulness`: the loss increase
when it is skipped, the angle it turns the stream by, its share of the gradient), for a model or for every checkpoint
of a run, and writes DIR/usefulness.json and DIR/usefulness.png.

Python API: `load_model`, `measure_signal_propagation`, `diagnose`, `plan_depths`.
"""

import argparse
import inspect
import json
import math
import os
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import layer_usefulness as usefulness
from . import layers as layer_finding
from . import monitoring
from .checkpointing import check_model_folder, loading, read_json_object
from .cli import UserError, check_output_dir, run_command, usage_errors_as_user_errors
from .configuration_deepscalelm import DeepScaleLMConfig
from .data import read_text_file
from .files import write_text_atomically
from .measurements import token_correlation, weight_gradient_norm
from .recipe_deepscalelm import embedding_correlation_estimate
from .theory import predict_model

class DiagnoseError(UserError):
    """Bad input to dslm-diagnose: the message says what is wrong and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Loading any model: a DeepScaleLM or transformers config (random init) or a checkpoint (its weights)
# ----------------------------------------------------------------------------------------------------------------
def _head_class(config):
    """The auto class whose loss exercises every layer: seq2seq LM, masked LM (encoders), causal LM, else the base."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    if getattr(config, "is_encoder_decoder", False) and type(config) in AutoModelForSeq2SeqLM._model_mapping:
        return AutoModelForSeq2SeqLM
    if not getattr(config, "is_decoder", False) and type(config) in AutoModelForMaskedLM._model_mapping:
        return AutoModelForMaskedLM
    if type(config) in AutoModelForCausalLM._model_mapping:
        return AutoModelForCausalLM
    return AutoModel


def load_model(spec: str, random_init: bool = False, trust_remote_code: bool = False) -> nn.Module:
    """A model from a model id, a folder (config.json, with weights if present) or a config.json path.

    A config alone (or `random_init=True`) gives a freshly initialised model; weights are loaded otherwise. Attention
    runs in eager mode so that attention probabilities can be returned. Raises DiagnoseError for anything unusable.
    """
    from transformers import AutoConfig

    path = Path(spec)
    if path.is_file() and path.suffix != ".json":
        raise DiagnoseError(f"{spec} is a file but not a config.json: pass a model folder, a config.json or a model id")
    if path.is_dir():
        check_model_folder(path)
    elif path.is_file():
        read_json_object(path)
    with loading("the model config", spec):  # errors other than these are about the files' content
        try:
            config = AutoConfig.from_pretrained(str(path) if path.is_file() else spec, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as error:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            where = "a local folder, a config.json, or a model id in the local Hugging Face cache" + (
                " (HF_HUB_OFFLINE is set, so the Hub is not asked)" if offline else ""
            )
            first_line = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
            raise DiagnoseError(f"cannot load a model config from {spec!r}: {first_line}. MODEL must be {where}") from None
    if path.is_file():
        config_only = True
    elif path.is_dir():
        config_only = random_init or not (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))
    else:  # a model id: its weights come from the local cache
        config_only = random_init
    head = _head_class(config)
    with loading("the weights", spec):
        try:
            if config_only:
                return head.from_config(config, attn_implementation="eager", trust_remote_code=trust_remote_code)
            return head.from_pretrained(spec, attn_implementation="eager", trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0].rstrip(".")
            hint = "" if config_only else " (pass --random-init to build it from its config alone)"
            raise DiagnoseError(f"cannot build a model from {spec!r}: {first_line}{hint}") from None


def find_layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every stack of layers (`dslm_hf.layers.find_layer_stacks`), refusing a model that has none."""
    stacks = layer_finding.find_layer_stacks(model)
    if not stacks:
        raise DiagnoseError(
            f"{type(model).__name__} has no layer stack (an nn.ModuleList of the classes its _no_split_modules names, "
            "or one its base_model_pp_plan names): dslm-diagnose measures transformers built as a list of layers"
        )
    return stacks


def _stack_role(stack_name: str) -> str:
    """'encoder' or 'decoder' for a stack inside an encoder-decoder; 'main' for a single stack."""
    parts = stack_name.split(".")
    for role in ("encoder", "decoder"):
        if role in parts:
            return role
    return "main"


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def zipf_token_ids(vocab_size: int, batch_size: int, sequence_length: int, seed: int = 0, exponent: float = 1.0) -> torch.Tensor:
    """Random token ids with a Zipf law over a shuffled vocabulary: repeats as frequent as in real text."""
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    probabilities = ranks.pow(-exponent)
    samples = torch.multinomial(probabilities / probabilities.sum(), batch_size * sequence_length, replacement=True, generator=generator)
    permutation = torch.randperm(vocab_size, generator=generator)
    return permutation[samples].view(batch_size, sequence_length)


def text_token_ids(text: str, tokenizer, vocab_size: int, batch_size: int, sequence_length: int) -> torch.Tensor:
    """batch_size consecutive windows of sequence_length tokens of `text`.

    tokenizer: a transformers tokenizer, or "bytes" (UTF-8 bytes as token ids, for byte/char-level vocabularies).
    """
    if tokenizer == "bytes":
        if vocab_size < 256:
            raise DiagnoseError(f"--tokenizer bytes needs a vocabulary of at least 256 ids, the model has {vocab_size}")
        ids = list(text.encode("utf-8"))
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    needed = batch_size * sequence_length
    if len(ids) < needed:
        raise DiagnoseError(
            f"the text gives {len(ids)} tokens, fewer than batch_size x sequence_length = {needed}: "
            "give more text or lower --batch-size / --sequence-length"
        )
    if max(ids[:needed]) >= vocab_size:
        raise DiagnoseError(f"the tokenizer produced id {max(ids[:needed])} outside the model's vocabulary ({vocab_size})")
    return torch.tensor(ids[:needed]).view(batch_size, sequence_length)


def _model_inputs(model: nn.Module, input_ids: torch.Tensor) -> dict:
    """Inputs whose loss reaches every layer: labels = the tokens (seq2seq: the decoder reads them too)."""
    if getattr(model.config, "is_encoder_decoder", False):
        return {"input_ids": input_ids, "decoder_input_ids": input_ids, "labels": input_ids}
    if "labels" in inspect.signature(model.forward).parameters:
        return {"input_ids": input_ids, "labels": input_ids}
    return {"input_ids": input_ids}


def _loss(output) -> torch.Tensor:
    if getattr(output, "loss", None) is not None:
        return output.loss
    # No head, or no labels: a quadratic read-out of the output reaches every layer.
    return 0.5 * _first_tensor(output).float().pow(2).mean()


# ----------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------
def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next(t for t in output if isinstance(t, torch.Tensor))
    return output[0]


def _attention_statistics(probabilities: torch.Tensor) -> tuple[float, float]:
    """(variance of the logits within a row over its visible keys, entropy) averaged over rows of (B, H, Tq, Tk)."""
    p = probabilities.double()
    visible = p > 0
    counts = visible.sum(-1)
    log_p = torch.where(visible, p.clamp_min(1e-300).log(), torch.zeros_like(p))
    entropy = -(p * log_p).sum(-1)
    # Logits and log-probabilities differ by a constant per row, so their within-row variances are equal.
    mean = log_p.sum(-1) / counts
    variance = (torch.where(visible, (log_p - mean.unsqueeze(-1)) ** 2, torch.zeros_like(p)).sum(-1)
                / (counts - 1).clamp_min(1))
    rows = counts > 1
    return float(variance[rows].mean()), float(entropy.mean())


def _attention_outputs(output, stacks: list[tuple[str, nn.ModuleList]]) -> dict[str, tuple]:
    found = {}
    for name, layers in stacks:
        role = _stack_role(name)
        key = {"encoder": "encoder_attentions", "decoder": "decoder_attentions"}.get(role, "attentions")
        attentions = getattr(output, key, None)
        if attentions is not None and len(attentions) == len(layers) and all(a is not None for a in attentions):
            found[name] = attentions
    return found


def measure_signal_propagation(model: nn.Module, input_ids: torch.Tensor, progress: bool = True, seed: int = 0) -> dict:
    """Per-stack, per-layer measurements of one training-mode step (no optimizer step) and one eval-mode pass.

    Returns {stack name: [{"stream_variance", "stream_correlation", "gradient_variance", "weight_gradient_norm",
    "attention_logit_variance", "attention_entropy"}, ...]} (attention entries None where the model does not
    return attention probabilities).
    """
    stacks = find_layer_stacks(model)
    records = {name: [dict() for _ in layers] for name, layers in stacks}
    total_layers = sum(len(layers) for _, layers in stacks)
    bar = tqdm(total=3 * total_layers, desc="diagnose (forward, backward, attention)", disable=not progress, leave=False)
    handles = []

    def hook(name: str, index: int):
        def record(module, args, output):
            if not torch.is_grad_enabled():
                bar.update(1)
                return
            hidden = _first_tensor(output)
            records[name][index]["stream_variance"] = float(hidden.detach().double().var())
            records[name][index]["stream_correlation"] = token_correlation(hidden.detach())
            if hidden.requires_grad:
                def on_gradient(grad):
                    records[name][index]["gradient_variance"] = float(grad.double().pow(2).mean())
                    bar.update(1)
                hidden.register_hook(on_gradient)
            bar.update(1)
        return record

    for name, layers in stacks:
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(hook(name, index)))
    was_training = model.training
    try:
        torch.manual_seed(seed)
        model.train()
        model.zero_grad(set_to_none=True)
        inputs = _model_inputs(model, input_ids)
        _loss(model(**inputs)).backward()
        for name, layers in stacks:
            for index, layer in enumerate(layers):
                records[name][index]["weight_gradient_norm"] = weight_gradient_norm(layer)
        model.zero_grad(set_to_none=True)
        model.eval()
        # Only eager attention materialises the probabilities; switch to it for this pass and back afterwards.
        implementation = getattr(model.config, "_attn_implementation", None)
        if implementation not in (None, "eager"):
            model.set_attn_implementation("eager")
        with torch.no_grad():
            attention = _attention_outputs(model(**inputs, output_attentions=True), stacks)
        if implementation not in (None, "eager"):
            model.set_attn_implementation(implementation)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        bar.close()
    for name, layers in stacks:
        for index in range(len(layers)):
            entry = records[name][index]
            entry.setdefault("gradient_variance", None)
            logit_variance, entropy = _attention_statistics(attention[name][index]) if name in attention else (None, None)
            entry["attention_logit_variance"], entry["attention_entropy"] = logit_variance, entropy
    return records


# ----------------------------------------------------------------------------------------------------------------
# Theory overlay
# ----------------------------------------------------------------------------------------------------------------
def theory_coverage(config) -> str | None:
    """None if the theory predicts this config, else the reason it does not."""
    if not isinstance(config, DeepScaleLMConfig):
        return f"not covered: the theory predicts DeepScaleLM configs; this is a {getattr(config, 'model_type', type(config).__name__)!r} model"
    if config.position_embedding_type != "absolute":
        return "not covered: rotary positions (the theory assumes learned absolute position embeddings)"
    if config.norm_placement == "mix" or config.layernorm_scaling:
        return "not covered: Mix-LN or LayerNorm Scaling (the theory assumes all-Pre-LN or all-Post-LN, unscaled)"
    return None


def _predictions(config, input_ids: torch.Tensor, stacks: list[str]) -> dict[str, list[dict]]:
    same_token = embedding_correlation_estimate(input_ids.tolist(), num_tables=1)
    predicted = predict_model(config, input_ids.shape[1], token_same_probability=same_token)
    by_stack = {}
    for name in stacks:
        role = _stack_role(name)
        prediction = predicted["decoder" if role == "main" and config.is_decoder else "encoder" if role == "main" else role]
        relative = prediction.relative_weight_gradient_norms()
        by_stack[name] = [
            {
                "stream_variance": layer.stream_variance,
                "stream_correlation": layer.stream_correlation,
                "gradient_variance": layer.gradient_variance,
                "relative_weight_gradient_norm": rel,
                "attention_logit_variance": layer.attention_logit_variance,
                "attention_entropy": layer.attention_entropy,
            }
            for layer, rel in zip(prediction.layers, relative)
        ]
    return by_stack


def diagnose(
    model: nn.Module,
    input_ids: torch.Tensor,
    output_dir: str | os.PathLike | None = None,
    source: str = "",
    progress: bool = True,
) -> dict:
    """Measure, overlay the theory where it applies, and (with output_dir) write report.json and the plot."""
    measured = measure_signal_propagation(model, input_ids, progress=progress)
    coverage = theory_coverage(model.config)
    predicted = _predictions(model.config, input_ids, list(measured)) if coverage is None else {}
    stacks = []
    for name, layers in measured.items():
        last = layers[-1]["weight_gradient_norm"]
        for entry in layers:
            norm = entry["weight_gradient_norm"]
            entry["relative_weight_gradient_norm"] = norm / last if norm is not None and last else None
        stacks.append({
            "name": name,
            "layers": [
                {"index": i, "measured": entry, "predicted": predicted[name][i] if name in predicted else None}
                for i, entry in enumerate(layers)
            ],
        })
    config = model.config
    report = {
        "model": source or type(model).__name__,
        "model_class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "input": {
            "batch_size": input_ids.shape[0],
            "sequence_length": input_ids.shape[1],
            "same_token_probability": embedding_correlation_estimate(input_ids.tolist(), num_tables=1),
        },
        "theory": coverage or "covered: predictions from dslm_hf.theory (train mode, per unit gradient at the last hidden state)",
        "stacks": stacks,
    }
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "report.json").write_text(json.dumps(report, indent=2))
        plot_report(report, output_dir / "signal_propagation.png")
    return report


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------
PANELS = (  # (key, title, log scale allowed)
    ("stream_variance", "stream variance", True),
    ("relative_weight_gradient_norm", "weight-gradient norm / last layer's", True),
    ("stream_correlation", "token correlation (1 = rank collapse)", False),
    ("attention_logit_variance", "attention-logit variance within a row (eval)", True),
    ("attention_entropy", "attention entropy, nats (eval)", True),
)


def _set_scale(axis):
    """Log scale when a panel spans more than a decade (variance growth, gradient decay); otherwise from 0, so that
    a flat profile looks flat rather than a zoomed-in wiggle."""
    values = [v for line in axis.get_lines() for v in line.get_ydata() if v == v]
    if values and min(values) > 0 and max(values) / min(values) > 10:
        axis.set_yscale("log")
    elif values:
        axis.set_ylim(0.0, 1.25 * max(values))


def plot_report(report: dict, path: str | os.PathLike):
    """One PNG: a panel per quantity, a colour per stack, measured solid, theory dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(15, 8.5))
    axes = grid.flat
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (key, title, log_allowed), axis in zip(PANELS, axes):
        for stack, color in zip(report["stacks"], colors):
            layers = stack["layers"]
            x = [entry["index"] + 1 for entry in layers]
            measured = [entry["measured"][key] for entry in layers]
            if any(v is not None for v in measured):
                axis.plot(x, [math.nan if v is None else v for v in measured], color=color, label=f"{stack['name']} measured")
            if layers[0]["predicted"] is not None:
                axis.plot(x, [entry["predicted"][key] for entry in layers], color=color, linestyle="--",
                          label=f"{stack['name']} theory")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("layer")
        axis.grid(alpha=0.3)
        if log_allowed:
            _set_scale(axis)
        elif key == "stream_correlation":
            axis.set_ylim(0.0, 1.0)
    axes[0].legend(fontsize=8)
    summary = axes[len(PANELS)]
    summary.axis("off")
    inputs = report["input"]
    summary.text(0.0, 0.95, "\n".join([
        f"model: {report['model']}",
        f"class: {report['model_class']} ({report['model_type']})",
        f"parameters: {report['num_parameters']:,}",
        f"input: {inputs['batch_size']} x {inputs['sequence_length']} tokens,",
        f"  same-token probability {inputs['same_token_probability']:.3f}",
        "train mode (dropout on) for stream and gradients;",
        "eval mode, eager attention for the attention panels",
        "",
        "theory: " + report["theory"].split(":")[0],
        *_wrap(report["theory"].split(":", 1)[1].strip(), 48),
    ]), va="top", family="monospace", fontsize=9, transform=summary.transAxes)
    fig.suptitle(f"Signal propagation at initialisation: {report['model']}", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return ["  " + line for line in textwrap.wrap(text, width)]


# ----------------------------------------------------------------------------------------------------------------
# Depth planning: the theory alone, vanilla (Xavier) vs DeepScaleLM, depths 12..1000
# ----------------------------------------------------------------------------------------------------------------
def plan_depths(hidden_size: int, depths: list[int], sequence_length: int = 128, norm_placement: str = "pre",
                num_attention_heads: int | None = None, vocab_size: int = 32000, embedding_correlation: float = 0.05,
                dropout: float = 0.1, is_decoder: bool = True) -> dict:
    """Predicted stream variance and relative gradient norm per layer for xavier and deepscalelm at each depth."""
    heads = num_attention_heads or max(1, hidden_size // 64)
    plan = {"hidden_size": hidden_size, "sequence_length": sequence_length, "norm_placement": norm_placement,
            "embedding_correlation": embedding_correlation, "schemes": {}}
    for scheme in ("xavier", "deepscalelm"):
        plan["schemes"][scheme] = {}
        for depth in depths:
            config = DeepScaleLMConfig(
                vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=depth, num_attention_heads=heads,
                max_position_embeddings=sequence_length, init_scheme=scheme, norm_placement=norm_placement,
                embedding_correlation=embedding_correlation, hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout, is_decoder=is_decoder,
            )
            (prediction,) = predict_model(config, sequence_length).values()
            plan["schemes"][scheme][depth] = {
                "stream_variance": [layer.stream_variance for layer in prediction.layers],
                "stream_correlation": [layer.stream_correlation for layer in prediction.layers],
                "relative_weight_gradient_norm": prediction.relative_weight_gradient_norms(),
            }
    return plan


def plot_plan(plan: dict, path: str | os.PathLike):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    depths = list(next(iter(plan["schemes"].values())))
    shades = {"xavier": plt.cm.Reds, "deepscalelm": plt.cm.Blues}
    for scheme, profiles in plan["schemes"].items():
        for i, depth in enumerate(depths):
            profile = profiles[depth]
            x = [(k + 1) / depth for k in range(depth)]
            color = shades[scheme](0.4 + 0.6 * i / max(1, len(depths) - 1))
            label = f"{'vanilla (xavier)' if scheme == 'xavier' else 'DeepScaleLM'}, {depth} layers"
            axes[0].plot(x, profile["stream_variance"], color=color, label=label)
            axes[1].plot(x, profile["relative_weight_gradient_norm"], color=color, label=label)
    axes[0].set_title("predicted stream variance")
    axes[1].set_title("predicted weight-gradient norm / last layer's")
    for axis in axes:
        axis.set_yscale("log")
        axis.set_xlabel("relative depth (layer / N)")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Depth plan: d={plan['hidden_size']}, {plan['norm_placement']}-LN, L={plan['sequence_length']}, "
                 f"r0={plan['embedding_correlation']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """Flags are snake_case (as dslm-pretrain's); each kebab-case spelling still works as an alias."""
    parser = argparse.ArgumentParser(
        prog="dslm-diagnose",
        description="Measure per-layer signal propagation (variance, gradients, rank collapse, attention) of any "
        "Hugging Face transformer, with the DeepScaleLM theory overlaid where it applies.",
    )
    parser.add_argument("model", nargs="?", help="model id (local cache), model folder, or config.json")
    parser.add_argument("--output_dir", "--output-dir", required=True, help="where report.json and the PNG plots go")
    parser.add_argument("--random_init", "--random-init", action="store_true", help="ignore weights: a fresh model from the config")
    parser.add_argument("--text", help="the text itself to feed, not a path (for a file: --text_file); default: "
                        "Zipf-distributed random tokens")
    parser.add_argument("--text_file", "--text-file", help="file whose text to feed")
    parser.add_argument("--tokenizer", help="tokenizer id/folder for --text, or 'bytes' (UTF-8 bytes as ids); "
                        "default: the model's own")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=4)
    parser.add_argument("--sequence_length", "--sequence-length", type=int, help="default: min(128, the model's maximum positions)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true")
    parser.add_argument("--no_progress", "--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--signals", metavar="RUN", help="plot a training run's layer signals instead of measuring "
                        "a model: a dslm-pretrain run folder (--signal_every) or a Trainer output folder "
                        "(LayerSignalCallback), or their layer_signals.jsonl")
    _add_usefulness_arguments(parser)
    plan = parser.add_argument_group("depth planning (--plan: theory only, no MODEL)")
    plan.add_argument("--plan", action="store_true", help="plot predicted profiles at several depths, vanilla vs DeepScaleLM")
    plan.add_argument("--hidden_size", "--hidden-size", type=int, default=256)
    plan.add_argument("--depths", default="12,48,192,1000", help="comma-separated depths")
    plan.add_argument("--norm_placement", "--norm-placement", choices=("pre", "post"), default="pre")
    plan.add_argument("--embedding_correlation", "--embedding-correlation", type=float, default=0.05, help="r0 of the data (see the config)")
    return parser


def _sequence_length(config, requested: int | None) -> int:
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if requested is None:
        return min(128, limit) if limit else 128
    if requested < 2:
        raise DiagnoseError(f"--sequence-length must be >= 2 (correlation between positions), got {requested}")
    if limit and requested > limit:
        raise DiagnoseError(f"--sequence-length {requested} exceeds the model's {limit} positions")
    return requested


def _run(args) -> str:
    check_output_dir(args.output_dir, "--output-dir")
    if args.usefulness:
        return run_usefulness(args)
    if args.plan:
        depths = [int(d) for d in args.depths.split(",") if d.strip().isdigit()]
        if len(depths) != len(args.depths.split(",")) or any(d < 1 for d in depths):
            raise DiagnoseError(f"--depths must be positive integers, got {args.depths}")
        plan = plan_depths(args.hidden_size, depths, sequence_length=args.sequence_length or 128,
                           norm_placement=args.norm_placement, embedding_correlation=args.embedding_correlation)
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "depth_plan.json").write_text(json.dumps(plan))
        plot_plan(plan, out / "depth_plan.png")
        return f"wrote {out / 'depth_plan.png'} and {out / 'depth_plan.json'}"
    if args.signals is not None:
        source = Path(args.signals)
        log = source / "layer_signals.jsonl" if source.is_dir() else source
        if not log.is_file():
            raise DiagnoseError(f"--signals {source}: no layer_signals.jsonl there; train with --signal_every N "
                                "(dslm-pretrain) or LayerSignalCallback (Trainer)")
        rows = monitoring.read_signals(log)
        if not rows:
            raise DiagnoseError(f"--signals {log} holds no measurement yet")
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        monitoring.plot_signals(rows, out / "layer_signals.png")
        last = rows[-1]
        return (f"wrote {out / 'layer_signals.png'} ({len(rows)} measurements; at step {last['step']}: first/last "
                f"layer gradient {last['grad_first_last']:.3g}, spread {last['grad_spread']:.3g}, shared fraction up to "
                f"{last['shared_fraction_max']:.3f})")
    if args.model is None:
        raise DiagnoseError("give a MODEL (model id, folder or config.json), or --plan for the depth-planning view")
    if args.batch_size < 1:
        raise DiagnoseError(f"--batch-size must be >= 1, got {args.batch_size}")
    model = load_model(args.model, random_init=args.random_init, trust_remote_code=args.trust_remote_code)
    config = model.config
    length = _sequence_length(config, args.sequence_length)
    vocab_size = model.get_input_embeddings().num_embeddings
    if args.text is not None or args.text_file is not None:
        text = args.text if args.text is not None else read_text_file(args.text_file, "--text-file")
        tokenizer = args.tokenizer
        if tokenizer != "bytes":
            from transformers import AutoTokenizer

            with loading("a tokenizer", tokenizer or args.model):
                try:
                    tokenizer = AutoTokenizer.from_pretrained(tokenizer or args.model, trust_remote_code=args.trust_remote_code)
                except (OSError, ValueError) as error:
                    raise DiagnoseError(
                        f"no tokenizer for {tokenizer or args.model!r} ({str(error).splitlines()[0]}): pass --tokenizer "
                        "NAME, or --tokenizer bytes for a byte/char-level vocabulary"
                    ) from None
        input_ids = text_token_ids(text, tokenizer, vocab_size, args.batch_size, length)
    else:
        input_ids = zipf_token_ids(vocab_size, args.batch_size, length, seed=args.seed)
    report = diagnose(model, input_ids, args.output_dir, source=args.model, progress=not args.no_progress)
    return f"wrote {Path(args.output_dir) / 'report.json'} and signal_propagation.png ({report['theory'].split(':')[0]} by the theory)"


# ----------------------------------------------------------------------------------------------------------------
# Per-layer usefulness (--usefulness): the measurement is dslm_hf.layer_usefulness, this is its command line
# ----------------------------------------------------------------------------------------------------------------
def _add_usefulness_arguments(parser: argparse.ArgumentParser):
    group = parser.add_argument_group(
        "per-layer usefulness (--usefulness: on held-out text, per layer, the loss increase when it is skipped, the "
        "angular distance between its input and output stream, and its share of the gradient norm^2; decoder-only "
        "models with a causal LM head or encoder-only models with a masked LM head)")
    group.add_argument("--usefulness", action="store_true",
                       help="measure per-layer usefulness: writes usefulness.json and usefulness.png. MODEL may also "
                       "be a run folder: each checkpoint (checkpoint-*, or dslm-pretrain's checkpoints/step_*) and its "
                       "final model are measured on the same blocks, one curve each")
    group.add_argument("--block_size", type=int, help="tokens per held-out block (default: min(128, the model's "
                       "positions))")
    group.add_argument("--max_blocks", type=int, default=32, help="at most this many blocks, from the start of the "
                       "text (default 32)")


def _checkpoint_step(name: str, prefix: str) -> int | None:
    rest = name[len(prefix):]
    return int(rest) if name.startswith(prefix) and rest.isdigit() else None


def usefulness_sources(spec: str, random_init: bool = False, trust_remote_code: bool = False) -> tuple[list, list]:
    """([(label, load)], [skipped checkpoint, why]) for MODEL: a run folder's checkpoints oldest first, then its final
    model; otherwise MODEL alone. A Trainer run holds checkpoint-N model folders; a dslm-pretrain run holds verified
    checkpoints/step_N weights (built from its model_config) and final/."""
    from safetensors.torch import load_model as load_weights

    from .checkpointing import MODEL_FILE, CheckpointError, checkpoint_folders, verify_checkpoint

    def folder_loader(folder: Path):
        return lambda: load_model(str(folder), random_init=random_init, trust_remote_code=trust_remote_code)

    def weights_loader(run: Path, folder: Path):
        def load():
            model = load_model(str(run / "model_config"), random_init=True, trust_remote_code=trust_remote_code)
            try:
                load_weights(model, str(folder / MODEL_FILE))
            except RuntimeError as error:
                raise DiagnoseError(f"checkpoint {folder} does not fit the run's model_config ({str(error)[:200]})") from None
            return model
        return load

    run = Path(spec)
    sources, skipped = [], []
    if not run.is_dir() or ((run / "config.json").is_file() and not any(run.glob("checkpoint-*"))):
        return [(spec, folder_loader(run) if run.is_dir() else lambda: load_model(spec, random_init, trust_remote_code))], []
    trainer = sorted((step, path) for path in run.glob("checkpoint-*")
                     if path.is_dir() and (step := _checkpoint_step(path.name, "checkpoint-")) is not None)
    sources += [(f"step {step}", folder_loader(path)) for step, path in trainer]
    if (run / "model_config" / "config.json").is_file():
        for folder in reversed(checkpoint_folders(run)):
            try:
                step = verify_checkpoint(folder)
            except CheckpointError as error:
                skipped.append((folder.name, str(error)))
                continue
            sources.append((f"step {step}", weights_loader(run, folder)))
    for final in (run / "final", run):
        if (final / "config.json").is_file():
            sources.append(("final", folder_loader(final)))
            break
    if not sources:
        raise DiagnoseError(f"{spec} holds no model to measure: expected config.json, checkpoint-N folders (Trainer) "
                            "or checkpoints/step_N with model_config/ (dslm-pretrain)"
                            + (f"; skipped {', '.join(name for name, _ in skipped)}" if skipped else ""))
    return sources, skipped


def _usefulness_tokenizer(args):
    """--tokenizer, else the first of the run's tokenizer/, final/, checkpoint folders and MODEL that holds one."""
    if args.tokenizer == "bytes":
        return "bytes"
    from transformers import AutoTokenizer

    name = args.tokenizer
    if name is None:
        run = Path(args.model)
        candidates = [run / "tokenizer", run / "final", *sorted(run.glob("checkpoint-*")), run] if run.is_dir() else []
        found = [c for c in candidates if (c / "tokenizer_config.json").is_file() or (c / "tokenizer.json").is_file()]
        name = str(found[0]) if found else args.model
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise DiagnoseError(f"no tokenizer for {name!r} ({str(error).splitlines()[0]}): pass --tokenizer NAME, or "
                            "--tokenizer bytes for a byte/char-level vocabulary") from None


def _usefulness_batches(model, token_ids: list[int], args, tokenizer) -> tuple[str, list[dict]]:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    block_size = args.block_size or (min(128, limit) if limit else 128)
    if limit and block_size > limit:
        raise DiagnoseError(f"--block_size {block_size} exceeds the model's {limit} positions")
    vocab_size = model.get_input_embeddings().num_embeddings
    if token_ids and max(token_ids) >= vocab_size:
        raise DiagnoseError(f"the tokenizer produced id {max(token_ids)} outside the model's vocabulary ({vocab_size}): "
                            "pass the tokenizer the model was trained with (--tokenizer)")
    if "MaskedLM" in type(model).__name__:
        mask_token_id = getattr(tokenizer, "mask_token_id", None)
        if mask_token_id is None:
            raise DiagnoseError(f"{type(model).__name__} is a masked LM but the tokenizer has no mask token: pass "
                                "--tokenizer with one")
        return "masked_lm", usefulness.masked_lm_batches(token_ids, block_size, args.max_blocks, mask_token_id,
                                                         args.batch_size, seed=args.seed)
    return "causal_lm", usefulness.causal_lm_batches(token_ids, block_size, args.max_blocks, args.batch_size)


def run_usefulness(args) -> str:
    """--usefulness: measure MODEL (or each checkpoint of a run), write usefulness.json and .png, summarise."""
    if args.plan or args.signals is not None:
        raise DiagnoseError("--usefulness measures a model: it does not combine with --plan or --signals")
    if args.model is None:
        raise DiagnoseError("--usefulness needs a MODEL: a model id, a model folder, or a run folder with checkpoints")
    if args.text is None and args.text_file is None:
        raise DiagnoseError("--usefulness needs held-out text: --text_file FILE (or --text TEXT)")
    if args.sequence_length is not None:
        raise DiagnoseError("--sequence-length sets the signal-propagation input; with --usefulness use --block_size")
    if args.batch_size < 1:
        raise DiagnoseError(f"--batch-size must be >= 1, got {args.batch_size}")
    sources, skipped = usefulness_sources(args.model, args.random_init, args.trust_remote_code)
    text = args.text if args.text is not None else read_text_file(args.text_file, "--text_file")
    tokenizer = _usefulness_tokenizer(args)
    if tokenizer == "bytes":
        token_ids = list(text.encode("utf-8"))
    else:
        token_ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    measured, lines = [], []
    for label, load in sources:
        model = load()
        objective, batches = _usefulness_batches(model, token_ids, args, tokenizer)
        result = usefulness.measure_layer_usefulness(model, batches, progress=not args.no_progress)
        lines.append(usefulness.summary_line(result, label))
        measured.append({"label": label, "objective": objective, "summary": lines[-1], **result})
        del model
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": args.model, "text": args.text_file or "--text", "tokenizer": args.tokenizer or "the model's own",
              "block_size": len(batches[0]["input_ids"][0]), "blocks": sum(len(b["input_ids"]) for b in batches),
              "skipped_checkpoints": [{"name": name, "why": why} for name, why in skipped], "measurements": measured}
    write_text_atomically(out / "usefulness.json", json.dumps(report, indent=1))
    usefulness.plot_usefulness([(m["label"], m) for m in measured], out / "usefulness.png",
                               title=f"Per-layer usefulness: {args.model}")
    skipped_note = [f"skipped {name}: {why}" for name, why in skipped]
    return "\n".join(lines + skipped_note + [f"wrote {out / 'usefulness.json'} and {out / 'usefulness.png'}"])


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`dslm-diagnose`): 0 on success; bad input is one stderr line and status 2."""
    parser = usage_errors_as_user_errors(build_parser())
    return run_command("dslm-diagnose", lambda arguments: print(_run(parser.parse_args(arguments))), argv)


if __name__ == "__main__":
    sys.exit(main())
