"""Signal propagation theory of transformers at initialisation, as code (Kedia et al., ICML 2024, section 3).

Two levels:

1. Component formulas (the paper's section 3; the moment formulas of `recipe_deepscalelm`). Each takes the statistics
   of its input - per-element mean, variance, and the correlation r between the hidden vectors of two different
   positions (`Moments`) - and returns those of its output; each `*_backward` maps the statistics of the upstream
   gradient (`GradientMoments`: variance and correlation between positions) to those of the gradient at its input.
   Linear, embedding, dropout, ReLU, GeLU, LayerNorm, softmax, single-head attention (bidirectional and causal), the
   attention and FFN blocks, the scaled residual. `tests/test_theory_components.py` checks each against the real
   torch op by Monte Carlo.

2. Whole-stack predictions (`predict_model`): per layer, the variance and inter-token correlation of the residual
   stream at the layer's output, the variance of the gradient reaching it, and the norm of the gradient of the layer's
   weight matrices, for any `DeepScaleLMConfig` (Pre-LN and Post-LN, every init scheme), run in train mode
   (dropout on), with the loss gradient entering at the last hidden state.

How each init scheme initialises the model (what the predictions assume). The sigmas, residual scales and logit
scale are read from the recipe's init tables (`stack_init_plan`, `linear_init_std`, `embedding_table_std`,
`output_logit_scale` in recipe_deepscalelm.py), the same functions the model's `_init_weights` calls, so the two can
not disagree; `tests/test_theory_stack.py` also pins them against a freshly built model. Every weight is
N(0, sigma^2), biases are zero, LayerNorms have weight 1 and bias 0.

- "deepscalelm": the recipe's initialisation (`recipe_deepscalelm`, "Initialisation sigmas"). Each embedding table
  (word, absolute position, token type) sigma^2 = (1-p)/n_tables (`embedding_std`); W_q, W_k 1/d (`query_key_std`);
  W_v and W_o of layer l each sqrt((1-p)/a_l)/d (`value_output_std`), a_l = `attention_variance_ratio` at the layer's
  input correlation r_l from `correlation_recurrence` (mask- and length-aware), at `init_sequence_length`, causal in
  a decoder stack (cross-attention: bidirectional, at the encoder's final correlation); FFN W_1, W_2 from `ffn_stds`; residual out = lambda skip + beta Dropout(F)
  with beta^2 = k/N, lambda^2 = 1 - beta^2 (`deepscalelm_residual_scales`); tied logits computed from the hidden
  state times 1/sqrt(d sigma_e^2) (`tied_logit_scale`); an untied head 1/d.
- "xavier" (the paper's vanilla baseline): xavier-normal, sigma^2 = 2/(fan_in + fan_out), on every Linear and every
  embedding table (an embedding of shape (rows, d) has sigma^2 = 2/(rows + d)); plain residual lambda = beta = 1;
  logits unscaled.
- "standard" (GPT-2): N(0, initializer_range^2) everywhere, except o_proj and fc2 at initializer_range/sqrt(2N)
  (`scaled_output_std`, N = layers of the stack); plain residual; logits unscaled.
- "deepnet" (DeepNorm, Post-LN only): x_next = LN(alpha x + F(x)); xavier-normal with gain beta on v_proj, o_proj,
  fc1, fc2 and gain 1 on q_proj, k_proj; (alpha, beta) from `deepnet_constants`; embeddings xavier-normal.

Model structure assumed (dslm_hf/modeling_deepscalelm.py): Pre-LN sums the embedding tables, applies dropout, runs
the layers (each branch sees LN(stream)), and normalises the last layer's output with a final LayerNorm. Post-LN
applies dropout to the embedding sum, then normalises it (the reference code's order), and every branch ends in
LN(lambda x + beta Dropout(F(x))).

Approximations (document them before trusting a number): attention weights are treated as uniform over the visible
keys in the backward pass and in the correlation of the outputs (logit variance ~1 at init); the causal mask is
averaged over positions; the hidden vectors of two different sequences are independent; token and label statistics
enter only through the probability that two positions hold the same token. Post-LN: the gradient between layers is
taken as nearly orthogonal to each LayerNorm's output (`post_ln_aligned_fraction`). No torch here: math on floats,
numpy for one quadrature (`softmax_power_sum`).
"""

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .recipe_deepscalelm import embedding_table_std, linear_init_std, output_logit_scale, stack_init_plan


# ----------------------------------------------------------------------------------------------------------------
# Statistics carried through the network
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Moments:
    """Forward statistics of a hidden tensor (positions x units).

    mean, variance: per element. correlation: Pearson correlation between the vectors of two different positions of
    one sequence (the paper's r); None where a formula does not define it (softmax).
    """

    mean: float
    variance: float
    correlation: float | None

    @property
    def second_moment(self) -> float:
        return self.variance + self.mean**2

    @property
    def second_moment_correlation(self) -> float:
        """E[x_i x_j] / E[x^2] for two positions: the correlation a zero-mean Linear passes on (RECIPE 3, linear)."""
        return (self.correlation * self.variance + self.mean**2) / self.second_moment


@dataclass(frozen=True)
class GradientMoments:
    """Backward statistics: per-element variance of the gradient and its correlation between two positions."""

    variance: float
    correlation: float = 0.0

    def scaled(self, gain: float) -> "GradientMoments":
        return GradientMoments(self.variance * gain, self.correlation)


def _require_zero_mean(x: Moments, component: str):
    if abs(x.mean) > 1e-9 * math.sqrt(max(x.variance, 1e-300)):
        raise ValueError(f"{component}: the formula assumes a zero-mean input, got mean={x.mean} (put a Linear first)")


# ----------------------------------------------------------------------------------------------------------------
# Components (the paper's section 3)
# ----------------------------------------------------------------------------------------------------------------
def linear_forward(x: Moments, fan_in: int, weight_std: float) -> Moments:
    """y = W x, W ~ N(0, sw^2): var = d_in sw^2 (s^2 + mu^2), r_out = (r s^2 + mu^2) / (s^2 + mu^2)."""
    return Moments(0.0, fan_in * weight_std**2 * x.second_moment, x.second_moment_correlation)


def linear_backward(g: GradientMoments, fan_out: int, weight_std: float) -> GradientMoments:
    """dx = W^T dy: var = d_out sw^2 g^2; the correlation between positions is unchanged."""
    return g.scaled(fan_out * weight_std**2)


def embedding_forward(table_stds: list[float], same_row_probabilities: list[float]) -> Moments:
    """Sum of embedding tables, table t ~ N(0, sigma_t^2), looked up independently.

    Two positions' sums correlate by the variance share of every table in which they pick the same row, weighted by
    how often that happens (same token; never the same position; usually the same segment).
    """
    variance = sum(s * s for s in table_stds)
    shared = sum(s * s * q for s, q in zip(table_stds, same_row_probabilities, strict=True))
    return Moments(0.0, variance, shared / variance)


def embedding_row_gradient_variance(g: GradientMoments, occurrences: float) -> float:
    """Gradient of one embedding row used at `occurrences` positions of a sequence: the sum of their gradients."""
    return occurrences * g.variance * (1.0 + (occurrences - 1.0) * g.correlation)


def dropout_forward(x: Moments, p: float) -> Moments:
    """Inverted dropout (keep 1-p, scale 1/(1-p)): var = (s^2 + p mu^2)/(1-p); covariance unchanged."""
    variance = (x.variance + p * x.mean**2) / (1.0 - p)
    return Moments(x.mean, variance, x.correlation * x.variance / variance)


def dropout_backward(g: GradientMoments, p: float) -> GradientMoments:
    """var = g^2/(1-p); independent masks leave the covariance, so the correlation shrinks by (1-p)."""
    return GradientMoments(g.variance / (1.0 - p), g.correlation * (1.0 - p))


def relu_forward(x: Moments) -> Moments:
    """ReLU of N(0, s^2): mean s/sqrt(2 pi), var s^2 (pi-1)/(2 pi), r_out = (pi r + sqrt(1-r^2) - r acos r - 1)/(pi-1)."""
    _require_zero_mean(x, "relu_forward")
    r = min(max(x.correlation, -1.0), 1.0)
    s2 = x.variance
    corr = (math.pi * r + math.sqrt(1.0 - r * r) - r * math.acos(r) - 1.0) / (math.pi - 1.0)
    return Moments(math.sqrt(s2 / (2.0 * math.pi)), s2 * (math.pi - 1.0) / (2.0 * math.pi), corr)


def relu_backward(g: GradientMoments, x: Moments) -> GradientMoments:
    """Half the units pass: var g^2/2; both positions active with probability (pi - acos r)/(2 pi)."""
    r = min(max(x.correlation, -1.0), 1.0)
    return GradientMoments(g.variance / 2.0, g.correlation * (math.pi - math.acos(r)) / math.pi)


def gelu_forward(x: Moments) -> Moments:
    """GeLU x Phi(x) of N(0, s^2), a = s^2/(1+s^2) (closed forms of the reference simulations).

    mean = s^2 / sqrt(2 pi (1 + s^2)); var = (s^2/(2 pi)) (pi - a - acos(a) + 2a sqrt((1-a)/(1+a)));
    E[g(x) g(y)] = (s^2/4) (r + (2r/pi) asin(r a) + (2 s^2/pi) (s^2 (1-r^2) + 1 + r^2) / ((1+s^2) sqrt((1+s^2)^2 - r^2 s^4))).
    """
    _require_zero_mean(x, "gelu_forward")
    s2, r = x.variance, x.correlation
    mean = s2 / math.sqrt(2.0 * math.pi * (1.0 + s2))
    return Moments(mean, _gelu_cross_moment(s2, 1.0) - mean**2, (_gelu_cross_moment(s2, r) - mean**2) / (_gelu_cross_moment(s2, 1.0) - mean**2))


def _gelu_cross_moment(s2: float, r: float) -> float:
    """E[g(x) g(y)] for (x, y) ~ N(0, s^2) with correlation r."""
    a = s2 / (1.0 + s2)
    root = (1.0 + s2) * math.sqrt((1.0 + s2) ** 2 - (r * s2) ** 2)
    return (s2 / 4.0) * (
        r + r * math.asin(r * a) * 2.0 / math.pi + s2 * (2.0 / math.pi) * (s2 * (1.0 - r * r) + 1.0 + r * r) / root
    )


def _gelu_derivative_cross_moment(s2: float, r: float) -> float:
    """E[g'(x) g'(y)] for (x, y) ~ N(0, s^2) with correlation r (r = 1: E[g'(x)^2])."""
    a = s2 / (1.0 + s2)
    ra = r * a
    return 0.5 + (1.0 / (2.0 * math.pi)) * (
        -math.acos(ra) + ra * ((s2 + 1.0) * (2.0 * s2 + 3.0) - 2.0 * (r * s2) ** 2) / ((s2 + 1.0) ** 2 - (r * s2) ** 2) ** 1.5
    )


def gelu_backward(g: GradientMoments, x: Moments) -> GradientMoments:
    """var = g^2 E[g'(x)^2] = g^2 [1/2 + (1/(2 pi)) (-acos(a) + a (5 s^2 + 3)/(1 + 2 s^2)^1.5)]."""
    s2, r = x.variance, x.correlation
    self_moment = _gelu_derivative_cross_moment(s2, 1.0)
    return GradientMoments(g.variance * self_moment, g.correlation * _gelu_derivative_cross_moment(s2, r) / self_moment)


def activation_forward(activation: str, x: Moments) -> Moments:
    return {"relu": relu_forward, "gelu": gelu_forward}[activation](x)


def activation_backward(activation: str, g: GradientMoments, x: Moments) -> GradientMoments:
    return {"relu": relu_backward, "gelu": gelu_backward}[activation](g, x)


def layer_norm_forward(x: Moments) -> Moments:
    """LayerNorm without affine: each position normalised to mean 0, variance 1; the correlation carries over."""
    return Moments(0.0, 1.0, x.correlation)


def layer_norm_backward(
    g: GradientMoments, x: Moments, width: int, aligned_fraction: float | None = None, token_variance: float | None = None
) -> GradientMoments:
    """dx = (1/sigma) P dy: P projects out the mean and the output direction, sigma^2 the input's per-position variance.

    P removes the part of the upstream gradient along those two directions: for a gradient independent of the
    output, 2 of d directions' worth, `aligned_fraction` = 2/d (the default). Between Post-LN layers the gradient
    reaching a LayerNorm's output has already passed the next LayerNorm, which is invariant to the scale and shift of
    its input, so it is nearly orthogonal to both and P removes almost nothing (`post_ln_aligned_fraction`).
    1/sigma^2: for Gaussian inputs sigma^2 = s^2 chi^2_{d-1}/d, so E[1/sigma^2] = d/((d-3) s^2) and an independent
    gradient gets var = g^2 (d-2)/((d-3) s^2). `token_variance` gives sigma^2 directly when it hardly fluctuates
    (a LayerNorm output plus a small branch, as in a Post-LN residual).
    """
    inverse_sigma2 = 1.0 / token_variance if token_variance is not None else width / ((width - 3.0) * x.variance)
    aligned = 2.0 / width if aligned_fraction is None else aligned_fraction
    return g.scaled((1.0 - aligned) * inverse_sigma2)


def post_ln_aligned_fraction(skip_scale: float, branch_scale: float, branch_variance: float, branch_gain: float,
                             width: int) -> float:
    """Share of the gradient at a Post-LN layer output y along y and the mean direction (what its LayerNorm removes).

    y feeds s = lambda y + beta f(y), normalised by the next LayerNorm, whose gradient g_s is orthogonal to s and to
    the mean: so y.g_y = -beta f.g_s + beta y.J^T g_s and 1.g_y = beta 1.J^T g_s, giving
    beta^2 (var_f + 2 j) / (d (lambda^2 + beta^2 j)) with j the branch's backward gain. Small for DeepScaleLM's beta;
    for a plain residual (beta = 1) it is what makes vanilla Post-LN gradients decay faster at small width.
    """
    lam2, beta2 = skip_scale**2, branch_scale**2
    return beta2 * (branch_variance + 2.0 * branch_gain) / (width * (lam2 + beta2 * branch_gain))


# Probabilists' Gauss-Hermite nodes, weights normalised to a standard normal expectation.
_HERMITE_NODES, _HERMITE_WEIGHTS = np.polynomial.hermite_e.hermegauss(32)
_HERMITE_WEIGHTS = _HERMITE_WEIGHTS / _HERMITE_WEIGHTS.sum()


def softmax_power_sum(lengths, spread: float, power: int = 2) -> np.ndarray:
    """E[sum_j a_j^power] for a = softmax of n logits with variance `spread` not shared between them, per n in `lengths`.

    power 2 is the concentration, the inverse effective number of averaged tokens: 1/n for equal logits, 1 when one
    token takes all the weight. n E[e^{kx} / (e^x + S)^k] with S, the sum of the other n-1 exponentials, matched to a
    log-normal (Fenton-Wilkinson), by 2-D Gauss-Hermite quadrature: within 3% of Monte Carlo for spread <= 1 at any n
    (exp(spread)/n, the large-n limit the recipe uses, is 30% high at n = 16).
    """
    n = np.asarray(lengths, dtype=np.float64).reshape(-1, 1, 1)
    others = np.maximum(n - 1.0, 1.0)
    log_var = np.log1p(np.expm1(spread) / others)
    log_mean = np.log(others) + spread / 2.0 - log_var / 2.0
    own = np.exp(math.sqrt(spread) * _HERMITE_NODES).reshape(1, -1, 1)
    rest = np.exp(log_mean + np.sqrt(log_var) * _HERMITE_NODES.reshape(1, 1, -1))
    weights = _HERMITE_WEIGHTS.reshape(1, -1, 1) * _HERMITE_WEIGHTS.reshape(1, 1, -1)
    moment = n[:, 0, 0] * (weights * (own / (own + rest)) ** power).sum(axis=(1, 2))
    return np.where(n[:, 0, 0] == 1.0, 1.0, moment)


def softmax_forward(logits: Moments, length: int) -> Moments:
    """Softmax over L logits of variance s^2 and correlation r: mean 1/L; only (1-r) s^2 matters.

    var = E[sum a^2]/L - 1/L^2 (`softmax_power_sum`), ~ (exp((1-r) s^2) - 1)/L^2 for long rows.
    The correlation between two softmax rows is not part of the formula (None).
    """
    concentration = float(softmax_power_sum([length], (1.0 - logits.correlation) * logits.variance)[0])
    return Moments(1.0 / length, concentration / length - 1.0 / length**2, None)


def softmax_backward(g: GradientMoments, logits: Moments, length: int) -> GradientMoments:
    """dx_j = y_j (g_j - sum_k y_k g_k), g independent of the logits with variance g^2:

    var = g^2 E[y_j^2 - 2 y_j^3 + y_j^2 sum_k y_k^2] ~ g^2 (E[sum y^2] (1 + E[sum y^2]) - 2 E[sum y^3]) / L,
    ~ g^2 E[y^2] for long rows; exact (g^2 (1 - 1/L)/L^2) for equal logits.
    """
    spread = (1.0 - logits.correlation) * logits.variance
    squares = float(softmax_power_sum([length], spread, 2)[0])
    cubes = float(softmax_power_sum([length], spread, 3)[0])
    return GradientMoments(g.variance * (squares * (1.0 + squares) - 2.0 * cubes) / length, 0.0)


def attention_averaging_ratio(
    r: float, length: int, causal: bool, fan_in: int, attention_dropout: float, logit_variance: float
) -> float:
    """Variance of attention's output per unit variance of r-correlated values (RECIPE 3, single-head attention):

        r + (1-r)^2 (n-1)/n sq/d + E[sum a^2] (1/(1-p) - r),   n visible keys,

    with E[sum a^2] from `softmax_power_sum` at spread (1-r) sq (the inverse effective number of averaged tokens),
    and (1/(1-p) - r) exact for dropout on the weights. Bidirectional: n = L; causal: averaged over n = 1..L.
    The recipe's `attention_variance_ratio` (used to initialise) writes E[sum a^2] as exp((1-r) sq)(1 + 4(1-r) sq/d)/n,
    the reference's large-n form; against Monte Carlo at n = 16 that is ~10-30% high, this within 5%.
    For long bidirectional sequences both tend to r, the paper's approximation.
    """
    sq, d = logit_variance, fan_in
    spread = (1.0 - r) * sq
    visible = np.arange(1, length + 1) if causal else np.array([length])
    coupling = (1.0 - r) * (visible - 1.0) / visible * sq / d
    concentration = np.minimum(softmax_power_sum(visible, spread), 1.0)
    # Dropout on the weights: E[o^2] = r (sum a)^2 + sum a^2 (1/(1-p) - r) for r-correlated unit values.
    return float(np.mean(r + (1.0 - r) * coupling + concentration * (1.0 / (1.0 - attention_dropout) - r)))


@lru_cache(maxsize=64)
def _causal_averages(length: int) -> dict[str, float]:
    """Position averages of uniform causal attention (query i attends to keys 1..i with weight 1/i)."""
    harmonic = [0.0] * (length + 2)  # harmonic[j] = sum_{i>=j} 1/i
    harmonic_sq = [0.0] * (length + 2)  # sum_{i>=j} 1/i^2
    for i in range(length, 0, -1):
        harmonic[i] = harmonic[i + 1] + 1.0 / i
        harmonic_sq[i] = harmonic_sq[i + 1] + 1.0 / (i * i)
    pairs = length * (length - 1) / 2.0
    h1 = harmonic[1 : length + 1]
    h2 = harmonic_sq[1 : length + 1]
    sum_h1 = sum(h1)
    return {
        # mean over position pairs of 1/max(i, i'): the shared weight of two causal outputs
        "pair_overlap": sum((i - 1.0) / i for i in range(2, length + 1)) / pairs if length > 1 else 1.0,
        # mean over keys j of sum_i a_ij^2 and of sum_{i != i'} a_ij a_i'j
        "key_self": sum(h2) / length,
        "key_cross": sum(a * a - b for a, b in zip(h1, h2)) / length,
        # mean over key pairs j < j' of sum_i a_ij a_ij' and of sum_{i != i'} a_ij a_i'j'
        "key_pair_self": sum((j - 1.0) * h2[j - 1] for j in range(1, length + 1)) / pairs if length > 1 else 0.0,
        "key_pair_cross": ((sum_h1**2 - sum(a * a for a in h1)) / 2.0 - sum((j - 1.0) * h2[j - 1] for j in range(1, length + 1)))
        / pairs
        if length > 1
        else 0.0,
        # mean over queries of (1 - 1/n)/n, n = i visible keys: the softmax path's weight
        "query_spread": sum((i - 1.0) / (i * i) for i in range(1, length + 1)) / length,
    }


def attention_logit_variance(queries_from: Moments, keys_from: Moments, fan_in: int, query_std: float, key_std: float) -> float:
    """Variance of q.k / sqrt(d_head) for independent inputs: d_in^2 sq^2 sk^2 E[x^2] E[y^2] (any number of heads)."""
    return fan_in**2 * query_std**2 * key_std**2 * queries_from.second_moment * keys_from.second_moment


def attention_forward(
    x: Moments,
    fan_in: int,
    query_std: float,
    key_std: float,
    value_std: float,
    length: int,
    causal: bool,
    attention_dropout: float = 0.0,
    keys_from: Moments | None = None,
) -> Moments:
    """Softmax attention (any number of heads) over L positions, before the output projection.

    var = d_in sv^2 s^2 x `attention_averaging_ratio` (RECIPE 3: ~ r + ((1-r)/L) [(1-r)(L-1) sq/d_in + exp((1-r) sq)/(1-p)];
    mask-aware: causal averages position i seeing i keys). The covariance of two outputs
    is d_in sv^2 s^2 [r + (1-r)(1 + 2(1-r) sq/d_in) w] with w = 1/L (bidirectional) or the mean of 1/max(i, i')
    (causal): the keys two queries share. `keys_from` are the key/value inputs of cross-attention (default: x).
    """
    source = keys_from if keys_from is not None else x
    sq = attention_logit_variance(x, source, fan_in, query_std, key_std)
    r = source.second_moment_correlation
    scale = fan_in * value_std**2 * source.second_moment
    ratio = attention_averaging_ratio(r, length, causal, fan_in, attention_dropout, sq)
    shared = _causal_averages(length)["pair_overlap"] if causal else 1.0 / length
    covariance_ratio = r + (1.0 - r) * (1.0 + 2.0 * (1.0 - r) * sq / fan_in) * shared
    return Moments(0.0, scale * ratio, min(covariance_ratio / ratio, 1.0))


@dataclass(frozen=True)
class AttentionGradients:
    """Gradients inside attention: at the values, queries and keys (after their projections), and at the input."""

    value: GradientMoments
    query: GradientMoments
    key: GradientMoments
    input: GradientMoments
    source: GradientMoments  # at the key/value input (= input for self-attention)


def attention_backward(
    g: GradientMoments,
    x: Moments,
    fan_in: int,
    query_std: float,
    key_std: float,
    value_std: float,
    length: int,
    causal: bool,
    attention_dropout: float = 0.0,
    keys_from: Moments | None = None,
) -> AttentionGradients:
    """Backward through attention with weights ~uniform over the visible keys.

    Value path (reference simulation): var = g^2 (1 + (L-1) r_g (1-p)) / (L (1-p)) at the values, covariance
    g^2 (1 + (L-1) r_g)/L; causal masks use the exact uniform-causal position averages. Softmax path: a query's
    gradient is sum_j a_ij (u_ij - u_i) k_j / sqrt(d_h), u_ij = g_i . v_j, giving var g^2 v^2 k^2 (1-r)^2 (1-1/n)/(n (1-p))
    (n visible keys; keys symmetric). Each path then goes back through its projection (`linear_backward`).
    """
    source = keys_from if keys_from is not None else x
    r = source.second_moment_correlation
    keep = 1.0 - attention_dropout
    if causal:
        avg = _causal_averages(length)
        value_var = g.variance * (avg["key_self"] / keep + g.correlation * avg["key_cross"])
        value_cov = g.variance * (avg["key_pair_self"] + g.correlation * avg["key_pair_cross"])
        spread = avg["query_spread"]
    else:
        value_var = g.variance * (1.0 + (length - 1.0) * g.correlation * keep) / (length * keep)
        value_cov = g.variance * (1.0 + (length - 1.0) * g.correlation) / length
        spread = (1.0 - 1.0 / length) / length
    value = GradientMoments(value_var, value_cov / value_var)
    value_entry_var = fan_in * value_std**2 * source.second_moment
    query_entry_var = fan_in * query_std**2 * x.second_moment
    key_entry_var = fan_in * key_std**2 * source.second_moment
    logit_path = g.variance * value_entry_var * (1.0 - r) ** 2 * spread / keep
    query = GradientMoments(logit_path * key_entry_var, 0.0)
    key = GradientMoments(logit_path * query_entry_var, 0.0)
    through_value = linear_backward(value, fan_in, value_std)
    through_query = linear_backward(query, fan_in, query_std)
    through_key = linear_backward(key, fan_in, key_std)
    if keys_from is None:
        total = through_value.variance + through_query.variance + through_key.variance
        combined = GradientMoments(total, through_value.variance * through_value.correlation / total)
        return AttentionGradients(value, query, key, combined, combined)
    source_total = through_value.variance + through_key.variance
    source_grad = GradientMoments(source_total, through_value.variance * through_value.correlation / source_total)
    return AttentionGradients(value, query, key, through_query, source_grad)


def attention_row_logit_variance(x: Moments, fan_in: int, query_std: float, key_std: float) -> float:
    """Variance of one query's logits over the keys: only the part of the keys not shared between positions, (1-r) sq."""
    return (1.0 - x.second_moment_correlation) * attention_logit_variance(x, x, fan_in, query_std, key_std)


def attention_entropy(row_logit_variance: float, length: int, causal: bool) -> float:
    """Entropy of softmax over n Gaussian logits of variance v: log n - v/2 (exact as n grows), averaged over queries.

    Large logit variance drives the entropy to 0: attention collapses onto single tokens (entropy collapse).
    """
    visible = range(1, length + 1) if causal else [length]
    return sum(max(math.log(n) - row_logit_variance / 2.0, 0.0) for n in visible) / len(visible)


def residual_forward(skip: Moments, branch: Moments, skip_scale: float, branch_scale: float) -> Moments:
    """y = lambda x + beta f, x and f independent: var = lambda^2 var_x + beta^2 var_f, covariances add likewise."""
    lam2, beta2 = skip_scale**2, branch_scale**2
    variance = lam2 * skip.variance + beta2 * branch.variance
    covariance = lam2 * skip.correlation * skip.variance + beta2 * branch.correlation * branch.variance
    return Moments(skip_scale * skip.mean + branch_scale * branch.mean, variance, covariance / variance)


def residual_backward(g: GradientMoments, skip_scale: float, branch_scale: float) -> tuple[GradientMoments, GradientMoments]:
    """(gradient into the skip, gradient into the branch output)."""
    return g.scaled(skip_scale**2), g.scaled(branch_scale**2)


def merge_gradients(a: GradientMoments, b: GradientMoments) -> GradientMoments:
    """Sum of two independent gradient contributions to one tensor."""
    total = a.variance + b.variance
    return GradientMoments(total, (a.variance * a.correlation + b.variance * b.correlation) / total)


# ----------------------------------------------------------------------------------------------------------------
# Blocks: one residual branch, ending in its dropout (out = lambda skip + beta * block(h))
# ----------------------------------------------------------------------------------------------------------------
def weight_gradient_square_norm(fan_in: int, fan_out: int, x: Moments, g: GradientMoments, length: int) -> float:
    """E ||dW||^2 per sequence for dW = sum_t g_t x_t^T over L positions (sequences independent)."""
    pairs = 1.0 + (length - 1.0) * g.correlation * x.second_moment_correlation
    return fan_in * fan_out * g.variance * x.second_moment * length * pairs


@dataclass(frozen=True)
class FFNWeights:
    fc1_std: float
    fc2_std: float
    intermediate_size: int
    activation: str


@dataclass(frozen=True)
class AttentionWeights:
    query_std: float
    key_std: float
    value_std: float
    output_std: float


def ffn_block_forward(h: Moments, width: int, weights: FFNWeights, dropout: float) -> Moments:
    """Dropout(W_2 act(W_1 h))."""
    pre = linear_forward(h, width, weights.fc1_std)
    post = activation_forward(weights.activation, pre)
    return dropout_forward(linear_forward(post, weights.intermediate_size, weights.fc2_std), dropout)


def ffn_block_backward(
    g: GradientMoments, h: Moments, width: int, weights: FFNWeights, dropout: float, length: int
) -> tuple[GradientMoments, dict[str, float]]:
    """(gradient at h, expected squared weight-gradient norms per sequence {"fc1", "fc2"})."""
    pre = linear_forward(h, width, weights.fc1_std)
    post = activation_forward(weights.activation, pre)
    at_fc2 = dropout_backward(g, dropout)
    at_post = linear_backward(at_fc2, width, weights.fc2_std)
    at_pre = activation_backward(weights.activation, at_post, pre)
    norms = {
        "fc2": weight_gradient_square_norm(weights.intermediate_size, width, post, at_fc2, length),
        "fc1": weight_gradient_square_norm(width, weights.intermediate_size, h, at_pre, length),
    }
    return linear_backward(at_pre, weights.intermediate_size, weights.fc1_std), norms


def attention_block_forward(
    h: Moments, width: int, weights: AttentionWeights, length: int, causal: bool, attention_dropout: float,
    dropout: float, keys_from: Moments | None = None,
) -> Moments:
    """Dropout(W_o Attention(h))."""
    mixed = attention_forward(h, width, weights.query_std, weights.key_std, weights.value_std, length, causal,
                              attention_dropout, keys_from)
    return dropout_forward(linear_forward(mixed, width, weights.output_std), dropout)


def attention_block_backward(
    g: GradientMoments, h: Moments, width: int, weights: AttentionWeights, length: int, causal: bool,
    attention_dropout: float, dropout: float, keys_from: Moments | None = None,
) -> tuple[AttentionGradients, dict[str, float]]:
    """(attention gradients, expected squared weight-gradient norms per sequence {"q_proj", ..., "o_proj"})."""
    mixed = attention_forward(h, width, weights.query_std, weights.key_std, weights.value_std, length, causal,
                              attention_dropout, keys_from)
    at_output_proj = dropout_backward(g, dropout)
    at_mixed = linear_backward(at_output_proj, width, weights.output_std)
    grads = attention_backward(at_mixed, h, width, weights.query_std, weights.key_std, weights.value_std, length,
                               causal, attention_dropout, keys_from)
    source = keys_from if keys_from is not None else h
    norms = {
        "o_proj": weight_gradient_square_norm(width, width, mixed, at_output_proj, length),
        "v_proj": weight_gradient_square_norm(width, width, source, grads.value, length),
        "q_proj": weight_gradient_square_norm(width, width, h, grads.query, length),
        "k_proj": weight_gradient_square_norm(width, width, source, grads.key, length),
    }
    return grads, norms


# ----------------------------------------------------------------------------------------------------------------
# What each init scheme puts in the model
# ----------------------------------------------------------------------------------------------------------------
def embedding_table_stds(config) -> list[float]:
    """Standard deviation of each embedding table: word, then absolute position, then token type (if present)."""
    rows = [config.vocab_size]
    if config.position_embedding_type == "absolute":
        rows.append(config.max_position_embeddings)
    if config.type_vocab_size > 0:
        rows.append(config.type_vocab_size)
    return [embedding_table_std(config, (n, config.hidden_size)) for n in rows]


def layer_init_stds(config, stack: str, layer_idx: int) -> dict[str, float]:
    """Weight sigmas of one layer: q_proj, k_proj, v_proj, o_proj, fc1, fc2 (+ cross_* in a decoder with cross-attention)."""
    d, d_ff = config.hidden_size, config.intermediate_size
    shapes = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d), "fc1": (d, d_ff), "fc2": (d_ff, d)}
    stds = {role: linear_init_std(config, role, stack, layer_idx, False, *shape) for role, shape in shapes.items()}
    if config.is_encoder_decoder and stack == "decoder":
        for role in ("q_proj", "k_proj", "v_proj", "o_proj"):
            stds[f"cross_{role}"] = linear_init_std(config, role, stack, layer_idx, True, d, d)
    return stds


def logit_variance(config, final_hidden: Moments) -> float:
    """Variance of the initial output logits (tied or untied LM head, DeepScaleLM's tied scaling)."""
    d = config.hidden_size
    if config.tie_word_embeddings:
        sigma = embedding_table_stds(config)[0]
    else:
        sigma = linear_init_std(config, "lm_head", None, None, False, d, config.vocab_size)
    return d * sigma**2 * output_logit_scale(config) ** 2 * final_hidden.second_moment


# ----------------------------------------------------------------------------------------------------------------
# Whole stacks
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class LayerPrediction:
    """One layer at initialisation, train mode. Gradients are per unit gradient variance at the last hidden state."""

    stream_variance: float  # variance of the layer's output (the residual stream; Post-LN: after its LayerNorm)
    stream_correlation: float  # correlation between two positions' output vectors
    gradient_variance: float  # per-element variance of dLoss/d(layer output)
    weight_gradient_norm: float  # sqrt(E ||dW||^2) summed over the layer's weight matrices, per sequence
    weight_gradient_norms: dict[str, float] = field(default_factory=dict)  # per matrix (q_proj, ..., fc2)
    attention_logit_variance: float = 0.0  # self-attention logits, variance within a row over the visible keys
    attention_entropy: float = 0.0  # self-attention entropy in nats, averaged over queries (no dropout)


@dataclass
class StackPrediction:
    name: str  # "decoder" or "encoder"
    embedding: Moments  # the stream entering the first layer
    layers: list[LayerPrediction]
    final_hidden: Moments  # after the final LayerNorm (Pre-LN) or the last layer (Post-LN)
    logit_variance: float | None  # None for an encoder inside an encoder-decoder

    def relative_weight_gradient_norms(self) -> list[float]:
        """Per-layer weight-gradient norms divided by the last layer's: the shape a measurement can be compared to."""
        last = self.layers[-1].weight_gradient_norm
        return [layer.weight_gradient_norm / last for layer in self.layers]


def _check_covered(config):
    from .configuration_deepscalelm import DeepScaleLMConfig

    if not isinstance(config, DeepScaleLMConfig):
        raise ValueError(
            f"the theory covers DeepScaleLMConfig models only, got {type(config).__name__}: measure it with "
            "dslm-diagnose, which reports the measurements without predictions"
        )
    if config.position_embedding_type != "absolute":
        raise ValueError("the theory covers learned absolute positions only (position_embedding_type='absolute'); "
                         "rotary positions change attention's correlation structure")
    if config.norm_placement == "mix" or config.layernorm_scaling:
        raise ValueError("the theory covers all-Pre-LN or all-Post-LN stacks with unscaled LayerNorms: Mix-LN "
                         "(norm_placement='mix') and LayerNorm Scaling (layernorm_scaling=True) are not predicted")


def predict_model(
    config, sequence_length: int, token_same_probability: float | None = None, label_same_probability: float | None = None
) -> dict[str, StackPrediction]:
    """Per-layer predictions for every stack of a DeepScaleLM model ({"decoder": ...} or {"encoder": ..., "decoder": ...}).

    sequence_length: the L of the measured batch (attention averages over it).
    token_same_probability: probability that two positions of a sequence hold the same token id; default
        `config.embedding_correlation * config.num_embedding_tables` (exact without a token-type table).
    label_same_probability: the same for the labels, which sets the correlation of the loss gradient between positions
        (the gradient of cross-entropy at position i is softmax - onehot(label_i)); default: token_same_probability.
    Encoder-decoder: the encoder's gradients are propagated from a unit gradient at its output (the decoder's
    cross-attention gradient is not added); the decoder's cross-attention reads the encoder's predicted output.
    """
    _check_covered(config)
    if sequence_length < 2:
        raise ValueError(f"sequence_length must be >= 2 (correlation between positions), got {sequence_length}")
    if token_same_probability is None:
        token_same_probability = min(config.embedding_correlation * config.num_embedding_tables, 1.0)
    if label_same_probability is None:
        label_same_probability = token_same_probability
    stacks = {}
    for name, _, _ in config.residual_stacks():
        encoder_output = stacks["encoder"].final_hidden if "encoder" in stacks and name == "decoder" else None
        stacks[name] = _predict_stack(config, name, sequence_length, token_same_probability, label_same_probability,
                                      encoder_output)
    return stacks


def _predict_stack(config, stack: str, length: int, token_same: float, label_same: float,
                   encoder_output: Moments | None) -> StackPrediction:
    d, p, p_attn = config.hidden_size, config.hidden_dropout_prob, config.attention_probs_dropout_prob
    pre_ln = config.norm_placement == "pre"
    causal = stack == "decoder"
    plan = stack_init_plan(config, stack)
    lam, beta = plan.residual_skip, plan.residual_branch

    same_rows = [token_same]
    if config.position_embedding_type == "absolute":
        same_rows.append(0.0)
    if config.type_vocab_size > 0:
        same_rows.append(1.0)
    embedding = embedding_forward(embedding_table_stds(config), same_rows)
    stream = dropout_forward(embedding, p)
    if not pre_ln:  # the reference order: embedding dropout, then the embedding LayerNorm
        stream = layer_norm_forward(stream)
    first_stream = stream

    kinds = ("attention", "cross", "ffn") if encoder_output is not None else ("attention", "ffn")
    branch_records = []  # per layer: [(kind, stream_in, branch_input, weights, pre_norm_sum)]
    outputs = []
    for layer_idx in range(plan.num_layers):
        stds = layer_init_stds(config, stack, layer_idx)
        records = []
        for kind in kinds:
            branch_in = layer_norm_forward(stream) if pre_ln else stream
            if kind == "ffn":
                weights = FFNWeights(stds["fc1"], stds["fc2"], config.intermediate_size, config.hidden_act)
                out = ffn_block_forward(branch_in, d, weights, p)
            else:
                prefix = "cross_" if kind == "cross" else ""
                weights = AttentionWeights(*(stds[prefix + n] for n in ("q_proj", "k_proj", "v_proj", "o_proj")))
                out = attention_block_forward(branch_in, d, weights, length, causal and kind != "cross", p_attn, p,
                                              encoder_output if kind == "cross" else None)
            if kind == "attention":
                row_variance = attention_row_logit_variance(branch_in, d, weights.query_std, weights.key_std)
            summed = residual_forward(stream, out, lam, beta)
            records.append((kind, stream, branch_in, weights, summed))
            stream = summed if pre_ln else layer_norm_forward(summed)
        branch_records.append(records)
        outputs.append((stream, row_variance))
    final_hidden = layer_norm_forward(stream) if pre_ln else stream

    gradient = GradientMoments(1.0, label_same)
    aligned_fraction = None  # the loss gradient is independent of the last LayerNorm's output
    if pre_ln:
        gradient = layer_norm_backward(gradient, stream, d)
    layers = [None] * plan.num_layers
    for layer_idx in reversed(range(plan.num_layers)):
        at_output = gradient
        norms = {}
        for kind, stream_in, branch_in, weights, summed in reversed(branch_records[layer_idx]):
            branch_variance = (summed.variance - lam**2 * stream_in.variance) / beta**2
            if pre_ln:
                at_sum = gradient
            else:
                # The skip is a LayerNorm output (zero mean per position): only the branch's per-position mean counts.
                token_variance = summed.variance - beta**2 * branch_variance / d
                at_sum = layer_norm_backward(gradient, summed, d, aligned_fraction, token_variance)
            to_skip, to_branch = residual_backward(at_sum, lam, beta)
            if kind == "ffn":
                at_branch_in, branch_norms = ffn_block_backward(to_branch, branch_in, d, weights, p, length)
            else:
                grads, branch_norms = attention_block_backward(
                    to_branch, branch_in, d, weights, length, causal and kind != "cross", p_attn, p,
                    encoder_output if kind == "cross" else None)
                at_branch_in = grads.input
                branch_norms = {("cross_" if kind == "cross" else "") + k: v for k, v in branch_norms.items()}
            norms |= branch_norms
            through_branch = layer_norm_backward(at_branch_in, stream_in, d) if pre_ln else at_branch_in
            gradient = merge_gradients(to_skip, through_branch)
            branch_gain = through_branch.variance / to_branch.variance
            aligned_fraction = post_ln_aligned_fraction(lam, beta, branch_variance, branch_gain, d)
        out, row_variance = outputs[layer_idx]
        layers[layer_idx] = LayerPrediction(
            stream_variance=out.variance,
            stream_correlation=out.correlation,
            gradient_variance=at_output.variance,
            weight_gradient_norm=math.sqrt(sum(norms.values())),
            weight_gradient_norms={k: math.sqrt(v) for k, v in norms.items()},
            attention_logit_variance=row_variance,
            attention_entropy=attention_entropy(row_variance, length, causal),
        )
    logits = logit_variance(config, final_hidden) if (stack == "decoder" or not config.is_encoder_decoder) else None
    return StackPrediction(stack, first_stream, layers, final_hidden, logits)


__all__ = [
    "Moments",
    "GradientMoments",
    "linear_forward",
    "linear_backward",
    "embedding_forward",
    "embedding_row_gradient_variance",
    "dropout_forward",
    "dropout_backward",
    "relu_forward",
    "relu_backward",
    "gelu_forward",
    "gelu_backward",
    "activation_forward",
    "activation_backward",
    "layer_norm_forward",
    "layer_norm_backward",
    "post_ln_aligned_fraction",
    "softmax_power_sum",
    "softmax_forward",
    "softmax_backward",
    "attention_logit_variance",
    "attention_averaging_ratio",
    "attention_forward",
    "attention_row_logit_variance",
    "attention_entropy",
    "attention_backward",
    "AttentionGradients",
    "residual_forward",
    "residual_backward",
    "merge_gradients",
    "weight_gradient_square_norm",
    "FFNWeights",
    "AttentionWeights",
    "ffn_block_forward",
    "ffn_block_backward",
    "attention_block_forward",
    "attention_block_backward",
    "embedding_table_stds",
    "layer_init_stds",
    "logit_variance",
    "LayerPrediction",
    "StackPrediction",
    "predict_model",
]
