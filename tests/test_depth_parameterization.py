"""Depth parameterizations (deepscalelm, depth_mup, completep): residual multipliers, optimizer groups, refusals."""

import math

import pytest
import torch

from dslm_hf import DeepScaleLMConfig, DeepScaleLMForCausalLM, DeepScaleLMForSeq2SeqLM
from dslm_hf.optimization import build_adamw, depth_parameter_groups
from dslm_hf.recipe_deepscalelm import depth_optimizer_multipliers, stack_init_plan
from tiny_models import tiny_config


def tiny(layers: int, parameterization: str = "deepscalelm", **kwargs) -> DeepScaleLMConfig:
    return tiny_config(vocab_size=40, hidden_size=16, num_hidden_layers=layers, max_position_embeddings=16,
                       depth_parameterization=parameterization, depth_base_layers=4, **kwargs)


@pytest.mark.parametrize("parameterization, exponent", [("deepscalelm", 0.5), ("depth_mup", 0.5), ("completep", 1.0)])
def test_branch_multiplier_scales_as_depth_to_minus_alpha_and_equals_deepscalelm_at_base(parameterization, exponent):
    base = stack_init_plan(tiny(4, "deepscalelm"), "decoder")
    for layers in (4, 16, 64):
        plan = stack_init_plan(tiny(layers, parameterization), "decoder")
        assert plan.residual_branch == pytest.approx(base.residual_branch * (layers / 4) ** -exponent, rel=1e-12)
        assert plan.residual_skip**2 + plan.residual_branch**2 == pytest.approx(1.0, abs=1e-12)  # unit variance kept


def test_optimizer_multipliers_follow_the_completep_rule():
    # m = 16: depth-muP (alpha 1/2): lr, eps * 16^-1/2, wd * 16^1/2; CompleteP (alpha 1): lr * 1, eps / 16, wd * 1
    assert depth_optimizer_multipliers("deepscalelm", 16.0) == (1.0, 1.0, 1.0)
    assert depth_optimizer_multipliers("depth_mup", 16.0) == pytest.approx((0.25, 0.25, 4.0))
    assert depth_optimizer_multipliers("completep", 16.0) == pytest.approx((1.0, 1 / 16, 1.0))


def test_parameter_groups_scale_only_the_layers_each_by_its_own_stack_depth():
    config = tiny(16, "depth_mup", is_encoder_decoder=True, decoder_layers=64, is_decoder=False,
                  pad_token_id=0, decoder_start_token_id=1)
    model = DeepScaleLMForSeq2SeqLM(config)
    groups = depth_parameter_groups(model, learning_rate=1e-2, weight_decay=0.1, eps=1e-8)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    lr_of = {id(p): g for g in groups for p in g["params"]}
    encoder_fc1 = model.model.encoder.layers[3].mlp.fc1.weight
    decoder_norm = model.model.decoder.layers[0].mlp_norm.weight
    assert lr_of[id(encoder_fc1)]["lr"] == pytest.approx(1e-2 * (16 / 4) ** -0.5)
    assert lr_of[id(encoder_fc1)]["eps"] == pytest.approx(1e-8 * (16 / 4) ** -0.5)
    assert lr_of[id(encoder_fc1)]["weight_decay"] == pytest.approx(0.1 * (16 / 4) ** 0.5)
    assert lr_of[id(decoder_norm)]["lr"] == pytest.approx(1e-2 * (64 / 4) ** -0.5)
    assert lr_of[id(decoder_norm)]["weight_decay"] == 0.0  # gains and biases are never decayed
    embeddings = model.get_input_embeddings().weight
    assert lr_of[id(embeddings)]["lr"] == 1e-2 and lr_of[id(embeddings)]["weight_decay"] == 0.1


def test_deepscalelm_groups_are_plain_adamw_groups():
    model = DeepScaleLMForCausalLM(tiny(8))
    optimizer = build_adamw(model, learning_rate=3e-3, weight_decay=0.01)
    assert {g["lr"] for g in optimizer.param_groups} == {3e-3}
    assert {g["eps"] for g in optimizer.param_groups} == {1e-8}
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters() if p.ndim >= 2}


def test_depth_mup_changes_only_the_optimizer_not_the_model():
    torch.manual_seed(0)
    plain = DeepScaleLMForCausalLM(tiny(16)).eval()
    torch.manual_seed(0)
    ruled = DeepScaleLMForCausalLM(tiny(16, "depth_mup")).eval()
    ids = torch.randint(0, 40, (2, 12))
    assert torch.equal(plain(input_ids=ids).logits, ruled(input_ids=ids).logits)


def test_completep_keeps_unit_stream_variance_at_initialisation():
    # lambda^2 + beta^2 = 1 with unit-variance branches: the stream variance stays 1 however small beta is
    # (tolerance: sampling noise of 2 x 16 x 64 activations and the recipe's finite-size attention terms, ~0.1).
    torch.manual_seed(0)
    model = DeepScaleLMForCausalLM(tiny(64, "completep", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    out = model(input_ids=torch.randint(0, 40, (4, 16)), output_hidden_states=True)
    variances = [float(h.var()) for h in out.hidden_states[1:-1]]
    assert max(abs(v - 1.0) for v in variances) < 0.15


@pytest.mark.parametrize("kwargs, field", [
    (dict(norm_placement="post", is_decoder=False), "CompleteP"),
    (dict(init_scheme="standard"), "lambda/beta"),
])
def test_incompatible_settings_are_refused(kwargs, field):
    parameterization = "completep" if field == "CompleteP" else "depth_mup"
    with pytest.raises(ValueError, match=field):
        tiny(8, parameterization, **kwargs)


def test_a_base_depth_below_one_is_refused():
    with pytest.raises(ValueError, match="depth_base_layers"):
        DeepScaleLMConfig(depth_parameterization="depth_mup", depth_base_layers=0)


def test_depth_mup_is_allowed_for_post_ln_as_an_optimizer_rule():
    config = tiny(8, "depth_mup", norm_placement="post", is_decoder=False)
    plain = tiny(8, "deepscalelm", norm_placement="post", is_decoder=False)
    assert stack_init_plan(config, "encoder") == stack_init_plan(plain, "encoder")
    assert math.isclose(depth_optimizer_multipliers("depth_mup", 8 / 4)[0], 2 ** -0.5)


def test_finetune_hands_trainer_the_depth_rule_optimizer(tmp_path):
    from transformers import TrainingArguments

    from dslm_hf.finetuning import FinetuneInputError, depth_rule_optimizer

    model = DeepScaleLMForCausalLM(tiny(16, "depth_mup"))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.0, use_cpu=True, report_to=[])
    optimizer = depth_rule_optimizer(model, args)
    rates = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert rates[id(model.model.layers[0].mlp.fc1.weight)] == pytest.approx(1e-4 * (16 / 4) ** -0.5)
    assert rates[id(model.get_input_embeddings().weight)] == pytest.approx(1e-4)
    sharded = TrainingArguments(output_dir=str(tmp_path), fsdp="full_shard", use_cpu=True, report_to=[])
    with pytest.raises(FinetuneInputError, match="depth_parameterization='depth_mup'"):
        depth_rule_optimizer(model, sharded)


def test_default_learning_rate_follows_the_measured_optima():
    from dslm_hf.optimization import BASE_LEARNING_RATE, default_learning_rate

    # the depth rule: the base rate at every depth (the sweep's depth_mup optimum stayed within 2x of it, 4-256 layers)
    assert default_learning_rate(tiny(256, "depth_mup"))[0] == BASE_LEARNING_RATE
    # one rate for all: the sweep's one-rate optimum was 0.008 at 4 layers and 0.004 at 64 (width 64)
    assert default_learning_rate(tiny(4))[0] == pytest.approx(0.008)
    assert default_learning_rate(tiny(64))[0] == pytest.approx(0.004)
