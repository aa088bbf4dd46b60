"""Which layers earn their place: per-layer usefulness of any Hugging Face transformer on held-out text.

For each layer of the model's stack of layers, on held-out token blocks (eval mode, no dropout):

- ablation cost: the held-out loss with the layer skipped minus the loss of the whole model. Skipping means the
  layer becomes the identity on the residual stream: it returns its input hidden states unchanged (a forward hook
  replaces its output; a tuple output keeps its other elements). This is the model one gets by deleting the layer
  from its ModuleList, the pruning experiment of Gromov et al. ("The Unreasonable Ineffectiveness of the Deeper
  Layers", 2024) and Sun et al. ("The Curse of Depth in LLMs", 2025), and it means the same thing in every
  architecture. For DeepScaleLM's scaled residual out = lambda * skip + beta * F(...) it gives out = skip, not
  lambda * skip (zeroing the branches only): that alternative would also shrink the stream by lambda per branch,
  which measures the loss of a rescaling on top of the loss of the layer's computation.
- angular distance between the layer's input and output stream, arccos(cos(x_in, x_out)) / pi per token, averaged
  over tokens (Gromov et al.); computed as 2 atan2(|u - v|, |u + v|) / pi for the unit vectors u, v, which is
  exactly 0 for an identity layer (arccos near 1 is not).
- gradient share: the squared norm of the gradient of the held-out loss with respect to the layer's parameters (all
  of them, biases and norms included), over the sum of these over all layers (the shares sum to 1).

The loss is the token-mean cross-entropy over every block: causal LM (labels = the next token) or masked LM
(labels at masked positions only). `find_layers` locates the stack as the whole package does (`dslm_hf.layers`: the
ModuleList of the layer classes the model's `_no_split_modules` names, else the one its `base_model_pp_plan` names);
encoder-decoders have two stacks and are refused.

    from dslm_hf.layer_usefulness import causal_lm_batches, measure_layer_usefulness, summary_line
    result = measure_layer_usefulness(model, causal_lm_batches(token_ids, block_size=128, max_blocks=32))
    print(summary_line(result))
"""

import inspect
import math
import os
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .cli import UserError
from .layers import find_layer_stacks
from .modeling_deepscalelm import IGNORE_INDEX


class UsefulnessError(UserError):
    """A model or input the usefulness measurement cannot handle; the message says what to do."""


# ----------------------------------------------------------------------------------------------------------------
# The layers
# ----------------------------------------------------------------------------------------------------------------
def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's one stack of layers (`dslm_hf.layers.find_layer_stacks`: the
    ModuleList of the classes its `_no_split_modules` names, else the one its `base_model_pp_plan` names)."""
    stacks = find_layer_stacks(model)
    if len(stacks) != 1:
        found = ", ".join(name for name, _ in stacks) or "none"
        raise UsefulnessError(
            f"{type(model).__name__}: expected one stack of layers, found {found}: per-layer usefulness measures "
            "decoder-only models (causal LM head) or encoder-only models (masked LM head)"
        )
    return stacks[0]


def _stream_in(args: tuple, kwargs: dict) -> torch.Tensor:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise UsefulnessError("a layer was called without its hidden states as first argument or `hidden_states=`: "
                              "cannot tell its input stream")
    return hidden


def _stream_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _skip_layer(module, args, kwargs, output):
    """Forward hook: the layer returns its input stream (other elements of a tuple output are kept)."""
    hidden = _stream_in(args, kwargs)
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


def angular_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """arccos(cos(x, y)) / pi along the last dimension, in [0, 1]; exactly 0 where y = x."""
    u = x.double() / x.double().norm(dim=-1, keepdim=True).clamp_min(1e-300)
    v = y.double() / y.double().norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return 2.0 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1)) / math.pi


# ----------------------------------------------------------------------------------------------------------------
# Held-out batches
# ----------------------------------------------------------------------------------------------------------------
def _blocks(token_ids: list[int], block_size: int, max_blocks: int) -> torch.Tensor:
    if block_size < 2:
        raise UsefulnessError(f"--block_size must be >= 2 (a block predicts its next tokens), got {block_size}")
    if max_blocks < 1:
        raise UsefulnessError(f"--max_blocks must be >= 1, got {max_blocks}")
    count = min(len(token_ids) // block_size, max_blocks)
    if count == 0:
        raise UsefulnessError(f"the held-out text gives {len(token_ids)} tokens, fewer than one block of "
                              f"--block_size {block_size}: give more text or a smaller block")
    return torch.tensor(token_ids[: count * block_size]).view(count, block_size)


def causal_lm_batches(token_ids: list[int], block_size: int, max_blocks: int, batch_size: int = 8) -> list[dict]:
    """Consecutive blocks of `block_size` tokens (at most `max_blocks`), labels = the next token (last one ignored)."""
    blocks = _blocks(token_ids, block_size, max_blocks)
    labels = torch.full_like(blocks, IGNORE_INDEX)
    labels[:, :-1] = blocks[:, 1:]
    return [{"input_ids": i, "labels": l} for i, l in zip(blocks.split(batch_size), labels.split(batch_size))]


def masked_lm_batches(token_ids: list[int], block_size: int, max_blocks: int, mask_token_id: int,
                      batch_size: int = 8, mask_fraction: float = 0.15, seed: int = 0) -> list[dict]:
    """Blocks with a fixed random `mask_fraction` of positions (at least one per block) replaced by the mask token;
    labels are the original tokens there and ignored elsewhere. The same seed gives the same masks."""
    blocks = _blocks(token_ids, block_size, max_blocks)
    generator = torch.Generator().manual_seed(seed)
    masked = torch.rand(blocks.shape, generator=generator) < mask_fraction
    masked[torch.arange(len(blocks)), torch.randint(block_size, (len(blocks),), generator=generator)] = True
    inputs = blocks.masked_fill(masked, mask_token_id)
    labels = blocks.masked_fill(~masked, IGNORE_INDEX)
    return [{"input_ids": i, "labels": l} for i, l in zip(inputs.split(batch_size), labels.split(batch_size))]


# ----------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------
def _forward_kwargs(model: nn.Module) -> dict:
    """No cache: a skipped layer must not leave a cache entry behind, and none is needed for a full forward."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def _summed_cross_entropy(model: nn.Module, batch: dict, extra: dict) -> torch.Tensor:
    logits = getattr(model(input_ids=batch["input_ids"], **extra), "logits", None)
    if logits is None:
        raise UsefulnessError(f"{type(model).__name__} returns no logits: load the model with its language-model head "
                              "(causal LM or masked LM)")
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="sum",
                                       ignore_index=IGNORE_INDEX)


def _label_count(batches: list[dict]) -> int:
    count = sum(int((batch["labels"] != IGNORE_INDEX).sum()) for batch in batches)
    if count == 0:
        raise UsefulnessError("the held-out batches hold no label token")
    return count


def held_out_loss(model: nn.Module, batches: list[dict], skip: nn.Module | None = None) -> float:
    """Token-mean cross-entropy over all batches, with the layer `skip` (if given) made the identity."""
    count, extra = _label_count(batches), _forward_kwargs(model)
    handle = skip.register_forward_hook(_skip_layer, with_kwargs=True) if skip is not None else None
    try:
        with torch.no_grad():
            total = sum(float(_summed_cross_entropy(model, batch, extra)) for batch in batches)
    finally:
        if handle is not None:
            handle.remove()
    return total / count


def _reference_pass(model: nn.Module, layers: nn.ModuleList, batches: list[dict]) -> tuple[float, list, list]:
    """One forward and backward over every batch: (loss, per-layer mean angular distance, per-layer |grad|^2)."""
    count, extra = _label_count(batches), _forward_kwargs(model)
    sums = [0.0] * len(layers)
    tokens = [0] * len(layers)

    def recorder(index: int):
        def record(module, args, kwargs, output):
            distance = angular_distance(_stream_in(args, kwargs).detach(), _stream_out(output).detach())
            sums[index] += float(distance.sum())
            tokens[index] += distance.numel()
        return record

    handles = [layer.register_forward_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    total = 0.0
    try:
        model.zero_grad(set_to_none=True)
        for batch in batches:
            summed = _summed_cross_entropy(model, batch, extra)
            (summed / count).backward()  # the gradient of the token-mean loss over all batches
            total += float(summed.detach())
    finally:
        for handle in handles:
            handle.remove()
    squares = [sum(float(p.grad.double().pow(2).sum()) for p in layer.parameters() if p.grad is not None)
               for layer in layers]
    model.zero_grad(set_to_none=True)
    return total / count, [s / max(n, 1) for s, n in zip(sums, tokens)], squares


def measure_layer_usefulness(model: nn.Module, batches: list[dict], progress: bool = False) -> dict:
    """Per-layer ablation cost, angular distance and gradient share of `model` on `batches` (see the module doc).

    batches: dicts with `input_ids` (B, T) and `labels` (B, T) aligned with the logits (-100: no loss), as made by
    `causal_lm_batches` / `masked_lm_batches`. The model runs in eval mode and its gradients are cleared afterwards.
    Returns {"stack", "num_layers", "loss", "tokens", "layers": [{"index", "ablation_cost", "ablated_loss",
    "angular_distance", "gradient_share"}]}.
    """
    stack, layers = find_layers(model)
    was_training = model.training
    model.eval()
    try:
        loss, distances, squares = _reference_pass(model, layers, batches)
        ablated = [held_out_loss(model, batches, skip=layer)
                   for layer in tqdm(layers, desc="usefulness (one pass per skipped layer)", disable=not progress,
                                     leave=False)]
    finally:
        model.train(was_training)
    total_square = sum(squares)
    return {
        "stack": stack,
        "num_layers": len(layers),
        "loss": loss,
        "tokens": _label_count(batches),
        "layers": [
            {"index": i, "ablation_cost": ablated[i] - loss, "ablated_loss": ablated[i],
             "angular_distance": distances[i],
             "gradient_share": squares[i] / total_square if total_square > 0 else None}
            for i in range(len(layers))
        ],
    }


# ----------------------------------------------------------------------------------------------------------------
# Summary and plot
# ----------------------------------------------------------------------------------------------------------------
def last_half_shares(result: dict) -> dict:
    """The last floor(L/2) layers' share of the total ablation cost and of the gradient norm^2 (None where the total
    is not positive: a share of a non-positive total means nothing)."""
    layers = result["layers"]
    last = layers[len(layers) - len(layers) // 2:]
    costs = sum(entry["ablation_cost"] for entry in layers)
    shares = [entry["gradient_share"] for entry in layers]
    return {
        "layers": [entry["index"] for entry in last],
        "ablation_cost": sum(entry["ablation_cost"] for entry in last) / costs if costs > 0 else None,
        "gradient_share": sum(entry["gradient_share"] for entry in last) if None not in shares else None,
    }


def summary_line(result: dict, label: str = "") -> str:
    """One line: the whole model's held-out loss, and the last half's share of the ablation cost and of the gradient.

    A layer whose removal lowers the loss has a negative cost, so a share of a positive total can leave [0, 100]%;
    with a total of zero or less no share is given."""
    half = last_half_shares(result)
    head = (f"{label + ': ' if label else ''}{result['num_layers']} layers, held-out loss {result['loss']:.4f} "
            f"({result['tokens']} tokens)")
    if not half["layers"]:
        return f"{head}; a single layer has no last half"
    total = sum(entry["ablation_cost"] for entry in result["layers"])
    gradient = (f"{100 * half['gradient_share']:.1f}% of the gradient norm^2" if half["gradient_share"] is not None
                else "no gradient")
    if half["ablation_cost"] is None:
        return (f"{head}; the total ablation cost is {total:.4f} nats (not positive, so no share); the last half of "
                f"the layers carries {gradient}")
    return (f"{head}; the last half of the layers carries {100 * half['ablation_cost']:.1f}% of the total ablation "
            f"cost ({total:.4f} nats) and {gradient}")


PANELS = (  # (key, title)
    ("ablation_cost", "ablation cost: loss(layer skipped) - loss, nats"),
    ("angular_distance", "angular distance input -> output stream (/pi)"),
    ("gradient_share", "share of the gradient norm^2"),
)


def plot_usefulness(results: list[tuple[str, dict]], path: str | os.PathLike, title: str = ""):
    """One PNG with three panels (per layer); one curve per (label, result), coloured from early to late."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colormap = plt.cm.viridis
    for k, (label, result) in enumerate(results):
        color = colormap(k / max(1, len(results) - 1)) if len(results) > 1 else "tab:blue"
        x = [entry["index"] + 1 for entry in result["layers"]]
        for (key, _), axis in zip(PANELS, axes):
            y = [math.nan if entry[key] is None else entry[key] for entry in result["layers"]]
            axis.plot(x, y, marker="o", markersize=3, color=color, label=label)
    for (_, panel_title), axis in zip(PANELS, axes):
        axis.set_title(panel_title, fontsize=10)
        axis.set_xlabel("layer")
        axis.grid(alpha=0.3)
    axes[0].axhline(0.0, color="grey", linewidth=0.8)
    if any(label for label, _ in results):
        axes[0].legend(fontsize=8)
    fig.suptitle(title or "Per-layer usefulness on held-out text", fontsize=12)
    fig.tight_layout()
    temporary = Path(path).with_name(f".tmp-{Path(path).name}")  # written whole, then renamed into place
    fig.savefig(temporary, dpi=100, format="png")
    plt.close(fig)
    os.replace(temporary, path)
