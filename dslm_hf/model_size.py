"""How big a model a config describes, by arithmetic alone: the size checks every command runs before it builds a
module or allocates a tensor.

A config.json that says num_hidden_layers=200000 or hidden_size=65536 would otherwise have dslm-export and
dslm-publish build modules for minutes, and dslm-pretrain try allocations of tens of gigabytes, before anything
failed. Counting parameters from the config takes microseconds; it is compared with what the weights file holds
(a folder: its safetensors headers, no tensor is read) or with the memory training needs (a fresh config).
"""

import json
import math
from pathlib import Path

from safetensors import safe_open

from .cli import UserError

FLOAT32_BYTES = 4
# Training in fp32 with AdamW keeps, per parameter, the weight, its gradient and the optimizer's two moments.
TRAINING_BYTES_PER_PARAMETER = 4 * FLOAT32_BYTES
# A stored checkpoint holds the backbone and a head: the config may describe at most this many times the stored
# parameters before the weights cannot be its weights (smaller disagreements are named tensor by tensor by the
# shape checks that follow, which build the model on the meta device: affordable at that size).
STORED_SLACK = 2


def backbone_parameters(config) -> int:
    """Distinct parameters of the config's backbone (every stack, embeddings, LayerNorms; the tied encoder-decoder
    word embedding once), without a task head: a lower bound on any head model's count. Equals
    `sum(p.numel() for p in DeepScaleLMModel(config).parameters())` (tests/test_trust_settings.py checks it)."""
    d, ff = config.hidden_size, config.intermediate_size
    norm = 2 * d  # LayerNorm weight and bias
    attention = 4 * (d * d + d)  # q, k, v, o with biases
    layer = attention + (d * ff + ff) + (ff * d + d) + 2 * norm
    positions = config.max_position_embeddings * d if config.position_embedding_type == "absolute" else 0
    per_stack = positions + config.type_vocab_size * d + norm  # the embedding LayerNorm (Post-LN) or the final one
    total = config.vocab_size * d
    for _, layers, branches in config.residual_stacks():
        cross_attention = attention + norm if branches == 3 else 0
        total += per_stack + layers * (layer + cross_attention)
    return total


def describe_bytes(count: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count:.0f} bytes"


def describe_model(config, parameters: int) -> str:
    layers = "+".join(str(layers) for _, layers, _ in config.residual_stacks())
    return (f"{parameters:.3g} parameters ({describe_bytes(parameters * FLOAT32_BYTES)} in float32: {layers} layers, "
            f"hidden_size {config.hidden_size}, intermediate_size {config.intermediate_size}, vocab_size "
            f"{config.vocab_size})")


def stored_parameters(folder: Path) -> int:
    """Parameters the folder's safetensors files hold (the index's shards, or every *.safetensors), from their
    headers: shapes only, no tensor data is read."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / shard for shard in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    total = 0
    for path in files:
        with safe_open(path, framework="pt") as opened:
            total += sum(math.prod(opened.get_slice(name).get_shape()) for name in opened.keys())
    return total


def check_config_matches_stored_size(folder: Path, config, stored: int | None = None) -> None:
    """Refuse a config.json describing far more parameters than the weights hold, before any module is built.
    `stored`: the count when the caller has read the headers already."""
    described = backbone_parameters(config)
    stored = stored_parameters(folder) if stored is None else stored
    if described > STORED_SLACK * stored:
        raise UserError(f"{Path(folder) / 'config.json'} describes {describe_model(config, described)} but the "
                        f"weights in {folder} hold {stored:.3g}: the config does not belong to these weights; restore "
                        "the config.json saved with them")


def available_memory_bytes() -> int:
    """Memory this machine can still give (MemAvailable), read from /proc/meminfo, else psutil."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return psutil.virtual_memory().available


def device_memory_bytes(device) -> int:
    """Total memory of an accelerator device, or the host's available memory for the CPU."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return available_memory_bytes()


def check_training_fits(config, source: str, device, processes_on_device: int = 1, shards: int = 1) -> int:
    """Refuse a config whose weights, gradients and AdamW moments alone (TRAINING_BYTES_PER_PARAMETER each, split
    over `shards` processes, `processes_on_device` of which share the memory) exceed the device's memory; returns
    the parameter count. Activations come on top, so passing is necessary, not sufficient."""
    parameters = backbone_parameters(config)
    needed = parameters * TRAINING_BYTES_PER_PARAMETER / shards * processes_on_device
    available = device_memory_bytes(device)
    if needed > available:
        where = "available on this machine" if getattr(device, "type", "cpu") == "cpu" else f"of {device}"
        copies = f", {processes_on_device} processes" if processes_on_device > 1 else ""
        raise UserError(f"{source} describes {describe_model(config, parameters)}: training needs at least "
                        f"{describe_bytes(needed)} ({TRAINING_BYTES_PER_PARAMETER} bytes per parameter for the "
                        f"weights, gradients and AdamW moments{copies}), more than the {describe_bytes(available)} "
                        f"{where}: lower hidden_size or num_hidden_layers")
    return parameters


__all__ = ["backbone_parameters", "check_config_matches_stored_size", "check_training_fits", "stored_parameters"]
