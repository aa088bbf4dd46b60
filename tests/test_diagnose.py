"""dslm-diagnose: reports and plots for DeepScaleLM and other transformers, the depth plan, and clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, GPT2Config, LlamaConfig, T5Config

from dslm_hf import DeepScaleLMConfig, DeepScaleLMForCausalLM
from dslm_hf.diagnostics import diagnose, find_layer_stacks, load_model, main, plan_depths, zipf_token_ids
from tiny_models import tiny_config

REPO = Path(__file__).resolve().parents[1]


def tiny_dslm_config(**overrides) -> DeepScaleLMConfig:
    return tiny_config(**(dict(vocab_size=300, num_hidden_layers=3, max_position_embeddings=32) | overrides))


def run_cli(*args) -> dict:
    assert main([str(a) for a in args] + ["--no-progress"]) == 0
    output_dir = Path(args[list(args).index("--output-dir") + 1])
    return json.loads((output_dir / "report.json").read_text())


def test_deepscalelm_config_report_has_measurements_and_predictions(tmp_path):
    tiny_dslm_config().save_pretrained(tmp_path / "model")
    report = run_cli(tmp_path / "model" / "config.json", "--output-dir", tmp_path / "out", "--sequence-length", 16)
    assert report["theory"].startswith("covered")
    (stack,) = report["stacks"]
    assert stack["name"] == "model.layers" and len(stack["layers"]) == 3
    for layer in stack["layers"]:
        measured, predicted = layer["measured"], layer["predicted"]
        assert measured["stream_variance"] == pytest.approx(predicted["stream_variance"], rel=0.5)
        assert 0.0 < measured["stream_correlation"] < 1.0
        assert measured["weight_gradient_norm"] > 0 and measured["gradient_variance"] > 0
        assert 0.0 < measured["attention_entropy"] <= torch.log(torch.tensor(16.0)).item()
        assert measured["attention_logit_variance"] > 0
    assert stack["layers"][-1]["measured"]["relative_weight_gradient_norm"] == pytest.approx(1.0)
    assert (tmp_path / "out" / "signal_propagation.png").stat().st_size > 10_000


def test_gpt2_config_is_measured_and_marked_not_covered(tmp_path):
    GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=300, n_positions=32).save_pretrained(tmp_path / "gpt2")
    report = run_cli(tmp_path / "gpt2" / "config.json", "--output-dir", tmp_path / "out", "--sequence-length", 16)
    assert report["theory"].startswith("not covered") and "gpt2" in report["theory"]
    (stack,) = report["stacks"]
    assert stack["name"] == "transformer.h" and len(stack["layers"]) == 3
    assert all(layer["predicted"] is None for layer in stack["layers"])
    assert all(layer["measured"]["attention_entropy"] is not None for layer in stack["layers"])
    assert (tmp_path / "out" / "signal_propagation.png").exists()


@pytest.mark.parametrize(
    "config, expected_stacks",
    [
        (BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=300),
         ["bert.encoder.layer"]),
        (LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                     intermediate_size=64, vocab_size=300), ["model.layers"]),
        (T5Config(num_layers=2, num_decoder_layers=2, d_model=32, d_kv=16, num_heads=2, d_ff=64, vocab_size=300),
         ["encoder.block", "decoder.block"]),
    ],
    ids=["bert", "llama", "t5"],
)
def test_layer_stacks_of_other_architectures_are_found_and_measured(tmp_path, config, expected_stacks):
    config.save_pretrained(tmp_path / "model")
    model = load_model(str(tmp_path / "model"))
    assert [name for name, _ in find_layer_stacks(model)] == expected_stacks
    report = diagnose(model, zipf_token_ids(300, 2, 16), tmp_path / "out", progress=False)
    for stack in report["stacks"]:
        assert all(layer["measured"]["weight_gradient_norm"] > 0 for layer in stack["layers"])
        assert all(layer["measured"]["stream_variance"] > 0 for layer in stack["layers"])


def test_encoder_decoder_deepscalelm_gets_predictions_for_both_stacks(tmp_path):
    config = tiny_dslm_config(is_encoder_decoder=True, decoder_layers=2, is_decoder=False)
    config.save_pretrained(tmp_path / "seq2seq")
    report = run_cli(tmp_path / "seq2seq", "--output-dir", tmp_path / "out", "--sequence-length", 16)
    names = [stack["name"] for stack in report["stacks"]]
    assert names == ["model.encoder.layers", "model.decoder.layers"]
    assert [len(stack["layers"]) for stack in report["stacks"]] == [3, 2]
    assert all(layer["predicted"] is not None for stack in report["stacks"] for layer in stack["layers"])


def test_checkpoint_weights_are_loaded_not_reinitialised(tmp_path):
    """Diagnosing a saved checkpoint measures exactly what diagnosing the in-memory model measures."""
    torch.manual_seed(3)
    model = DeepScaleLMForCausalLM(tiny_dslm_config(init_scheme="xavier"))
    model.save_pretrained(tmp_path / "checkpoint")
    ids = zipf_token_ids(300, 2, 16)
    in_memory = diagnose(model, ids, progress=False)
    reloaded = diagnose(load_model(str(tmp_path / "checkpoint")), ids, progress=False)
    for a, b in zip(in_memory["stacks"][0]["layers"], reloaded["stacks"][0]["layers"]):
        assert a["measured"]["stream_variance"] == pytest.approx(b["measured"]["stream_variance"], rel=1e-5)
        assert a["measured"]["weight_gradient_norm"] == pytest.approx(b["measured"]["weight_gradient_norm"], rel=1e-4)


def test_text_input_with_byte_tokens(tmp_path):
    tiny_dslm_config(vocab_size=256).save_pretrained(tmp_path / "bytes")
    text = "To be, or not to be, that is the question: " * 4
    report = run_cli(tmp_path / "bytes", "--output-dir", tmp_path / "out", "--text", text, "--tokenizer", "bytes",
                     "--batch-size", 2, "--sequence-length", 32)
    assert report["input"]["batch_size"] == 2 and report["input"]["sequence_length"] == 32
    # Real text repeats characters far more than 1/256: the same-token probability shows it.
    assert report["input"]["same_token_probability"] > 0.04


def test_rotary_deepscalelm_is_measured_but_not_covered(tmp_path):
    tiny_dslm_config(position_embedding_type="rotary").save_pretrained(tmp_path / "rotary")
    report = run_cli(tmp_path / "rotary", "--output-dir", tmp_path / "out", "--sequence-length", 16)
    assert report["theory"].startswith("not covered") and "rotary" in report["theory"]
    assert all(layer["predicted"] is None for layer in report["stacks"][0]["layers"])


def test_depth_plan_contrasts_vanilla_growth_with_flat_deepscalelm(tmp_path):
    assert main(["--plan", "--hidden-size", "64", "--depths", "12,96", "--sequence-length", "32",
                 "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "depth_plan.png").stat().st_size > 10_000
    plan = json.loads((tmp_path / "depth_plan.json").read_text())
    vanilla, dslm = plan["schemes"]["xavier"]["96"], plan["schemes"]["deepscalelm"]["96"]
    assert vanilla["stream_variance"][-1] > 20 * vanilla["stream_variance"][0]
    assert vanilla["relative_weight_gradient_norm"][0] > 5
    assert all(0.8 < v < 1.2 for v in dslm["stream_variance"])
    assert 0.8 < dslm["relative_weight_gradient_norm"][0] < 1.25


def test_plan_api_reaches_a_thousand_layers_quickly():
    plan = plan_depths(256, [1000], sequence_length=128)
    assert len(plan["schemes"]["deepscalelm"][1000]["stream_variance"]) == 1000


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/folder/config.json"], "cannot load a model config"),
        (["{model}", "--sequence-length", "999"], "exceeds the model's 32 positions"),
        (["{model}", "--text", "too short", "--tokenizer", "bytes"], "fewer than batch_size x sequence_length"),
        ([], "give a MODEL"),
    ],
    ids=["missing-config", "too-long", "short-text", "no-model"],
)
def test_bad_input_exits_2_with_a_one_line_message(tmp_path, capsys, args, message):
    tiny_dslm_config(vocab_size=256).save_pretrained(tmp_path / "model")
    args = [a.format(model=tmp_path / "model") for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--output-dir", str(tmp_path / "out"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_unknown_model_id_offline_exits_2_without_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    result = subprocess.run(
        [sys.executable, "-m", "dslm_hf.diagnostics", "no-such-org/no-such-model", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "dslm-diagnose: error: cannot load a model config from 'no-such-org/no-such-model'" in result.stderr
    assert "HF_HUB_OFFLINE" in result.stderr


def test_model_id_is_served_from_the_local_cache_offline(tmp_path):
    """A repo id resolves through a pre-filled Hugging Face cache with HF_HUB_OFFLINE=1 (no network)."""
    snapshot = tmp_path / "hub" / "models--acme--tiny-dslm" / "snapshots" / ("0" * 40)
    tiny_dslm_config().save_pretrained(snapshot)
    (tmp_path / "hub" / "models--acme--tiny-dslm" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-dslm" / "refs" / "main").write_text("0" * 40)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    result = subprocess.run(
        [sys.executable, "-m", "dslm_hf.diagnostics", "acme/tiny-dslm", "--random-init", "--sequence-length", "16",
         "--no-progress", "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"] == "acme/tiny-dslm" and report["theory"].startswith("covered")
