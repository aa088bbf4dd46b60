"""Sharded data parallelism with FSDP2 (`torch.distributed.fsdp.fully_shard`), applied from outside the model.

The model knows nothing about parallelism: this module takes a built model, shards each of its transformer layers
(the classes named in `model._no_split_modules`, i.e. DeepScaleLMLayer) and then the root, so parameters, gradients
and optimizer state are split across ranks and each layer's parameters are gathered only while it runs. It works
on any process group, gloo on CPU included, which is why it is tested there: accelerate's FSDP plugin falls back to
DDP without GPUs. On GPUs, `accelerate launch --config_file accelerate_configs/fsdp2.yaml` is the usual route.
"""

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor


def shardable_layers(model: nn.Module) -> list[nn.Module]:
    """The model's transformer layers: modules whose class is named in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no layer classes in _no_split_modules ({sorted(names)}): "
                         "nothing to shard layer by layer")
    return layers


def shard_model(model: nn.Module, mesh=None, reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard each transformer layer, then the root (embeddings, final norm, head): FSDP2's usual wrapping."""
    for layer in shardable_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict on CPU (a collective: every rank must call it; all receive it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_copy(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (unsharded) model of the same class and config holding `state_dict`, ready for save_pretrained.

    Built on the meta device and filled by assignment, so no memory or time goes into a throwaway initialisation.
    """
    plain_class = next(c for c in type(model).__mro__[1:] if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        copy = plain_class(model.config)
    copy.load_state_dict(state_dict, assign=True, strict=False)
    copy.tie_weights()
    missing = [name for name, tensor in copy.state_dict().items() if tensor.is_meta]
    if missing:
        raise ValueError(f"the full state dict does not cover {missing[:5]}")
    copy.generation_config = model.generation_config
    return copy


def grad_norm_value(norm) -> torch.Tensor:
    """A clipped-gradient norm as a plain tensor (sharded gradients give a DTensor)."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
