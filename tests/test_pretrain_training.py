"""Pretraining loop, in process: each objective learns, gradient accumulation is token-exact, non-finite steps are
skipped and counted, the final folder loads, bad arguments are clear errors."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dslm_hf import pretraining, training_modes
from dslm_hf.checkpointing import verify_checkpoint
from dslm_hf.cli import UserError
from dslm_hf.run_metrics import read_metrics
from pretrain_helpers import NO_DROPOUT, eval_losses, run_in_process, train_losses


@pytest.mark.parametrize("objective", ["clm", "mlm", "seq2seq"])
def test_objective_trains_and_held_out_loss_drops(tmp_path, objective, capsys):
    metrics = run_in_process(tmp_path, "--objective", objective, "--max_steps", 30, "--eval_steps", 15,
                             "--learning_rate", 3e-3, "--per_device_train_batch_size", 8, "--save_steps", 0,
                             "--sample_max_new_tokens", 4)
    losses = train_losses(tmp_path)
    evals = eval_losses(tmp_path)
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses.values())
    assert sum(list(losses.values())[-5:]) / 5 < losses[1] - 0.3
    assert evals[30] < evals[15] < math.log(512) + 0.5
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    sample = capsys.readouterr().out.split("=== generated sample")[1]
    assert {"clm": "", "mlm": "filled: ", "seq2seq": "spans: "}[objective] in sample


def test_whole_word_masking_changes_the_training_masks_not_the_held_out_ones(tmp_path):
    """Same seed, same initial weights, one step at learning rate 0 (its warmup step): the held-out loss (token
    masks, seeded) is the same with and without --whole_word_mask, the training loss (word masks) is not."""
    common = ["--objective", "mlm", "--max_steps", 1, "--eval_steps", 100, "--learning_rate", 1e-9, "--save_steps", 0,
              "--per_device_train_batch_size", 8, *NO_DROPOUT]
    tokens = run_in_process(tmp_path / "tokens", *common)
    words = run_in_process(tmp_path / "words", *common, "--whole_word_mask")
    assert words["eval_loss"] == pytest.approx(tokens["eval_loss"], abs=1e-6)
    assert train_losses(tmp_path / "words")[1] != pytest.approx(train_losses(tmp_path / "tokens")[1], abs=1e-3)


def test_final_folder_loads_with_auto_class_and_prints_a_sample(tmp_path, capsys):
    run_in_process(tmp_path, "--max_steps", 3, "--save_steps", 0, "--sample_max_new_tokens", 8)
    final = tmp_path / "final"
    names = {p.name for p in final.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "modeling_deepscalelm.py", "configuration_deepscalelm.py"} <= names
    assert "README.md" not in names  # the card comes from dslm-publish, with numbers measured on these weights
    config = json.loads((final / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("DeepScaleLMForCausalLM")
    assert config["init_sequence_length"] == 32 and 0.0 < config["embedding_correlation"] < 0.1
    model = AutoModelForCausalLM.from_pretrained(final)
    saved = load_file(final / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert len(AutoTokenizer.from_pretrained(final)) == config["vocab_size"] == 512
    assert "=== generated sample" in capsys.readouterr().out
    for folder in (tmp_path / "tokenizer", final):  # truncation=True stops at the position table, not at 1e30
        saved = json.loads((folder / "tokenizer_config.json").read_text())
        assert saved["model_max_length"] == config["max_position_embeddings"] == 128
        assert not {"is_local", "local_files_only"} & set(saved)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    common = ["--max_steps", 2, "--save_steps", 0, "--eval_steps", 100, "--learning_rate", 5e-4, *NO_DROPOUT]
    run_in_process(tmp_path / "accumulated", *common, "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2)
    run_in_process(tmp_path / "big", *common, "--per_device_train_batch_size", 8, "--gradient_accumulation_steps", 1)
    records = {name: [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
               for name in ("accumulated", "big")}
    for accumulated, big in zip(records["accumulated"], records["big"]):
        assert accumulated["loss"] == pytest.approx(big["loss"], rel=1e-6)
        assert accumulated["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-5)
    first, second = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("accumulated", "big"))
    # Float summation order differs; at lr 5e-4 Adam turns relative gradient noise of ~1e-7 into ~1e-6 weight
    # differences (the bound scales with the learning rate).
    assert max((first[k] - second[k]).abs().max().item() for k in first) < 1e-5


def test_nonfinite_loss_skips_the_step_and_is_counted(tmp_path, monkeypatch):
    real_compute_loss, calls = training_modes.compute_loss, []

    def loss_with_faults(model, batch, num_items_in_batch):
        calls.append(None)
        loss = real_compute_loss(model, batch, num_items_in_batch)
        return loss * float("nan") if len(calls) in (2, 3) else loss

    monkeypatch.setattr(training_modes, "compute_loss", loss_with_faults)
    metrics = run_in_process(tmp_path, "--max_steps", 5, "--save_steps", 0, "--max_nonfinite_steps", 2)
    assert metrics["nonfinite_steps"] == 2 and metrics["step"] == 5
    assert sorted(train_losses(tmp_path)) == [1, 4, 5]  # steps 2 and 3 logged no loss
    weights = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_too_many_nonfinite_steps_stop_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(training_modes, "compute_loss", lambda model, batch, num_items_in_batch: torch.tensor(float("inf")))
    with pytest.raises(UserError, match="stopping at step 3: 3 steps had a non-finite loss.*--max_nonfinite_steps=2"):
        run_in_process(tmp_path, "--max_steps", 10, "--save_steps", 0, "--max_nonfinite_steps", 2)


@pytest.mark.parametrize("argv, message", [
    (["--objective", "gpt"], "--objective='gpt' is invalid"),
    (["--preset", "huge"], "--preset='huge' is invalid: expected one of"),
    (["--preset", "tiny", "--config_name", "x.json"], "either --preset or --config_name"),
    (["--mixed_precision", "fp8"], "--mixed_precision='fp8' is invalid"),
    (["--block_size", "0"], "--block_size=0 is invalid"),
    (["--num_threads", "0"], "--num_threads=0 is invalid"),
    (["--whole_word_mask"], "--whole_word_mask=True is invalid: whole-word masking is a masked-LM objective"),
    (["--max_steps", "ten"], "invalid int value: 'ten'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_invalid_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretraining.main(["--output_dir", "unused", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_block_longer_than_the_positions_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--block_size=256 exceeds the model's max_position_embeddings=128"):
        run_in_process(tmp_path, "--block_size", 256, "--max_steps", 1)


def test_config_overrides_parse_json_values():
    assert pretraining.parse_config_overrides("num_hidden_layers=4,hidden_dropout_prob=0.0,hidden_act=gelu") == {
        "num_hidden_layers": 4, "hidden_dropout_prob": 0.0, "hidden_act": "gelu"}
    with pytest.raises(ValueError, match="'layers' is not key=value"):
        pretraining.parse_config_overrides("layers")


def test_bf16_mixed_precision_runs_under_autocast(tmp_path):
    # Without the width rule: under the default muP rule at this 32-wide preset the step-1 loss of the two runs came
    # out bit-identical although their logits differ (not yet understood; noted for the next session).
    standard_width = ["--config_overrides", "hidden_dropout_prob=0,attention_probs_dropout_prob=0,width_parameterization=standard"]
    run_in_process(tmp_path / "fp32", "--max_steps", 1, "--save_steps", 0, *standard_width)
    run_in_process(tmp_path / "bf16", "--max_steps", 1, "--save_steps", 0, "--mixed_precision", "bf16", *standard_width)
    fp32, bf16 = train_losses(tmp_path / "fp32")[1], train_losses(tmp_path / "bf16")[1]
    assert fp32 != bf16 and bf16 == pytest.approx(fp32, abs=0.1)  # bf16 matmuls round differently, same model


def test_existing_tokenizer_is_used_and_saved_with_the_model(tmp_path):
    from dslm_hf import data

    corpus = data.load_corpus("default", default_corpus_megabytes=0.1)
    data.train_byte_level_bpe(corpus["train"]["text"], 300).save_pretrained(tmp_path / "my_tokenizer")
    run_in_process(tmp_path / "run", "--tokenizer_name", tmp_path / "my_tokenizer", "--max_steps", 1, "--save_steps", 0)
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["vocab_size"] == 300 and config["eos_token_id"] == 2 and config["pad_token_id"] == 0
    assert len(AutoTokenizer.from_pretrained(tmp_path / "run" / "final")) == 300


def test_main_command_preset_deep_48_trains_evaluates_and_saves_a_loadable_model(tmp_path, capsys):
    """The README command on a small budget: the 48-layer preset, a few steps, evaluation, save, sample."""
    metrics = run_in_process(tmp_path, "--preset", "deep-48", "--max_steps", 3, "--per_device_train_batch_size", 4,
                             "--learning_rate", 1e-3, "--save_steps", 3, "--sample_max_new_tokens", 4)
    assert metrics["step"] == 3 and math.isfinite(metrics["eval_loss"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert model.config.num_hidden_layers == 48 and len(model.model.layers) == 48
    assert verify_checkpoint(tmp_path / "checkpoints" / "step_00000003") == 3
    assert "=== generated sample" in capsys.readouterr().out


def test_time_limit_stops_early_then_evaluates_and_saves(tmp_path, capsys):
    metrics = run_in_process(tmp_path, "--max_steps", 1000, "--max_train_minutes", 1e-4, "--save_steps", 500)
    assert metrics["step"] == 1 and math.isfinite(metrics["eval_loss"])
    assert verify_checkpoint(tmp_path / "checkpoints" / "step_00000001") == 1
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert "--max_train_minutes=0.0001 reached at step 1: stopping" in capsys.readouterr().out


def test_tensorboard_tracker_writes_events_beside_the_jsonl(tmp_path):
    run_in_process(tmp_path, "--max_steps", 2, "--save_steps", 0, "--report_to", "tensorboard")
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert "config" in records[0] and [r["step"] for r in records if "loss" in r] == [1, 2]


def test_learning_rate_is_picked_from_depth_and_logged_when_not_given(tmp_path, capsys):
    run_in_process(tmp_path, "--max_steps", 1, "--save_steps", 0, "--eval_steps", 100, "--sample_max_new_tokens", 0)
    log = capsys.readouterr().out
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["depth_parameterization"] == "depth_mup"  # dslm-pretrain's default rule for Pre-LN DeepScaleLM
    layers, base = config["num_hidden_layers"], config["depth_base_layers"]
    inside = 8e-3 * (layers / base) ** -0.5  # depth-muP: layer learning rate * (L / L0)^-1/2
    assert "learning rate: base 0.008 (embeddings, final norm, head)" in log
    assert f"{inside:.3g} inside the {layers} layers (depth_mup rule from {base} layers)" in log


def test_cpu_thread_count_is_set_recorded_and_said(tmp_path, capsys):
    try:
        run_in_process(tmp_path, "--max_steps", 1, "--save_steps", 0, "--eval_steps", 100, "--num_threads", 2)
    finally:
        torch.set_num_threads(1)  # the suite's one thread per process (conftest.py), for the tests after this one
    log = capsys.readouterr().out
    assert f"CPU threads: 2 per process x 1 process(es) on {os.cpu_count()} cores (--num_threads)" in log
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["config"]["num_threads"] == 2
    run_in_process(tmp_path / "default", "--max_steps", 1, "--save_steps", 0, "--eval_steps", 100)
    assert "CPU threads: 1 per process x 1 process(es)" in capsys.readouterr().out  # the tests' one thread
    cores = os.cpu_count()
    run_in_process(tmp_path / "over", "--max_steps", 1, "--save_steps", 0, "--eval_steps", 100, "--num_threads", cores + 1)
    assert (f"CPU threads: {cores + 1} per process x 1 process(es) on {cores} cores (--num_threads); {cores + 1} "
            f"threads on {cores} cores: oversubscribed") in capsys.readouterr().out
    assert torch.get_num_threads() == 1  # train() gives the calling process its thread count back


def test_layer_signals_are_logged_every_n_steps(tmp_path):
    run_in_process(tmp_path, "--max_steps", 4, "--save_steps", 0, "--eval_steps", 100, "--signal_every", 2,
                   "--sample_max_new_tokens", 0)
    rows = [json.loads(line) for line in (tmp_path / "layer_signals.jsonl").read_text().splitlines()]
    layers = json.loads((tmp_path / "final" / "config.json").read_text())["num_hidden_layers"]
    assert [row["step"] for row in rows] == [1, 3]  # the optimizer steps whose gradients were measured
    assert all(len(row["grad_norm"]) == layers and row["grad_spread"] >= 1.0 for row in rows)
    logged = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "signals/grad_first_last" in r]
    assert [r["step"] for r in logged] == [1, 3]


def test_causal_run_ends_with_its_held_out_loss_next_to_a_count_baseline(tmp_path, capsys):
    metrics = run_in_process(tmp_path, "--max_steps", 2, "--save_steps", 0, "--eval_steps", 100,
                             "--sample_max_new_tokens", 0)
    log = capsys.readouterr().out
    assert f"held-out loss {metrics['eval_loss']:.4f}" in log
    assert f"Kneser-Ney 4-gram fitted on the training blocks scores {metrics['baseline_eval_loss']:.4f}" in log
    # a 512-token byte-level BPE: the smoothed 4-gram is far below the uniform ln 512 = 6.24 nats
    assert 0 < metrics["baseline_eval_loss"] < math.log(512)
