"""Whole-model predictions of dslm_hf.theory against measurements on real DeepScaleLM models (48-96 layers).

Measured with the same hooks dslm-diagnose uses (forward hooks on model.model.layers[i] for the stream, weight-gradient
norms per layer), in train mode (dropout on), on Zipf-distributed token ids with config.embedding_correlation
estimated from them, as the recipe asks.
"""

import functools
import math
import statistics

import pytest
import torch

from dslm_hf import DeepScaleLMConfig, DeepScaleLMForCausalLM, DeepScaleLMForMaskedLM
from dslm_hf.diagnostics import measure_signal_propagation, zipf_token_ids
from dslm_hf.recipe_deepscalelm import embedding_correlation_estimate
from dslm_hf.theory import StackPrediction, embedding_table_stds, layer_init_stds, predict_model
from shakespeare_data import excerpt_text

VOCAB = 512


def shakespeare_char_ids(batch: int, length: int) -> tuple[torch.Tensor, int]:
    """(`batch` windows of `length` characters mapped to ids, vocabulary size): real text at character level."""
    text = excerpt_text()
    vocabulary = {c: i for i, c in enumerate(sorted(set(text)))}
    stride = len(text) // batch
    windows = [text[b * stride : b * stride + length] for b in range(batch)]
    return torch.tensor([[vocabulary[c] for c in window] for window in windows]), len(vocabulary)


def build(scheme: str, norm: str, layers: int, width: int, length: int, decoder: bool, text: bool = False, batch: int = 4,
          seed: int = 0):
    """(model, token ids) with r0 estimated from the ids, weights drawn from `seed`. text: Shakespeare characters,
    else Zipf ids.

    At a stream correlation r, the batch gives ~batch x width independent draws of the shared part: more sequences
    make the measured variance and correlation of one model less noisy.
    """
    ids, vocab = shakespeare_char_ids(batch, length) if text else (zipf_token_ids(VOCAB, batch, length, seed=1), VOCAB)
    config = DeepScaleLMConfig(
        vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
        max_position_embeddings=length, init_scheme=scheme, norm_placement=norm, is_decoder=decoder,
    )
    config.embedding_correlation = config.estimate_embedding_correlation(ids)
    torch.manual_seed(seed)
    model = (DeepScaleLMForCausalLM if decoder else DeepScaleLMForMaskedLM)(config)
    return model, ids


SEEDS = range(4)


@functools.cache
def measure_over_seeds(scheme: str, norm: str, **shape) -> tuple[dict[str, list[float]], StackPrediction]:
    """Per-layer means over len(SEEDS) models (weights drawn from each seed, the same ids), and the prediction.

    One model's profile is noisy (each test states the per-seed spread, measured over seeds 0-7); the theory
    predicts the mean, so the tests compare it with a 4-seed mean, whose standard error is half a seed's spread.
    Stream variance and correlation are averaged; the relative weight-gradient norms geometrically (gradients
    multiply through the stack, so their logarithms are what scatters evenly).
    """
    profiles = []
    for seed in SEEDS:
        model, ids = build(scheme, norm, seed=seed, **shape)
        profiles.append(measure_signal_propagation(model, ids, progress=False)["model.layers"])
    same_token = embedding_correlation_estimate(ids.tolist(), num_tables=1)
    (predicted,) = predict_model(model.config, ids.shape[1], token_same_probability=same_token).values()
    layers = range(len(profiles[0]))
    mean = {key: [statistics.fmean(p[i][key] for p in profiles) for i in layers]
            for key in ("stream_variance", "stream_correlation")}
    mean["relative_gradient"] = [
        math.exp(statistics.fmean(math.log(p[i]["weight_gradient_norm"] / p[-1]["weight_gradient_norm"]) for p in profiles))
        for i in layers
    ]
    return mean, predicted


def r_squared(measured: list[float], predicted: list[float]) -> float:
    """1 - SS(measured - predicted) / SS(measured - mean): how much of the measured profile the prediction explains."""
    mean = sum(measured) / len(measured)
    residual = sum((m - p) ** 2 for m, p in zip(measured, predicted))
    total = sum((m - mean) ** 2 for m in measured)
    return 1.0 - residual / total


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def quarter_ratio(values: list[float]) -> float:
    """Mean of the first quarter of the layers over the mean of the last quarter (1: flat)."""
    quarter = max(1, len(values) // 4)
    return (sum(values[:quarter]) / quarter) / (sum(values[-quarter:]) / quarter)


XAVIER_PRE_LN = dict(layers=48, width=64, length=64, decoder=True, text=True)


def test_xavier_pre_ln_stream_variance_grows_linearly_as_predicted():
    measured, predicted = measure_over_seeds("xavier", "pre", **XAVIER_PRE_LN)
    variance = measured["stream_variance"]
    # R^2 against the prediction: one seed 0.75-0.996, a 4-seed mean 0.995-0.999 (seeds 0-3 and 4-7).
    assert r_squared(variance, [layer.stream_variance for layer in predicted.layers]) >= 0.98
    # Grows with depth, no saturation: last/first layer 80-120 for one seed (~2 per layer at unit input variance).
    assert variance[-1] > 50 * variance[0]
    # Linear: a line explains the profile (one seed R^2 0.968-0.997, a 4-seed mean 0.994-0.997).
    layers = list(range(len(variance)))
    line = [variance[0] + slope(layers, variance) * i for i in layers]
    assert r_squared(variance, line) >= 0.98


def test_xavier_pre_ln_gradient_falls_like_inverse_sqrt_depth():
    measured, predicted = measure_over_seeds("xavier", "pre", **XAVIER_PRE_LN)
    gradients = measured["relative_gradient"]
    depth = len(gradients)
    # log-log slope ~ -1/2 (gradient ~ 1/sqrt(l+1)); theory -0.528 here. One seed's slope scatters with sd 0.078
    # (seeds 0-7), so a 4-seed mean has standard error 0.039: 0.12 is 3 standard errors.
    log_depth = [math.log(i + 1) for i in range(depth)]
    log_slope = slope(log_depth, [math.log(g) for g in gradients])
    predicted_slope = slope(log_depth, [math.log(g) for g in predicted.relative_weight_gradient_norms()])
    assert log_slope == pytest.approx(predicted_slope, abs=0.12)
    # The first layers get ~sqrt(N/2) x the last (theory: 1.15 sqrt(N/2) here). One seed: sd 0.26 sqrt(N/2), so a
    # 4-seed mean has standard error 0.13: 40% is 3 standard errors.
    first_layers = sum(gradients[:3]) / 3  # a single layer's norm is noisy
    assert first_layers == pytest.approx(math.sqrt(depth / 2), rel=0.4)


@pytest.mark.slow
def test_xavier_post_ln_gradient_decays_toward_the_input_at_the_predicted_rate():
    measured, predicted = measure_over_seeds("xavier", "post", layers=48, width=128, length=128, decoder=False)
    gradients = measured["relative_gradient"]
    layers = list(range(len(gradients)))
    # Exponential decay toward the input: the log-gradient's slope over the layers. Theory 0.0287 per layer. This is
    # the noisiest profile here: one seed's slope scatters with sd 0.021 (seeds 0-7; mean 0.030, range -0.005 to
    # 0.060), so a 4-seed mean has standard error 0.0105 and the prediction is held to 3 standard errors (0.032).
    # A line's R^2 through one seed's log-profile ranges from -0.75 to 0.94: too unstable to assert.
    rate = slope(layers, [math.log(g) for g in gradients])
    predicted_rate = slope(layers, [math.log(g) for g in predicted.relative_weight_gradient_norms()])
    assert rate == pytest.approx(predicted_rate, abs=0.032)
    assert rate > 0.01  # decays (4-seed means 0.020 and 0.039)
    # The first quarter gets well under the last's gradient: theory 0.36, 4-seed means 0.24 and 0.48.
    assert quarter_ratio(gradients) < 0.6
    assert all(v == pytest.approx(1.0, abs=0.01) for v in measured["stream_variance"])  # forward is stable (LN)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_deepscalelm_profiles_are_flat_and_match_the_theory(norm):
    measured, predicted = measure_over_seeds("deepscalelm", norm, layers=48, width=64, length=64, decoder=True,
                                             text=True, batch=8)
    # Largest deviation over the 48 layers, 4-seed means (seeds 0-3 / 4-7): variance 0.073 / 0.025 (Pre-LN; Post-LN's
    # LayerNorm makes it exact), correlation 0.027 / 0.023 (Pre-LN) and 0.030 / 0.032 (Post-LN).
    for variance, correlation, layer in zip(measured["stream_variance"], measured["stream_correlation"], predicted.layers):
        assert abs(variance - layer.stream_variance) < 0.1
        assert abs(correlation - layer.stream_correlation) < 0.05
        assert variance == pytest.approx(1.0, abs=0.1)  # 4-seed means within 0.054-0.065 of 1 (Pre-LN)
    # Flat: no growth or decay with depth (xavier Pre-LN: ~sqrt(N) = 7x between the ends; Post-LN: ~1/3). Theory
    # 0.94 (Pre-LN) and 0.92 (Post-LN); one seed's ratio has sd 0.15-0.21, so 0.7-1.4 is about 3 standard errors of
    # a 4-seed mean on each side (measured: 0.90 / 0.92 Pre-LN, 0.91 / 0.98 Post-LN).
    assert 0.7 < quarter_ratio(measured["relative_gradient"]) < 1.4
    assert 0.85 < quarter_ratio(predicted.relative_weight_gradient_norms()) < 1.15
    assert max(measured["stream_correlation"]) < 0.8  # no rank collapse (measured 0.49-0.54)


@pytest.mark.parametrize("scheme, norm, variance_tolerance, correlation_tolerance, gradient_tolerance", [
    # 4-seed means (seeds 0-3 / 4-7): variance within 4.7% / 2.7%, correlation within 0.030 / 0.012, gradient
    # quarter ratio 1.05 / 1.11 against the theory's 1.16 (the theory runs 0.08 high on the 8-seed mean; one seed's
    # sd 0.057 gives a 4-seed standard error 0.029: 0.08 + 3 x 0.029 = 0.17).
    ("standard", "pre", 0.08, 0.05, 0.17),
    # 4-seed means: correlation within 0.004 / 0.001, quarter ratio 0.998 / 1.007 against 1.000 (one seed's sd 0.011).
    ("deepnet", "post", 0.01, 0.01, 0.02),
])
def test_gpt2_standard_and_deepnet_stacks_match_the_theory(scheme, norm, variance_tolerance, correlation_tolerance,
                                                           gradient_tolerance):
    """GPT-2's scaled init (tiny, slowly growing variance) and DeepNorm (Post-LN, flat) at 48 layers."""
    measured, predicted = measure_over_seeds(scheme, norm, layers=48, width=64, length=64, decoder=True, text=True,
                                             batch=8)
    for variance, correlation, layer in zip(measured["stream_variance"], measured["stream_correlation"], predicted.layers):
        assert variance == pytest.approx(layer.stream_variance, rel=variance_tolerance)
        assert abs(correlation - layer.stream_correlation) < correlation_tolerance
    assert quarter_ratio(measured["relative_gradient"]) == pytest.approx(
        quarter_ratio(predicted.relative_weight_gradient_norms()), abs=gradient_tolerance)


def xavier(fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    return gain * math.sqrt(2 / (fan_in + fan_out))


# The published sigmas of a 6-layer decoder, d = 64, d_ff = 256, vocabulary 512, 128 positions, dropout p = 0.1,
# written out from their sources rather than taken from dslm_hf.recipe_deepscalelm: xavier-normal (the paper's
# vanilla); GPT-2 (N(0, 0.02), output projections 0.02 / sqrt(2N)); DeepNet (xavier, v/o/FFN times (8N)^(-1/4));
# DeepScaleLM (RECIPE section 2: q/k 1/d, ReLU FFN sqrt((1-p)/2)/d each, two tables of (1-p)/2).
D, D_FF, N, P = 64, 256, 6, 0.1
PUBLISHED_STDS = {
    "xavier": {"q_proj": xavier(D, D), "k_proj": xavier(D, D), "v_proj": xavier(D, D), "o_proj": xavier(D, D),
               "fc1": xavier(D, D_FF), "fc2": xavier(D_FF, D), "word": xavier(VOCAB, D), "position": xavier(128, D)},
    "standard": {"q_proj": 0.02, "k_proj": 0.02, "v_proj": 0.02, "o_proj": 0.02 / math.sqrt(2 * N), "fc1": 0.02,
                 "fc2": 0.02 / math.sqrt(2 * N), "word": 0.02, "position": 0.02},
    "deepnet": {"q_proj": xavier(D, D), "k_proj": xavier(D, D), "v_proj": xavier(D, D, (8 * N) ** -0.25),
                "o_proj": xavier(D, D, (8 * N) ** -0.25), "fc1": xavier(D, D_FF, (8 * N) ** -0.25),
                "fc2": xavier(D_FF, D, (8 * N) ** -0.25), "word": xavier(VOCAB, D), "position": xavier(128, D)},
    "deepscalelm": {"q_proj": math.sqrt(1 / D), "k_proj": math.sqrt(1 / D), "fc1": math.sqrt(math.sqrt((1 - P) / 2) / D),
                    "fc2": math.sqrt(math.sqrt((1 - P) / 2) / D), "word": math.sqrt((1 - P) / 2),
                    "position": math.sqrt((1 - P) / 2)},
}


def drawn_std(weight: torch.Tensor) -> float:
    return float(weight.detach().std())


@pytest.mark.parametrize("scheme, norm", [("deepscalelm", "pre"), ("xavier", "pre"), ("standard", "pre"), ("deepnet", "post")])
def test_models_draw_the_published_sigmas_and_the_theory_assumes_them(scheme, norm):
    """Every weight's sample std against its published formula, and the theory's assumed sigma against both.

    Tolerance 5% relative: the sample std of n >= 4096 normal draws has a relative standard error 1/sqrt(2n) <= 1.1%,
    so 5% is more than 4 standard errors.
    """
    config = DeepScaleLMConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=N, num_attention_heads=4,
                               max_position_embeddings=128, init_scheme=scheme, norm_placement=norm)
    assert (config.intermediate_size, config.hidden_dropout_prob) == (D_FF, P)
    torch.manual_seed(0)
    model = DeepScaleLMForCausalLM(config)
    published = PUBLISHED_STDS[scheme]
    value_output = []
    for index in (0, N - 1):
        layer, assumed = model.model.layers[index], layer_init_stds(config, "decoder", index)
        drawn = {name: drawn_std(getattr(layer.self_attn, name).weight) for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
        drawn |= {name: drawn_std(getattr(layer.mlp, name).weight) for name in ("fc1", "fc2")}
        for name, std in drawn.items():
            assert std == pytest.approx(assumed[name], rel=0.05), name
            if name in published:
                assert assumed[name] == pytest.approx(published[name], rel=1e-12), name
        value_output.append((assumed["v_proj"], assumed["o_proj"]))
    if scheme == "deepscalelm":
        # v/o: sqrt((1-p)/r_l)/d each, r_l the attention input correlation (0 < r_l <= 1): at least sqrt(1-p)/d, and
        # falling with depth as r_l grows (the recurrence itself is checked against measured correlations above).
        assert all(v == o and v**2 * D >= math.sqrt(1 - P) for v, o in value_output)
        assert value_output[1][0] < value_output[0][0]
    word, position = embedding_table_stds(config)
    assert (word, position) == pytest.approx((published["word"], published["position"]), rel=1e-12)
    assert drawn_std(model.model.embed_tokens.weight) == pytest.approx(word, rel=0.05)
    assert drawn_std(model.model.embed_positions.weight) == pytest.approx(position, rel=0.05)
