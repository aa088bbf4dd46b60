"""Bad input to the models: a ValueError that says what is wrong and what to do."""

import pytest
import torch

from dslm_hf import DeepScaleLMConfig, DeepScaleLMForCausalLM, DeepScaleLMForMaskedLM, DeepScaleLMModel

CONFIG = dict(vocab_size=50, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=16)


@pytest.fixture(scope="module")
def model():
    return DeepScaleLMForCausalLM(DeepScaleLMConfig(**CONFIG)).eval()


@pytest.mark.parametrize("bad_id", [50, 1000, -1])
def test_token_ids_outside_the_vocabulary(model, bad_id):
    ids = torch.tensor([[1, 2, bad_id]])
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 50\).*tokenizer"):
        model(ids)


def test_sequence_longer_than_the_learned_positions(model):
    with pytest.raises(ValueError, match="max_position_embeddings=16.*truncate"):
        model(torch.ones(1, 17, dtype=torch.long))


def test_generation_past_the_learned_positions(model):
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model.generate(torch.ones(1, 10, dtype=torch.long), max_new_tokens=10, do_sample=False)


def test_rotary_positions_have_no_length_limit_from_the_table():
    rotary = DeepScaleLMForCausalLM(DeepScaleLMConfig(**CONFIG, position_embedding_type="rotary")).eval()
    assert rotary(torch.ones(1, 40, dtype=torch.long)).logits.shape == (1, 40, 50)


@pytest.mark.parametrize("shape", [(1, 5), (2, 6), (1, 6, 1)])
def test_attention_mask_of_the_wrong_shape(model, shape):
    ids = torch.ones(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(shape, dtype=torch.long))


def test_wrong_head_for_the_config():
    with pytest.raises(ValueError, match="needs a bidirectional encoder"):
        DeepScaleLMForMaskedLM(DeepScaleLMConfig(**CONFIG))
    with pytest.raises(ValueError, match="DeepScaleLMSeq2SeqModel"):
        DeepScaleLMModel(DeepScaleLMConfig(**CONFIG, is_encoder_decoder=True))


def test_both_or_neither_input_ids_and_embeddings(model):
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
