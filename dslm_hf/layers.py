"""Where a transformer's repeated layers are: the one way the package finds them.

A Hugging Face model names its layer classes in `_no_split_modules` (the units `device_map` must not split), so a
layer stack is an `nn.ModuleList` of those classes: `model.layers` of a DeepScaleLM or Llama decoder,
`encoder.layers` and `decoder.layers` of an encoder-decoder, `bert.encoder.layer`, `transformer.h`, T5's `block`.
A model that names no layer class falls back to the ModuleLists its `base_model_pp_plan` (the pipeline plan) names.
The optimizer's depth rule, FSDP2's per-layer sharding, the pipeline's stage split, `dslm-diagnose` and the training
monitor all read the layers from `find_layer_stacks`.
"""

from torch import nn


def class_names(module: nn.Module) -> set[str]:
    # By class name in the MRO: fully_shard swaps each layer's class for an FSDP subclass of it, and a checkpoint's
    # remote code defines classes of the same names that are not the package's.
    return {cls.__name__ for cls in type(module).__mro__}


def layer_class_names(model: nn.Module) -> set[str]:
    """The layer classes `model` and the models inside it (a head's base model, a wrapper's model) name in
    `_no_split_modules`."""
    return {name for module in model.modules() for name in (getattr(module, "_no_split_modules", None) or ())}


def _pipeline_plan_names(model: nn.Module) -> set[str]:
    names = set()
    for module in model.modules():
        plan = getattr(module, "base_model_pp_plan", None) or getattr(getattr(module, "config", None), "base_model_pp_plan", None)
        names.update(plan or ())
    return names


def find_layer_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every stack of layers of `model` as (qualified name, ModuleList), outermost only, in definition order; [] when
    it has none.

    A stack is a non-empty ModuleList whose every entry is one of the classes named in `_no_split_modules`; when the
    model names none, the ModuleLists named in `base_model_pp_plan`.
    """
    classes = layer_class_names(model)
    planned = _pipeline_plan_names(model)
    stacks = _outermost_lists(model, lambda name, layers: all(class_names(layer) & classes for layer in layers))
    return stacks or _outermost_lists(model, lambda name, layers: name.rsplit(".", 1)[-1] in planned)


def _outermost_lists(model: nn.Module, is_stack) -> list[tuple[str, nn.ModuleList]]:
    stacks = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or not is_stack(name, module):
            continue
        if not any(name.startswith(found + ".") for found, _ in stacks):
            stacks.append((name, module))
    return stacks


__all__ = ["class_names", "find_layer_stacks", "layer_class_names"]
