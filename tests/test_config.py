"""DeepScaleLMConfig: every invalid value is a ValueError naming the field; r0 estimation; seq2seq fields."""

import pytest

from dslm_hf import DeepScaleLMConfig
from dslm_hf.recipe_deepscalelm import deepscalelm_residual_scales, embedding_correlation_estimate

INVALID = [
    ("vocab_size", 0),
    ("hidden_size", -8),
    ("num_hidden_layers", 0),
    ("num_attention_heads", 5),  # does not divide 768
    ("intermediate_size", 0),
    ("hidden_act", "silu"),
    ("hidden_dropout_prob", 1.0),
    ("attention_probs_dropout_prob", -0.1),
    ("max_position_embeddings", 0),
    ("position_embedding_type", "alibi"),
    ("rope_theta", 0.0),
    ("type_vocab_size", -1),
    ("layer_norm_eps", 0.0),
    ("norm_placement", "sandwich"),
    ("init_scheme", "kaiming"),
    ("residual_k", 0.0),
    ("residual_branch_count", "blocks"),
    ("residual_beta2", 1.5),
    ("embedding_correlation", 1.0),
    ("init_sequence_length", 0),
    ("initializer_range", -0.02),
    ("classifier_dropout", 2.0),
    ("decoder_layers", 4),  # only for an encoder-decoder
    ("pad_token_id", 40000),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f for f, _ in INVALID])
def test_invalid_field_raises_value_error_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        DeepScaleLMConfig(**{field: value})
    message = str(info.value)
    assert field in message and repr(value) in message


def test_deepnet_requires_post_ln():
    with pytest.raises(ValueError, match="norm_placement='post'"):
        DeepScaleLMConfig(init_scheme="deepnet", norm_placement="pre")


def test_residual_k_too_large_for_a_shallow_stack_is_rejected():
    with pytest.raises(ValueError, match="residual_k"):
        DeepScaleLMConfig(num_hidden_layers=1, residual_k=2.0)  # beta^2 = 2 / 2 branches = 1


def test_encoder_decoder_defaults_and_text_config_for_a_deeper_decoder():
    config = DeepScaleLMConfig(is_encoder_decoder=True, num_hidden_layers=2, decoder_layers=6)
    assert config.get_text_config(decoder=True).num_hidden_layers == 6
    assert DeepScaleLMConfig(is_encoder_decoder=True, num_hidden_layers=3).decoder_layers == 3
    assert config.residual_stacks() == [("encoder", 2, 2), ("decoder", 6, 3)]


def test_defaults_follow_the_paper():
    config = DeepScaleLMConfig()
    assert config.intermediate_size == 4 * config.hidden_size
    assert config.hidden_act == "relu" and config.hidden_dropout_prob == 0.1
    assert config.num_embedding_tables == 2  # word + learned positions
    assert DeepScaleLMConfig(type_vocab_size=2).num_embedding_tables == 3
    assert DeepScaleLMConfig(position_embedding_type="rotary").num_embedding_tables == 1


def test_residual_scales_keep_unit_variance_and_match_the_reference_beta2():
    lam, beta = deepscalelm_residual_scales(2.0, 2 * 192)  # k=2 over 384 branches: the reference's ~1/layers
    assert lam**2 + beta**2 == pytest.approx(1.0)
    assert beta**2 == pytest.approx(1 / 192)
    assert deepscalelm_residual_scales(2.0, 192, beta2_override=0.005)[1] ** 2 == pytest.approx(0.005)


def test_r0_estimate_is_the_same_token_probability_over_the_table_count():
    # one sequence, tokens a a b b: pairs with the same id 4 of 12 ordered pairs -> 1/3, over 2 tables -> 1/6
    assert embedding_correlation_estimate([[0, 0, 1, 1]], num_tables=2) == pytest.approx(1 / 6)
    with_types = embedding_correlation_estimate([[0, 1, 2, 3]], 3, token_type_ids=[[0, 0, 0, 0]])
    assert with_types == pytest.approx(1 / 3)  # no repeated token; segment table always shared


def test_r0_estimate_on_real_text_is_far_below_the_reference_value(text_batch):
    config = DeepScaleLMConfig(vocab_size=65)
    r0 = config.estimate_embedding_correlation(text_batch(32, 128))
    assert 0.02 < r0 < 0.05  # character level, 2 tables; the BERT/Wikipedia reference is 0.221


def test_r0_estimate_rejects_sequences_too_short():
    with pytest.raises(ValueError, match="two or more tokens"):
        embedding_correlation_estimate([[5]], num_tables=2)


def test_config_round_trips_through_json(tmp_path):
    config = DeepScaleLMConfig(hidden_size=64, num_attention_heads=4, norm_placement="post", residual_beta2=0.01)
    config.save_pretrained(tmp_path)
    loaded = DeepScaleLMConfig.from_pretrained(tmp_path)
    assert loaded.norm_placement == "post" and loaded.residual_beta2 == 0.01 and loaded.intermediate_size == 256
