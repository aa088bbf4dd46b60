"""Whole-model predictions of dslm_hf.theory against measurements on real DeepScaleLM models (48-96 layers).

Measured with the same hooks dslm-diagnose uses (forward hooks on model.model.layers[i] for the stream, weight-gradient
norms per layer), in train mode (dropout on), on Zipf-distributed token ids with config.embedding_correlation
estimated from them, as the recipe asks.
"""

import math
from pathlib import Path

import pytest
import torch

from dslm_hf import DeepScaleLMConfig, DeepScaleLMForCausalLM, DeepScaleLMForMaskedLM
from dslm_hf.diagnostics import measure_signal_propagation, zipf_token_ids
from dslm_hf.recipe_deepscalelm import embedding_correlation_estimate
from dslm_hf.theory import embedding_table_stds, layer_init_stds, predict_model

VOCAB = 512
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def shakespeare_char_ids(batch: int, length: int) -> tuple[torch.Tensor, int]:
    """(`batch` windows of `length` characters mapped to ids, vocabulary size): real text at character level."""
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} (the shared tinyshakespeare data) is not on this machine")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    vocabulary = {c: i for i, c in enumerate(sorted(set(text)))}
    stride = len(text) // batch
    windows = [text[b * stride : b * stride + length] for b in range(batch)]
    return torch.tensor([[vocabulary[c] for c in window] for window in windows]), len(vocabulary)


def build(scheme: str, norm: str, layers: int, width: int, length: int, decoder: bool, text: bool = False, batch: int = 4):
    """(model, token ids) with r0 estimated from the ids, seeded. text: Shakespeare characters, else Zipf ids.

    At a stream correlation r, the batch gives ~batch x width independent draws of the shared part: more sequences
    make the measured variance and correlation of one model less noisy.
    """
    ids, vocab = shakespeare_char_ids(batch, length) if text else (zipf_token_ids(VOCAB, batch, length, seed=1), VOCAB)
    config = DeepScaleLMConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=length, init_scheme=scheme, norm_placement=norm, is_decoder=decoder,
    )
    config.embedding_correlation = config.estimate_embedding_correlation(ids)
    torch.manual_seed(0)
    model = (DeepScaleLMForCausalLM if decoder else DeepScaleLMForMaskedLM)(config)
    return model, ids


def measure_and_predict(model, ids):
    """(measured per-layer dicts, StackPrediction) for a single-stack model."""
    measured = measure_signal_propagation(model, ids, progress=False)["model.layers"]
    same_token = embedding_correlation_estimate(ids.tolist(), num_tables=1)
    (predicted,) = predict_model(model.config, ids.shape[1], token_same_probability=same_token).values()
    return measured, predicted


def r_squared(measured: list[float], predicted: list[float]) -> float:
    """1 - SS(measured - predicted) / SS(measured - mean): how much of the measured profile the prediction explains."""
    mean = sum(measured) / len(measured)
    residual = sum((m - p) ** 2 for m, p in zip(measured, predicted))
    total = sum((m - mean) ** 2 for m in measured)
    return 1.0 - residual / total


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def relative_gradients(measured: list[dict]) -> list[float]:
    last = measured[-1]["weight_gradient_norm"]
    return [entry["weight_gradient_norm"] / last for entry in measured]


@pytest.fixture(scope="module")
def xavier_pre_ln():
    model, ids = build("xavier", "pre", layers=48, width=64, length=64, decoder=True, text=True)
    return measure_and_predict(model, ids)


def test_xavier_pre_ln_stream_variance_grows_linearly_as_predicted(xavier_pre_ln):
    measured, predicted = xavier_pre_ln
    variance = [entry["stream_variance"] for entry in measured]
    assert r_squared(variance, [layer.stream_variance for layer in predicted.layers]) >= 0.95
    assert variance[-1] > 30 * variance[0]  # grows with depth, no saturation: ~0.5 per layer
    layers = list(range(len(variance)))
    line = [variance[0] + slope(layers, variance) * i for i in layers]
    assert r_squared(variance, line) >= 0.95


def test_xavier_pre_ln_gradient_falls_like_inverse_sqrt_depth(xavier_pre_ln):
    measured, predicted = xavier_pre_ln
    gradients = relative_gradients(measured)
    depth = len(gradients)
    # log-log slope ~ -1/2 (gradient ~ 1/sqrt(l+1)), first layer ~ sqrt(N) x the last, as the theory predicts.
    log_depth = [math.log(i + 1) for i in range(depth)]
    log_slope = slope(log_depth, [math.log(g) for g in gradients])
    assert -0.75 < log_slope < -0.3
    predicted_slope = slope(log_depth, [math.log(g) for g in predicted.relative_weight_gradient_norms()])
    assert log_slope == pytest.approx(predicted_slope, abs=0.15)
    first_layers = sum(gradients[:3]) / 3  # a single layer's norm is noisy
    assert first_layers == pytest.approx(math.sqrt(depth / 2), rel=0.4)


def test_xavier_post_ln_gradient_decays_exponentially_toward_the_input():
    model, ids = build("xavier", "post", layers=48, width=128, length=128, decoder=False)
    measured, predicted = measure_and_predict(model, ids)
    gradients = relative_gradients(measured)
    log_gradients = [math.log(g) for g in gradients]
    layers = list(range(len(gradients)))
    # Exponential: the log-gradient falls linearly from the output toward the input. One model's per-layer norms
    # scatter by ~10% around the trend, so the line explains a good part of the profile, not all of it.
    rate = slope(layers, log_gradients)
    assert rate > 0.015
    line = [log_gradients[-1] + rate * (i - layers[-1]) for i in layers]
    assert r_squared(log_gradients, line) >= 0.5
    assert sum(gradients[:3]) / 3 < 0.5
    predicted_rate = slope(layers, [math.log(g) for g in predicted.relative_weight_gradient_norms()])
    assert predicted_rate == pytest.approx(rate, rel=0.5)
    assert all(entry["stream_variance"] == pytest.approx(1.0, abs=0.01) for entry in measured)  # forward is stable


def quarter_ratio(values: list[float]) -> float:
    """Mean of the first quarter of the layers over the mean of the last quarter (1: flat)."""
    quarter = max(1, len(values) // 4)
    return (sum(values[:quarter]) / quarter) / (sum(values[-quarter:]) / quarter)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_deepscalelm_profiles_are_flat_and_match_the_theory(norm):
    model, ids = build("deepscalelm", norm, layers=48, width=64, length=64, decoder=True, text=True, batch=8)
    measured, predicted = measure_and_predict(model, ids)
    for entry, layer in zip(measured, predicted.layers):
        assert abs(entry["stream_variance"] - layer.stream_variance) < 0.1
        assert abs(entry["stream_correlation"] - layer.stream_correlation) < 0.05
        assert entry["stream_variance"] == pytest.approx(1.0, abs=0.15)
    # Flat: no growth or decay with depth (xavier Pre-LN: ~sqrt(N) = 7x between the ends; Post-LN: ~1/3).
    assert 0.7 < quarter_ratio(relative_gradients(measured)) < 1.4
    assert 0.85 < quarter_ratio(predicted.relative_weight_gradient_norms()) < 1.15
    assert max(entry["stream_correlation"] for entry in measured) < 0.8  # no rank collapse


@pytest.mark.parametrize("scheme, norm, correlation_tolerance", [("standard", "pre", 0.08), ("deepnet", "post", 0.03)])
def test_gpt2_standard_and_deepnet_stacks_match_the_theory(scheme, norm, correlation_tolerance):
    """GPT-2's scaled init (tiny, slowly growing variance) and DeepNorm (Post-LN, flat) at 48 layers."""
    model, ids = build(scheme, norm, layers=48, width=64, length=64, decoder=True, text=True, batch=8)
    measured, predicted = measure_and_predict(model, ids)
    for entry, layer in zip(measured, predicted.layers):
        assert entry["stream_variance"] == pytest.approx(layer.stream_variance, rel=0.1)
        assert abs(entry["stream_correlation"] - layer.stream_correlation) < correlation_tolerance
    assert quarter_ratio(relative_gradients(measured)) == pytest.approx(
        quarter_ratio(predicted.relative_weight_gradient_norms()), abs=0.2)


@pytest.mark.parametrize("scheme, norm", [("deepscalelm", "pre"), ("xavier", "pre"), ("standard", "pre"), ("deepnet", "post")])
def test_theory_init_sigmas_are_the_models(scheme, norm):
    """The sigmas the theory assumes are the ones the model draws its weights with (4096+ entries each: ~2% noise)."""
    config = DeepScaleLMConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                               max_position_embeddings=128, init_scheme=scheme, norm_placement=norm)
    torch.manual_seed(0)
    model = DeepScaleLMForCausalLM(config)
    for index in (0, 5):
        layer, stds = model.model.layers[index], layer_init_stds(config, "decoder", index)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert float(getattr(layer.self_attn, name).weight.detach().std()) == pytest.approx(stds[name], rel=0.05), name
        for name in ("fc1", "fc2"):
            assert float(getattr(layer.mlp, name).weight.detach().std()) == pytest.approx(stds[name], rel=0.05), name
    word, position = embedding_table_stds(config)
    assert float(model.model.embed_tokens.weight.detach().std()) == pytest.approx(word, rel=0.05)
    assert float(model.model.embed_positions.weight.detach().std()) == pytest.approx(position, rel=0.05)
