"""AdamW parameter groups that carry the depth and width rules' learning-rate, epsilon and weight-decay multipliers.

One helper for every training path: `dslm-pretrain`, `dslm-finetune` (handed to `Trainer` through its
`optimizers=(optimizer, None)` hook) and the benchmarks.

    from dslm_hf.optimization import build_adamw
    optimizer = build_adamw(model, learning_rate=4e-3, weight_decay=0.01)

The multipliers come from the pure-math recipe (`recipe_deepscalelm.depth_optimizer_multipliers`): with
`config.depth_parameterization="deepscalelm"` every group has the base values (the paper: one learning rate);
with `"depth_mup"` or `"completep"` the parameters inside the residual layers of a stack of L layers get the rule
for m = L / config.depth_base_layers, and everything outside the layers (embeddings, final LayerNorm, heads) keeps
the base values. With `config.width_parameterization="mup"` the hidden matrices (inside the layers, and the MLM
transform's d x d dense) get muP's rule for m_w = hidden_size / config.width_base on top
(`recipe_deepscalelm.width_optimizer_multipliers`); vector-like parameters keep the base values. Weight decay applies
to matrices only (biases and LayerNorm gains are not decayed).

Any training loop keeps the rules: the config is found on a wrapper's DeepScaleLM submodule (nanoGPT-style wrapper,
PEFT, torch.compile, DDP), torch LR schedulers scale each group's own initial rate, and a loop that sets the rate
itself calls `set_learning_rate(optimizer, lr)` instead of writing `group["lr"] = lr` (which erases the multiplier).
"""

from collections import defaultdict

import torch

from .layers import class_names, find_layer_stacks
from .recipe_deepscalelm import depth_optimizer_multipliers, width_optimizer_multipliers

LAYER_CLASS_NAME = "DeepScaleLMLayer"
# Outside the layers, the MLM head's d x d transform is the one matrix whose two dimensions both grow with width.
HIDDEN_HEAD_CLASS_NAME = "DeepScaleLMPredictionHeadTransform"
# dslm-pretrain's defaults, from the learning-rate x depth sweep (benchmarks/RESULTS.md, "Depth"): with the depth-muP
# rule the best base learning rate stayed within one factor-2 step from 4 to 256 layers at width 64.
PRETRAINING_PARAMETERIZATION = "depth_mup"
# ... and with the width rule (muP for AdamW) from width_base = 64, the width of that sweep.
PRETRAINING_WIDTH_PARAMETERIZATION = "mup"
BASE_LEARNING_RATE = 8e-3


def _layer_depths(model: torch.nn.Module) -> dict[int, int]:
    """id(parameter) -> depth of the layer stack that holds it, for every parameter inside a residual layer.

    A layer's stack depth is the length of the ModuleList that holds it, so the encoder and the decoder of an
    encoder-decoder each get their own depth, and PEFT-wrapped or remote-code models work the same way. The stacks
    are `dslm_hf.layers.find_layer_stacks`'s; only DeepScaleLM layers carry a depth rule.
    """
    depths = {}
    for _, layers in find_layer_stacks(model):
        if LAYER_CLASS_NAME not in class_names(layers[0]):
            continue
        for layer in layers:
            for parameter in layer.parameters():
                depths[id(parameter)] = len(layers)
    return depths


def _hidden_head_parameters(model: torch.nn.Module) -> set[int]:
    return {id(p) for module in model.modules() if HIDDEN_HEAD_CLASS_NAME in class_names(module)
            for p in module.parameters() if p.ndim >= 2}


def _rules(config) -> tuple:
    """(depth_parameterization, depth_base_layers, width_parameterization, width_base, hidden_size); a config saved
    before the width rule existed (a checkpoint's own remote code) has the "standard" width rule."""
    return (config.depth_parameterization, config.depth_base_layers, getattr(config, "width_parameterization", "standard"),
            getattr(config, "width_base", 64), config.hidden_size)


def find_deepscalelm_config(model: torch.nn.Module):
    """The DeepScaleLM config that sets `model`'s rules, also when `model` wraps a DeepScaleLM model (a nanoGPT-style
    module holding one, a PEFT model, torch.compile's OptimizedModule, DistributedDataParallel): the `config` of the
    first module (in `model.modules()` order) whose config has model_type "deepscalelm". None for a model without
    DeepScaleLM layers (plain AdamW groups); ValueError when DeepScaleLM layers are there but no config says their
    rules, or when two DeepScaleLM configs with different rules are found."""
    configs = [getattr(module, "config", None) for module in model.modules()]
    configs = [c for c in configs if getattr(c, "model_type", None) == "deepscalelm"]
    rules = {_rules(c) for c in configs}
    if len(rules) > 1:
        raise ValueError(f"{type(model).__name__} holds DeepScaleLM models with different rules (depth_parameterization, "
                         f"depth_base_layers, width_parameterization, width_base, hidden_size) {sorted(rules)}: build "
                         "one optimizer per model, or give them the same rules")
    if configs:
        return configs[0]
    if any(LAYER_CLASS_NAME in class_names(m) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} holds {LAYER_CLASS_NAME}s but no module with a DeepScaleLM config "
                         "(a `config` with model_type 'deepscalelm'), so the depth and width rules cannot be known: "
                         "pass the DeepScaleLM model (or a module that holds it) to depth_parameter_groups/build_adamw")
    return None


def depth_parameter_groups(model: torch.nn.Module, learning_rate: float, weight_decay: float,
                           eps: float = 1e-8) -> list[dict]:
    """AdamW parameter groups (each with its own `lr`, `eps`, `weight_decay`) for the config's depth and width rules.

    Groups are keyed by (stack depth, decayed or not, hidden matrix or not); each group also carries
    `lr_multiplier` (its `lr` / `learning_rate`: what `set_learning_rate` and LR schedulers keep), `depth`,
    `hidden_matrix` and `name` so logs and tests can read what was applied. Frozen parameters are left out. The config
    is found on `model` or on its DeepScaleLM submodule (`find_deepscalelm_config`).
    """
    config = find_deepscalelm_config(model)
    depth_rule, base_layers, width_rule, width_base, width = _rules(config) if config else ("deepscalelm", 1, "standard", 1, 1)
    depths = _layer_depths(model)
    hidden_head = _hidden_head_parameters(model)
    buckets = defaultdict(list)
    for parameter in model.parameters():
        if parameter.requires_grad:
            depth = depths.get(id(parameter))
            hidden = parameter.ndim >= 2 and (depth is not None or id(parameter) in hidden_head)
            buckets[(depth, parameter.ndim >= 2, hidden)].append(parameter)
    groups = []
    for (depth, decayed, hidden), params in sorted(buckets.items(), key=lambda item: (item[0][0] or 0, *item[0][1:])):
        lr_mult, eps_mult, wd_mult = (1.0, 1.0, 1.0) if depth is None else depth_optimizer_multipliers(
            depth_rule, depth / base_layers)
        if hidden:
            lr_width, eps_width, wd_width = width_optimizer_multipliers(width_rule, width / width_base)
            lr_mult, eps_mult, wd_mult = lr_mult * lr_width, eps_mult * eps_width, wd_mult * wd_width
        where = f"layers[{depth}]" if depth else "outside-layers"
        groups.append({
            "params": params,
            "lr": learning_rate * lr_mult,
            "eps": eps * eps_mult,
            "weight_decay": weight_decay * wd_mult if decayed else 0.0,
            "lr_multiplier": lr_mult,
            "depth": depth,
            "hidden_matrix": hidden,
            "name": f"{where}-{'hidden-' if hidden and not depth else ''}{'decay' if decayed else 'no-decay'}",
        })
    return groups


def build_adamw(model: torch.nn.Module, learning_rate: float, weight_decay: float = 0.01,
                betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8) -> torch.optim.AdamW:
    """torch.optim.AdamW over `depth_parameter_groups` (the defaults are the paper's AdamW settings)."""
    return torch.optim.AdamW(depth_parameter_groups(model, learning_rate, weight_decay, eps), lr=learning_rate,
                             betas=betas, eps=eps)


def set_learning_rate(optimizer: torch.optim.Optimizer, learning_rate: float) -> None:
    """Set the scheduled base rate in a hand-written loop: every group gets `learning_rate * group["lr_multiplier"]`.

    Use it where a loop would write `for group in optimizer.param_groups: group["lr"] = lr` (nanoGPT's), which gives
    every group the same rate and erases the depth and width rules' learning-rate multipliers while their epsilon and
    weight-decay multipliers stay: a mix that is neither rule. torch LR schedulers need no help (they scale each
    group's own initial rate). A group without `lr_multiplier` (not made by `depth_parameter_groups`) is refused.
    """
    for index, group in enumerate(optimizer.param_groups):
        if "lr_multiplier" not in group:
            raise ValueError(f"optimizer.param_groups[{index}] has no 'lr_multiplier': build the optimizer with "
                             "dslm_hf.optimization.build_adamw or depth_parameter_groups, or set its rates yourself")
        group["lr"] = learning_rate * group["lr_multiplier"]


def default_learning_rate(config) -> tuple[float, str]:
    """(base learning rate, why) when the user gives none, from the shape (depth and width).

    The swept base rate holds at `depth_base_layers` and `width_base`; the depth rule then scales it inside the
    layers and the width rule ("mup") for the hidden matrices. Without a depth rule ("deepscalelm"), one rate taken
    down as (layers / base)^-1/4: the sweep's one-rate optimum was 0.008 at 4 and 16 layers and 0.004 at 64 and 256
    (width 64), which this follows within a factor 1.5 at every measured depth. Without a width rule ("standard"), the
    rate is taken down as width_base / width above width_base (the optimum halved from width 64 to 128, the one wider
    width measured) and kept below it (not measured).
    """
    depth_rule, base_layers, width_rule, width_base, width = _rules(config)
    depth = max(layers for _, layers, _ in config.residual_stacks())
    width_mult = width / width_base
    rate, narrowed = BASE_LEARNING_RATE, ""
    if width_rule == "standard" and width_mult > 1:
        rate, narrowed = rate / width_mult, f" x {width_base}/{width}"
    width_part = (f", {{:.3g}} for the hidden matrices (mup width rule from width {width_base})" if width_rule == "mup"
                  else "; no width rule in the config")
    if depth_rule == "deepscalelm":
        rate *= min(1.0, (depth / base_layers) ** -0.25)
        return rate, (f"{rate:.3g} for every parameter{' but the hidden matrices' if width_rule == 'mup' else ''}: "
                      f"{BASE_LEARNING_RATE:g} at {base_layers} layers x ({depth} / {base_layers})^-1/4{narrowed} (no depth "
                      f"rule in the config)" + width_part.format(rate / width_mult))
    inside = rate * depth_optimizer_multipliers(depth_rule, depth / base_layers)[0]
    return rate, (f"base {rate:g}{f' ({BASE_LEARNING_RATE:g}{narrowed})' if narrowed else ''} (embeddings, final norm, "
                  f"head), {inside:.3g} inside the {depth} layers ({depth_rule} rule from {base_layers} layers)"
                  + width_part.format(inside / width_mult))


def rule_settings(config) -> dict[str, str]:
    """The config fields that give some parameter group a multiplier other than 1: a depth rule other than
    "deepscalelm", a width rule other than "standard". Empty when plain AdamW groups carry the config's rules (any
    model config is accepted: one without these fields has no rule)."""
    settings = {"depth_parameterization": getattr(config, "depth_parameterization", "deepscalelm"),
                "width_parameterization": getattr(config, "width_parameterization", "standard")}
    return {field: value for (field, value), plain in zip(settings.items(), ("deepscalelm", "standard")) if value != plain}


def describe_rules(config) -> str:
    """The config's depth and width rules in words, for the training log."""
    depth_rule, base_layers, width_rule, width_base, _ = _rules(config)
    depth = "no depth rule" if depth_rule == "deepscalelm" else f"{depth_rule} depth rule from {base_layers} layers"
    width = "no width rule" if width_rule == "standard" else f"{width_rule} width rule from width {width_base}"
    return f"{depth}, {width}"


def _describe_parameters(depth: int | None, hidden: set[bool]) -> str:
    if not depth:
        return "MLM transform matrix" if hidden == {True} else "embeddings/norm/heads"
    kind = {frozenset({True}): "matrices in the layers", frozenset({False}): "norms and biases in the layers"}
    return f"{kind.get(frozenset(hidden), 'layers')} of a {depth}-layer stack"


def describe_groups(groups: list[dict]) -> str:
    """One line per distinct learning rate, for the training log."""
    seen = {}
    for group in groups:
        count, hidden = seen.get((group["depth"], group["lr"]), (0, set()))
        seen[(group["depth"], group["lr"])] = (count + sum(p.numel() for p in group["params"]),
                                              hidden | {group.get("hidden_matrix", False)})
    return "; ".join(f"{_describe_parameters(depth, hidden)}: lr {lr:.3g} ({count:,} parameters)"
                     for (depth, lr), (count, hidden) in seen.items())


__all__ = ["depth_parameter_groups", "build_adamw", "set_learning_rate", "find_deepscalelm_config",
           "default_learning_rate", "rule_settings", "describe_rules", "describe_groups"]
