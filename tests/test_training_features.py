"""Activation checkpointing gives the same gradients; torch.compile's forward matches eager."""

import pytest
import torch

from dslm_hf import DeepScaleLMConfig, DeepScaleLMForCausalLM, DeepScaleLMForSeq2SeqLM

BASE = dict(vocab_size=101, hidden_size=32, num_attention_heads=4, num_hidden_layers=6, max_position_embeddings=64,
            pad_token_id=0, decoder_start_token_id=1)


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
    torch.manual_seed(0)
    model = model_class(DeepScaleLMConfig(**BASE, **overrides)).train()
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
    torch.manual_seed(0)
    model = DeepScaleLMForCausalLM(DeepScaleLMConfig(**{**BASE, "num_hidden_layers": 2})).eval()
    ids = torch.randint(3, 101, (2, 16))
    eager = model(ids).logits
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(ids).logits, eager, atol=1e-5, rtol=1e-5)
