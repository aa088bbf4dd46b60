"""AdamW parameter groups that carry a depth parameterization's learning-rate, epsilon and weight-decay rule.

One helper for every training path: `dslm-pretrain`, `dslm-finetune` (handed to `Trainer` through its
`optimizers=(optimizer, None)` hook) and the benchmarks.

    from dslm_hf.optimization import build_adamw
    optimizer = build_adamw(model, learning_rate=4e-3, weight_decay=0.01)

The multipliers come from the pure-math recipe (`recipe_deepscalelm.depth_optimizer_multipliers`): with
`config.depth_parameterization="deepscalelm"` every group has the base values (the paper: one learning rate);
with `"depth_mup"` or `"completep"` the parameters inside the residual layers of a stack of L layers get the rule
for m = L / config.depth_base_layers, and everything outside the layers (embeddings, final LayerNorm, heads) keeps
the base values. Weight decay applies to matrices only (biases and LayerNorm gains are not decayed).
"""

from collections import defaultdict

import torch

from .recipe_deepscalelm import depth_optimizer_multipliers

LAYER_CLASS_NAME = "DeepScaleLMLayer"
# dslm-pretrain's defaults, from the learning-rate x depth sweep (benchmarks/RESULTS.md, "Depth"): with the depth-muP
# rule the best base learning rate stayed within one factor-2 step from 4 to 256 layers at width 64.
PRETRAINING_PARAMETERIZATION = "depth_mup"
BASE_LEARNING_RATE = 8e-3


def _layer_depths(model: torch.nn.Module) -> dict[int, int]:
    """id(parameter) -> depth of the layer stack that holds it, for every parameter inside a residual layer.

    A layer's stack depth is the length of the ModuleList that holds it, so the encoder and the decoder of an
    encoder-decoder each get their own depth, and PEFT-wrapped or remote-code models work the same way.
    """
    depths = {}
    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList):
            continue
        # By class name in the MRO: fully_shard swaps each layer's class for an FSDP subclass of it.
        layers = [m for m in module if LAYER_CLASS_NAME in {c.__name__ for c in type(m).__mro__}]
        for layer in layers:
            for parameter in layer.parameters():
                depths[id(parameter)] = len(layers)
    return depths


def depth_parameter_groups(model: torch.nn.Module, learning_rate: float, weight_decay: float,
                           eps: float = 1e-8) -> list[dict]:
    """AdamW parameter groups (each with its own `lr`, `eps`, `weight_decay`) for `model`'s depth parameterization.

    Groups are keyed by (stack depth, decayed or not); each group also carries `lr_multiplier`, `depth` and
    `name` so logs and tests can read what was applied. Frozen parameters are left out.
    """
    config = model.config
    parameterization = getattr(config, "depth_parameterization", "deepscalelm")
    base_layers = getattr(config, "depth_base_layers", 1)
    depths = _layer_depths(model)
    buckets = defaultdict(list)
    for parameter in model.parameters():
        if parameter.requires_grad:
            buckets[(depths.get(id(parameter)), parameter.ndim >= 2)].append(parameter)
    groups = []
    for (depth, decayed), params in sorted(buckets.items(), key=lambda item: (item[0][0] or 0, item[0][1])):
        lr_mult, eps_mult, wd_mult = (1.0, 1.0, 1.0) if depth is None else depth_optimizer_multipliers(
            parameterization, depth / base_layers)
        groups.append({
            "params": params,
            "lr": learning_rate * lr_mult,
            "eps": eps * eps_mult,
            "weight_decay": weight_decay * wd_mult if decayed else 0.0,
            "lr_multiplier": lr_mult,
            "depth": depth,
            "name": f"{'layers' if depth else 'outside-layers'}{f'[{depth}]' if depth else ''}-{'decay' if decayed else 'no-decay'}",
        })
    return groups


def build_adamw(model: torch.nn.Module, learning_rate: float, weight_decay: float = 0.01,
                betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8) -> torch.optim.AdamW:
    """torch.optim.AdamW over `depth_parameter_groups` (the defaults are the paper's AdamW settings)."""
    return torch.optim.AdamW(depth_parameter_groups(model, learning_rate, weight_decay, eps), lr=learning_rate,
                             betas=betas, eps=eps)


def default_learning_rate(config) -> tuple[float, str]:
    """(base learning rate, why) when the user gives none: the swept base rate at `depth_base_layers`; the depth rule
    then scales it inside the layers. Without a rule ("deepscalelm"), one rate for the whole model, taken down as
    (layers / base)^-1/4: the sweep's one-rate optimum was 0.008 at 4 and 16 layers and 0.004 at 64 and 256 (width 64),
    which this follows within a factor 1.5 at every measured depth."""
    parameterization = getattr(config, "depth_parameterization", "deepscalelm")
    depth = max(layers for _, layers, _ in config.residual_stacks())
    if parameterization == "deepscalelm":
        rate = BASE_LEARNING_RATE * min(1.0, (depth / config.depth_base_layers) ** -0.25)
        return rate, (f"{rate:.3g} for every parameter: {BASE_LEARNING_RATE:g} at {config.depth_base_layers} layers "
                      f"x ({depth} / {config.depth_base_layers})^-1/4 (no depth rule in the config)")
    lr_mult = depth_optimizer_multipliers(parameterization, depth / config.depth_base_layers)[0]
    return BASE_LEARNING_RATE, (f"base {BASE_LEARNING_RATE:g} (embeddings, final norm, head), "
                                f"{BASE_LEARNING_RATE * lr_mult:.3g} inside the {depth} layers ({parameterization} rule "
                                f"from {config.depth_base_layers} layers)")


def describe_groups(groups: list[dict]) -> str:
    """One line per distinct learning rate, for the training log."""
    seen = {}
    for group in groups:
        key = (group["depth"], group["lr"])
        seen.setdefault(key, 0)
        seen[key] += sum(p.numel() for p in group["params"])
    return "; ".join(f"{'layers of a ' + str(depth) + '-layer stack' if depth else 'embeddings/norm/heads'}: "
                     f"lr {lr:.3g} ({count:,} parameters)" for (depth, lr), count in seen.items())


__all__ = ["depth_parameter_groups", "build_adamw", "default_learning_rate", "describe_groups"]
