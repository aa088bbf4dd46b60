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

The format does not depend on the training mode: `save_checkpoint` and `load_checkpoint` both take a
`Checkpointable` (a training mode of dslm_hf.training_modes, or `OneProcessState`) and the loop's JSON-able dict,
which `load_checkpoint` gives back (see docs/failure_modes.md).
"""

import hashlib
import json
import os
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file, save_model
from tokenizers import Tokenizer

from .cli import UserError
from .files import write_json_atomically
from .modeling_deepscalelm import AUTO_MAP
from .parallel import with_tied_copies

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
class Checkpointable(Protocol):
    """A model and its optimizer, seen as one process's whole model whatever the training mode."""

    def training_state(self) -> tuple | None:
        """(model tensors by name, each tied tensor once, or the whole model; optimizer.state_dict()-layout state)
        on the rank that writes, None elsewhere."""

    def load_training_state(self, model_state: dict[str, torch.Tensor], optimizer_state: dict) -> None:
        """Take this rank's part of a whole-model state."""


class OneProcessState:
    """The Checkpointable of a whole model and its optimizer in one process (or identical replicas)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def training_state(self) -> tuple[torch.nn.Module, dict]:
        return self.model, self.optimizer.state_dict()

    def load_training_state(self, model_state: dict[str, torch.Tensor], optimizer_state: dict) -> None:
        self.model.load_state_dict(with_tied_copies(self.model, model_state))  # a tied tensor is stored once
        self.optimizer.load_state_dict(optimizer_state)


def write_manifest(folder: Path, step: int) -> None:
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(CHECKPOINT_MARKER)}
    write_json_atomically(folder / CHECKPOINT_MARKER, {"format": CHECKPOINT_FORMAT, "step": step, "files": files})


def save_checkpoint(accelerator, run_dir: Path, state: "Checkpointable", trainer_state: dict, limit: int | None) -> Path:
    """Write checkpoints/step_XXXXXXXX for `trainer_state["step"]` from `state.training_state()` (rank 0 writes; every
    rank must call it, gathering the state can be a collective) and keep the newest `limit` checkpoints."""
    step = trainer_state["step"]
    final = Path(run_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"
    staging = final.with_name(f".tmp-{final.name}")
    gathered = state.training_state()
    if accelerator.is_main_process:
        model_state, optimizer_state = gathered
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True)
            if isinstance(model_state, torch.nn.Module):  # one process's whole model: safetensors' own layout
                save_model(model_state, str(staging / MODEL_FILE))
            else:
                save_file(model_state, str(staging / MODEL_FILE), metadata={"format": "pt"})
            tensors, rest = split_optimizer_state(optimizer_state)
            save_file(tensors, str(staging / OPTIMIZER_FILE))
            (staging / TRAINER_STATE).write_text(json.dumps({**trainer_state, "optimizer": rest}, indent=1))
            write_manifest(staging, step)
        except OSError as error:  # disk full, file too large, permissions changed during the run
            shutil.rmtree(staging, ignore_errors=True)  # half a checkpoint is no checkpoint: give the space back
            older = checkpoint_folders(run_dir)
            kept = f"the previous checkpoints are kept (newest: {older[0]})" if older else "no earlier checkpoint exists"
            raise CheckpointError(f"could not write checkpoint {final} ({describe_os_error(error)}): {kept}; free "
                                  "space or fix the folder's permissions, then run the same command with "
                                  "--resume_from_checkpoint latest") from None
        refuse_links([final], "saving a checkpoint over an existing one")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        if limit is not None:
            rotated = checkpoint_folders(run_dir)[limit:]
            refuse_links(rotated, f"checkpoint rotation (keeping the newest {limit})",
                         done=f"the new checkpoint {final} is written; ")
            for old in rotated:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def describe_os_error(error: OSError) -> str:
    """'No space left on device: path/file' for an OSError (what failed, on which file)."""
    what = error.strerror or str(error) or type(error).__name__
    return f"{what}: {error.filename}" if error.filename else what


def refuse_links(paths, action: str, done: str = "") -> None:
    """Never delete through a symbolic link: rmtree refuses one with a traceback, and the folder it points at may
    hold something else entirely. `action` says what would have deleted it, `done` what was finished before."""
    for path in paths:
        if Path(path).is_symlink():
            raise UserError(f"{action} would delete {path}, a symbolic link to {os.readlink(path)}: nothing is "
                            f"deleted through a link; {done}remove or replace the link yourself, then rerun")


def load_checkpoint(folder: Path, state: "Checkpointable") -> dict:
    """Verify `folder`, hand its weights and optimizer state to `state.load_training_state` (on every rank), and
    return the trainer state the loop saved (without the optimizer part)."""
    folder = Path(folder)
    verify_checkpoint(folder)
    trainer_state = json.loads((folder / TRAINER_STATE).read_text())
    try:
        optimizer_state = join_optimizer_state(load_file(folder / OPTIMIZER_FILE), trainer_state.pop("optimizer"))
        state.load_training_state(load_file(folder / MODEL_FILE), optimizer_state)
    except (RuntimeError, SafetensorError, KeyError, ValueError) as error:
        raise CheckpointError(f"checkpoint {folder} does not fit this model and optimizer ({' '.join(str(error).split())[:300]}): "
                              "resume with the settings that wrote it") from None
    return trainer_state



# ----------------------------------------------------------------------------------------------------------------
# Saved model folders (save_pretrained output), as every command reads them
# ----------------------------------------------------------------------------------------------------------------
# The JSON files transformers reads from a model folder; a corrupt one otherwise ends in a JSONDecodeError (or an
# AttributeError on a list) deep inside the library.
FOLDER_JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "added_tokens.json", "model.safetensors.index.json")
RESAVE_HINT = "the file is damaged (an interrupted copy or download?): copy or save the folder again"


class CorruptFileError(UserError):
    """A file of a model folder that cannot be read: the message names the file and what is wrong with it."""


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; CorruptFileError naming the file when it is empty, not UTF-8, not JSON, or not an
    object."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise CorruptFileError(f"{path} is not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}): "
                               f"{RESAVE_HINT}") from None
    except json.JSONDecodeError as error:
        what = "is empty" if not raw.strip() else f"is not valid JSON ({error.msg}, line {error.lineno} column {error.colno})"
        raise CorruptFileError(f"{path} {what}: {RESAVE_HINT}") from None
    if not isinstance(value, dict):
        raise CorruptFileError(f"{path} holds a JSON {type(value).__name__}, not an object: {RESAVE_HINT}")
    return value


def read_safetensors_shapes(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of one safetensors file, refusing a truncated or corrupt file.

    The format is an 8-byte little-endian header length, a JSON header with each tensor's data offsets, then
    the data; a complete file ends exactly where the last tensor's data ends.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CorruptFileError(f"{path} is truncated: {size} bytes, too short for a safetensors header")
        (header_length,) = struct.unpack("<Q", prefix)
        if 8 + header_length > size:
            raise CorruptFileError(
                f"{path} is truncated or corrupt: its header claims {header_length} bytes but the file has {size}"
            )
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CorruptFileError(f"{path} is corrupt: its safetensors header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path} is corrupt: its safetensors header is a JSON {type(header).__name__}, not an "
                               "object of tensors; re-save the weights with save_pretrained")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and isinstance(entry.get("shape"), list) and isinstance(entry.get("dtype"), str)):
            raise CorruptFileError(f"{path} is corrupt: header entry {name!r} is not a tensor description "
                                   "(dtype, shape, data_offsets); re-save the weights with save_pretrained")
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_length + data_end != size:
        raise CorruptFileError(
            f"{path} is truncated or corrupt: its header describes {8 + header_length + data_end} bytes "
            f"but the file has {size}"
        )
    try:
        with safe_open(path, framework="pt") as opened:
            names = set(opened.keys())
    except Exception as error:  # safetensors raises its own SafetensorError for every malformed layout
        raise CorruptFileError(f"{path} is corrupt: safetensors cannot open it ({error})") from None
    if names != set(header):
        raise CorruptFileError(f"{path} is corrupt: safetensors reads different tensor names than its header lists")
    return {name: (entry["dtype"], tuple(entry["shape"])) for name, entry in header.items()}


def check_model_folder(folder: Path) -> None:
    """Refuse a save_pretrained folder whose JSON files (config, tokenizer, generation config, shard index) or
    safetensors files are empty, truncated or corrupt, naming the file: every command runs this before transformers
    reads the folder. Headers only: a 1000-layer checkpoint is checked in milliseconds."""
    folder = Path(folder)
    for name in FOLDER_JSON_FILES:
        if (folder / name).is_file():
            read_json_object(folder / name)
    for path in sorted(folder.glob("*.safetensors")):
        read_safetensors_shapes(path)


def describe_error(error: BaseException) -> str:
    """One line for a library exception: a config field's own error rather than huggingface_hub's wrapper."""
    if isinstance(error, StrictDataclassFieldValidationError) and error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


@contextmanager
def loading(what: str, source):
    """Around a transformers load of `what` (a config, the weights, a tokenizer) from `source`, a folder that
    check_model_folder passed: well-formed files whose content the library rejects (a config value out of range,
    a tokenizer.json of another layout) end as one UserError naming the source. The library's own exceptions are
    of every type (the tokenizers library raises plain Exception), so all are caught here, and only here;
    `--debug` shows the traceback."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        raise CorruptFileError(f"cannot load {what} from {source} ({describe_error(error)}): fix or re-save the folder "
                        "(save_pretrained)") from None


# ----------------------------------------------------------------------------------------------------------------
# Code and tokenizers in model folders
# ----------------------------------------------------------------------------------------------------------------
# The package's own remote code, which save_pretrained copies beside the weights and config.json's auto_map names.
REMOTE_CODE_FILES = (
    "configuration_deepscalelm.py", "input_checks_deepscalelm.py", "modeling_deepscalelm.py", "recipe_deepscalelm.py"
)
# Keys transformers copies into a saved tokenizer_config.json from the call that loaded the tokenizer.
LOADING_KEYS = ("is_local", "local_files_only")


class ForeignCodeError(UserError):
    """A model or tokenizer folder that carries code other than DeepScaleLM's own: loading it could run that code."""


def _saved_auto_map(path: Path):
    """The auto_map of a saved JSON file, None without one (or when the file is unreadable: transformers cannot
    load it either, and `check_model_folder` names what is wrong with it)."""
    try:
        value = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value.get("auto_map") if isinstance(value, dict) else None


def _auto_map_entries(auto_map) -> list[tuple[str, object]]:
    """(Auto class, reference) pairs of an auto_map: a dict of strings or [slow, fast] lists, or the legacy list."""
    if isinstance(auto_map, dict):
        return [(key, ref) for key, value in auto_map.items()
                for ref in (value if isinstance(value, (list, tuple)) else [value]) if ref is not None]
    return [("AutoTokenizer", ref) for ref in (auto_map if isinstance(auto_map, (list, tuple)) else [auto_map])
            if ref is not None]


def check_no_foreign_code(folder: Path) -> None:
    """Refuse (ForeignCodeError, naming the file) a model or tokenizer folder that would make transformers import
    code other than the package's own: a tokenizer_config.json with any auto_map (DeepScaleLM has no tokenizer
    code), a config.json whose auto_map maps anything but DeepScaleLM's classes, or a *.py file other than the
    package's remote-code files. Every command that reads a folder it did not write runs this first; the loads
    themselves also pass trust_remote_code=False."""
    folder = Path(folder)
    hint = "delete the auto_map and the code files, or load the folder yourself if you trust its code"
    for name, own in (("tokenizer_config.json", {}), ("config.json", AUTO_MAP)):
        path = folder / name
        if not path.is_file():
            continue
        foreign = [f"{key}: {ref}" for key, ref in _auto_map_entries(_saved_auto_map(path)) if own.get(key) != ref]
        if foreign:
            raise ForeignCodeError(f"{path} has an auto_map into code that is not DeepScaleLM's ({'; '.join(foreign)}): "
                                   f"loading it could run that code, so it is refused; {hint}")
    stray = sorted(path for path in folder.rglob("*.py")
                   if path.is_file() and not (path.parent == folder and path.name in REMOTE_CODE_FILES))
    if stray:
        raise ForeignCodeError(f"{folder} holds {stray[0].relative_to(folder)}, Python code that is not DeepScaleLM's "
                               f"(its files are {', '.join(REMOTE_CODE_FILES)}): refused; {hint}")


def fit_tokenizer_to_model(tokenizer, max_position_embeddings: int, type_vocab_size: int) -> None:
    """Make `tokenizer` describe the model it is saved with: model_max_length is the position table's size (unset
    it is 1e30 and truncation=True does nothing), a sequence pair's segment ids stay below type_vocab_size
    (transformers' default template gives the second sequence segment 1, which a model without a segment table
    refuses), and the keys of the call that loaded it (is_local, local_files_only) are not saved."""
    tokenizer.model_max_length = max_position_embeddings
    tokenizer.init_kwargs["model_max_length"] = max_position_embeddings
    for key in LOADING_KEYS:
        tokenizer.init_kwargs.pop(key, None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.post_processor is None:
        return
    state = json.loads(backend.to_str())
    processor, top = state["post_processor"], max(type_vocab_size, 1) - 1
    if processor.get("type") != "TemplateProcessing":
        return
    parts = [next(iter(item.values())) for item in processor["single"] + processor["pair"]]
    if any(part["type_id"] > top for part in parts):
        for part in parts:
            part["type_id"] = min(part["type_id"], top)
        backend.post_processor = Tokenizer.from_str(json.dumps(state)).post_processor


def give_normal_permissions(folder: Path) -> None:
    """The permissions a new file or folder gets from the umask (0644 / 0755 under umask 022), for `folder` and
    everything in it: a folder staged with tempfile.mkdtemp is 0700, and transformers writes weights through a
    private temporary file (0600), which would leave an exported model readable by its owner only."""
    umask = os.umask(0)
    os.umask(umask)
    folder = Path(folder)
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def save_tokenizer(tokenizer, folder: Path, config) -> None:
    """tokenizer.save_pretrained(folder), fitted to the model `config` first (`fit_tokenizer_to_model`)."""
    fit_tokenizer_to_model(tokenizer, config.max_position_embeddings, config.type_vocab_size)
    tokenizer.save_pretrained(folder)
