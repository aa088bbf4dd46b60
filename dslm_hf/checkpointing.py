"""Training checkpoints that can be trusted: safetensors and JSON only, verified byte for byte before loading.

A checkpoint is a folder `checkpoints/step_XXXXXXXX/` holding exactly

    model.safetensors        the unwrapped model's weights (tied tensors stored once, safetensors.torch.save_model)
    optimizer.safetensors    every tensor of the optimizer state, keyed "<param index>.<name>" (AdamW: exp_avg, ...)
    trainer_state.json       the loop's own state: {"step", ...} from the caller (scheduler state, counters, layout)
                             plus "optimizer": the optimizer's param_groups and its non-tensor state entries
    checkpoint_complete.json the manifest, written last: {"format", "step", "files": {name: {"bytes", "sha256"}}}

Nothing in a checkpoint is ever unpickled: a folder holding a pickle-format file (*.pkl, *.pt, *.bin, ...) is
refused with its name, and so is a manifest that does not list every file above or whose sizes or digests differ.
Saving writes into a hidden `.tmp-step_XXXXXXXX` folder and renames it into place after the manifest, so a run
killed at any instant leaves either the previous checkpoints or a complete new one.

The format does not depend on the training mode: a loop hands `save_checkpoint` its model, optimizer and a
JSON-able dict, and gets the same dict back from `load_checkpoint` (see docs/failure_modes.md).
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from .cli import UserError
from .files import write_json_atomically

CHECKPOINT_FORMAT = 2  # 1 was accelerate's save_state folder (pickled optimizer, scheduler and RNG states)
CHECKPOINT_PREFIX = "step_"
CHECKPOINT_MARKER = "checkpoint_complete.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_FILES = (MODEL_FILE, OPTIMIZER_FILE, TRAINER_STATE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class CheckpointError(UserError):
    """A checkpoint that must not be loaded; the message says which folder, which file and why."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_pickle_files(folder: Path) -> list[Path]:
    """Every pickle-format file anywhere under `folder` (loading one can run arbitrary code)."""
    return sorted(path for path in Path(folder).rglob("*") if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES)


# ----------------------------------------------------------------------------------------------------------------
# Verification and resolution
# ----------------------------------------------------------------------------------------------------------------
def read_manifest(folder: Path) -> dict:
    marker = folder / CHECKPOINT_MARKER
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    pickles = find_pickle_files(folder)
    if pickles:
        raise CheckpointError(f"checkpoint {folder} holds {pickles[0].relative_to(folder)}, a pickle file, which could "
                              "run code when loaded: dslm-pretrain never loads one; delete the checkpoint (or start "
                              "over with --overwrite_output_dir)")
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete: it has no {CHECKPOINT_MARKER} "
                              "(the run stopped while writing it)")
    try:
        manifest = json.loads(marker.read_text())
        step, files = int(manifest["step"]), manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(e, dict) for e in files.values()):
            raise TypeError("'files' is not a mapping of file entries")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {folder} is corrupt: unreadable {CHECKPOINT_MARKER} ({error})") from None
    unlisted = [name for name in CHECKPOINT_FILES if name not in files]
    if unlisted:
        raise CheckpointError(f"checkpoint {folder} is corrupt: its {CHECKPOINT_MARKER} does not list {unlisted[0]} "
                              f"(a checkpoint holds {', '.join(CHECKPOINT_FILES)})")
    return {"step": step, "files": files}


def verify_checkpoint(folder: Path) -> int:
    """The checkpoint's step; CheckpointError saying what is wrong when it is incomplete, corrupt or holds a pickle.
    Every file the manifest lists is checked (size, then sha256) and must lie inside the folder."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, expected in manifest["files"].items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"checkpoint {folder} is corrupt: its manifest names {name!r}, outside the folder")
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} is missing")
        if path.stat().st_size != expected.get("bytes"):
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} has {path.stat().st_size} bytes, "
                                  f"expected {expected.get('bytes')}")
        if file_sha256(path) != expected.get("sha256"):
            raise CheckpointError(f"checkpoint {folder} is corrupt: {name} does not match its recorded sha256")
    try:
        state_step = json.loads((folder / TRAINER_STATE).read_text()).get("step")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise CheckpointError(f"checkpoint {folder} is corrupt: unreadable {TRAINER_STATE} ({error})") from None
    if state_step != manifest["step"]:
        raise CheckpointError(f"checkpoint {folder} is corrupt: {TRAINER_STATE} is at step {state_step}, its "
                              f"manifest at step {manifest['step']}")
    return manifest["step"]


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """Checkpoint folders (complete or not), newest step first; temporary folders are not listed."""
    folders = [p for p in (Path(run_dir) / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*")
               if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(folders, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), reverse=True)


def resolve_checkpoint(request: str | None, run_dir: Path, say=print) -> Path | None:
    """'latest' -> newest complete checkpoint (None if none; skipped broken ones are reported); a path -> that
    checkpoint, which must be complete (CheckpointError otherwise)."""
    if request is None:
        return None
    if request != "latest":
        verify_checkpoint(Path(request))
        return Path(request)
    for folder in checkpoint_folders(run_dir):
        try:
            verify_checkpoint(folder)
        except CheckpointError as error:
            say(f"skipping {error}")
            continue
        say(f"resuming from the newest complete checkpoint: {folder}")
        return folder
    say(f"no complete checkpoint in {Path(run_dir) / 'checkpoints'}: starting from scratch")
    return None


# ----------------------------------------------------------------------------------------------------------------
# Optimizer state as tensors + JSON
# ----------------------------------------------------------------------------------------------------------------
def split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors keyed "<param index>.<name>", JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """The inverse of split_optimizer_state: a dict for optimizer.load_state_dict."""
    state = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for index, entries in rest["state"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": rest["param_groups"]}


# ----------------------------------------------------------------------------------------------------------------
# Save and load
# ----------------------------------------------------------------------------------------------------------------
def write_manifest(folder: Path, step: int) -> None:
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(CHECKPOINT_MARKER)}
    write_json_atomically(folder / CHECKPOINT_MARKER, {"format": CHECKPOINT_FORMAT, "step": step, "files": files})


def save_checkpoint(accelerator, run_dir: Path, model, optimizer, trainer_state: dict, limit: int | None,
                    state: tuple[dict, dict] | None = None) -> Path:
    """Write checkpoints/step_XXXXXXXX for `trainer_state["step"]` (rank 0 writes; every rank must call it, the
    model's replicas and optimizer states being identical) and keep the newest `limit` checkpoints.

    `state`: (model tensors, optimizer.state_dict()-layout state) already gathered onto rank 0 by a sharded or
    pipelined run (dslm_hf.parallel, dslm_hf.pipeline); without it they are read from `model` and `optimizer`."""
    step = trainer_state["step"]
    final = Path(run_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"
    staging = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if state is None:
            save_model(accelerator.unwrap_model(model), str(staging / MODEL_FILE))
        else:
            save_file(state[0], str(staging / MODEL_FILE), metadata={"format": "pt"})
        tensors, rest = split_optimizer_state(optimizer.state_dict() if state is None else state[1])
        save_file(tensors, str(staging / OPTIMIZER_FILE))
        (staging / TRAINER_STATE).write_text(json.dumps({**trainer_state, "optimizer": rest}, indent=1))
        write_manifest(staging, step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        if limit is not None:
            for old in checkpoint_folders(run_dir)[limit:]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(folder: Path, accelerator, model, optimizer, restore=None) -> dict:
    """Verify `folder`, load the weights into `model` and the state into `optimizer` (in place, on every rank), and
    return the trainer state the loop saved (without the optimizer part). `restore(model tensors, optimizer state)`
    replaces both loads for a sharded or pipelined run, which takes its own part of the whole state."""
    folder = Path(folder)
    verify_checkpoint(folder)
    state = json.loads((folder / TRAINER_STATE).read_text())
    try:
        optimizer_state = join_optimizer_state(load_file(folder / OPTIMIZER_FILE), state.pop("optimizer"))
        if restore is None:
            load_model(accelerator.unwrap_model(model), str(folder / MODEL_FILE))  # read on CPU, copied into place
            optimizer.load_state_dict(optimizer_state)
        else:
            restore(load_file(folder / MODEL_FILE), optimizer_state)
    except (RuntimeError, SafetensorError, KeyError, ValueError) as error:
        raise CheckpointError(f"checkpoint {folder} does not fit this model and optimizer ({' '.join(str(error).split())[:300]}): "
                              "resume with the settings that wrote it") from None
    return state

