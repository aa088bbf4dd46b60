"""Weight statistics: every parameter of every head, for every scheme, has the recipe's std (a table test).

The expected value is derived here from the parameter's NAME through the recipe module, independently of how the
model tags its modules, so a weight the initialisation forgets (or initialises with the wrong role) fails.
"""

import math
import re

import pytest
import torch

from dslm_hf import (
    DeepScaleLMConfig,
    DeepScaleLMForCausalLM,
    DeepScaleLMForMaskedLM,
    DeepScaleLMForQuestionAnswering,
    DeepScaleLMForSeq2SeqLM,
    DeepScaleLMForSequenceClassification,
    DeepScaleLMForTokenClassification,
)
from dslm_hf.recipe_deepscalelm import (
    attention_variance_ratio,
    embedding_std,
    ffn_stds,
    head_dense_std,
    query_key_std,
    scaled_output_std,
    stack_init_plan,
    value_output_std,
    xavier_std,
)
from tiny_models import tiny_config, tiny_model

LAYER = re.compile(r"^model\.(?:(encoder|decoder)\.)?layers\.(\d+)\.(self_attn|cross_attn|mlp)\.(\w+)\.weight$")


def expected_std(config: DeepScaleLMConfig, name: str, shape: tuple[int, ...]) -> float:
    scheme, d, p = config.init_scheme, config.hidden_size, config.hidden_dropout_prob
    if re.search(r"embed_(tokens|positions|token_types)\.weight$", name):
        if scheme == "deepscalelm":
            return embedding_std(p, config.num_embedding_tables)
        return config.initializer_range if scheme == "standard" else xavier_std(*shape)
    if name in ("transform.dense.weight", "score.weight", "qa_outputs.weight", "lm_head.weight"):
        if scheme == "standard":
            return config.initializer_range
        return head_dense_std(d) if scheme == "deepscalelm" else xavier_std(shape[1], shape[0])
    match = LAYER.match(name)
    if match is None:
        raise AssertionError(f"no recipe entry for parameter {name}")
    stack = match.group(1) or ("decoder" if config.is_decoder else "encoder")
    layer, branch, role = int(match.group(2)), match.group(3), match.group(4)
    plan = stack_init_plan(config, stack)
    if scheme == "deepscalelm":
        if role in ("q_proj", "k_proj"):
            return query_key_std(d)
        if role in ("v_proj", "o_proj"):
            return (plan.cross_value_output_stds if branch == "cross_attn" else plan.value_output_stds)[layer]
        return ffn_stds(config.hidden_act, p, d, config.intermediate_size)[0 if role == "fc1" else 1]
    if scheme == "standard":
        return scaled_output_std(config.initializer_range, plan.num_layers) if role in ("o_proj", "fc2") else config.initializer_range
    gain = plan.branch_gain if role in ("v_proj", "o_proj", "fc1", "fc2") else 1.0
    return xavier_std(shape[1], shape[0], gain)


HEADS = {
    "causal": (DeepScaleLMForCausalLM, {}),
    "masked": (DeepScaleLMForMaskedLM, {"is_decoder": False, "type_vocab_size": 2}),
    "seq2seq": (DeepScaleLMForSeq2SeqLM, {"is_encoder_decoder": True, "num_hidden_layers": 2, "decoder_layers": 3}),
    "sequence-classification": (DeepScaleLMForSequenceClassification, {"num_labels": 3, "tie_word_embeddings": False}),
    "token-classification": (DeepScaleLMForTokenClassification, {"is_decoder": False}),
    "question-answering": (DeepScaleLMForQuestionAnswering, {"is_decoder": False, "hidden_act": "gelu"}),
    "causal-untied-rotary": (DeepScaleLMForCausalLM, {"tie_word_embeddings": False, "position_embedding_type": "rotary"}),
}


@pytest.mark.parametrize("scheme", ["deepscalelm", "xavier", "standard", "deepnet"])
@pytest.mark.parametrize("head", list(HEADS))
def test_every_weight_has_the_recipe_std(head, scheme):
    model_class, overrides = HEADS[head]
    kwargs = dict(vocab_size=2000, hidden_size=128, num_attention_heads=4, num_hidden_layers=3,
                  max_position_embeddings=128, embedding_correlation=0.05, init_scheme=scheme)
    kwargs.update(overrides)
    if scheme == "deepnet":
        kwargs["norm_placement"] = "post"
    torch.manual_seed(0)
    model = model_class(tiny_config(**kwargs))
    checked = 0
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.all(param == 0), name
            continue
        if name.endswith("norm.weight"):
            assert torch.all(param == 1), name
            continue
        want = expected_std(model.config, name, tuple(param.shape))
        got = param.detach().float().std().item()
        # the sampling error of a std estimate is ~1/sqrt(2n): 3% for every matrix here except the 2-row type table
        tolerance = max(0.03, 4 / math.sqrt(2 * param.numel()))
        assert abs(got / want - 1) < tolerance, f"{name}: std {got:.5f}, recipe {want:.5f}"
        checked += 1
    assert checked >= 6 * model.config.num_hidden_layers


def test_per_layer_value_output_stds_follow_the_correlation_recurrence():
    config = tiny_config(vocab_size=100, hidden_size=64, num_attention_heads=4, num_hidden_layers=48,
                         max_position_embeddings=64, embedding_correlation=0.03)
    plan = stack_init_plan(config, "decoder")
    # correlation grows with depth, so attention averages less and W_v/W_o shrink layer by layer
    assert all(a >= b for a, b in zip(plan.value_output_stds, plan.value_output_stds[1:]))
    first = value_output_std(0.1, attention_variance_ratio(0.03 * 0.9, 64, True, 64, 0.1), 64)
    assert plan.value_output_stds[0] == pytest.approx(first)


def test_rotary_frequencies_are_rebuilt_when_a_checkpoint_loads(tmp_path):
    """The rotary buffers are not saved: transformers' initialisation recomputes them on load, through the module's
    compute_default_rope_parameters, as theta^(-2i/head_dim)."""
    model = tiny_model(vocab_size=50, hidden_size=32, num_attention_heads=4, max_position_embeddings=16,
                       position_embedding_type="rotary", rope_theta=500.0)
    model.save_pretrained(tmp_path)
    loaded = DeepScaleLMForCausalLM.from_pretrained(tmp_path).eval()
    head_dim = 32 // 4
    expected = torch.tensor([500.0 ** (-2 * i / head_dim) for i in range(head_dim // 2)])
    rotary = loaded.model.rotary_emb
    assert torch.allclose(rotary.inv_freq, expected, rtol=1e-6) and torch.equal(rotary.original_inv_freq, rotary.inv_freq)
    ids = torch.arange(1, 13).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
