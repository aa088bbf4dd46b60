"""User errors that used to end in a traceback end as one line, status 2, in every command (issue 20, item 5).

Each case runs a command's `main` in this process on a tiny real input (the 2-layer checkpoint of
tests/publish_support.py, damaged one file at a time) and asserts the status, that no traceback was printed, and
the words of the one error line, which names the file or option at fault.
"""

import importlib
import json
import shutil
from pathlib import Path

import pytest

from publish_support import build_tiny_checkpoint, write_text_sample

PROGRAMS = {"pretraining": "dslm-pretrain", "finetuning": "dslm-finetune", "publishing": "dslm-publish",
            "diagnostics": "dslm-diagnose", "export": "dslm-export"}
ROWS = [{"text": "the cat sat", "label": 0}, {"text": "a dog ran", "label": 1}, {"text": "the sun", "label": 0}]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_errors")
    text = write_text_sample(root / "text.txt")
    checkpoint = build_tiny_checkpoint(root / "checkpoint", text)
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return {"root": root, "text": text, "checkpoint": checkpoint, "rows": rows}


def run_main(module: str, arguments, capfd) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"dslm_hf.{module}").main([str(argument) for argument in arguments])
    return exit_info.value.code, capfd.readouterr().err


def assert_one_line(status: int, stderr: str, module: str, *expected: str) -> str:
    assert status == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(f"{PROGRAMS[module]}: error: ")]
    assert len(lines) == 1, stderr[-3000:]
    for words in expected:
        assert words in lines[0], lines[0]
    return lines[0]


def command_line(module: str, w, folder: Path, out: Path) -> list:
    """The command reading the checkpoint folder `folder` (what each does first with a folder)."""
    return {
        "export": [folder, "--output-dir", out],
        "publishing": [folder, "--repo-id", "org/model", "--dry-run", "--staging-dir", out],
        "diagnostics": [folder, "--output-dir", out, "--no-progress"],
        "finetuning": ["--task", "sequence-classification", "--model_name_or_path", folder, "--train_file", w["rows"],
                       "--validation_file", w["rows"], "--output_dir", out, "--max_steps", 1, "--report_to", "none",
                       "--use_cpu", "--save_strategy", "no"],
    }[module]


# ----------------------------------------------------------------------------------------------------------------
# Corrupt or truncated files in a checkpoint folder: (file, new content or a fraction of it to keep, message)
# ----------------------------------------------------------------------------------------------------------------
CORRUPTIONS = {
    "empty_tokenizer_json": ("tokenizer.json", 0.0, "tokenizer.json is empty"),
    "truncated_tokenizer_json": ("tokenizer.json", 0.5, "tokenizer.json is not valid JSON (Unterminated string"),
    "tokenizer_json_a_list": ("tokenizer.json", b"[1]", "tokenizer.json holds a JSON list, not an object"),
    "empty_tokenizer_config": ("tokenizer_config.json", 0.0, "tokenizer_config.json is empty"),
    "config_not_json": ("config.json", b"{\"hidden_size\": 3", "config.json is not valid JSON"),
    "config_a_list": ("config.json", b"[1, 2]", "config.json holds a JSON list, not an object"),
    "config_not_utf8": ("config.json", b'{"a": "caf\xe9"}', "config.json is not UTF-8 text (byte 0xe9 at offset 10)"),
    "empty_generation_config": ("generation_config.json", 0.0, "generation_config.json is empty"),
    "truncated_safetensors": ("model.safetensors", 0.5, "model.safetensors is truncated or corrupt: its header "
                                                        "describes 151952 bytes but the file has 75976"),
    "empty_safetensors": ("model.safetensors", 0.0, "model.safetensors is truncated: 0 bytes"),
}


def damaged_copy(w, case: str, folder: Path) -> Path:
    name, change, _ = CORRUPTIONS[case]
    shutil.copytree(w["checkpoint"], folder)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(change if isinstance(change, bytes) else data[:int(len(data) * change)])
    return folder


@pytest.mark.parametrize("module", ["export", "publishing", "diagnostics", "finetuning"])
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupt_checkpoint_file_is_one_line_naming_the_file(workspace, module, case, capfd):
    folder = damaged_copy(workspace, case, workspace["root"] / f"{module}-{case}")
    status, stderr = run_main(module, command_line(module, workspace, folder, folder.parent / f"{folder.name}-out"), capfd)
    assert_one_line(status, stderr, module, f"{folder}/{CORRUPTIONS[case][2]}")


@pytest.mark.parametrize("module", ["export", "publishing", "diagnostics", "finetuning"])
def test_a_config_value_the_model_refuses_is_one_line_naming_the_value(workspace, module, capfd):
    folder = Path(shutil.copytree(workspace["checkpoint"], workspace["root"] / f"{module}-three-heads"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 3}))
    status, stderr = run_main(module, command_line(module, workspace, folder, folder.parent / f"{folder.name}-out"), capfd)
    assert_one_line(status, stderr, module, str(folder), "DeepScaleLMConfig.num_attention_heads=3 is invalid: must divide hidden_size=32")


def test_a_tokenizer_json_of_another_layout_is_one_line(workspace, capfd):
    """Valid JSON, not a tokenizer: the library's KeyError ('added_tokens') becomes a line naming the folder."""
    folder = Path(shutil.copytree(workspace["checkpoint"], workspace["root"] / "tokenizer-layout"))
    (folder / "tokenizer.json").write_text("{}")
    status, stderr = run_main("export", [folder, "--output-dir", folder.parent / "tokenizer-layout-out"], capfd)
    assert_one_line(status, stderr, "export", f"cannot load the tokenizer from {folder} (KeyError: 'added_tokens')")
    assert not (folder.parent / "tokenizer-layout-out").exists()


def test_pretrain_with_an_empty_tokenizer_json_is_one_line(workspace, capfd):
    folder = workspace["root"] / "empty-tokenizer"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("")
    (folder / "tokenizer_config.json").write_text("{}")
    status, stderr = run_main("pretraining", ["--output_dir", folder / "run", "--dataset", workspace["text"],
                                              "--tokenizer_name", folder, "--max_steps", 1, "--block_size", 32,
                                              "--report_to", "none"], capfd)
    assert_one_line(status, stderr, "pretraining", f"{folder / 'tokenizer.json'} is empty")


def test_max_eval_blocks_below_one_evaluation_round_names_the_flag(workspace, capfd):
    status, stderr = run_main("pretraining", ["--output_dir", workspace["root"] / "eval-round", "--dataset",
                                              workspace["text"], "--preset", "tiny", "--max_steps", 1, "--block_size",
                                              32, "--max_eval_blocks", 4, "--per_device_eval_batch_size", 8,
                                              "--report_to", "none"], capfd)
    assert_one_line(status, stderr, "pretraining", "--max_eval_blocks 4 is fewer than one evaluation round (8 blocks",
                    "raise --max_eval_blocks")


# ----------------------------------------------------------------------------------------------------------------
# dslm-pretrain: config values, refused before the tokenizer is trained
# ----------------------------------------------------------------------------------------------------------------
CONFIG_VALUES = {
    # read with PretrainedConfig.update_from_string: the value converts to the field's type, or the item is named
    "hidden_size=abc": "(item 'hidden_size=abc': invalid literal for int() with base 10: 'abc')",
    "hidden_size=NaN": "(item 'hidden_size=NaN': invalid literal for int() with base 10: 'NaN')",
    "hidden_dropout_prob=NaN": "DeepScaleLMConfig.hidden_dropout_prob=nan is invalid: expected a finite number",
    "num_attention_heads=3": "DeepScaleLMConfig.num_attention_heads=3 is invalid: must divide hidden_size=32",
    "num_hidden_layers=-1": "DeepScaleLMConfig.num_hidden_layers=-1 is invalid: expected a positive integer",
    "id2label=5": "(item 'id2label=5': You can only update int, float, bool or string values in the config",
}


@pytest.mark.parametrize("override", list(CONFIG_VALUES))
def test_an_invalid_config_override_is_refused_before_the_tokenizer_is_trained(workspace, override, capfd):
    run_dir = workspace["root"] / f"override-{override}"
    status, stderr = run_main("pretraining", ["--output_dir", run_dir, "--dataset", workspace["text"], "--max_steps", 1,
                                              "--vocab_size", 300, "--block_size", 32, "--report_to", "none",
                                              "--config_overrides", override], capfd)
    assert_one_line(status, stderr, "pretraining", "--config_overrides gives an invalid model configuration",
                    CONFIG_VALUES[override])
    assert not (run_dir / "tokenizer").exists()  # before: the tokenizer was trained and saved first


def test_an_invalid_config_name_value_names_the_file(workspace, capfd):
    config = workspace["root"] / "config_kwargs.json"
    config.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 3, "num_hidden_layers": 2}))
    status, stderr = run_main("pretraining", ["--output_dir", workspace["root"] / "config-name-run", "--dataset",
                                              workspace["text"], "--config_name", config, "--max_steps", 1,
                                              "--block_size", 32, "--report_to", "none"], capfd)
    assert_one_line(status, stderr, "pretraining", f"--config_name {config} gives an invalid model configuration",
                    "num_attention_heads=3 is invalid: must divide hidden_size=64")


# ----------------------------------------------------------------------------------------------------------------
# dslm-export usage errors
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arguments, expected", [
    (["SRC", "--output-dir", "OUT", "--bogus"], "unrecognized arguments: --bogus (see dslm-export --help)"),
    ([], "the following arguments are required: SRC, --output_dir/--output-dir (see dslm-export --help)"),
    (["SRC", "--output-dir"], "argument --output_dir/--output-dir: expected one argument (see dslm-export --help)"),
])
def test_export_usage_errors_are_one_line(arguments, expected, capfd):
    status, stderr = run_main("export", arguments, capfd)
    assert_one_line(status, stderr, "export", expected)
    assert "usage:" not in stderr


# ----------------------------------------------------------------------------------------------------------------
# dslm-finetune: texts that are not text, and files with other columns
# ----------------------------------------------------------------------------------------------------------------
def finetune_files(w, case: str, train_rows, validation_rows, task="sequence-classification") -> list:
    folder = w["root"] / f"finetune-{case}"
    folder.mkdir()
    for name, rows in (("train", train_rows), ("validation", validation_rows)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return ["--task", task, "--model_name_or_path", w["checkpoint"], "--train_file", folder / "train.jsonl",
            "--validation_file", folder / "validation.jsonl", "--output_dir", folder / "out", "--max_steps", 1,
            "--report_to", "none", "--use_cpu", "--save_strategy", "no"]


SFT_ROWS = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
TEXTS = {  # case: (train rows, validation rows, task, message)
    "null_text": ([{"text": None, "label": 0}] + ROWS, ROWS, "sequence-classification",
                  "train row 1, column 'text': the text is null (or the row lacks the column)"),
    "missing_text": (ROWS + [{"label": 1}], ROWS, "sequence-classification",
                     "train row 4, column 'text': the text is null (or the row lacks the column)"),
    "empty_text": (ROWS, ROWS + [{"text": "  ", "label": 1}], "sequence-classification",
                   "validation row 4, column 'text': the text is empty"),
    "numeric_text": (ROWS, [{"text": 5, "label": 0}] + ROWS, "sequence-classification",
                     "validation.jsonl: line 1, column 'text': 5 is a JSON int, not text; quote it if it is text"),
    "numeric_response": ([{"prompt": "a", "response": 2.5}] + SFT_ROWS, SFT_ROWS, "causal-sft",
                         "train.jsonl: line 1, column 'response': 2.5 is a JSON float, not text"),
    "null_prompt": ([{"prompt": None, "response": "b"}] + SFT_ROWS, SFT_ROWS, "causal-sft",
                    "train row 1, column 'prompt': the text is null"),
}


@pytest.mark.parametrize("case", list(TEXTS))
def test_a_text_that_is_null_numeric_or_empty_is_one_line_naming_the_row(workspace, case, capfd):
    """Before: the tokenizer's ValueError traceback (null, number), or silently '5' / an empty text trained on."""
    train, validation, task, expected = TEXTS[case]
    status, stderr = run_main("finetuning", finetune_files(workspace, case, train, validation, task), capfd)
    assert_one_line(status, stderr, "finetuning", expected)


def test_train_and_validation_files_with_other_columns_are_one_line(workspace, capfd):
    """Before: datasets' DatasetGenerationError traceback (a cast error deep in the JSON loader)."""
    renamed = [{"sentence": row["text"], "label": row["label"]} for row in ROWS]
    arguments = finetune_files(workspace, "other-columns", ROWS, renamed)
    status, stderr = run_main("finetuning", arguments, capfd)
    assert_one_line(status, stderr, "finetuning", f"--validation_file {arguments[7]} has columns ['label', 'sentence'] "
                    f"but --train_file {arguments[5]} has ['label', 'text']: give both files the same columns")


# ----------------------------------------------------------------------------------------------------------------
# Writing: disk full during a save, symbolic links met by deletion
# ----------------------------------------------------------------------------------------------------------------
class OneProcess:
    """What save_checkpoint asks of an Accelerator, for one process."""
    is_main_process = True

    @staticmethod
    def wait_for_everyone():
        pass


def tiny_training_state():
    import torch

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_disk_full_during_a_checkpoint_keeps_the_previous_one_and_says_so(tmp_path, monkeypatch):
    import errno

    from dslm_hf import checkpointing
    from dslm_hf.cli import UserError

    model, optimizer = tiny_training_state()
    first = checkpointing.save_checkpoint(OneProcess, tmp_path, checkpointing.OneProcessState(model, optimizer), {"step": 1}, limit=None)

    def disk_full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(checkpointing, "save_file", disk_full)
    with pytest.raises(UserError) as refusal:
        checkpointing.save_checkpoint(OneProcess, tmp_path, checkpointing.OneProcessState(model, optimizer), {"step": 2}, limit=None)
    second = tmp_path / "checkpoints" / "step_00000002"
    assert str(refusal.value) == (
        f"could not write checkpoint {second} (No space left on device: {tmp_path}/checkpoints/.tmp-step_00000002/"
        f"optimizer.safetensors): the previous checkpoints are kept (newest: {first}); free space or fix the "
        "folder's permissions, then run the same command with --resume_from_checkpoint latest")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]  # no half checkpoint
    assert checkpointing.verify_checkpoint(first) == 1


def test_checkpoint_rotation_refuses_to_delete_through_a_symbolic_link(tmp_path):
    from dslm_hf import checkpointing
    from dslm_hf.cli import UserError

    model, optimizer = tiny_training_state()
    first = checkpointing.save_checkpoint(OneProcess, tmp_path, checkpointing.OneProcessState(model, optimizer), {"step": 1}, limit=None)
    elsewhere = tmp_path / "kept-elsewhere"
    first.rename(elsewhere)
    first.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UserError) as refusal:
        checkpointing.save_checkpoint(OneProcess, tmp_path, checkpointing.OneProcessState(model, optimizer), {"step": 2}, limit=1)
    assert str(refusal.value).startswith(
        f"checkpoint rotation (keeping the newest 1) would delete {first}, a symbolic link to {elsewhere}: nothing is "
        f"deleted through a link; the new checkpoint {tmp_path / 'checkpoints' / 'step_00000002'} is written")
    assert checkpointing.verify_checkpoint(elsewhere) == 1 and first.is_symlink()


def test_overwrite_output_dir_refuses_to_delete_a_linked_final_folder(workspace, capfd):
    run_dir = workspace["root"] / "linked-final"
    kept = workspace["root"] / "a-model-kept-elsewhere"
    kept.mkdir()
    (kept / "config.json").write_text("{}")
    run_dir.mkdir()
    (run_dir / "final").symlink_to(kept, target_is_directory=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    status, stderr = run_main("pretraining", ["--output_dir", run_dir, "--dataset", workspace["text"], "--max_steps", 1,
                                              "--block_size", 32, "--report_to", "none", "--overwrite_output_dir"], capfd)
    assert_one_line(status, stderr, "pretraining", f"--overwrite_output_dir would delete {run_dir / 'final'}, a symbolic "
                    f"link to {kept}: nothing is deleted through a link")
    assert (kept / "config.json").is_file() and (run_dir / "metrics.jsonl").is_file()  # before: rmtree's OSError


# ----------------------------------------------------------------------------------------------------------------
# Paths the file system or the libraries cannot take
# ----------------------------------------------------------------------------------------------------------------
def test_a_path_component_over_255_bytes_is_one_line(workspace, capfd):
    too_long = workspace["root"] / ("x" * 300)
    status, stderr = run_main("export", [workspace["checkpoint"], "--output-dir", too_long], capfd)
    assert_one_line(status, stderr, "export", f"File name too long: {too_long}: a file or folder name is longer than "
                    "the file system allows (255 bytes): choose a shorter path")


def test_a_path_that_is_not_utf8_is_one_line_naming_the_flag(workspace, capfd):
    """Before: tokenizers' UnicodeEncodeError (surrogates not allowed) while saving, or safetensors' 'not valid UTF-8'."""
    latin1 = str(workspace["root"]) + "/caf\udce9"  # the byte 0xe9, as Python carries a non-UTF-8 file name
    status, stderr = run_main("export", [workspace["checkpoint"], "--output-dir", latin1], capfd)
    assert_one_line(status, stderr, "export", f"--output-dir {workspace['root']}/caf\\xe9 is not UTF-8 (byte 0xe9): the "
                    "tokenizers and safetensors libraries cannot use such a path")
    status, stderr = run_main("pretraining", [f"--output_dir={latin1}", "--dataset", workspace["text"]], capfd)
    assert_one_line(status, stderr, "pretraining", f"--output_dir {workspace['root']}/caf\\xe9 is not UTF-8")


def test_a_disk_full_while_writing_final_removes_it_and_names_the_checkpoint_kept(workspace, monkeypatch, capfd):
    import errno

    from dslm_hf import pretraining

    run_dir = workspace["root"] / "final-disk-full"

    def disk_full(run, folder):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{")  # what a save cut short leaves
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    monkeypatch.setattr(pretraining, "save_final_model", disk_full)
    status, stderr = run_main("pretraining", ["--output_dir", run_dir, "--dataset", workspace["text"], "--max_steps", 2,
                                              "--save_steps", 2, "--vocab_size", 300, "--block_size", 32,
                                              "--per_device_train_batch_size", 2, "--report_to", "none",
                                              "--per_device_eval_batch_size", 2, "--sample_max_new_tokens", 0], capfd)
    assert_one_line(status, stderr, "pretraining", f"could not write the final model to {run_dir / 'final'} (No space "
                    f"left on device: {run_dir / 'final' / 'model.safetensors'}): it was removed, and the newest "
                    f"checkpoint, {run_dir / 'checkpoints' / 'step_00000002'}, is kept")
    assert not (run_dir / "final").exists()


# ----------------------------------------------------------------------------------------------------------------
# dslm-finetune --resume_from_checkpoint: Trainer's pickles, loaded only as torch's weights-only loader allows
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, content, expected", [
    ("rng_state.pth", "namespace", "rng_state.pth cannot be loaded safely (WeightsUnpickler error: Unsupported global: "
                                   "GLOBAL argparse.Namespace was not an allowed global by default): loading it could "
                                   "run code, so dslm-finetune does not"),
    ("optimizer.pt", "truncated", "optimizer.pt cannot be read (PytorchStreamReader failed reading zip archive"),
])
def test_a_trainer_checkpoint_pickle_the_safe_loader_refuses_is_one_line(workspace, name, content, expected, capfd):
    """Before: torch's UnpicklingError (or RuntimeError) traceback from inside Trainer, after the data was prepared."""
    import argparse

    import torch

    checkpoint = Path(shutil.copytree(workspace["checkpoint"], workspace["root"] / f"trainer-checkpoint-{content}"))
    torch.save({"state": {}, "param_groups": []}, checkpoint / "optimizer.pt")
    torch.save(argparse.Namespace(a=1) if content == "namespace" else {"python": 1}, checkpoint / "rng_state.pth")
    if content == "truncated":
        data = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(data[: len(data) // 2])
    arguments = command_line("finetuning", workspace, workspace["checkpoint"], checkpoint.parent / f"{checkpoint.name}-out")
    status, stderr = run_main("finetuning", arguments + ["--resume_from_checkpoint", checkpoint], capfd)
    assert_one_line(status, stderr, "finetuning", f"--resume_from_checkpoint {checkpoint}: {expected}")


def test_export_refuses_an_output_dir_that_is_a_symbolic_link(workspace, capfd):
    """Before: NotADirectoryError from rmdir on the link, after the whole export had been computed."""
    target = workspace["root"] / "empty-export-target"
    target.mkdir()
    link = workspace["root"] / "export-link"
    link.symlink_to(target, target_is_directory=True)
    status, stderr = run_main("export", [workspace["checkpoint"], "--output-dir", link], capfd)
    assert_one_line(status, stderr, "export", f"--output-dir {link} is a symbolic link (to {target}): give the folder "
                    "itself, or a new path")
    assert link.is_symlink() and not any(target.iterdir())
