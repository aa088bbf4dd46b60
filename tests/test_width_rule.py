"""The width rule (muP for AdamW) beside the depth rule, and rules that survive any training loop (issue 19, items 1
and 6): parameter groups, the readout multiplier, refusals, wrappers, hand-set and scheduled learning rates."""

import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dslm_hf import DeepScaleLMConfig, DeepScaleLMForCausalLM, DeepScaleLMForMaskedLM, DeepScaleLMForSeq2SeqLM
from dslm_hf.optimization import (
    BASE_LEARNING_RATE,
    build_adamw,
    default_learning_rate,
    depth_parameter_groups,
    describe_rules,
    find_deepscalelm_config,
    set_learning_rate,
)
from dslm_hf.recipe_deepscalelm import (
    embedding_std,
    tied_logit_scale,
    width_optimizer_multipliers,
    width_output_multiplier,
)
from tiny_models import tiny_config

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (32, 64, 128, 256)


def config_of(width: int = 128, layers: int = 16, rule: str = "mup", **kwargs) -> DeepScaleLMConfig:
    """Heads of 16 (the width grows by heads, as in the sweeps); depth rule from 4 layers, width rule from 64."""
    fields = dict(vocab_size=40, hidden_size=width, num_attention_heads=width // 16, num_hidden_layers=layers,
                  max_position_embeddings=16, depth_parameterization="depth_mup", depth_base_layers=4,
                  width_parameterization=rule, width_base=64)
    return tiny_config(**(fields | kwargs))


def group_of(groups: list[dict]) -> dict[int, dict]:
    return {id(p): g for g in groups for p in g["params"]}


def test_width_multipliers_are_mups_adam_rule():
    # m_w = 4: hidden-matrix lr and eps / 4, weight decay * 4 (lr * wd per step independent of width); readout / 4
    assert width_optimizer_multipliers("mup", 4.0) == (0.25, 0.25, 4.0)
    assert width_optimizer_multipliers("standard", 4.0) == (1.0, 1.0, 1.0)
    assert width_output_multiplier("mup", 4.0) == 0.25 and width_output_multiplier("standard", 4.0) == 1.0
    with pytest.raises(ValueError, match="width_parameterization must be one of \\('standard', 'mup'\\), got 'muP'"):
        width_optimizer_multipliers("muP", 2.0)


@pytest.mark.parametrize("width", WIDTHS)
def test_hidden_matrices_get_base_over_width_composed_with_depth_mup_and_vectors_keep_the_depth_rule(width):
    model = DeepScaleLMForCausalLM(config_of(width))
    groups = group_of(depth_parameter_groups(model, learning_rate=1e-2, weight_decay=0.1, eps=1e-8))
    depth, base_over_width = (16 / 4) ** -0.5, 64 / width  # depth_mup at 16 layers from 4; muP from width 64
    layer = model.model.layers[5]
    for matrix in (layer.self_attn.q_proj.weight, layer.self_attn.o_proj.weight, layer.mlp.fc1.weight,
                   layer.mlp.fc2.weight):
        assert groups[id(matrix)]["lr"] == pytest.approx(1e-2 * depth * base_over_width, rel=1e-12)
        assert groups[id(matrix)]["eps"] == pytest.approx(1e-8 * depth * base_over_width, rel=1e-12)
        assert groups[id(matrix)]["weight_decay"] == pytest.approx(0.1 / depth / base_over_width, rel=1e-12)
        assert groups[id(matrix)]["lr_multiplier"] == pytest.approx(depth * base_over_width, rel=1e-12)
    for vector in (layer.mlp.fc1.bias, layer.mlp_norm.weight):  # inside the layers: the depth rule only
        assert groups[id(vector)]["lr"] == pytest.approx(1e-2 * depth, rel=1e-12)
        assert groups[id(vector)]["weight_decay"] == 0.0
    for outside in (model.model.embed_tokens.weight, model.model.embed_positions.weight, model.model.norm.weight):
        assert groups[id(outside)]["lr"] == 1e-2 and groups[id(outside)]["eps"] == 1e-8


def test_the_mlm_transform_and_cross_attention_are_hidden_matrices_the_vocabulary_bias_is_not():
    masked = DeepScaleLMForMaskedLM(config_of(256, is_decoder=False))
    groups = group_of(depth_parameter_groups(masked, 1e-2, 0.1))
    assert groups[id(masked.transform.dense.weight)]["lr"] == pytest.approx(1e-2 * 64 / 256, rel=1e-12)
    assert groups[id(masked.transform.dense.weight)]["hidden_matrix"] is True
    for vector in (masked.transform.dense.bias, masked.transform.norm.weight, masked.lm_head.bias):
        assert groups[id(vector)]["lr"] == 1e-2
    seq2seq = DeepScaleLMForSeq2SeqLM(config_of(128, is_encoder_decoder=True, is_decoder=False, decoder_layers=64,
                                                pad_token_id=0, decoder_start_token_id=1))
    groups = group_of(depth_parameter_groups(seq2seq, 1e-2, 0.1))
    cross = seq2seq.model.decoder.layers[0].cross_attn.k_proj.weight
    assert groups[id(cross)]["lr"] == pytest.approx(1e-2 * (64 / 4) ** -0.5 * 64 / 128, rel=1e-12)


def test_the_readout_multiplier_is_the_base_widths_logit_scale_over_m_w():
    sigma_e = embedding_std(0.1, 2)  # word + position tables, dropout 0.1
    for width in WIDTHS:
        tied = DeepScaleLMForCausalLM(config_of(width, layers=4))
        assert tied.logit_scale == pytest.approx(tied_logit_scale(64, sigma_e) * 64 / width, rel=1e-12)
        # muP: the whole readout multiplier falls as 1/width (DeepScaleLM's own factor already falls as width^-1/2)
        assert tied.logit_scale * width == pytest.approx(tied_logit_scale(64, sigma_e) * 64, rel=1e-12)
        untied = DeepScaleLMForCausalLM(config_of(width, layers=4, tie_word_embeddings=False))
        assert untied.logit_scale == pytest.approx(64 / width, rel=1e-12)  # mup's MuReadout on the N(0, 1/d) head
        standard = DeepScaleLMForCausalLM(config_of(width, layers=4, rule="standard"))
        assert standard.logit_scale == tied_logit_scale(width, sigma_e)
    model = DeepScaleLMForCausalLM(config_of(256, layers=4)).eval()
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    by_hand = out.hidden_states[-1] @ model.model.embed_tokens.weight.T * model.logit_scale
    torch.testing.assert_close(out.logits, by_hand, rtol=1e-5, atol=1e-6)


def test_mup_at_its_base_width_is_the_standard_model_and_optimizer():
    torch.manual_seed(0)
    standard = DeepScaleLMForCausalLM(config_of(96, layers=8, rule="standard")).eval()
    torch.manual_seed(0)
    mup = DeepScaleLMForCausalLM(config_of(96, layers=8, width_base=96)).eval()
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(standard(input_ids=ids).logits, mup(input_ids=ids).logits)
    settings = [[(g["name"], g["lr"], g["eps"], g["weight_decay"], len(g["params"]))
                 for g in depth_parameter_groups(m, 1e-2, 0.1)] for m in (standard, mup)]
    assert settings[0] == settings[1]
    rates = [{name: group_of(depth_parameter_groups(m, 1e-2, 0.1))[id(p)]["lr"] for name, p in m.named_parameters()}
             for m in (standard, mup)]
    assert rates[0] == rates[1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(width_parameterization="muP"), "width_parameterization='muP' is invalid: expected one of ('standard', 'mup')"),
    (dict(width_base=0), "width_base=0 is invalid: expected a positive integer"),
    (dict(width_parameterization="mup", init_scheme="standard"),
     "width_parameterization='mup' is invalid: muP scales the optimizer around matrices drawn with variance ~ 1/fan_in"),
])
def test_invalid_width_settings_are_refused_naming_the_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DeepScaleLMConfig(**kwargs)


def test_a_config_without_the_width_fields_has_the_standard_rule():
    config = DeepScaleLMConfig.from_dict({"hidden_size": 32, "num_attention_heads": 2})
    assert (config.width_parameterization, config.width_base) == ("standard", 64)


@pytest.mark.parametrize("case", ["decoder_pre", "encoder_post", "decoder_standard_pre", "seq2seq_pre"])
def test_checkpoints_written_before_the_width_rule_and_norm_options_load_with_their_logits(case):
    """tests/data/reference_logits: models and their logits written before the width rule, LayerNorm Scaling and
    Mix-LN existed (width 16), and
    seq2seq_pre: the shipped 48+48 x 32 encoder-decoder of before the rule (its config.json has no width or depth
    rule field, so it loads as "standard" and "deepscalelm"), cut to its first 2+2 layers when its checkpoint was
    rebuilt, with logits from the code its own saved modeling files equalled.
    The logits were written on one CPU: another CPU's kernels (AVX2 against AVX-512) may round the last bits
    differently (measured up to 1e-6 on logits up to 4.3), so they must agree to float32 rounding, far below what
    any rule or placement change moves them."""
    folder = ROOT / "tests" / "data" / "reference_logits" / case
    model_class = {"decoder": DeepScaleLMForCausalLM, "encoder": DeepScaleLMForMaskedLM,
                   "seq2seq": DeepScaleLMForSeq2SeqLM}[case.split("_")[0]]
    model = model_class.from_pretrained(folder).eval()
    assert model.config.width_parameterization == "standard"
    assert model.config.norm_placement in ("pre", "post") and model.config.layernorm_scaling is False
    reference = load_file(folder / "logits.safetensors")
    inputs = {name: reference[name] for name in ("input_ids", "decoder_input_ids") if name in reference}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference["logits"], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Item 6: wrappers, hand-set rates and schedulers
# ----------------------------------------------------------------------------------------------------------------
class NanoGPTStyleWrapper(torch.nn.Module):
    """A training loop's own module around a DeepScaleLM model, with its own (non-DeepScaleLM) `config`."""

    def __init__(self, model):
        super().__init__()
        self.config = {"block_size": 16, "n_layer": 16}
        self.transformer = model

    def forward(self, ids):
        return self.transformer(input_ids=ids).logits


def reference_rates(model) -> dict[str, float]:
    return {name: group_of(depth_parameter_groups(model, 1e-2, 0.1))[id(p)]["lr"] for name, p in model.named_parameters()}


def test_a_wrapper_whose_config_is_not_deepscalelms_gets_the_submodules_rules():
    model = DeepScaleLMForCausalLM(config_of(128))
    expected = reference_rates(model)
    wrapper = NanoGPTStyleWrapper(model)
    assert find_deepscalelm_config(wrapper) is model.config
    rates = {name.removeprefix("transformer."): rate for name, rate in reference_rates(wrapper).items()}
    assert rates == expected
    assert sorted(set(rates.values())) == pytest.approx([0.0025, 0.005, 0.01])  # layer matrices, layer vectors, outside


def test_compiled_and_peft_models_get_the_same_rules():
    peft = pytest.importorskip("peft")
    model = DeepScaleLMForCausalLM(config_of(128))
    expected = reference_rates(model)
    compiled = torch.compile(model)
    assert {name.removeprefix("_orig_mod."): rate for name, rate in reference_rates(compiled).items()} == expected
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    groups = group_of(depth_parameter_groups(lora, 1e-2, 0.1))
    lora_a = lora.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    # LoRA factors are matrices inside the layers: the depth and width rules apply to them as to the frozen weight
    assert groups[id(lora_a)]["lr"] == pytest.approx(1e-2 * 0.5 * 0.5, rel=1e-12)


def test_distributed_data_parallel_gets_the_rules(tmp_path):
    model = DeepScaleLMForCausalLM(config_of(128))
    expected = reference_rates(model)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert {name.removeprefix("module."): rate for name, rate in reference_rates(ddp).items()} == expected
    finally:
        torch.distributed.destroy_process_group()


def test_layers_without_their_config_are_refused_and_other_models_get_plain_groups():
    holder = torch.nn.Module()
    holder.layers = DeepScaleLMForCausalLM(config_of(64, layers=4)).model.layers
    for module in holder.modules():  # layers from code that does not keep the config on their attention modules
        module.__dict__.pop("config", None)
    with pytest.raises(ValueError, match="holds DeepScaleLMLayers but no module with a DeepScaleLM config"):
        build_adamw(holder, 1e-3)
    plain = build_adamw(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)), 1e-3)
    assert {g["lr_multiplier"] for g in plain.param_groups} == {1.0}
    two = torch.nn.ModuleList([DeepScaleLMForCausalLM(config_of(width, layers=4)) for width in (64, 128)])
    with pytest.raises(ValueError, match="holds DeepScaleLM models with different rules"):
        depth_parameter_groups(two, 1e-3, 0.0)


def test_set_learning_rate_keeps_every_groups_multiplier_where_nanogpts_loop_erases_it():
    optimizer = build_adamw(DeepScaleLMForCausalLM(config_of(128)), learning_rate=1e-2)
    multipliers = [g["lr_multiplier"] for g in optimizer.param_groups]
    assert sorted(set(multipliers)) == pytest.approx([0.25, 0.5, 1.0])  # layer matrices, layer vectors, outside
    set_learning_rate(optimizer, 3e-3)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([3e-3 * m for m in multipliers], rel=1e-12)
    for group in optimizer.param_groups:  # what nanoGPT's loop does: one rate for every group, the rule gone
        group["lr"] = 3e-3
    set_learning_rate(optimizer, 3e-3)  # and the multipliers, kept in the groups, bring it back
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([3e-3 * m for m in multipliers], rel=1e-12)
    foreign = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(2))]}], lr=1e-3)
    with pytest.raises(ValueError, match=re.escape("optimizer.param_groups[0] has no 'lr_multiplier'")):
        set_learning_rate(foreign, 1e-3)


@pytest.mark.parametrize("scheduler", ["lambda", "cosine", "transformers_cosine"])
def test_torch_and_transformers_schedulers_keep_the_ratios(scheduler):
    from transformers import get_cosine_schedule_with_warmup

    model = DeepScaleLMForCausalLM(config_of(128, layers=4))
    optimizer = build_adamw(model, learning_rate=1e-2)
    make = {"lambda": lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9 ** step),
            "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10, eta_min=1e-4),
            "transformers_cosine": lambda: get_cosine_schedule_with_warmup(optimizer, 2, 10)}[scheduler]
    schedule = make()
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    outside = next(g for g in optimizer.param_groups if g["lr_multiplier"] == 1.0)["lr"]
    for group in optimizer.param_groups:
        if scheduler == "cosine":  # eta_min is absolute (one floor for every group): ratios hold above it
            expected = 1e-4 + (1e-2 * group["lr_multiplier"] - 1e-4) * (1 + math.cos(math.pi * 4 / 10)) / 2
            assert group["lr"] == pytest.approx(expected, rel=1e-9)
        else:
            assert group["lr"] == pytest.approx(outside * group["lr_multiplier"], rel=1e-12)


def test_the_hand_written_loop_in_docs_depth_md_runs_and_keeps_the_rules():
    text = (ROOT / "docs" / "depth.md").read_text(encoding="utf-8")
    section = text.split("## Any training loop keeps the rules", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "set_learning_rate(optimizer, get_lr(it))" in snippet
    namespace = {}
    exec(compile(snippet, "docs/depth.md", "exec"), namespace)
    optimizer, last = namespace["optimizer"], namespace["get_lr"](9)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(
        [last * g["lr_multiplier"] for g in optimizer.param_groups], rel=1e-12)
    assert len({g["lr"] for g in optimizer.param_groups}) == 3  # outside, layer vectors, layer matrices
    assert all(torch.isfinite(p).all() for p in namespace["model"].parameters())


# ----------------------------------------------------------------------------------------------------------------
# The learning rate from the shape, and dslm-pretrain's defaults
# ----------------------------------------------------------------------------------------------------------------
def test_default_learning_rate_names_both_rules():
    rate, why = default_learning_rate(config_of(256, layers=48))
    assert rate == BASE_LEARNING_RATE
    assert why == ("base 0.008 (embeddings, final norm, head), 0.00231 inside the 48 layers (depth_mup rule from 4 "
                   "layers), 0.000577 for the hidden matrices (mup width rule from width 64)")
    # no width rule: one rate taken down as 64 / width above 64 (measured: 0.008 at width 64, 0.004 at 128)
    rate, why = default_learning_rate(config_of(128, layers=4, rule="standard"))
    assert rate == pytest.approx(0.004) and why.endswith("; no width rule in the config")
    assert default_learning_rate(config_of(32, layers=4, rule="standard"))[0] == BASE_LEARNING_RATE
    assert describe_rules(config_of(256)) == "depth_mup depth rule from 4 layers, mup width rule from width 64"


def test_dslm_pretrain_uses_the_width_rule_for_pre_ln_deepscalelm_only():
    from dslm_hf.pretraining import PretrainingArguments, preset_kwargs

    assert preset_kwargs(PretrainingArguments(output_dir="unused", preset="deep-48"))["width_parameterization"] == "mup"
    post = PretrainingArguments(output_dir="unused", preset="deep-48", config_overrides="norm_placement=post")
    assert "width_parameterization" not in preset_kwargs(post)
    chosen = PretrainingArguments(output_dir="unused", preset="deep-48", config_overrides="width_parameterization=standard")
    assert preset_kwargs(chosen)["width_parameterization"] == "standard"


# ----------------------------------------------------------------------------------------------------------------
# Coordinate check: the muP sanity test
# ----------------------------------------------------------------------------------------------------------------
def hidden_change_after_three_steps(width: int, rule: str) -> float:
    """Mean |change| of the 2nd layer's output (4 layers, heads of 16, no dropout) after 3 AdamW steps at base rate
    0.002 on one fixed batch."""
    torch.manual_seed(0)
    config = config_of(width, layers=4, rule=rule, vocab_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    model = DeepScaleLMForCausalLM(config)
    ids = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(1))
    optimizer = build_adamw(model, 2e-3, weight_decay=0.0)

    def second_layer_output():
        with torch.no_grad():
            return model(input_ids=ids, output_hidden_states=True).hidden_states[2]

    before = second_layer_output()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return float((second_layer_output() - before).abs().mean())


def test_coordinate_check_hidden_updates_stay_put_across_width_under_mup_and_grow_under_standard():
    """Measured (seed 0): mup 0.458 / 0.348 / 0.330 / 0.287 at widths 32 / 64 / 128 / 256 (max/min 1.6); standard
    0.344 / 0.348 / 0.600 / 1.108 (3.2x from 32 to 256). muP predicts O(1) in width, standard ~ width for Adam; the
    factor 2 is the issue's tolerance (finite-width effects are largest at width 32)."""
    mup = [hidden_change_after_three_steps(width, "mup") for width in WIDTHS]
    standard = [hidden_change_after_three_steps(width, "standard") for width in WIDTHS]
    assert mup[1] == standard[1]  # width 64 is the base width: the two rules are the same model and optimizer
    assert max(mup) / min(mup) < 2.0
    assert standard[3] / standard[0] > 2.5 and standard[3] > standard[2] > standard[1]


def test_finetune_refuses_to_drop_the_width_rule_under_sharding_or_another_optimizer(tmp_path):
    from transformers import TrainingArguments

    from dslm_hf.finetuning import FinetuneInputError, depth_rule_optimizer

    model = DeepScaleLMForCausalLM(config_of(128, layers=4, depth_parameterization="deepscalelm"))
    plain = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, weight_decay=0.0, use_cpu=True, report_to=[])
    rates = group_of(depth_rule_optimizer(model, plain).param_groups)
    assert rates[id(model.model.layers[0].mlp.fc1.weight)]["lr"] == pytest.approx(1e-4 * 64 / 128, rel=1e-12)
    sharded = TrainingArguments(output_dir=str(tmp_path), fsdp="full_shard", use_cpu=True, report_to=[])
    with pytest.raises(FinetuneInputError, match=re.escape("the model's optimizer rules (width_parameterization='mup') "
                                                           "need per-group learning rates")):
        depth_rule_optimizer(model, sharded)
    other = TrainingArguments(output_dir=str(tmp_path), optim="adafactor", use_cpu=True, report_to=[])
    with pytest.raises(FinetuneInputError, match=re.escape("--optim adafactor cannot carry the model's optimizer rules "
                                                           "(width_parameterization='mup')")):
        depth_rule_optimizer(model, other)
