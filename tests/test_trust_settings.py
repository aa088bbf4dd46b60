"""Trust in what the commands do with a run's settings: no finished run is lost, sizes are checked before anything
is built, and every setting means what the log says (validated up front, refused where it could not apply)."""

import json
import math
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from dslm_hf import pretraining
from dslm_hf.checkpointing import checkpoint_folders
from dslm_hf.cli import UserError
from dslm_hf.model_size import backbone_parameters
from dslm_hf.modeling_deepscalelm import DeepScaleLMModel
from pretrain_helpers import TINY_RUN, run_in_process
from publish_support import build_tiny_checkpoint, write_text_sample, write_tiny_eval_file

# A refusal that needs no data, tokenizer or model takes microseconds; the bound leaves room for a loaded machine.
REFUSAL_SECONDS = 2.0


def exit_message(main, arguments) -> tuple[str, float]:
    """(the one-line error of a command run in this process, seconds until it exited)."""
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        main([str(argument) for argument in arguments])
    assert exit_info.value.code == 2
    return str(exit_info.value), time.monotonic() - started


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step run with a checkpoint at step 2 and its final/ model."""
    run_dir = tmp_path_factory.mktemp("trust") / "run"
    run_in_process(run_dir, "--max_steps", 2, "--save_steps", 2, "--eval_steps", 100)
    return run_dir


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-checkpoint")
    text = write_text_sample(root / "sample.txt")
    checkpoint = build_tiny_checkpoint(root / "decoder", text)
    write_tiny_eval_file(checkpoint, text)
    return {"checkpoint": checkpoint, "text": text}


# ----------------------------------------------------------------------------------------------------------------
# No lost run
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("resume", [[], ["--resume_from_checkpoint", "latest"]], ids=["fresh", "latest"])
def test_a_finished_run_without_checkpoints_is_refused_and_kept(finished_run, tmp_path, resume):
    """final/ and metrics.jsonl but no checkpoint (as --save_steps 0 leaves): neither a fresh run nor `latest` (which
    would start from scratch) may replace the model and delete the metric records."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    before = {name: (run_dir / name).read_bytes() for name in ("metrics.jsonl", "final/model.safetensors")}
    message, seconds = exit_message(pretraining.main, ["--output_dir", run_dir, *TINY_RUN, "--max_steps", 2, *resume])
    assert f"{run_dir} holds a previous run's tokenizer, model_config, final, metrics.jsonl" in message
    assert "and no checkpoint to resume from: choose a new --output_dir, or pass --overwrite_output_dir" in message
    assert seconds < REFUSAL_SECONDS
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_a_finetuning_output_dir_with_a_previous_fine_tuning_is_refused(tmp_path):
    from dslm_hf.finetuning import main

    output = tmp_path / "out"
    (output / "checkpoint-2").mkdir(parents=True)
    for name in ("model.safetensors", "all_results.json"):
        (output / name).write_text("previous run\n")
    (tmp_path / "model").mkdir()
    arguments = ["--task", "causal-sft", "--model_name_or_path", tmp_path / "model", "--train_file",
                 tmp_path / "train.jsonl", "--output_dir", output, "--use_cpu"]
    message, _ = exit_message(main, arguments)
    assert f"--output_dir {output} holds a previous fine-tuning (model.safetensors, all_results.json, checkpoint-2): " \
           "choose a new folder, pass --resume_from_checkpoint to continue, or --overwrite_output_dir" in message
    assert (output / "model.safetensors").read_text() == "previous run\n"
    # With --overwrite_output_dir nothing is deleted before the new run's data and model have loaded.
    message, _ = exit_message(main, arguments + ["--overwrite_output_dir"])
    assert "train.jsonl" in message and (output / "checkpoint-2").is_dir()


# ----------------------------------------------------------------------------------------------------------------
# Sizes before anything is built
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields", [
    {}, {"is_decoder": True, "position_embedding_type": "rotary"}, {"type_vocab_size": 2},
    {"norm_placement": "post"}, {"is_encoder_decoder": True, "decoder_layers": 3},
    {"is_encoder_decoder": True, "intermediate_size": 50},
], ids=["encoder", "rotary-decoder", "token-types", "post-ln", "seq2seq", "seq2seq-ffn50"])
def test_backbone_parameters_equal_the_built_model_count(fields, tiny_config):
    config = tiny_config(vocab_size=300, **fields)
    with torch.device("meta"):
        model = DeepScaleLMModel(config)
    assert backbone_parameters(config) == sum(parameter.numel() for parameter in model.parameters())


def with_config(tiny_checkpoint, tmp_path, **changes):
    folder = shutil.copytree(tiny_checkpoint["checkpoint"], tmp_path / "checkpoint")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize("command", ["export", "publishing"])
@pytest.mark.parametrize("changes, described", [
    ({"num_hidden_layers": 200_000}, "describes 2.54e+09 parameters (10.2 GB in float32: 200000 layers"),
    ({"hidden_size": 65536, "num_attention_heads": 2, "intermediate_size": 262144},
     "describes 1.03e+11 parameters (412 GB in float32: 2 layers, hidden_size 65536"),
], ids=["200000-layers", "hidden-65536"])
def test_a_config_far_larger_than_its_weights_is_refused_before_any_module_is_built(
        tiny_checkpoint, tmp_path, command, changes, described):
    import importlib

    folder = with_config(tiny_checkpoint, tmp_path, **changes)
    main = importlib.import_module(f"dslm_hf.{command}").main
    arguments = [folder, "--output-dir", tmp_path / "out"] if command == "export" else [
        folder, "--repo-id", "org/model", "--dry-run", "--staging-dir", tmp_path / "stage"]
    message, seconds = exit_message(main, arguments)
    assert described in message and "but the weights in" in message and "hold 3.71e+04: the config does not belong to these weights" in message
    assert seconds < REFUSAL_SECONDS


@pytest.mark.parametrize("how", ["config_overrides", "config_name"])
def test_pretraining_refuses_a_model_larger_than_memory_before_reading_data(tmp_path, how):
    if how == "config_overrides":
        source = ["--config_overrides", "hidden_size=65536,num_attention_heads=64"]
    else:
        (tmp_path / "huge.json").write_text(json.dumps({"hidden_size": 65536, "num_hidden_layers": 2,
                                                        "num_attention_heads": 64}))
        source = ["--config_name", tmp_path / "huge.json"]
    run_dir = tmp_path / "run"
    arguments = ["--output_dir", run_dir, *TINY_RUN, *source]
    if how == "config_name":
        arguments.remove("--preset"), arguments.remove("tiny")
    message, seconds = exit_message(pretraining.main, arguments)
    assert "describes 1.03e+11 parameters (" in message and " GB in float32: 2 layers, hidden_size 65536" in message
    assert "training needs at least 1.65 TB (16 bytes per parameter for the weights, gradients and AdamW moments)" \
           in message
    assert seconds < REFUSAL_SECONDS
    assert not (run_dir / "tokenizer").exists()


# ----------------------------------------------------------------------------------------------------------------
# Settings validated up front
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, allowed", [
    ("weight_decay", "nan", "expected a finite number >= 0"),
    ("max_grad_norm", "nan", "expected a finite number >= 0"),
    ("adam_beta1", "1.5", "expected a finite number in [0, 1)"),
    ("adam_epsilon", "-1", "expected a finite number > 0"),
    ("mlm_probability", "1.5", "expected a finite number in (0, 1)"),
    ("noise_density", "0", "expected a finite number in (0, 1)"),
    ("vocab_size", "5", "expected an integer >= 261"),
    ("learning_rate", "nan", "expected a finite number > 0"),
    ("learning_rate", "inf", "expected a finite number > 0"),
])
def test_pretraining_settings_are_validated_before_any_work(tmp_path, flag, value, allowed):
    message, seconds = exit_message(pretraining.main, ["--output_dir", tmp_path / "run", f"--{flag}", value])
    assert message.startswith(f"dslm-pretrain: error: --{flag}=") and f"is invalid: {allowed}" in message
    assert seconds < REFUSAL_SECONDS and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value, allowed", [
    ("max_length", "0", "expected an integer >= 1"),
    ("max_length", "-5", "expected an integer >= 1"),
    ("lora_r", "0", "expected an integer >= 1"),
    ("learning_rate", "nan", "expected a finite number >= 0"),
    ("weight_decay", "nan", "expected a finite number >= 0"),
    ("max_grad_norm", "nan", "expected a finite number >= 0"),
    ("adam_beta1", "1.5", "expected a finite number in [0, 1)"),
    ("adam_epsilon", "-1", "expected a finite number > 0"),
])
def test_finetuning_settings_are_validated_before_any_work(tmp_path, flag, value, allowed):
    from dslm_hf.finetuning import main

    arguments = ["--task", "causal-sft", "--model_name_or_path", tmp_path / "no-model", "--train_file",
                 tmp_path / "no-data.jsonl", "--output_dir", tmp_path / "out", f"--{flag}", value]
    message, seconds = exit_message(main, arguments)
    assert message.startswith(f"dslm-finetune: error: --{flag}=") and f"is invalid: {allowed}" in message
    assert seconds < REFUSAL_SECONDS and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# Settings that could not apply are refused; a diverged run is not saved as good
# ----------------------------------------------------------------------------------------------------------------
def test_resuming_with_another_learning_rate_is_refused(finished_run, tmp_path):
    """The checkpoint's optimizer state and scheduler fix the peak learning rate: a new --learning_rate would be
    logged and never used, so it is refused (the original value resumes)."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    with pytest.raises(UserError, match=r"was trained with learning_rate=0\.008 in parameter group 0, this command "
                                        r"asks for 0\.001 \(--learning_rate\): a resume keeps the checkpoint's "
                                        "optimizer settings and schedule, so the new value would not be applied"):
        run_in_process(run_dir, "--max_steps", 4, "--resume_from_checkpoint", "latest", "--learning_rate", 0.001)
    with pytest.raises(UserError, match=r"weight_decay=0\.01 .* asks for 0\.5 \(--weight_decay\)"):
        run_in_process(run_dir, "--max_steps", 4, "--resume_from_checkpoint", "latest", "--weight_decay", 0.5)
    assert run_in_process(run_dir, "--max_steps", 4, "--resume_from_checkpoint", "latest",
                          "--learning_rate", 0.008)["step"] == 4


def test_resuming_a_masked_lm_with_other_masking_is_refused(tmp_path):
    """The masking flags fix the training task: a resume with another --mlm_probability or --whole_word_mask is
    refused, naming the checkpoint's value; with the same flags it goes on."""
    run_dir = tmp_path / "run"
    common = ["--objective", "mlm", "--save_steps", 2, "--eval_steps", 100]
    run_in_process(run_dir, *common, "--max_steps", 2, "--whole_word_mask")
    with pytest.raises(UserError, match=r"was trained with --whole_word_mask True \(this command: False\): resuming "
                                        "with other masking would change the training task mid-run"):
        run_in_process(run_dir, *common, "--max_steps", 3, "--resume_from_checkpoint", "latest")
    with pytest.raises(UserError, match=r"--mlm_probability 0\.15 \(this command: 0\.3\)"):
        run_in_process(run_dir, *common, "--max_steps", 3, "--resume_from_checkpoint", "latest", "--whole_word_mask",
                       "--mlm_probability", 0.3)
    assert run_in_process(run_dir, *common, "--max_steps", 3, "--resume_from_checkpoint", "latest",
                          "--whole_word_mask")["step"] == 3


def test_a_run_whose_weights_turn_non_finite_writes_no_final_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                                capsys):
    original = pretraining.train_step

    def poisoned_after_step_3(run, batches):
        measured = original(run, batches)
        if run.step == 3:
            with torch.no_grad():
                next(run.model.parameters())[0, 0] = math.nan
        return measured

    monkeypatch.setattr(pretraining, "train_step", poisoned_after_step_3)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=r"training ended at step 4 with non-finite weights \(1 parameter tensors, "
                                        r"first: model\.embed_tokens\.weight\): final/ was not written and the newest "
                                        r"checkpoint, .*step_00000002, is kept"):
        run_in_process(run_dir, "--max_steps", 4, "--save_steps", 2, "--eval_steps", 100)
    assert [folder.name for folder in checkpoint_folders(run_dir)] == ["step_00000002"]
    assert not (run_dir / "final").exists()
    assert "step 4: 1 parameter tensors are not finite (first: model.embed_tokens.weight); no checkpoint written" \
           in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# dslm-publish: finite weights and a verified record by default
# ----------------------------------------------------------------------------------------------------------------
def test_publish_refuses_non_finite_weights(tiny_checkpoint, tmp_path):
    from dslm_hf.publishing import main

    folder = shutil.copytree(tiny_checkpoint["checkpoint"], tmp_path / "checkpoint")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.fc2.weight"][0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    message, _ = exit_message(main, [folder, "--repo-id", "org/model", "--dry-run", "--no-verify-eval",
                                     "--staging-dir", tmp_path / "stage"])
    assert f"the weights in {folder} are not finite: 1 tensors hold NaN or infinity (model.layers.1.mlp.fc2.weight " \
           "(3 of 4096 values))" in message


def test_publish_verifies_the_record_by_default_and_opts_out_only_on_request(tiny_checkpoint, tmp_path, capsys):
    from dslm_hf.publishing import main

    checkpoint = tiny_checkpoint["checkpoint"]  # its text lies next to it, not inside: not found by default
    base = [checkpoint, "--repo-id", "org/model", "--dry-run"]
    message, _ = exit_message(main, [*base, "--staging-dir", tmp_path / "a"])
    assert "the evaluation file's numbers are recomputed before publishing, but the text it measured (sample.txt, " \
           "sha256 " in message and "give it with --verify-eval TEXT_FILE, or pass --no-verify-eval" in message
    assert main([str(a) for a in [*base, "--staging-dir", tmp_path / "b", "--no-verify-eval"]]) == 0
    assert "--no-verify-eval: the evaluation file's numbers were published as recorded" in capsys.readouterr().out
    with_text = shutil.copytree(checkpoint, tmp_path / "with-text")
    shutil.copy(tiny_checkpoint["text"], with_text / "sample.txt")
    assert main([str(with_text), "--repo-id", "org/model", "--dry-run", "--staging-dir", str(tmp_path / "c")]) == 0
    assert "verified: the evaluation file's numbers were recomputed from the weights" in capsys.readouterr().out
