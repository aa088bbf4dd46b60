"""scripts/build_checkpoint.py in smoke mode (tiny models, 2 steps, the shipped excerpt): the model and its
same-parameter baseline train on the same tokens with one tokenizer, and the staged card shows the model, the
baseline and the count baselines from one evaluation record."""

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from dslm_hf.cli import CommandExit
from shakespeare_data import EXCERPT

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_checkpoint.py"
SMOKE = ["--preset", "tiny", "--vocab_size", "300", "--block_size", "32", "--per_device_train_batch_size", "4",
         "--per_device_eval_batch_size", "4", "--max_steps", "2", "--eval_steps", "1000", "--max_eval_blocks", "8",
         "--save_steps", "0", "--report_to", "none", "--sample_max_new_tokens", "0", "--seed", "0"]


def load_script():
    spec = importlib.util.spec_from_file_location("build_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["clm", "seq2seq"])
def test_smoke_build_trains_a_same_parameter_baseline_and_cards_every_baseline(tmp_path, objective):
    staged, runs = tmp_path / "staged", tmp_path / "runs"
    load_script().main([str(staged), "--repo-id", "me/smoke", "--text-file", str(EXCERPT), "--run-dir", str(runs),
                        "--baseline-layers", "3", "--", "--objective", objective, *SMOKE])
    record = json.loads((staged / "eval_results.json").read_text())
    same_record = json.loads((runs / "same-parameters" / "eval_results.json").read_text())
    baselines = record["baselines"]
    model_config = json.loads((staged / "config.json").read_text())
    same_config = json.loads((runs / "same-parameters" / "final" / "config.json").read_text())
    assert (model_config["num_hidden_layers"], same_config["num_hidden_layers"]) == (2, 3)
    assert same_config["hidden_size"] == baselines["same_parameters"]["hidden_size"] < model_config["hidden_size"]
    # same tokenizer, same steps and tokens
    assert (runs / "model" / "final" / "tokenizer.json").read_bytes() == \
        (runs / "same-parameters" / "final" / "tokenizer.json").read_bytes()
    for field in ("optimizer_steps", "tokens"):
        assert same_record["training"][field] == record["training"][field] == {"optimizer_steps": 2,
                                                                               "tokens": 2 * 4 * 32}[field]
    assert baselines["same_parameters"]["loss"] == same_record["metrics"]["loss"]
    # the code that trained: this checkout's commit (the staged and run folders are outside it)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=SCRIPT.parents[1], capture_output=True, text=True).stdout.strip()
    assert record["training"]["git_commit"] == same_record["training"]["git_commit"] == (head or None)
    card = ModelCard.load(staged / "README.md").text
    assert f"| code (dslm_hf git commit) | {record['training']['git_commit']} |" in card
    assert f"{baselines['same_parameters']['parameters']:,} parameters; same data, tokens and steps" in card
    assert [point["step"] for point in record["training_curve"]] == [2]  # --eval_steps 1000: the final evaluation
    assert (f"| held-out loss during training (its evaluation blocks), step: loss | "
            f"2: {record['training_curve'][0]['eval_loss']:.3f} |") in card
    spread = record["gradient_spread"]
    assert all(1.0 <= value < 3.0 for value in spread["initialisation"].values())
    if objective == "clm":
        assert baselines["ngram"]["order"] == 4 and baselines["ngram"]["tokens"] == record["dataset"]["blocks"] * 31
        assert baselines["ngram"]["loss"] < baselines["unigram"]["loss"] < record["metrics"]["loss"]  # 2 steps
        assert f"| 4-gram, interpolated Kneser-Ney, fitted on the training split: loss / perplexity | " \
               f"{baselines['ngram']['loss']:.4f} / {baselines['ngram']['perplexity']:.2f} |" in card
    else:
        spans = baselines["spans"]
        assert spans["tokens"] == record["dataset"]["blocks"] * 5  # round(32 * 0.15) = 5 hidden tokens per block
        assert f"top-1 accuracy on {spans['tokens']:,} hidden span tokens" in card


def test_too_shallow_a_baseline_is_a_one_line_user_error(tmp_path, capsys):
    # The depth check runs after the model's run: 2 steps of the tiny preset, then the refused 1-layer shape.
    with pytest.raises(CommandExit):
        load_script().main([str(tmp_path / "staged"), "--repo-id", "me/smoke", "--text-file", str(EXCERPT),
                            "--run-dir", str(tmp_path / "runs"), "--baseline-layers", "1", "--", "--objective", "clm",
                            *SMOKE])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("build_checkpoint.py: error: --baseline-layers 1: DeepScaleLMConfig.residual_k=2.0")


def test_help_lists_the_baseline_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script().main(["--help"])
    assert exit_info.value.code == 0
    assert "--baseline-layers" in capsys.readouterr().out


def test_missing_pretrain_arguments_is_a_one_line_user_error(tmp_path, capsys):
    with pytest.raises(CommandExit):
        load_script().main([str(tmp_path / "staged"), "--repo-id", "me/x", "--text-file", str(EXCERPT),
                            "--run-dir", str(tmp_path / "runs")])
    assert capsys.readouterr().err == "build_checkpoint.py: error: give the dslm-pretrain arguments after --\n"


@pytest.mark.parametrize("flag", ["--max_train_minutes", "--max-train-minutes"])
def test_time_limit_is_refused_so_model_and_twin_share_steps_and_schedule(tmp_path, capsys, flag):
    # A time limit that fires would cut the model's schedule mid-way while the twin decays fully over the same steps.
    with pytest.raises(CommandExit):
        load_script().main([str(tmp_path / "staged"), "--repo-id", "me/smoke", "--text-file", str(EXCERPT),
                            "--run-dir", str(tmp_path / "runs"), "--", "--objective", "clm", *SMOKE, flag, "25"])
    assert capsys.readouterr().err == (
        "build_checkpoint.py: error: --max_train_minutes 25: a time limit that fires cuts the model's learning-rate "
        "schedule mid-way, while its same-parameter twin trained for the same steps decays fully; size both runs by "
        "--max_steps instead (time a few steps first to choose it)\n")
    assert not (tmp_path / "runs").exists()  # refused before anything trained


@pytest.mark.slow
def test_smoke_build_stages_the_training_signal_and_usefulness_figures(tmp_path):
    staged, runs = tmp_path / "staged", tmp_path / "runs"
    smoke = [arg for arg in SMOKE]
    smoke[smoke.index("--max_steps") + 1], smoke[smoke.index("--save_steps") + 1] = "4", "2"
    smoke[smoke.index("--eval_steps") + 1] = "2"
    load_script().main([str(staged), "--repo-id", "me/smoke", "--text-file", str(EXCERPT), "--run-dir", str(runs),
                        "--baseline-layers", "3", "--usefulness_blocks", "3", "--", "--objective", "clm",
                        "--signal_every", "2", *smoke])
    record = json.loads((staged / "eval_results.json").read_text())
    assert sorted(record["figures"]) == ["layer_signals.png", "training_curve.png", "usefulness.png"]
    for name in ("layer_signals.png", "training_curve.png", "usefulness.png", "usefulness.json"):
        assert (staged / name).read_bytes()[:4] == (b"\x89PNG" if name.endswith(".png") else b'{"bl')
    # the kept checkpoints are steps 2 and 4; step 4 holds the final weights, which are measured once
    usefulness = json.loads((staged / "usefulness.json").read_text())
    assert usefulness["blocks"] == 3
    assert [m["label"] for m in usefulness["measurements"]] == [m["label"] for m in record["layer_usefulness"]] \
        == ["step 2", "final"]
    final = usefulness["measurements"][-1]
    assert len(final["layers"]) == 2 and final["tokens"] == 3 * 31
    assert abs(sum(layer["gradient_share"] for layer in final["layers"]) - 1) < 1e-6
    signals = record["layer_signals"]
    # measured on the training batch of steps 1 and 3 (the first step of each --signal_every window)
    assert signals["measurements"] == 2 and (signals["first"]["step"], signals["last"]["step"]) == (1, 3)
    card = ModelCard.load(staged / "README.md").text
    for name in record["figures"]:
        assert f"![{name}]({name})" in card
    assert f"| per-layer usefulness (final) | {record['layer_usefulness'][-1]['summary']} |" in card
    assert (f"at steps 1 -> 3 | {signals['first']['grad_first_last']:.2f} -> "
            f"{signals['last']['grad_first_last']:.2f}; ") in card
    # publishing the staged folder again carries the figures; a record naming a missing figure is refused first
    from dslm_hf.publishing import PublishRefusal, stage_repository
    again = stage_repository(staged, tmp_path / "again", "me/smoke", staged / "eval_results.json")
    assert (again / "usefulness.png").read_bytes() == (staged / "usefulness.png").read_bytes()
    (staged / "layer_signals.png").unlink()
    with pytest.raises(PublishRefusal, match="the card shows layer_signals.png, which .* lacks"):
        stage_repository(staged, tmp_path / "refused", "me/smoke", staged / "eval_results.json")
    assert not (tmp_path / "refused").exists()


def test_usefulness_of_a_masked_lm_is_refused_before_training(tmp_path, capsys):
    with pytest.raises(CommandExit):
        load_script().main([str(tmp_path / "staged"), "--repo-id", "me/smoke", "--text-file", str(EXCERPT),
                            "--run-dir", str(tmp_path / "runs"), "--usefulness_blocks", "2", "--", "--objective", "mlm",
                            *SMOKE])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("build_checkpoint.py: error: --usefulness_blocks 2: the per-layer usefulness is measured")
    assert not (tmp_path / "runs").exists()


def test_a_rotary_models_twin_has_an_even_head_size():
    """Rotary positions need an even head size: the twin's width is searched in steps of two heads' worth."""
    from dslm_hf import DeepScaleLMConfig
    config = DeepScaleLMConfig(vocab_size=2048, hidden_size=64, num_hidden_layers=48, num_attention_heads=4,
                               intermediate_size=256, position_embedding_type="rotary", is_decoder=False,
                               architectures=["DeepScaleLMForMaskedLM"])
    overrides, parameters = load_script().same_parameter_overrides(config, 4)
    width = int(dict(item.split("=") for item in overrides.split(","))["hidden_size"])
    assert (width // 4) % 2 == 0
    DeepScaleLMConfig.from_dict(config.to_dict() | {"hidden_size": width, "num_hidden_layers": 4,
                                                     "intermediate_size": 4 * width})  # accepted


@pytest.mark.slow
def test_reuse_model_run_trains_only_the_twin_and_refuses_another_command(tmp_path, capsys):
    runs = tmp_path / "runs"
    common = ["--repo-id", "me/smoke", "--text-file", str(EXCERPT), "--run-dir", str(runs), "--baseline-layers", "3"]
    load_script().main([str(tmp_path / "first"), *common, "--", "--objective", "clm", *SMOKE])
    weights = (runs / "model" / "final" / "model.safetensors").read_bytes()
    record = json.loads((runs / "model" / "build_training.json").read_text())
    shutil.rmtree(runs / "same-parameters")
    load_script().main([str(tmp_path / "second"), *common, "--reuse_model_run", "--", "--objective", "clm", *SMOKE])
    assert (runs / "model" / "final" / "model.safetensors").read_bytes() == weights  # not retrained
    assert json.loads((tmp_path / "second" / "eval_results.json").read_text())["training"] == record
    assert (runs / "same-parameters" / "final" / "model.safetensors").is_file()
    with pytest.raises(CommandExit):
        load_script().main([str(tmp_path / "third"), *common, "--reuse_model_run", "--", "--objective", "clm",
                            *SMOKE, "--seed", "1"])
    assert "was trained by another command" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "third").exists()
