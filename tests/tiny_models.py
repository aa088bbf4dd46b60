"""Tiny DeepScaleLM configs and models for the tests: one canonical shape, changed field by field.

Tests used to spell vocab_size, hidden_size, num_hidden_layers, num_attention_heads and max_position_embeddings in
every config they built. Here they are written once (TINY_SHAPE); a test names only what it needs to differ, so what
it depends on stands out. A test whose numbers depend on a shape passes that shape as overrides: the canonical shape
must never change under a test's feet (an override equal to TINY_SHAPE is harmless, so tests may keep spelling a field
their assertions use).

    tiny_config(num_hidden_layers=4, is_decoder=False)           # a DeepScaleLMConfig
    tiny_model(DeepScaleLMForMaskedLM, is_decoder=False)         # seeded, in eval mode
    tiny_config(**tokenizer_fields(tokenizer), dropout=0.0)      # the tokenizer's vocabulary and special ids

Tests that prefer fixtures ask for `tiny_config` (tests/conftest.py), the same factory.
"""

import torch

from dslm_hf import DeepScaleLMConfig, DeepScaleLMForCausalLM

# 2 layers of width 32 with 2 heads over 64 tokens: a forward pass takes milliseconds on one CPU thread.
TINY_SHAPE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)


def tiny_config(dropout: float | None = None, **overrides) -> DeepScaleLMConfig:
    """TINY_SHAPE with `overrides` replacing or adding fields; everything else is DeepScaleLMConfig's default.

    dropout, when given, sets both hidden_dropout_prob and attention_probs_dropout_prob (0.0: a deterministic forward
    pass even in train mode); an explicit hidden_dropout_prob or attention_probs_dropout_prob in overrides wins.
    """
    fields = dict(TINY_SHAPE)
    if dropout is not None:
        fields.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return DeepScaleLMConfig(**(fields | overrides))


def tiny_model(cls=DeepScaleLMForCausalLM, seed: int | None = 0, dropout: float | None = None, **overrides):
    """cls(tiny_config(dropout, **overrides)) in eval mode, its weights drawn after torch.manual_seed(seed).

    seed=None draws from the global generator as it stands (for tests that seed once for several models). Call
    .train() on the result where a test needs training mode (dropout, activation checkpointing).
    """
    config = tiny_config(dropout, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return cls(config).eval()


def tokenizer_fields(tokenizer) -> dict:
    """The config fields a tokenizer decides: vocab_size (len, added tokens included) and the pad/bos/eos ids."""
    return dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
