"""Sharded data parallelism with FSDP2 (`torch.distributed.fsdp.fully_shard`), applied from outside the model, and
the training state (model + optimizer) that sharded runs checkpoint.

The model knows nothing about parallelism: this module takes a built model, shards each of its transformer layers
(the classes named in `model._no_split_modules`, i.e. DeepScaleLMLayer) and then the root, so parameters, gradients
and optimizer state are split across ranks and each layer's parameters are gathered only while it runs. It works
on any process group, gloo on CPU included, which is why it is tested there: accelerate's FSDP plugin falls back to
DDP without GPUs. On GPUs, `accelerate launch --config_file accelerate_configs/fsdp2.yaml` is the usual route.

Checkpoints of a sharded run are those of one process (dslm_hf.checkpointing): the model and optimizer states are
gathered whole onto rank 0 to be written (fine up to a few billion parameters: rank 0 holds one full copy in CPU
memory), and each rank takes its shards from the whole state when loading.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .layers import find_layer_stacks, layer_class_names

PARAM_DTYPES = {"no": None, "bf16": torch.bfloat16}


def shardable_layers(model: nn.Module) -> list[nn.Module]:
    """The model's transformer layers, every stack's (`dslm_hf.layers.find_layer_stacks`)."""
    layers = [layer for _, stack in find_layer_stacks(model) for layer in stack]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no layer stack (an nn.ModuleList of the classes its "
                         f"_no_split_modules names: {sorted(layer_class_names(model))}): nothing to shard layer by layer")
    return layers


def shard_model(model: nn.Module, mesh=None, reshard_after_forward: bool = True, mixed_precision: str = "no") -> nn.Module:
    """fully_shard each transformer layer, then the root (embeddings, final norm, head): FSDP2's usual wrapping.

    mixed_precision "bf16": parameters are cast to bf16 for compute when a unit is gathered, gradients are reduced
    in fp32 and the sharded master weights and optimizer state stay fp32 (MixedPrecisionPolicy).
    """
    if mixed_precision not in PARAM_DTYPES:
        raise ValueError(f"mixed_precision={mixed_precision!r} under fully_shard: expected one of {sorted(PARAM_DTYPES)} "
                         "(fp16 would need a sharded gradient scaler)")
    policy = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[mixed_precision], reduce_dtype=torch.float32)
    for layer in shardable_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict on CPU (a collective: every rank must call it; rank 0 receives it)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_copy(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (unsharded, whole) model of the same class and config holding `state_dict`, ready for save_pretrained.

    Built on the meta device and filled by assignment, so no memory or time goes into a throwaway initialisation.
    """
    plain_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
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


# ----------------------------------------------------------------------------------------------------------------
# Training state in the checkpoint layout: whole-model tensors by name, the optimizer state numbered like one process's
# ----------------------------------------------------------------------------------------------------------------
def with_tied_copies(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each tied pair complete: a checkpoint stores a tied tensor once (lm_head.weight or the input
    embedding), a state dict to load wants both names."""
    state, tied = dict(state), (getattr(model, "_tied_weights_keys", None) or {}).items()
    filled = True
    while filled:  # a chain (decoder <- encoder <- lm_head) fills whatever the order of the pairs
        filled = False
        for target, source in tied:
            if target not in state and source in state:
                state[target], filled = state[source], True
            elif source not in state and target in state:
                state[source], filled = state[target], True
    return state


def without_tied_copies(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each tied tensor once (under the input embedding's name), as safetensors needs it."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return {name: tensor for name, tensor in state.items() if name not in tied or tied[name] not in state}


def parameter_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in param-group order: index i of optimizer.state_dict() is name i."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def numbered_optimizer_state(named: dict) -> dict:
    """torch.distributed.checkpoint's optimizer state (keyed by parameter name) in optimizer.state_dict()'s layout
    (parameters numbered in param-group order): the layout of one process, which checkpoints store."""
    index = {name: i for i, name in enumerate(name for group in named["param_groups"] for name in group["params"])}
    return {"state": {index[name]: entries for name, entries in named["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in named["param_groups"]]}


def named_optimizer_state(numbered: dict, order: list[str]) -> dict:
    """The inverse of numbered_optimizer_state, given the names in param-group order."""
    return {"state": {order[int(i)]: entries for i, entries in numbered["state"].items()},
            "param_groups": [{**group, "params": [order[int(i)] for i in group["params"]]}
                             for group in numbered["param_groups"]]}


def sharded_training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict] | None:
    """(model tensors, optimizer state) of an FSDP2 model gathered whole onto rank 0, in the layout one process
    saves; None on the other ranks. A collective: every rank must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() != 0:
        return None
    return without_tied_copies(model, model_state), numbered_optimizer_state(optimizer_state)


def load_sharded_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                                optimizer_state: dict) -> None:
    """Load a whole-model training state (as sharded_training_state returns it, read on every rank) into an FSDP2
    model and its optimizer: each rank keeps its own shards."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, with_tied_copies(model, model_state), options=options)
    set_optimizer_state_dict(model, optimizer, named_optimizer_state(optimizer_state, parameter_order(model, optimizer)),
                             options=options)
