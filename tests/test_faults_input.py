"""Bad input to the console commands, as a careless or hostile user gives it: a table of cases on tiny inputs.

Each case is either a clear error (status 2, one stderr line `PROG: error: ...` holding the expected words, no
traceback) or correct handling (status 0 and the right outcome). The table calls each command's `main` (what the
console script runs) in this process, with the real stderr captured: a fresh interpreter per case would spend ~6 s
importing torch and transformers for each. One case per command and the success exit of dslm-publish run as the
installed console commands in fresh processes, to pin the exit status the shell sees. The fixtures are real: a saved
2-layer checkpoint with its tokenizer and a measured evaluation file (tests/publish_support.py), real data files,
real safetensors.
"""

import importlib
import json
import math
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from dslm_hf.cli import DEBUG_ENV, UserError
from publish_support import build_tiny_checkpoint, write_text_sample, write_tiny_eval_file

PROGRAMS = {"pretraining": "dslm-pretrain", "finetuning": "dslm-finetune", "publishing": "dslm-publish",
            "diagnostics": "dslm-diagnose"}
UNWRITABLE = "/proc/dslm-faults-test"  # /proc takes no new files, even from root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    text = write_text_sample(root / "text.txt")
    checkpoint = build_tiny_checkpoint(root / "checkpoint", text)
    write_tiny_eval_file(checkpoint, text)
    files = {"text": text, "checkpoint": checkpoint, "a_file": root / "a_file.txt"}
    files["a_file"].write_text("not a folder\n")
    (root / "empty.txt").write_text("  \n\n")
    (root / "binary.txt").write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(256)))
    (root / "latin1.txt").write_bytes("To be, or not to be\nthat is the question: caf\xe9\n".encode("latin-1"))
    (root / "small.txt").write_text("First Citizen:\nSpeak.\n\nAll:\nSpeak.\n\nSecond:\nYes.\n")
    for name in ("empty", "binary", "latin1", "small"):
        files[name] = root / f"{name}.txt"
    files["root"] = root
    return files


def run(module: str, *args) -> subprocess.CompletedProcess:
    """The installed console command (dslm-publish, ...) in a fresh process, offline."""
    env = {key: value for key, value in os.environ.items() if key != DEBUG_ENV}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([PROGRAMS[module], *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def run_main(module: str, arguments, capfd) -> tuple[int, str]:
    """(exit status, stderr) of the command's `main` run in this process; any other exception fails the test."""
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"dslm_hf.{module}").main([str(argument) for argument in arguments])
    return exit_info.value.code, capfd.readouterr().err


def assert_clear_error(status: int, stderr: str, module: str, expected: str) -> None:
    """Status 2, no traceback, and the message on one line that starts with the command's name."""
    assert status == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    error_lines = [line for line in stderr.splitlines() if line.startswith(f"{PROGRAMS[module]}: error: ")]
    assert len(error_lines) == 1, stderr[-3000:]
    assert expected in error_lines[0], error_lines[0]


# ----------------------------------------------------------------------------------------------------------------
# Case builders: (workspace, case folder) -> command-line arguments
# ----------------------------------------------------------------------------------------------------------------
def pretrain(w, case, *extra, dataset=None):
    return ["--output_dir", case / "run", "--dataset", dataset or w["text"], "--max_steps", 1, "--vocab_size", 300,
            "--block_size", 32, "--report_to", "none", *extra]


def write_rows(path: Path, rows) -> Path:
    """JSON Lines from dicts, or the text as given."""
    path.write_text(rows if isinstance(rows, str) else "".join(json.dumps(row) + "\n" for row in rows))
    return path


def classify(w, case, train_rows, validation_rows=None, *extra, suffix=".jsonl"):
    """dslm-finetune sequence-classification on the tiny checkpoint; the files are written into `case`."""
    train = write_rows(case / f"train{suffix}", train_rows)
    validation = write_rows(case / f"validation{suffix}", validation_rows if validation_rows is not None else train_rows)
    return ["--task", "sequence-classification", "--model_name_or_path", w["checkpoint"], "--train_file", train,
            "--validation_file", validation, "--output_dir", case / "out", "--max_steps", 1, "--report_to", "none",
            "--use_cpu", "--save_strategy", "no", *extra]


GOOD_ROWS = [{"text": "the cat sat", "label": 0}, {"text": "a dog ran", "label": 1}, {"text": "the sun", "label": 0}]


def with_label(row: int, label) -> list[dict]:
    rows = [dict(r) for r in GOOD_ROWS]
    rows[row]["label"] = label
    return rows


def binary_train_file(w, case):
    arguments = classify(w, case, GOOD_ROWS)
    (case / "train.jsonl").write_bytes(w["binary"].read_bytes())
    return arguments


def checkpoint_copy(w, case) -> Path:
    return Path(shutil.copytree(w["checkpoint"], case / "checkpoint"))


def index_pointing_outside(w, case):
    """A sharded checkpoint whose index names ../../outside/model.safetensors: the weights live outside the folder."""
    folder = case / "models" / "checkpoint"
    shutil.copytree(w["checkpoint"], folder)
    outside = case / "outside" / "model.safetensors"
    outside.parent.mkdir()
    shutil.move(folder / "model.safetensors", outside)
    with open(outside, "rb") as handle:
        names = [name for name in json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0])) if name != "__metadata__"]
    index = {"metadata": {}, "weight_map": {name: "../../outside/model.safetensors" for name in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return [folder, "--repo-id", "org/model", "--dry-run", "--staging-dir", case / "stage"]


def header_not_a_dict(w, case):
    folder = checkpoint_copy(w, case)
    header = b"[1, 2, 3]"
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return [folder, "--repo-id", "org/model", "--dry-run", "--staging-dir", case / "stage"]


def eval_file_with_other_numbers(w, case, *extra):
    """The evaluation file's loss raised by 0.5 (perplexity kept consistent): right weights digest, wrong numbers."""
    folder = checkpoint_copy(w, case)
    results = json.loads((folder / "eval_results.json").read_text())
    results["metrics"]["loss"] += 0.5
    results["metrics"]["perplexity"] = math.exp(results["metrics"]["loss"])
    (folder / "eval_results.json").write_text(json.dumps(results))
    return [folder, "--repo-id", "org/model", "--dry-run", "--staging-dir", case / "stage", *extra]


CLEAR_ERRORS = {
    # pretraining: cheap checks before the tokenizer is trained or any data is prepared
    "misspelt_config_override": ("pretraining", lambda w, c: pretrain(w, c, "--config_overrides", "hiden_size=64"),
                                 "--config_overrides: unknown key 'hiden_size'; did you mean 'hidden_size'?"),
    "block_size_beyond_positions": ("pretraining", lambda w, c: pretrain(w, c, "--block_size", 256),
                                    "--block_size=256 exceeds the model's max_position_embeddings=128"),
    "output_dir_is_a_file": ("pretraining", lambda w, c: ["--output_dir", w["a_file"]],
                             "is a file, not a folder"),
    "output_dir_unwritable": ("pretraining", lambda w, c: ["--output_dir", UNWRITABLE],
                              f"--output_dir {UNWRITABLE} is not writable"),
    "missing_data_file": ("pretraining", lambda w, c: pretrain(w, c, dataset=c / "nowhere.txt"), "does not exist"),
    "empty_data_file": ("pretraining", lambda w, c: pretrain(w, c, dataset=w["empty"]), "empty.txt is empty"),
    "binary_data_file": ("pretraining", lambda w, c: pretrain(w, c, dataset=w["binary"]),
                         "binary.txt is binary, not text (a NUL byte on line 1)"),
    "non_utf8_data_file": ("pretraining", lambda w, c: pretrain(w, c, dataset=w["latin1"]),
                           "latin1.txt is not UTF-8 text (byte 0xe9 on line 2)"),
    "dataset_neither_file_nor_dataset": ("pretraining", lambda w, c: pretrain(w, c, dataset=c / "no_such_folder"),
                                         "no_such_folder' is neither a local file nor a loadable dataset"),
    "corpus_smaller_than_one_block": ("pretraining", lambda w, c: pretrain(w, c, dataset=w["small"]),
                                      "fewer than one block of --block_size=32"),
    # fine-tuning: data files and labels, before the model is loaded
    "finetune_output_dir_is_a_file": ("finetuning", lambda w, c: classify(w, c, GOOD_ROWS) + ["--output_dir", w["a_file"]],
                                      "is a file, not a folder"),
    "null_label": ("finetuning", lambda w, c: classify(w, c, with_label(1, None)),
                   "train row 2, column 'label': the label is null"),
    "fractional_label": ("finetuning", lambda w, c: classify(w, c, with_label(2, 0.5)),
                         "train row 3, column 'label': label 0.5 is a float"),
    "stray_label_id": ("finetuning", lambda w, c: classify(w, c, with_label(2, 100000)),
                       "a stray id would create a 100001-class head"),
    "class_only_in_validation": ("finetuning", lambda w, c: classify(w, c, GOOD_ROWS, with_label(0, 2)),
                                 "validation row 1 has label '2', which never occurs in the training data"),
    "empty_finetune_file": ("finetuning", lambda w, c: classify(w, c, ""), "train.jsonl is empty"),
    "header_only_csv": ("finetuning", lambda w, c: classify(w, c, "text,label\n", suffix=".csv"),
                        "has a header but no rows"),
    "malformed_csv_line": ("finetuning", lambda w, c: classify(w, c, "text,label\nthe cat,0\na dog, ran,1\n",
                                                               suffix=".csv"),
                           "line 3 has 3 fields but the header has 2"),
    "malformed_jsonl_line": ("finetuning", lambda w, c: classify(w, c, '{"text": "a", "label": 0}\n{"text": "b", \n'),
                             "line 2 is not valid JSON"),
    "binary_finetune_file": ("finetuning", binary_train_file, "train.jsonl is binary, not text"),
    "finetune_dataset_that_cannot_be_loaded": (
        "finetuning", lambda w, c: ["--task", "sequence-classification", "--model_name_or_path", w["checkpoint"],
                                    "--dataset_name", c / "no_such_folder", "--output_dir", c / "out", "--use_cpu"],
        "no_such_folder' is neither a local file nor a loadable dataset"),
    "json_document_of_the_wrong_shape": ("finetuning", lambda w, c: classify(w, c, "[1, 2]", "[1, 2]", suffix=".json"),
                                         "holds a JSON list that is neither a list of row objects nor an object"),
    "unknown_flag": ("finetuning", lambda w, c: classify(w, c, GOOD_ROWS) + ["--bogus"],
                     "unrecognized arguments: --bogus (see dslm-finetune --help)"),
    # publishing
    "shard_index_outside_the_folder": ("publishing", index_pointing_outside,
                                       "points at shards outside"),
    "safetensors_header_not_a_dict": ("publishing", header_not_a_dict, "header is a JSON list, not an object"),
    "verify_eval_catches_other_numbers": ("publishing", lambda w, c: eval_file_with_other_numbers(
        w, c, "--verify-eval", w["text"]), "the weights give held-out loss"),
    # diagnostics
    "diagnose_non_utf8_text_file": ("diagnostics", lambda w, c: [w["checkpoint"], "--output-dir", c / "out",
                                                                 "--text-file", w["latin1"], "--no-progress"],
                                    "is not UTF-8 text"),
    "value_of_the_wrong_type": ("diagnostics", lambda w, c: [w["checkpoint"], "--output-dir", c / "out",
                                                             "--batch-size", "four"],
                                "argument --batch_size/--batch-size: invalid int value: 'four' (see dslm-diagnose --help)"),
}


# Cheap checks come before tokenizer training and data preparation: these leave no run folder behind.
REFUSED_BEFORE_ANY_DATA = {"misspelt_config_override", "block_size_beyond_positions", "output_dir_unwritable"}


@pytest.mark.parametrize("case", list(CLEAR_ERRORS))
def test_bad_input_is_one_clear_line_with_status_2(workspace, case, capfd):
    module, arguments, expected = CLEAR_ERRORS[case]
    folder = workspace["root"] / case
    folder.mkdir()
    assert_clear_error(*run_main(module, arguments(workspace, folder), capfd), module, expected)
    if case in REFUSED_BEFORE_ANY_DATA:
        assert not (folder / "run").exists()
    assert not (folder / "stage").exists() or not any((folder / "stage").iterdir())  # nothing staged


@pytest.mark.parametrize("case", ["misspelt_config_override", "stray_label_id", "shard_index_outside_the_folder",
                                  "diagnose_non_utf8_text_file"])
def test_console_command_exits_2_without_traceback_in_a_fresh_process(workspace, case):
    module, arguments, expected = CLEAR_ERRORS[case]
    folder = workspace["root"] / f"{case}_process"
    folder.mkdir()
    result = run(module, *arguments(workspace, folder))
    assert_clear_error(result.returncode, result.stderr, module, expected)


# ----------------------------------------------------------------------------------------------------------------
# Correct handling
# ----------------------------------------------------------------------------------------------------------------
def test_publish_dry_run_exits_0_after_verifying_the_eval_numbers(workspace, tmp_path):
    result = run("publishing", workspace["checkpoint"], "--repo-id", "org/model", "--dry-run", "--staging-dir",
                 tmp_path / "stage", "--verify-eval", workspace["text"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "recomputed from the weights" in result.stdout and "dry run: nothing uploaded" in result.stdout
    assert (tmp_path / "stage" / "README.md").is_file()


def test_verify_eval_recomputes_the_recorded_loss_bit_for_bit(workspace):
    """Same weights, text, split, block size, batch size and seed: the seeded evaluation repeats exactly here, far
    inside the 1e-4 relative tolerance --verify-eval allows for other thread counts and torch builds."""
    from dslm_hf.publishing import verify_eval_file

    results = json.loads((workspace["checkpoint"] / "eval_results.json").read_text())
    recomputed = verify_eval_file(results, workspace["checkpoint"], workspace["text"])
    assert recomputed["metrics"] == results["metrics"]
    assert recomputed["dataset"]["tokens"] == results["dataset"]["tokens"] > 0


def test_other_numbers_pass_the_static_checks_so_only_the_default_verification_catches_them(workspace, tmp_path):
    """The doctored evaluation file is self-consistent (right weights digest, perplexity = exp(loss)): dslm-publish
    refuses it only because it recomputes the numbers by default; --no-verify-eval, the explicit opt-out, publishes
    it."""
    from dslm_hf.publishing import main

    arguments = eval_file_with_other_numbers(workspace, tmp_path)
    shutil.copy(workspace["text"], arguments[0] / "text.txt")  # found by default, next to the evaluation record
    with pytest.raises(SystemExit, match="the weights give held-out loss"):
        main([str(argument) for argument in arguments])
    arguments[-1] = tmp_path / "stage_unverified"
    assert main([str(argument) for argument in arguments] + ["--no-verify-eval"]) == 0


def test_declared_class_names_allow_a_class_unseen_in_training(workspace, tmp_path):
    from dslm_hf.finetuning import label_names_of, load_raw_datasets, parse_args

    arguments = classify(workspace, tmp_path, GOOD_ROWS, with_label(0, 2), "--class_names", "0,1,2")
    args, training_args = parse_args([str(argument) for argument in arguments])
    assert label_names_of(load_raw_datasets(args, training_args.seed), args) == ["0", "1", "2"]


def test_rows_without_a_label_token_are_dropped_so_no_batch_loss_is_nan(workspace, tmp_path):
    """causal-sft with prompts longer than --max_length: those rows have only -100 labels (a batch of them would
    average the loss over zero tokens, NaN). They are dropped with a message and training runs on finite losses."""
    long_prompt = " ".join(["To be, or not to be, that is the question"] * 4)
    rows = [{"prompt": "Speak:", "response": "Yes."}] * 5 + [{"prompt": long_prompt, "response": "No."}] * 3
    train = write_rows(tmp_path / "sft.jsonl", rows)
    result = run("finetuning", "--task", "causal-sft", "--model_name_or_path", workspace["checkpoint"],
                 "--train_file", train, "--validation_file", train, "--output_dir", tmp_path / "out", "--max_length", 16,
                 "--max_steps", 2, "--per_device_train_batch_size", 8, "--logging_steps", 1, "--report_to", "none",
                 "--use_cpu", "--save_strategy", "no")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dropped 3 of 8 train rows with no token to train on within max_length=16" in result.stderr
    logged = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in logged if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert math.isfinite(json.loads((tmp_path / "out" / "eval_results.json").read_text())["eval_loss"])


@pytest.mark.parametrize("debug_env", [False, True], ids=["--debug", DEBUG_ENV])
def test_debug_lets_the_error_through_with_its_traceback(workspace, tmp_path, monkeypatch, debug_env):
    """Under --debug or DSLM_DEBUG=1 the UserError leaves main (Python prints its traceback, status 1)."""
    from dslm_hf.pretraining import main

    arguments = pretrain(workspace, tmp_path, dataset=workspace["empty"]) + ([] if debug_env else ["--debug"])
    if debug_env:
        monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(UserError, match="--dataset .*empty.txt is empty"):
        main([str(argument) for argument in arguments])
