"""Activation checkpointing gives the same gradients; torch.compile's forward matches eager."""

import pytest
import torch

from dslm_hf import DeepScaleLMForCausalLM, DeepScaleLMForSeq2SeqLM
from tiny_models import tiny_model

BASE = dict(vocab_size=101, num_attention_heads=4, num_hidden_layers=6, pad_token_id=0, decoder_start_token_id=1)


def gradients(model, inputs) -> dict:
    model.zero_grad()
    torch.manual_seed(7)  # same dropout masks in both runs
    model(**inputs).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_class,overrides", [
    (DeepScaleLMForCausalLM, {}),
    (DeepScaleLMForCausalLM, {"norm_placement": "post"}),
    (DeepScaleLMForSeq2SeqLM, {"is_encoder_decoder": True, "decoder_layers": 3}),
])
def test_activation_checkpointing_gives_the_same_gradients(model_class, overrides):
    model = tiny_model(model_class, **BASE, **overrides).train()
    ids = torch.randint(3, 101, (2, 24))
    inputs = {"input_ids": ids, "labels": ids}
    plain = gradients(model, inputs)
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.modules() if hasattr(layer, "self_attn"))
    checkpointed = gradients(model, inputs)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_torch_compile_forward_matches_eager():
    model = tiny_model(**{**BASE, "num_hidden_layers": 2})
    ids = torch.randint(3, 101, (2, 16))
    eager = model(ids).logits
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(ids).logits, eager, atol=1e-5, rtol=1e-5)
