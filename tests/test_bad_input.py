"""Bad input to the models: a ValueError that says what is wrong and what to do."""

import re

import pytest
import torch

from dslm_hf import DeepScaleLMForCausalLM, DeepScaleLMForMaskedLM, DeepScaleLMForSeq2SeqLM
from tiny_models import tiny_config, tiny_model

CONFIG = dict(vocab_size=50, num_attention_heads=4, max_position_embeddings=16)  # overrides of the tiny shape


@pytest.fixture(scope="module")
def model():
    return tiny_model(**CONFIG)


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
    rotary = tiny_model(**CONFIG, position_embedding_type="rotary")
    assert rotary(torch.ones(1, 40, dtype=torch.long)).logits.shape == (1, 40, 50)


@pytest.mark.parametrize("shape", [(1, 5), (2, 6), (1, 6, 1)])
def test_attention_mask_of_the_wrong_shape(model, shape):
    ids = torch.ones(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(shape, dtype=torch.long))


@pytest.mark.parametrize("shape", [(1, 1, 5, 6), (1, 1, 6, 7), (2, 1, 6, 6), (1, 3, 6, 6)])
def test_a_4d_attention_mask_of_the_wrong_shape_names_the_expected_shape(model, shape):
    """Before: torch's bare 'The size of tensor a (6) must match the size of tensor b (5)' from inside attention."""
    ids = torch.ones(1, 6, dtype=torch.long)
    expected = f"a 4-D attention_mask must have shape (batch=1, heads=4 or 1, new tokens=6 or 1, cached + new tokens=6), got {shape}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        model(ids, attention_mask=torch.zeros(shape))


@pytest.mark.parametrize("shape", [(1, 1, 6, 6), (1, 4, 6, 6), (1, 1, 1, 6)])
def test_a_4d_attention_mask_that_broadcasts_is_used(model, shape):
    ids = torch.ones(1, 6, dtype=torch.long)
    blocked = torch.zeros(shape)
    blocked[..., 0] = torch.finfo(torch.float32).min  # no query may attend to the first token
    assert not torch.equal(model(ids, attention_mask=blocked).logits, model(ids, attention_mask=torch.zeros(shape)).logits)


def test_wrong_head_for_the_config():
    with pytest.raises(ValueError, match="needs a bidirectional encoder"):
        DeepScaleLMForMaskedLM(tiny_config(**CONFIG))
    with pytest.raises(ValueError, match="needs config.is_encoder_decoder=True"):
        DeepScaleLMForSeq2SeqLM(tiny_config(**CONFIG))


def test_both_or_neither_input_ids_and_embeddings(model):
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


ENCODER = dict(CONFIG, is_decoder=False, type_vocab_size=2)
IDS = torch.tensor([[3, 4, 5], [6, 7, 8]])


@pytest.mark.parametrize("head, config, inputs, message", [
    ("causal", CONFIG, dict(input_ids=IDS, labels=IDS[:, :2]), r"labels must be integer class ids of shape \(2, 3\)"),
    ("causal", CONFIG, dict(input_ids=IDS, labels=IDS.float()), r"labels must be integer class ids of shape \(2, 3\)"),
    ("causal", CONFIG, dict(input_ids=IDS, labels=IDS + 45), r"labels holds 53, outside the classes \[0, 50\) or -100"),
    ("masked", ENCODER, dict(input_ids=IDS, labels=IDS - 10), r"labels holds -7, outside the classes \[0, 50\)"),
    ("causal", CONFIG, dict(input_ids=IDS[:0]), r"empty input: shape \(0, 3\)"),
    ("causal", CONFIG, dict(input_ids=IDS[:, :0]), r"empty input: shape \(2, 0\)"),
    ("causal", CONFIG, dict(input_ids=IDS.float()), r"input_ids must hold integer token ids, got dtype torch.float32"),
    ("causal", CONFIG, dict(input_ids=IDS[0]), r"input_ids must have shape \(batch, sequence\), got \(3,\)"),
    ("causal", CONFIG, dict(input_ids=IDS, position_ids=torch.tensor([[-1, 0, 1]])), r"position_ids holds -1, outside the positions"),
    ("masked", ENCODER, dict(input_ids=IDS, token_type_ids=torch.full_like(IDS, 2)), r"token_type_ids holds 2, outside the segment ids \[0, 2\)"),
    ("causal", CONFIG, dict(input_ids=IDS, token_type_ids=torch.ones_like(IDS)), r"type_vocab_size=0"),
    ("classify", ENCODER | {"num_labels": 3}, dict(input_ids=IDS, labels=torch.tensor([0, 3])), r"labels holds 3, outside the classes \[0, 3\)"),
    ("classify", ENCODER | {"num_labels": 3}, dict(input_ids=IDS, labels=torch.tensor([[0], [1]])), r"labels must be class ids of shape \(2,\)"),
])
def test_forward_refuses_malformed_inputs_with_the_expected_shape_or_range(head, config, inputs, message):
    from dslm_hf import DeepScaleLMForSequenceClassification

    cls = {"causal": DeepScaleLMForCausalLM, "masked": DeepScaleLMForMaskedLM,
           "classify": DeepScaleLMForSequenceClassification}[head]
    with pytest.raises(ValueError, match=message):
        cls(tiny_config(**config))(**inputs)


@pytest.mark.parametrize("head, config", [(DeepScaleLMForCausalLM, CONFIG), (DeepScaleLMForMaskedLM, ENCODER)])
def test_a_batch_whose_labels_are_all_ignored_has_zero_loss_connected_to_the_graph(head, config):
    model = head(tiny_config(**config))
    loss = model(input_ids=IDS, labels=torch.full_like(IDS, -100)).loss
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())
    # with one label token, the loss is that token's cross-entropy (the mean over one)
    labels = torch.full_like(IDS, -100)
    labels[0, 1] = 7
    out = model(input_ids=IDS, labels=labels)
    position = 0 if head is DeepScaleLMForCausalLM else 1  # the causal loss predicts token t+1 from position t
    expected = torch.nn.functional.cross_entropy(out.logits[0, position][None], torch.tensor([7]))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_seq2seq_all_ignored_labels_give_zero_loss():
    config = tiny_config(**CONFIG, is_encoder_decoder=True, decoder_start_token_id=1, pad_token_id=0)
    loss = DeepScaleLMForSeq2SeqLM(config)(input_ids=IDS, labels=torch.full_like(IDS, -100)).loss
    assert loss.item() == 0.0 and loss.requires_grad
