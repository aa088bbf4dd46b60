"""dslm-publish: the staged Hub repository, its model card, and every refusal (each before any upload)."""

import json
import math
import shutil

import huggingface_hub.constants
import pytest
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from dslm_hf.checkpointing import PICKLE_SUFFIXES
from dslm_hf.folder_checks import check_checkpoint, weights_digest
from dslm_hf.publishing import main, render_model_card, stage_repository
from publish_support import TRAINING_RECORD, build_tiny_checkpoint, write_text_sample, write_tiny_eval_file

REPO_ID = "dslm-test/tiny-decoder"
# A loopback port nothing listens on: an upload attempt fails at once, so a test can tell "refused before
# uploading" (the refusal message) from "tried to upload" (the upload error).
UNREACHABLE_ENDPOINT = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def decoder_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    text_file = write_text_sample(root / "sample.txt")
    checkpoint = build_tiny_checkpoint(root / "decoder", text_file)
    write_tiny_eval_file(checkpoint, text_file)
    shutil.copy(text_file, checkpoint / text_file.name)  # where dslm-publish finds the text to verify the record on
    return checkpoint


@pytest.fixture(scope="module")
def staged(decoder_checkpoint, tmp_path_factory):
    staging = tmp_path_factory.mktemp("staged") / "repo"
    main([str(decoder_checkpoint), "--repo-id", REPO_ID, "--dry-run", "--staging-dir", str(staging)])
    return staging


@pytest.fixture
def checkpoint_copy(decoder_checkpoint, tmp_path):
    return shutil.copytree(decoder_checkpoint, tmp_path / "checkpoint")


@pytest.fixture
def unreachable_hub(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", UNREACHABLE_ENDPOINT)
    # Online, whatever the user's HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE (read once, at import): the upload must be
    # tried, and fail, against the endpoint above.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def publish(checkpoint, tmp_path, *extra):
    """Run dslm-publish for real (not a dry run) against the unreachable Hub; return its exit message."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(checkpoint), "--repo-id", REPO_ID, "--token", "hf_test", "--staging-dir", str(tmp_path / "stage"), *extra])
    return str(exit_info.value)


# ----------------------------------------------------------------------------------------------------------------
# Staging
# ----------------------------------------------------------------------------------------------------------------
def test_dry_run_stages_the_hub_repository_files(staged, capsys):
    names = sorted(path.name for path in staged.iterdir())
    assert names == [
        "README.md", "config.json", "configuration_deepscalelm.py", "eval_results.json", "generation_config.json",
        "input_checks_deepscalelm.py", "model.safetensors", "modeling_deepscalelm.py", "recipe_deepscalelm.py",
        "tokenizer.json", "tokenizer_config.json",
    ]
    assert not [path for path in staged.rglob("*") if path.suffix in PICKLE_SUFFIXES]


def test_dry_run_lists_paths_and_sizes_without_uploading(decoder_checkpoint, tmp_path, capsys, unreachable_hub):
    staging = tmp_path / "s"
    assert main([str(decoder_checkpoint), "--repo-id", REPO_ID, "--dry-run", "--staging-dir", str(staging)]) == 0
    printed = capsys.readouterr().out
    size = (staging / "model.safetensors").stat().st_size
    assert f"{size:,}  model.safetensors" in printed
    assert "dry run: nothing uploaded" in printed and "11 files" in printed


def test_staged_config_maps_auto_classes_to_the_shipped_code(staged):
    auto_map = json.loads((staged / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_deepscalelm.DeepScaleLMConfig"
    assert auto_map["AutoModelForCausalLM"] == "modeling_deepscalelm.DeepScaleLMForCausalLM"


def test_staging_keeps_the_evaluated_weights_bit_identical(staged, decoder_checkpoint):
    original = load_file(decoder_checkpoint / "model.safetensors")
    republished = load_file(staged / "model.safetensors")
    assert original.keys() == republished.keys()
    assert all((original[name] == republished[name]).all() for name in original)
    assert weights_digest(staged) == json.loads((decoder_checkpoint / "eval_results.json").read_text())["weights_sha256"]


def test_card_metadata_parses_back_with_modelcard_load(staged, decoder_checkpoint):
    card = ModelCard.load(staged / "README.md")
    results = json.loads((decoder_checkpoint / "eval_results.json").read_text())
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert "deepscalelm" in card.data.tags
    assert card.data.datasets == ["karpathy/tiny_shakespeare"]
    reported = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert reported == {"loss": round(results["metrics"]["loss"], 4),
                        "perplexity": round(results["metrics"]["perplexity"], 4)}
    assert card.data.eval_results[0].dataset_type == "karpathy/tiny_shakespeare"


def test_card_text_has_numbers_config_usage_and_citation(staged, decoder_checkpoint):
    text = (staged / "README.md").read_text()
    results = json.loads((decoder_checkpoint / "eval_results.json").read_text())
    assert f"| held-out loss (per token, nats) | {results['metrics']['loss']:.4f} |" in text
    assert f"| held-out perplexity | {results['metrics']['perplexity']:.2f} |" in text
    assert f"| training tokens | {TRAINING_RECORD['tokens']:,} |" in text
    assert "| decoder layers | 2 |" in text and "| hidden size | 32 |" in text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert "Transformers Get Stable: An End-to-End Signal Propagation Theory for Language Models" in text
    assert "Kedia, Akhil and Zaidi, Mohd Abbas and Khyalia, Sushil and Jung, Jungho and Goka, Harshith and Lee, Haejun" in text
    assert "volume    = {235}" in text and "2403.09635" in text


def test_weights_larger_than_max_shard_size_are_sharded(decoder_checkpoint, tmp_path):
    staging = tmp_path / "s"
    main([str(decoder_checkpoint), "--repo-id", REPO_ID, "--dry-run", "--staging-dir", str(staging),
          "--max-shard-size", "50KB"])
    shards = sorted(path.name for path in staging.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (staging / "model.safetensors").exists()
    index = json.loads((staging / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    check_checkpoint(staging)
    assert weights_digest(staging) == weights_digest(decoder_checkpoint)


def test_masked_lm_card_is_a_fill_mask_pipeline(tmp_path):
    text_file = write_text_sample(tmp_path / "sample.txt")
    checkpoint = build_tiny_checkpoint(tmp_path / "encoder", text_file, masked=True)
    eval_file = write_tiny_eval_file(checkpoint, text_file)
    staging = stage_repository(checkpoint, tmp_path / "stage", "dslm-test/tiny-encoder", eval_file)
    card = ModelCard.load(staging / "README.md")
    assert card.data.pipeline_tag == "fill-mask"
    assert "AutoModelForMaskedLM" in json.loads((staging / "config.json").read_text())["auto_map"]
    assert not (staging / "generation_config.json").exists()


def test_card_numbers_are_the_evaluation_files(decoder_checkpoint):
    results = json.loads((decoder_checkpoint / "eval_results.json").read_text())
    results["metrics"]["loss"], results["metrics"]["perplexity"] = 1.25, math.exp(1.25)
    card = render_model_card(check_checkpoint(decoder_checkpoint), results, REPO_ID)
    assert {result.metric_type: result.metric_value for result in card.data.eval_results} == {
        "loss": 1.25, "perplexity": round(math.exp(1.25), 4)}


def test_upload_goes_to_the_configured_endpoint_and_fails_clearly(checkpoint_copy, tmp_path, unreachable_hub):
    message = publish(checkpoint_copy, tmp_path)
    assert message.startswith(f"dslm-publish: error: upload of {REPO_ID} to {UNREACHABLE_ENDPOINT} failed")
    assert "Connect" in message


# ----------------------------------------------------------------------------------------------------------------
# Refusals: each is a clear message, before anything is uploaded
# ----------------------------------------------------------------------------------------------------------------
def test_refuses_missing_weights(checkpoint_copy, tmp_path, unreachable_hub):
    tensors = load_file(checkpoint_copy / "model.safetensors")
    del tensors["model.layers.1.mlp.fc2.weight"]
    save_file(tensors, checkpoint_copy / "model.safetensors", metadata={"format": "pt"})
    message = publish(checkpoint_copy, tmp_path)
    assert "refusing to publish" in message
    assert "missing 1 tensors the config's architecture needs: model.layers.1.mlp.fc2.weight" in message


def test_refuses_extra_weights(checkpoint_copy, tmp_path, unreachable_hub):
    tensors = load_file(checkpoint_copy / "model.safetensors")
    tensors["model.layers.2.mlp.fc1.weight"] = tensors["model.layers.1.mlp.fc1.weight"].clone()
    save_file(tensors, checkpoint_copy / "model.safetensors", metadata={"format": "pt"})
    message = publish(checkpoint_copy, tmp_path)
    assert "1 tensors the architecture does not have: model.layers.2.mlp.fc1.weight" in message


def test_refuses_weights_shaped_for_another_config(checkpoint_copy, tmp_path, unreachable_hub):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["intermediate_size"] = 64
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    message = publish(checkpoint_copy, tmp_path)
    assert "tensors whose shape disagrees with config.json" in message
    assert "model.layers.0.mlp.fc1.weight [128, 32] (config expects [64, 32])" in message


def test_accepts_an_untied_copy_of_the_tied_lm_head_only_when_shapes_match(checkpoint_copy):
    tensors = load_file(checkpoint_copy / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, checkpoint_copy / "model.safetensors", metadata={"format": "pt"})
    check_checkpoint(checkpoint_copy)


def test_refuses_truncated_safetensors(checkpoint_copy, tmp_path, unreachable_hub):
    weights = checkpoint_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    message = publish(checkpoint_copy, tmp_path)
    assert f"{weights} is truncated or corrupt: its header describes {len(data)} bytes but the file has {len(data) - 100}" in message


def test_refuses_corrupt_safetensors_header(checkpoint_copy, tmp_path, unreachable_hub):
    weights = checkpoint_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8
    weights.write_bytes(bytes(data))
    message = publish(checkpoint_copy, tmp_path)
    assert f"{weights} is corrupt: its safetensors header is not valid JSON" in message


def test_refuses_a_file_too_short_for_a_header(checkpoint_copy, tmp_path, unreachable_hub):
    (checkpoint_copy / "model.safetensors").write_bytes(b"\x10\x00")
    assert "too short for a safetensors header" in publish(checkpoint_copy, tmp_path)


@pytest.mark.parametrize("pickle_path", ["pytorch_model.bin", "checkpoint-10/optimizer.pt", "rng_state.pth",
                                         "extra/state.pkl", "last.ckpt"])
def test_refuses_pickle_files_anywhere_in_the_folder(checkpoint_copy, tmp_path, unreachable_hub, pickle_path):
    (checkpoint_copy / pickle_path).parent.mkdir(parents=True, exist_ok=True)
    (checkpoint_copy / pickle_path).write_bytes(b"\x80\x04pickle")
    message = publish(checkpoint_copy, tmp_path)
    assert f"holds pickle files ({pickle_path})" in message
    assert not (tmp_path / "stage").exists()


def test_refuses_a_missing_eval_file(checkpoint_copy, tmp_path, unreachable_hub):
    (checkpoint_copy / "eval_results.json").unlink()
    assert "no evaluation file: the card's numbers must come from one" in publish(checkpoint_copy, tmp_path)
    assert "does not exist" in publish(checkpoint_copy, tmp_path, "--eval-file", str(tmp_path / "nowhere.json"))


def test_refuses_a_malformed_eval_file(checkpoint_copy, tmp_path, unreachable_hub):
    (checkpoint_copy / "eval_results.json").write_text('{"metrics": {"loss": 2.0,')
    assert "is not valid JSON" in publish(checkpoint_copy, tmp_path)


@pytest.mark.parametrize("metric", ["loss", "perplexity"])
def test_refuses_an_eval_file_without_a_reported_metric(checkpoint_copy, tmp_path, unreachable_hub, metric):
    eval_file = checkpoint_copy / "eval_results.json"
    results = json.loads(eval_file.read_text())
    del results["metrics"][metric]
    eval_file.write_text(json.dumps(results))
    assert f"has no metrics.{metric}: the card can only report measured numbers" in publish(checkpoint_copy, tmp_path)


def test_refuses_a_non_finite_or_inconsistent_metric(checkpoint_copy, tmp_path, unreachable_hub):
    eval_file = checkpoint_copy / "eval_results.json"
    results = json.loads(eval_file.read_text())
    results["metrics"]["perplexity"] = results["metrics"]["perplexity"] / 2
    eval_file.write_text(json.dumps(results))
    assert "is not exp(loss)" in publish(checkpoint_copy, tmp_path)
    results["metrics"]["loss"] = "NaN"
    eval_file.write_text(json.dumps(results))
    assert "metrics.loss='NaN' is not a finite number" in publish(checkpoint_copy, tmp_path)


def test_refuses_an_eval_file_without_the_training_record(checkpoint_copy, tmp_path, unreachable_hub):
    eval_file = checkpoint_copy / "eval_results.json"
    results = json.loads(eval_file.read_text())
    del results["training"]["wall_time_seconds"]
    eval_file.write_text(json.dumps(results))
    assert "training.wall_time_seconds is None" in publish(checkpoint_copy, tmp_path)


def test_refuses_an_eval_file_of_other_weights(checkpoint_copy, tmp_path, unreachable_hub):
    tensors = load_file(checkpoint_copy / "model.safetensors")
    tensors["model.norm.weight"] += 1.0
    save_file(tensors, checkpoint_copy / "model.safetensors", metadata={"format": "pt"})
    assert "measured other weights than those in" in publish(checkpoint_copy, tmp_path)


def test_refuses_a_checkpoint_without_tokenizer(checkpoint_copy, tmp_path, unreachable_hub):
    (checkpoint_copy / "tokenizer.json").unlink()
    (checkpoint_copy / "tokenizer_config.json").unlink()
    assert "has no tokenizer" in publish(checkpoint_copy, tmp_path)


def test_refuses_an_invalid_repo_id(checkpoint_copy, tmp_path):
    with pytest.raises(SystemExit, match="must be 'owner/name'"):
        main([str(checkpoint_copy), "--repo-id", "no-owner", "--dry-run", "--staging-dir", str(tmp_path / "s")])


def test_refuses_a_non_empty_staging_folder(checkpoint_copy, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "old.txt").write_text("x")
    with pytest.raises(SystemExit, match="is not empty"):
        main([str(checkpoint_copy), "--repo-id", REPO_ID, "--dry-run", "--staging-dir", str(tmp_path / "s")])
