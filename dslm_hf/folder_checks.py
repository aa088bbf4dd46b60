"""Checks on a saved DeepScaleLM checkpoint folder (save_pretrained output) before anything publishes it or
reports numbers of it: `check_checkpoint` refuses pickle files, corrupt or truncated safetensors, foreign code,
weights that do not match the architecture the config describes, and weights that are not finite; `weights_digest`
names exactly the weights an evaluation measured. Used by `dslm-publish`, `scripts/evaluate_checkpoint.py`,
`scripts/build_checkpoint.py` and the baselines.
"""

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .checkpointing import (check_model_folder, check_no_foreign_code, find_pickle_files, loading, read_json_object,
                            read_safetensors_shapes)
from .cli import UserError
from .configuration_deepscalelm import DeepScaleLMConfig
from .heads import HEADS, architecture_class
from .model_size import check_config_matches_stored_size


class PublishRefusal(UserError):
    """The folder would break users if published or measured; the message says what is wrong and where."""


def check_no_pickle_files(folder: Path) -> None:
    pickles = find_pickle_files(folder)
    if pickles:
        listed = ", ".join(str(path.relative_to(folder)) for path in pickles)
        raise PublishRefusal(
            f"{folder} holds pickle files ({listed}): loading a pickle can execute arbitrary code, so the Hub "
            "repository must hold safetensors only. Remove them (optimizer/trainer state does not belong in a "
            "published model) or convert the weights with save_pretrained."
        )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index lists, or the single weights file."""
    folder = Path(folder)
    index_path = folder / SAFE_WEIGHTS_INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise PublishRefusal(f"{index_path} is not a valid safetensors index ({error!r})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise PublishRefusal(f"{index_path} is not a valid safetensors index: weight_map must map tensor names "
                                 "to shard file names")
        shards = sorted(set(weight_map.values()))
        inside = folder.resolve()
        outside = [shard for shard in shards if not (folder / shard).resolve().is_relative_to(inside)]
        if outside:
            raise PublishRefusal(f"{index_path} points at shards outside {folder} ({', '.join(outside)}): a shard "
                                 "must be a file in the checkpoint folder; fix the index")
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if missing:
            raise PublishRefusal(f"{index_path} lists shards that do not exist: {', '.join(missing)}")
        return [folder / shard for shard in shards]
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        if not (folder / SAFE_WEIGHTS_NAME).resolve().is_relative_to(folder.resolve()):
            raise PublishRefusal(f"{folder / SAFE_WEIGHTS_NAME} links outside {folder}: copy the weights into the folder")
        return [folder / SAFE_WEIGHTS_NAME]
    raise PublishRefusal(f"{folder} has no {SAFE_WEIGHTS_NAME} and no {SAFE_WEIGHTS_INDEX_NAME}: nothing to publish")


def read_checkpoint_shapes(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} over every weight file, refusing corrupt files and index mismatches."""
    folder = Path(folder)
    shapes = {}
    index_path = folder / SAFE_WEIGHTS_INDEX_NAME
    for path in weight_files(folder):
        file_shapes = read_safetensors_shapes(path)
        duplicated = sorted(set(file_shapes) & set(shapes))
        if duplicated:
            raise PublishRefusal(f"{path} repeats tensors stored in another shard: {', '.join(duplicated[:5])}")
        shapes.update(file_shapes)
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        misplaced = sorted(name for name, shard in weight_map.items() if name not in shapes)
        if misplaced:
            raise PublishRefusal(f"{index_path} lists tensors no shard holds: {', '.join(misplaced[:5])}")
    return shapes


def load_checkpoint_config(folder: Path) -> DeepScaleLMConfig:
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise PublishRefusal(f"{folder} has no config.json: it is not a save_pretrained checkpoint folder")
    model_type = read_json_object(config_path).get("model_type")
    if model_type != DeepScaleLMConfig.model_type:
        raise PublishRefusal(f"{config_path} has model_type={model_type!r}; dslm-publish publishes 'deepscalelm' models")
    with loading("the model config", config_path):
        config = DeepScaleLMConfig.from_pretrained(folder)
    architecture = (config.architectures or [None])[0]
    if architecture not in HEADS:
        raise PublishRefusal(
            f"{config_path} names architectures={config.architectures}; expected one of {sorted(HEADS)} "
            "(the published heads with a Hub pipeline)"
        )
    return config


def expected_weight_shapes(config: DeepScaleLMConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """({tensor name: shape} the architecture saves, names tied to another tensor) from a model on the meta device."""
    with torch.device("meta"):
        model = architecture_class(config)(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    return shapes, set(model.all_tied_weights_keys)  # already empty when the config unties the embeddings


def check_weights_match_config(folder: Path, config: DeepScaleLMConfig) -> None:
    """Refuse weights that miss, add or reshape tensors against the architecture `config` describes.

    A tied tensor (the LM head sharing the word embeddings) may be absent: save_pretrained drops it and
    from_pretrained re-ties it.
    """
    stored = read_checkpoint_shapes(folder)
    # Arithmetic first: the meta-device model below would take minutes to build for a 200000-layer config.json.
    check_config_matches_stored_size(folder, config, stored=sum(math.prod(shape) for _, shape in stored.values()))
    expected, tied = expected_weight_shapes(config)
    missing = sorted(set(expected) - set(stored) - tied)
    extra = sorted(set(stored) - set(expected))
    reshaped = sorted(
        f"{name} {list(stored[name][1])} (config expects {list(expected[name])})"
        for name in set(stored) & set(expected)
        if stored[name][1] != expected[name]
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors the config's architecture needs: {', '.join(missing[:8])}")
    if extra:
        problems.append(f"{len(extra)} tensors the architecture does not have: {', '.join(extra[:8])}")
    if reshaped:
        problems.append(f"tensors whose shape disagrees with config.json: {', '.join(reshaped[:8])}")
    if problems:
        raise PublishRefusal(
            f"the weights in {folder} do not match its config.json ({config.architectures[0]}, "
            f"{config.num_hidden_layers} layers, hidden_size {config.hidden_size}): " + "; ".join(problems)
        )


def weights_digest(folder: Path) -> str:
    """sha256 over every stored tensor (name, dtype, shape, bytes) in name order: the same for the same weights
    however they are sharded or re-saved, so an evaluation file can name exactly the weights it measured."""
    file_of_tensor = {}
    for path in weight_files(folder):
        with safe_open(path, framework="pt") as opened:
            file_of_tensor.update({name: path for name in opened.keys()})
    digest = hashlib.sha256()
    for name in sorted(file_of_tensor):
        with safe_open(file_of_tensor[name], framework="pt") as opened:
            tensor = opened.get_tensor(name).contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_checkpoint(folder: Path) -> DeepScaleLMConfig:
    """Every refusal that depends on the checkpoint folder alone; returns its config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishRefusal(f"checkpoint folder {folder} does not exist")
    check_no_pickle_files(folder)
    check_model_folder(folder)
    check_no_foreign_code(folder)
    config = load_checkpoint_config(folder)
    check_weights_match_config(folder, config)
    check_weights_finite(folder)
    return config


def check_weights_finite(folder: Path) -> None:
    """Refuse weights holding a NaN or an infinity (a diverged run): every tensor is read, one at a time."""
    broken = []
    for path in weight_files(folder):
        with safe_open(path, framework="pt") as opened:
            for name in opened.keys():
                tensor = opened.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    broken.append(f"{name} ({int((~torch.isfinite(tensor)).sum())} of {tensor.numel()} values)")
    if broken:
        raise PublishRefusal(f"the weights in {folder} are not finite: {len(broken)} tensors hold NaN or infinity "
                             f"({', '.join(sorted(broken)[:4])}): publish the last checkpoint whose weights are finite")


__all__ = ["PublishRefusal", "check_checkpoint", "check_no_pickle_files", "check_weights_finite",
           "check_weights_match_config", "expected_weight_shapes", "load_checkpoint_config", "read_checkpoint_shapes",
           "weight_files", "weights_digest"]
