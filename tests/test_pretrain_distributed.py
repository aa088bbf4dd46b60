"""Multi-process pretraining on CPU: two gloo ranks (DDP through accelerate, and FSDP2 fully_shard) reproduce one
process with the same global batch, and the sharded run exports a full model that loads with from_pretrained.

Tolerance: float summation order differs between 1 and 2 ranks (gradient all-reduce), so losses and gradient norms
agree to 1e-5 relative, and weights to 1e-4 absolute after 4 AdamW steps at lr 5e-4: Adam divides by sqrt(v), so
parameters with near-zero gradients turn rounding noise into up to ~10% of one step (5e-4).
"""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dslm_hf import pretraining
from dslm_hf.run_metrics import read_metrics
from pretrain_helpers import REPO, NO_DROPOUT, eval_losses, run_in_process, run_launched, train_losses

RUN = ["--max_steps", 4, "--eval_steps", 2, "--save_steps", 0, *NO_DROPOUT]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one_process")
    run_in_process(run_dir, *RUN, "--per_device_train_batch_size", 8)
    return run_dir


def assert_same_training(run_dir, reference):
    losses, expected = train_losses(run_dir), train_losses(reference)
    assert sorted(losses) == [1, 2, 3, 4]
    for step in expected:
        assert losses[step] == pytest.approx(expected[step], rel=1e-5)
    norms, expected_norms = ({r["step"]: r["grad_norm"] for r in read_metrics(d / "metrics.jsonl")
                              if "grad_norm" in r} for d in (run_dir, reference))
    assert norms == pytest.approx(expected_norms, rel=1e-5)
    for step, loss in eval_losses(reference).items():
        assert eval_losses(run_dir)[step] == pytest.approx(loss, rel=1e-5)
    weights, expected_weights = (load_file(d / "final" / "model.safetensors") for d in (run_dir, reference))
    assert weights.keys() == expected_weights.keys()
    assert max((weights[k] - expected_weights[k]).abs().max().item() for k in weights) < 1e-4


@pytest.mark.slow
def test_two_gloo_ranks_train_identical_replicas_like_one_process(tmp_path, one_process):
    run_launched(tmp_path, *RUN, "--per_device_train_batch_size", 4, processes=2)
    assert_same_training(tmp_path, one_process)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["replica_spread"] for r in records if "replica_spread" in r] == [0.0]
    assert records[0]["config"]["per_device_train_batch_size"] == 4


@pytest.mark.slow
def test_fully_shard_over_two_gloo_ranks_matches_one_process_and_exports_a_loadable_model(tmp_path, one_process):
    run_launched(tmp_path, *RUN, "--per_device_train_batch_size", 4, "--fully_shard", processes=2)
    assert_same_training(tmp_path, one_process)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    saved = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def test_fully_shard_rejects_periodic_checkpoints():
    with pytest.raises(SystemExit):
        pretraining.parse_arguments(["--output_dir", "unused", "--fully_shard", "--save_steps", "10"])


def test_shardable_layers_are_the_deepscalelm_layers():
    from dslm_hf import DeepScaleLMConfig, DeepScaleLMForCausalLM
    from dslm_hf.parallel import shardable_layers

    model = DeepScaleLMForCausalLM(DeepScaleLMConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3,
                                                     num_attention_heads=2, max_position_embeddings=16))
    assert [type(m).__name__ for m in shardable_layers(model)] == ["DeepScaleLMLayer"] * 3


def test_shipped_accelerate_configs_parse_and_shard_deepscalelm_layers():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: load_config_from_file(str(p)) for p in (REPO / "accelerate_configs").glob("*.yaml")}
    assert sorted(configs) == ["cpu_2proc", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"]
    assert configs["fsdp2"].fsdp_config["fsdp_version"] == 2
    assert configs["fsdp2"].fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "DeepScaleLMLayer"
    assert [configs[f"deepspeed_zero{n}"].deepspeed_config["zero_stage"] for n in (2, 3)] == [2, 3]
    assert configs["cpu_2proc"].num_processes == 2
