"""The curse-of-depth baselines: LayerNorm Scaling (Sun et al. 2025) and Mix-LN (Li et al. 2024) as config options,
checked against their definitions, refused where they make no sense, and invisible at their defaults."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from dslm_hf import DeepScaleLMForCausalLM, DeepScaleLMForMaskedLM
from dslm_hf.export import ExportRefusal, native_target
from dslm_hf.theory import predict_model
from tiny_models import tiny_config, tiny_model

# overrides of tiny_models' shape (width 32); every test names its depth
TINY = dict(vocab_size=61, num_attention_heads=4, max_position_embeddings=32, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, init_scheme="standard", pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def model_of(model_class=DeepScaleLMForCausalLM, seed: int = 0, **overrides):
    return tiny_model(model_class, seed, **(TINY | overrides))


def branch_inputs(model, ids) -> dict[tuple[int, str], torch.Tensor]:
    """What each branch (self-attention, FFN) of each layer reads, by forward pre-hooks."""
    seen, handles = {}, []
    for index, layer in enumerate(model.model.layers):
        for name in ("self_attn", "mlp"):
            def record(module, args, index=index, name=name):
                seen[index, name] = args[0].detach()
            handles.append(getattr(layer, name).register_forward_pre_hook(record))
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return seen


def test_layernorm_scaling_gives_layer_l_branch_inputs_of_variance_one_over_l():
    # eps 1e-12: LayerNorm's output variance is then v / (v + eps) = 1 to 1e-6, so the scale alone sets it.
    scaled = model_of(num_hidden_layers=6, layernorm_scaling=True, layer_norm_eps=1e-12)
    plain = model_of(num_hidden_layers=6, layer_norm_eps=1e-12)
    ids = tokens()
    for (index, name), read in branch_inputs(scaled, ids).items():
        per_token = read.double().var(dim=-1, unbiased=False).mean()
        assert per_token == pytest.approx(1.0 / (index + 1), rel=1e-5), (index, name)
    for (index, name), read in branch_inputs(plain, ids).items():
        assert read.double().var(dim=-1, unbiased=False).mean() == pytest.approx(1.0, rel=1e-5), (index, name)
    assert scaled.model.norm is not None and plain.model.embed_norm is None  # the final LayerNorm stays unscaled


def test_mix_ln_first_quarter_is_post_ln_then_pre_ln_by_the_layer_formulas():
    model = model_of(num_hidden_layers=8, norm_placement="mix")
    stack = model.model
    assert [layer.pre_norm for layer in stack.layers] == [False, False] + [True] * 6  # floor(0.25 x 8) = 2
    assert stack.embed_norm is None and stack.norm is not None
    torch.manual_seed(1)
    x = torch.randn(2, 12, model.config.hidden_size)
    with torch.no_grad():
        post, pre = stack.layers[0], stack.layers[2]
        h = post.self_attn_norm(x + post.self_attn(x)[0])
        expected_post = post.mlp_norm(h + post.mlp(h))
        h = x + pre.self_attn(pre.self_attn_norm(x))[0]
        expected_pre = h + pre.mlp(pre.mlp_norm(h))
        torch.testing.assert_close(post(x), expected_post, rtol=0, atol=1e-6)
        torch.testing.assert_close(pre(x), expected_pre, rtol=0, atol=1e-6)


def test_mix_ln_stream_after_a_post_ln_layer_has_unit_layernorm_statistics():
    model = model_of(num_hidden_layers=4, norm_placement="mix")  # layer 1 Post-LN, layers 2-4 Pre-LN
    with torch.no_grad():
        streams = model(tokens(), output_hidden_states=True).hidden_states  # embeddings, then each layer's output
    after_first = streams[1].double()
    assert after_first.mean(-1).abs().max() < 1e-6
    torch.testing.assert_close(after_first.var(-1, unbiased=False), torch.ones(after_first.shape[:2], dtype=torch.double),
                               rtol=0, atol=1e-3)  # v / (v + 1e-5) with v ~ 0.02^2 x d: the eps term
    # A Pre-LN layer adds its branches to the unnormalised stream: no longer unit statistics per token.
    assert (streams[2].double().var(-1, unbiased=False) - 1).abs().max() > 1e-3


@pytest.mark.parametrize("overrides,field,fragment", [
    ({"layernorm_scaling": True, "norm_placement": "post"}, "layernorm_scaling", "set norm_placement='pre'"),
    ({"layernorm_scaling": True, "norm_placement": "mix"}, "layernorm_scaling", "set norm_placement='pre'"),
    ({"layernorm_scaling": True, "init_scheme": "deepscalelm"}, "layernorm_scaling", "use init_scheme in ('standard', 'xavier')"),
    ({"norm_placement": "mix", "init_scheme": "deepscalelm"}, "norm_placement", "use init_scheme in ('standard', 'xavier')"),
    ({"norm_placement": "mix", "init_scheme": "deepnet"}, "init_scheme", "DeepNorm) is a Post-LN method"),
    ({"norm_placement": "mix", "mix_ln_post_fraction": 1.0}, "mix_ln_post_fraction", "expected a fraction in (0, 1)"),
    ({"norm_placement": "mix", "mix_ln_post_fraction": 0.0}, "mix_ln_post_fraction", "expected a fraction in (0, 1)"),
    ({"norm_placement": "mix", "mix_ln_post_fraction": 0.2}, "mix_ln_post_fraction", "floor(0.2 x 4 layers) = 0 Post-LN layers in the decoder"),
    ({"norm_placement": "pre", "mix_ln_post_fraction": 0.5}, "mix_ln_post_fraction", "applies only to norm_placement='mix'"),
])
def test_senseless_combinations_are_refused_naming_the_field(overrides, field, fragment):
    with pytest.raises(ValueError) as caught:
        tiny_config(**(TINY | {"num_hidden_layers": 4} | overrides))
    assert f"DeepScaleLMConfig.{field}=" in str(caught.value) and fragment in str(caught.value)


def test_mix_ln_in_an_encoder_decoder_counts_the_post_ln_layers_per_stack():
    config = tiny_config(**(TINY | {"num_hidden_layers": 4, "is_encoder_decoder": True, "decoder_layers": 8,
                                          "decoder_start_token_id": 1, "norm_placement": "mix"}))
    assert (config.post_norm_layers(4), config.post_norm_layers(8)) == (1, 2)
    with pytest.raises(ValueError, match=r"floor\(0.25 x 2 layers\) = 0 Post-LN layers in the encoder"):
        tiny_config(**(TINY | {"num_hidden_layers": 2, "is_encoder_decoder": True, "decoder_layers": 8,
                                     "decoder_start_token_id": 1, "norm_placement": "mix"}))


@pytest.mark.parametrize("overrides", [{"layernorm_scaling": True}, {"norm_placement": "mix"}], ids=["lns", "mix"])
def test_save_load_generate_and_refusals_work_with_both_options(overrides, tmp_path):
    model = model_of(num_hidden_layers=4, **overrides)
    ids = tokens()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert {key: getattr(loaded.config, key) for key in overrides} == overrides
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    prompt = ids[:1, :5]
    cached = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    uncached = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                               use_cache=False)
    assert cached.shape == (1, 11) and torch.equal(cached, uncached)
    with pytest.raises(ExportRefusal, match="no native twin"):
        native_target(loaded.config, "DeepScaleLMForCausalLM")
    with pytest.raises(ValueError, match="are not predicted"):
        predict_model(loaded.config, 12)


def test_mix_ln_masked_lm_round_trips_through_the_auto_class(tmp_path):
    model = model_of(DeepScaleLMForMaskedLM, num_hidden_layers=4, is_decoder=False, norm_placement="mix")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(tokens()).logits, model(tokens()).logits)
