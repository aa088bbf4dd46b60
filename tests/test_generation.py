"""Generation: cached decoding equals one full forward, left padding is invisible, eager equals sdpa."""

import pytest
import torch

from dslm_hf import (
    DeepScaleLMForCausalLM,
    DeepScaleLMForMaskedLM,
    DeepScaleLMForSeq2SeqLM,
)
from tiny_models import tiny_config

BASE = dict(vocab_size=101, num_attention_heads=4, num_hidden_layers=4,  # overrides of the tiny shape
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)


@pytest.mark.parametrize("positions", ["absolute", "rotary"])
def test_causal_prefill_then_token_by_token_equals_full_forward(positions):
    torch.manual_seed(0)
    model = DeepScaleLMForCausalLM(tiny_config(**BASE, position_embedding_type=positions)).eval()
    ids = torch.randint(3, 101, (2, 20))
    full = model(ids).logits
    out = model(ids[:, :8], use_cache=True)
    steps, cache = [out.logits], out.cache
    for t in range(8, 20):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.cache
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_seq2seq_with_a_decoder_deeper_than_the_encoder_caches_exactly():
    torch.manual_seed(0)
    model = DeepScaleLMForSeq2SeqLM(
        tiny_config(**{**BASE, "num_hidden_layers": 2}, is_encoder_decoder=True, decoder_layers=6)
    ).eval()
    source = torch.randint(3, 101, (2, 11))
    source_mask = torch.ones_like(source)
    source_mask[1, -3:] = 0
    target = torch.randint(3, 101, (2, 9))
    full = model(source, attention_mask=source_mask, decoder_input_ids=target).logits
    encoder_outputs = model.get_encoder()(source, attention_mask=source_mask)
    out = model(encoder_outputs=encoder_outputs, attention_mask=source_mask, decoder_input_ids=target[:, :4], use_cache=True)
    steps, cache = [out.logits], out.cache
    for t in range(4, 9):
        out = model(encoder_outputs=encoder_outputs, attention_mask=source_mask, decoder_input_ids=target[:, t : t + 1],
                    cache=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.cache
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    generated = model.generate(source, attention_mask=source_mask, max_new_tokens=7, do_sample=False)
    assert generated.shape == (2, 8) and torch.all(generated[:, 0] == 1)


def test_seq2seq_loss_is_unshifted_cross_entropy_of_the_labels():
    torch.manual_seed(0)
    model = DeepScaleLMForSeq2SeqLM(tiny_config(**BASE, is_encoder_decoder=True)).eval()
    source, labels = torch.randint(3, 101, (2, 7)), torch.randint(3, 101, (2, 6))
    out = model(source, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(out.loss, expected)
    decoder_inputs = model.prepare_decoder_input_ids_from_labels(labels)
    assert decoder_inputs[:, 0].tolist() == [1, 1] and torch.equal(decoder_inputs[:, 1:], labels[:, :-1])


@pytest.mark.parametrize("positions", ["absolute", "rotary"])
def test_left_padded_batch_generates_what_each_example_generates_alone(positions):
    torch.manual_seed(0)
    model = DeepScaleLMForCausalLM(tiny_config(**BASE, position_embedding_type=positions)).eval()
    prompts = [[1, 5, 6, 7, 8, 9], [1, 10, 11], [1, 40, 41, 42, 43]]
    alone = [model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p):].tolist() for p in prompts]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert [row[width:].tolist() for row in batch] == alone


@pytest.mark.parametrize("model_class,overrides", [
    (DeepScaleLMForCausalLM, {}),
    (DeepScaleLMForMaskedLM, {"is_decoder": False}),
    (DeepScaleLMForSeq2SeqLM, {"is_encoder_decoder": True}),
])
def test_eager_attention_equals_sdpa(model_class, overrides, tmp_path):
    torch.manual_seed(0)
    model_class(tiny_config(**BASE, **overrides)).save_pretrained(tmp_path)
    sdpa = model_class.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    eager = model_class.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(3, 101, (2, 16))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    seq2seq = overrides.get("is_encoder_decoder", False)
    kwargs = {"decoder_input_ids": ids[:, :6]} if seq2seq else {}
    real = slice(None) if seq2seq else mask.bool()  # padded query rows are fully masked: implementations differ there
    torch.testing.assert_close(eager(ids, attention_mask=mask, **kwargs).logits[real],
                               sdpa(ids, attention_mask=mask, **kwargs).logits[real], atol=1e-5, rtol=0)


def test_output_hidden_states_and_attentions():
    model = DeepScaleLMForCausalLM(tiny_config(**BASE)).eval()
    model.set_attn_implementation("eager")
    out = model(torch.randint(3, 101, (1, 9)), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == BASE["num_hidden_layers"] + 1
    assert len(out.attentions) == BASE["num_hidden_layers"] and out.attentions[0].shape == (1, 4, 9, 9)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(1, 4, 9))
    assert torch.all(out.attentions[0].triu(1) == 0)  # causal
