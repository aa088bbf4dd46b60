"""The DeepScaleLM recipe as pure math: residual scales, initialisation sigmas, the correlation recurrence.

Kedia et al., "Transformers Get Stable" (ICML 2024). Every constant the model initialises with comes from
here, and the theory module (`dslm_hf.theory`) uses the same functions, so a constant exists exactly once.
No torch, no numpy: this file ships to the Hub beside the modeling code (`trust_remote_code`).

Notation: d hidden size, d_ff FFN width, p hidden dropout, L sequence length, N the residual branches of a stack,
r the correlation between the hidden vectors of two different positions (r0: of the summed embeddings), and
sigma the standard deviation of a weight ~ N(0, sigma^2) (biases 0, LayerNorms identity).

The recipe (section 1: residuals; section 2: initialisation):
1. Every residual branch joins as out = lambda * skip + beta * Dropout(F(h)), lambda^2 + beta^2 = 1, beta^2 = k / N.
2. Each branch is initialised to output unit variance, so the stream keeps variance 1 at any depth:
   - each of n embedding tables sigma^2 = (1-p)/n (the sum has variance 1-p; embedding dropout brings it to 1);
   - W_q, W_k: 1/d (attention logits of variance ~1);
   - W_v, W_o of layer l: sigma^2 = sqrt((1-p)/a_l)/d each, a_l the variance of attention's average of unit
     values at the layer's input correlation r_l (~r_l for long bidirectional sequences: the reference code);
   - FFN: sigma_1^2 sigma_2^2 = (1-p) / (E[act(z)^2] d d_ff) (ReLU: E = 1/2);
   - MLM head dense and an untied output layer: 1/d; a tied output embedding reads the hidden state times
     1/sqrt(d sigma_e^2), which gives the initial logits variance 1.
   r_l runs through the stack by the correlation recurrence (`correlation_recurrence`), from r0 (1-p) after the
   embedding dropout.

Moment formulas used below (section 3; input of per-element variance s2, correlation r, zero mean):
   Linear with sigma_w: variance d_in sigma_w^2 s2; dropout: correlation r (1-p); ReLU: correlation
   (pi r + sqrt(1-r^2) - r acos(r) - 1) / (pi - 1) around its mean; residual y = lambda x + beta f of independent
   x, f: var = lambda^2 var_x + beta^2 var_f, r_y = (lambda^2 r_x var_x + beta^2 r_f var_f) / var_y;
   single-head attention over L keys with logit variance sq: output variance per unit value variance
   r + ((1-r)/L) [ (1-r)(L-1) sq/d + exp((1-r) sq)(1 + 4(1-r) sq/d) / (1-p_attn) ].
"""

import math
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

INIT_SCHEMES = ("deepscalelm", "xavier", "standard", "deepnet")
NORM_PLACEMENTS = ("pre", "post", "mix")  # mix: Mix-LN (Li et al. 2024), Post-LN first layers, Pre-LN after
BRANCH_COUNTINGS = ("branches", "layers")
ACTIVATIONS = ("relu", "gelu")
DEPTH_PARAMETERIZATIONS = ("deepscalelm", "depth_mup", "completep")
WIDTH_PARAMETERIZATIONS = ("standard", "mup")
RECURRENCES = ("refined", "reference")


# ----------------------------------------------------------------------------------------------------------------
# Activations: E[act(z)^2] and the correlation map, for z ~ N(0, 1)
# ----------------------------------------------------------------------------------------------------------------
def _std_normal_pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _std_normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _gelu_mean_given_affine(a: float, b: float) -> float:
    """E_z[g(a + b z)] for GeLU g(x) = x Phi(x), z ~ N(0, 1), in closed form."""
    s = math.sqrt(1.0 + b * b)
    return a * _std_normal_cdf(a / s) + b * b * _std_normal_pdf(a / s) / s


# Gauss-Hermite (probabilists') nodes are not in the standard library; a fine trapezoid over [-9, 9] is exact to
# ~1e-12 for these smooth integrands and costs ~10 microseconds per node.
_QUADRATURE_NODES = [(-9.0 + 18.0 * i / 720) for i in range(721)]
_QUADRATURE_WEIGHTS = [_std_normal_pdf(x) * (18.0 / 720) * (0.5 if i in (0, 720) else 1.0) for i, x in enumerate(_QUADRATURE_NODES)]


def _expect(f) -> float:
    """E[f(x)] for x ~ N(0, 1)."""
    return sum(w * f(x) for x, w in zip(_QUADRATURE_NODES, _QUADRATURE_WEIGHTS))


@lru_cache(maxsize=None)
def activation_second_moment(activation: str) -> float:
    """E[act(z)^2] for z ~ N(0, 1): 1/2 for ReLU, 0.4253 for GeLU (x Phi(x))."""
    if activation == "relu":
        return 0.5
    if activation == "gelu":
        return _expect(lambda x: (x * _std_normal_cdf(x)) ** 2)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


@lru_cache(maxsize=4096)
def activation_cross_moment(activation: str, r: float) -> float:
    """E[act(x) act(y)] for (x, y) standard bivariate normal with correlation r."""
    r = min(max(r, -1.0), 1.0)
    if activation == "relu":
        return (math.sqrt(1.0 - r * r) + r * (math.pi - math.acos(r))) / (2.0 * math.pi)
    if activation == "gelu":
        # y = r x + sqrt(1 - r^2) z: the inner expectation over z is closed form.
        b = math.sqrt(max(1.0 - r * r, 0.0))
        return _expect(lambda x: x * _std_normal_cdf(x) * _gelu_mean_given_affine(r * x, b))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activation_output_correlation(activation: str, r: float) -> float:
    """Correlation after act -> mean-zero linear layer: E[act(x)act(y)] / E[act(x)^2] (section 3, Linear)."""
    return activation_cross_moment(activation, round(r, 6)) / activation_second_moment(activation)


# ----------------------------------------------------------------------------------------------------------------
# Residual scaling: out = lambda * skip + beta * Dropout(F(h)), lambda^2 + beta^2 = 1
# ----------------------------------------------------------------------------------------------------------------
def residual_branch_total(num_layers: int, branches_per_layer: int, counting: str) -> int:
    """N in beta^2 = k / N: residual branches of the stack ("branches") or its layers ("layers")."""
    if counting == "branches":
        return num_layers * branches_per_layer
    if counting == "layers":
        return num_layers
    raise ValueError(f"residual_branch_count must be one of {BRANCH_COUNTINGS}, got {counting!r}")


def deepscalelm_residual_scales(
    k: float, n: int, beta2_override: float | None = None, depth_multiplier: float = 1.0, depth_exponent: float = 0.5
) -> tuple[float, float]:
    """(lambda, beta) with lambda^2 + beta^2 = 1 and beta^2 = (k / N) * m^(1 - 2 alpha) (or the raw override).

    m = layers / base layers and alpha is the depth exponent of the parameterization (`depth_exponent`): alpha = 1/2
    is DeepScaleLM's own beta^2 = k / N (branch multiplier ~ 1/sqrt(depth), as depth-muP); alpha = 1 is CompleteP's
    branch multiplier ~ 1/depth, equal to DeepScaleLM's at the base depth (N = N_base * m, so
    beta = sqrt(k / N_base) * m^-alpha).
    """
    beta2 = beta2_override if beta2_override is not None else k / n * depth_multiplier ** (1.0 - 2.0 * depth_exponent)
    if not 0.0 < beta2 <= 1.0:
        raise ValueError(
            f"beta^2 = {beta2} (k={k}, N={n}, override={beta2_override}) must lie in (0, 1] so that "
            "lambda^2 = 1 - beta^2 is non-negative: lower residual_k or residual_beta2, or count more branches"
        )
    return math.sqrt(1.0 - beta2), math.sqrt(beta2)


# ----------------------------------------------------------------------------------------------------------------
# Depth parameterizations: how the residual branch and the optimizer scale with depth
# ----------------------------------------------------------------------------------------------------------------
def depth_exponent(parameterization: str) -> float:
    """alpha in branch multiplier ~ (layers / base layers)^-alpha.

    "deepscalelm" and "depth_mup" share DeepScaleLM's beta^2 = k / N (alpha = 1/2: Yang et al., "Tensor Programs
    VI", 2023; Bordelon et al., 2023); "completep" is alpha = 1 (Dey et al., "Don't be lazy: CompleteP enables
    compute-efficient deep transformers", 2025).
    """
    if parameterization not in DEPTH_PARAMETERIZATIONS:
        raise ValueError(f"depth_parameterization must be one of {DEPTH_PARAMETERIZATIONS}, got {parameterization!r}")
    return 1.0 if parameterization == "completep" else 0.5


def depth_optimizer_multipliers(parameterization: str, depth_multiplier: float) -> tuple[float, float, float]:
    """(learning rate, Adam epsilon, weight decay) multipliers of the parameters inside the residual layers.

    m = layers / base layers. "deepscalelm" (the paper): none, one learning rate for every depth.
    "depth_mup" and "completep" follow CompleteP's AdamW rule for branch multiplier m^-alpha (Dey et al. 2025,
    as in EleutherAI's nanoGPT-mup `configure_optimizers`): learning rate * m^(alpha - 1), epsilon * m^-alpha;
    decoupled weight decay * m^(1 - alpha) keeps the per-step shrinkage lr * wd independent of depth. Embeddings,
    the final LayerNorm and the output heads keep the base values (multiplier 1).
    """
    if parameterization == "deepscalelm":
        return 1.0, 1.0, 1.0
    alpha = depth_exponent(parameterization)
    m = depth_multiplier
    return m ** (alpha - 1.0), m ** -alpha, m ** (1.0 - alpha)


# ----------------------------------------------------------------------------------------------------------------
# Width parameterizations: how the optimizer and the readout scale with width (muP for Adam)
# ----------------------------------------------------------------------------------------------------------------
def width_optimizer_multipliers(parameterization: str, width_multiplier: float) -> tuple[float, float, float]:
    """(learning rate, Adam epsilon, weight decay) multipliers of the hidden matrices (both dimensions grow with width).

    m_w = hidden size / base width. "standard": none. "mup" (Yang et al., "Tensor Programs V", 2022, Table 3 for Adam;
    the `mup` package's MuAdam): learning rate * 1/m_w, so that an Adam step (entries ~ lr whatever the gradient's
    scale) moves a fan-in-d matrix's output by O(1) instead of O(d); epsilon * 1/m_w, so that it keeps its size
    relative to the gradients, which shrink as 1/d in these matrices; decoupled weight decay * m_w keeps the per-step
    shrinkage lr * wd independent of width (as the depth rule does across depth; Wang and Aitchison, "How to set
    AdamW's weight decay as you scale model and dataset size", 2024). Vector-like parameters (embeddings, biases,
    LayerNorm gains, the tied or untied readout) keep multiplier 1: one of their dimensions does not grow.
    """
    if parameterization not in WIDTH_PARAMETERIZATIONS:
        raise ValueError(f"width_parameterization must be one of {WIDTH_PARAMETERIZATIONS}, got {parameterization!r}")
    if parameterization == "standard":
        return 1.0, 1.0, 1.0
    m = width_multiplier
    return 1.0 / m, 1.0 / m, m


def width_output_multiplier(parameterization: str, width_multiplier: float) -> float:
    """muP's readout multiplier 1/m_w (the `mup` package's MuReadout / MuSharedReadout), applied to the readout
    multiplier the model has at the base width; 1 under "standard".

    With it the readout (whose Adam learning rate does not shrink) moves the logits by O(1) per step at any width:
    an Adam step changes each of its entries by ~lr, aligned with the hidden state, so (W + dW) h changes by ~lr d.
    """
    if parameterization not in WIDTH_PARAMETERIZATIONS:
        raise ValueError(f"width_parameterization must be one of {WIDTH_PARAMETERIZATIONS}, got {parameterization!r}")
    return 1.0 if parameterization == "standard" else 1.0 / width_multiplier


def deepnet_constants(num_layers: int, decoder_layers: int | None = None, stack: str = "single") -> tuple[float, float]:
    """DeepNet (Wang et al. 2022) (alpha, beta): x_next = LN(alpha x + F(x)); v/out/FFN weights scaled by beta.

    stack="single": decoder-only or encoder-only, alpha = (2N)^(1/4), beta = (8N)^(-1/4).
    stack="encoder"/"decoder" of an N-layer encoder and M-layer decoder:
    encoder alpha = 0.81 (N^4 M)^(1/16), beta = 0.87 (N^4 M)^(-1/16); decoder alpha = (3M)^(1/4), beta = (12M)^(-1/4).
    """
    if stack == "single":
        return (2.0 * num_layers) ** 0.25, (8.0 * num_layers) ** -0.25
    m = decoder_layers
    if stack == "encoder":
        return 0.81 * (num_layers**4 * m) ** (1 / 16), 0.87 * (num_layers**4 * m) ** (-1 / 16)
    if stack == "decoder":
        return (3.0 * m) ** 0.25, (12.0 * m) ** -0.25
    raise ValueError(f"stack must be 'single', 'encoder' or 'decoder', got {stack!r}")


# ----------------------------------------------------------------------------------------------------------------
# Initialisation sigmas (section 2). All return standard deviations.
# ----------------------------------------------------------------------------------------------------------------
def embedding_std(dropout: float, num_tables: int) -> float:
    """Each of n tables ~ N(0, (1-p)/n): the sum has variance 1-p, embedding dropout brings it to 1."""
    return math.sqrt((1.0 - dropout) / num_tables)


def query_key_std(hidden_size: int) -> float:
    """W_q, W_k ~ N(0, 1/d): attention logits have variance ~1."""
    return math.sqrt(1.0 / hidden_size)


def value_output_std(dropout: float, attention_correlation: float, hidden_size: int) -> float:
    """W_v and W_o each ~ N(0, sqrt((1-p)/r)/d): attention output variance ~r is undone, dropout brings it to 1."""
    return math.sqrt(math.sqrt((1.0 - dropout) / attention_correlation) / hidden_size)


def ffn_stds(activation: str, dropout: float, hidden_size: int, intermediate_size: int) -> tuple[float, float]:
    """(sigma_1, sigma_2) with sigma_1^2 sigma_2^2 = (1-p) / (E[act^2] d d_ff).

    ReLU is homogeneous, so the product is all that matters; split evenly as the reference code does
    (sqrt((1-p)/2)/d each at d_ff = 4d). GeLU is not: W_1 keeps pre-activations at unit variance (1/d) and
    W_2 carries the rest.
    """
    m2 = activation_second_moment(activation)
    product = (1.0 - dropout) / (m2 * hidden_size * intermediate_size)
    if activation == "relu":
        return math.sqrt(math.sqrt(product)), math.sqrt(math.sqrt(product))
    sigma1_sq = 1.0 / hidden_size
    return math.sqrt(sigma1_sq), math.sqrt(product / sigma1_sq)


def head_dense_std(hidden_size: int) -> float:
    """MLM head dense d->d and an untied LM head: N(0, 1/d)."""
    return math.sqrt(1.0 / hidden_size)


def tied_logit_scale(hidden_size: int, embedding_sigma: float) -> float:
    """Tied output embedding: hidden times 1/sqrt(d sigma_e^2) gives initial logits of variance 1."""
    return 1.0 / math.sqrt(hidden_size * embedding_sigma**2)


def xavier_std(fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def scaled_output_std(initializer_range: float, num_layers: int) -> float:
    """GPT-2: output projections of each residual branch ~ N(0, (0.02 / sqrt(2N))^2)."""
    return initializer_range / math.sqrt(2.0 * num_layers)


# ----------------------------------------------------------------------------------------------------------------
# Attention averaging and the correlation recurrence
# ----------------------------------------------------------------------------------------------------------------
def _attention_position_variances(
    r: float, sequence_length: int, causal: bool, hidden_size: int, attention_dropout: float, logit_variance: float
) -> list[float]:
    """v_n: variance of an attention average over n keys (section 3, single-head attention), n = 1..L."""
    sq, d = logit_variance, hidden_size

    def at_length(n: int) -> float:
        coupling = (1.0 - r) * (n - 1) / n * sq / d
        concentration = min(1.0, math.exp((1.0 - r) * sq) * (1.0 + 4.0 * (1.0 - r) * sq / d) / n)
        return r + (1.0 - r) * (coupling + concentration / (1.0 - attention_dropout))

    if causal:
        return [at_length(n) for n in range(1, sequence_length + 1)]
    return [at_length(sequence_length)]


def attention_variance_ratio(
    r: float, sequence_length: int, causal: bool, hidden_size: int, attention_dropout: float, logit_variance: float = 1.0
) -> float:
    """Variance of the attention average of unit-variance, r-correlated value vectors (per unit value variance).

    Section 3, single-head attention with L keys, logit variance sq:
        r + ((1-r)/L) [ (1-r)(L-1) sq/d + exp((1-r) sq)(1 + 4(1-r) sq/d) / (1-p_attn) ]
    The bracket's second term is L * E[sum_j a_j^2], the inverse effective number of averaged tokens; it can not
    exceed L (one token takes all the weight), which matters for the first positions of a causal mask.
    Bidirectional: every position sees L keys. Causal: position i sees i keys; the average over i = 1..L is returned.
    For long bidirectional sequences this tends to r, the paper's approximation.
    """
    variances = _attention_position_variances(r, sequence_length, causal, hidden_size, attention_dropout, logit_variance)
    return sum(variances) / len(variances)


def attention_output_correlation(
    r: float, sequence_length: int, causal: bool, hidden_size: int, attention_dropout: float, logit_variance: float = 1.0
) -> float:
    """Correlation between the attention outputs of two different query positions (before the branch dropout).

    Two queries share their keys' common part r and the overlap of their weights: E[sum_j a_ij a_kj] ~ 1/L
    (bidirectional, independent softmax weights) or 1/k (causal, i < k: query i sees i keys of weight ~1/i, query k
    weighs each ~1/k). Divided by the per-position variances. The reference recurrence takes this as 1 (outputs
    ~identical), the limit of long sequences with r >> 1/L; at short context or small r0 it is far below 1.
    Causal: averaged over all pairs i < k with prefix sums, O(L).
    """
    variances = _attention_position_variances(r, sequence_length, causal, hidden_size, attention_dropout, logit_variance)
    if not causal:
        return min(1.0, (r + (1.0 - r) / sequence_length) / variances[0])
    total, prefix = 0.0, 0.0  # prefix = sum_{i<k} 1/sqrt(v_i)
    for k in range(1, sequence_length + 1):
        v_k = variances[k - 1]
        total += (r + (1.0 - r) / k) / math.sqrt(v_k) * prefix
        prefix += 1.0 / math.sqrt(v_k)
    pairs = sequence_length * (sequence_length - 1) / 2
    return min(1.0, total / pairs) if pairs else 1.0


def embedding_correlation_estimate(token_ids, num_tables: int, token_type_ids=None) -> float:
    """Estimate r0, the correlation of the summed embeddings of two different positions, from token ids.

    Independent Gaussian tables of equal variance: two positions' summed embeddings correlate by the share of
    each table whose row they have in common. Positions always differ (share 0); the word table contributes the
    probability that two positions of one sequence hold the same token, the token-type table the probability
    of the same segment. `token_ids` is a list of sequences (lists or 1-D tensors of ints) of length >= 2.
    """
    if num_tables < 1:
        raise ValueError(f"num_tables must be >= 1, got {num_tables}")

    def same_id_probability(sequences) -> float:
        total, pairs = 0.0, 0
        for seq in sequences:
            ids = [int(t) for t in seq]
            n = len(ids)
            if n < 2:
                continue
            total += sum(c * (c - 1) for c in Counter(ids).values()) / (n * (n - 1))
            pairs += 1
        if pairs == 0:
            raise ValueError("token_ids must hold at least one sequence of two or more tokens to estimate r0")
        return total / pairs

    r0 = same_id_probability(token_ids) / num_tables
    if token_type_ids is not None:
        r0 += same_id_probability(token_type_ids) / num_tables
    return r0


def branch_output_correlation(kind: str, r_in: float, dropout: float, activation: str, attention_correlation: float = 1.0) -> float:
    """Correlation between positions of a branch's output after its dropout.

    Attention: `attention_correlation` (see attention_output_correlation; the reference code's value is 1, outputs
    ~identical) times 1 - p. FFN: r through the activation's correlation kernel, times 1 - p.
    """
    if kind == "attention":
        return (1.0 - dropout) * attention_correlation
    if kind == "ffn":
        return (1.0 - dropout) * activation_output_correlation(activation, r_in)
    raise ValueError(f"kind must be 'attention' or 'ffn', got {kind!r}")


def mix_residual(r_skip: float, var_skip: float, r_branch: float, var_branch: float, lam2: float, beta2: float):
    """y = lambda x + beta f for independent x, f: (correlation, variance) of y (section 3, residual)."""
    var = lam2 * var_skip + beta2 * var_branch
    return (lam2 * r_skip * var_skip + beta2 * r_branch * var_branch) / var, var


def correlation_recurrence(
    *,
    num_layers: int,
    branch_kinds: tuple[str, ...],
    embedding_correlation: float,
    dropout: float,
    activation: str,
    lam2: float,
    beta2: float,
    sequence_length: int | None = None,
    hidden_size: int | None = None,
    attention_dropout: float = 0.0,
    causal: bool = False,
    cross_correlation: float | None = None,
) -> list[list[float]]:
    """Correlation at the input of every branch of every layer, run through the stack.

    Starts from r0 (1 - p) after embedding dropout, with unit stream variance. Returns, per layer, the input
    correlation of each branch in `branch_kinds` order ("attention", "cross", "ffn"), plus (as a last list) the
    output correlation. With `sequence_length=None` attention outputs are taken as identical across positions
    (the reference code); with the sequence geometry (length, width, mask) they follow attention_output_correlation.
    Cross-attention averages encoder tokens of correlation `cross_correlation` bidirectionally.
    """
    r, s = embedding_correlation * (1.0 - dropout), 1.0
    per_layer = []
    for _ in range(num_layers):
        inputs = []
        for kind in branch_kinds:
            inputs.append(r)
            if kind == "ffn":
                r_out = branch_output_correlation("ffn", r, dropout, activation)
            else:
                attention_correlation = 1.0
                if sequence_length is not None:
                    keys_r, keys_causal = (cross_correlation, False) if kind == "cross" else (r, causal)
                    attention_correlation = attention_output_correlation(
                        keys_r, sequence_length, keys_causal, hidden_size, attention_dropout
                    )
                r_out = branch_output_correlation("attention", r, dropout, activation, attention_correlation)
            r, s = mix_residual(r, s, r_out, 1.0, lam2, beta2)
        per_layer.append(inputs)
    per_layer.append([r])
    return per_layer


# ----------------------------------------------------------------------------------------------------------------
# The recipe applied to one stack: residual scales and every sigma, computed once per configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StackInitPlan:
    """What a stack of layers is initialised with under `init_scheme` (standard deviations, residual scales)."""

    residual_skip: float  # lambda
    residual_branch: float  # beta
    value_output_stds: tuple[float, ...]  # per layer, self-attention W_v and W_o (deepscalelm)
    cross_value_output_stds: tuple[float, ...]  # per layer, cross-attention W_v and W_o (deepscalelm)
    branch_gain: float  # deepnet's beta on v/out/FFN weights; 1 otherwise
    num_layers: int


def _recipe_key(config) -> tuple:
    return (
        config.init_scheme, config.hidden_size, config.num_hidden_layers, config.decoder_layers,
        config.is_encoder_decoder, config.is_decoder, config.hidden_act, float(config.hidden_dropout_prob),
        float(config.attention_probs_dropout_prob), float(config.residual_k), config.residual_branch_count,
        config.residual_beta2, float(config.embedding_correlation), config.init_sequence_length,
        config.depth_parameterization, config.depth_base_layers, config.recurrence,
    )


def stack_init_plan(config, stack: str) -> StackInitPlan:
    """The plan of stack "encoder" or "decoder" (a decoder-only model's only stack is "decoder")."""
    return _stack_init_plan(_recipe_key(config), stack)


def _residual_and_correlations(key: tuple, layers: int, kinds: tuple[str, ...], causal: bool, cross_correlation=None):
    """(lambda, beta, per-layer branch-input correlations) of a DeepScaleLM stack with these branch kinds."""
    _, d, _, _, _, _, act, p, p_attn, k, counting, beta2_override, r0, seq_len, parameterization, base_layers, recurrence = key
    lam, beta = deepscalelm_residual_scales(
        k, residual_branch_total(layers, len(kinds), counting), beta2_override,
        depth_multiplier=layers / base_layers, depth_exponent=depth_exponent(parameterization),
    )
    correlations = correlation_recurrence(
        num_layers=layers, branch_kinds=kinds, embedding_correlation=r0, dropout=p, activation=act,
        lam2=lam * lam, beta2=beta * beta, sequence_length=None if recurrence == "reference" else seq_len,
        hidden_size=d, attention_dropout=p_attn, causal=causal, cross_correlation=cross_correlation,
    )
    return lam, beta, correlations


def _attention_ratio(recurrence: str, r: float, sequence_length: int, causal: bool, hidden_size: int,
                     attention_dropout: float) -> float:
    """Attention output variance per unit value variance: r in the reference code, else attention_variance_ratio."""
    if recurrence == "reference":
        return r
    return attention_variance_ratio(r, sequence_length, causal, hidden_size, attention_dropout)


@lru_cache(maxsize=64)
def _stack_init_plan(key: tuple, stack: str) -> StackInitPlan:
    scheme, d, num_layers, decoder_layers, is_encoder_decoder, _, _, p, p_attn, _, _, _, _, seq_len, _, _, recurrence = key
    has_cross = is_encoder_decoder and stack == "decoder"
    layers = decoder_layers if has_cross else num_layers
    if scheme == "deepnet":
        alpha, gain = deepnet_constants(num_layers, decoder_layers, stack if is_encoder_decoder else "single")
        return StackInitPlan(alpha, 1.0, (), (), gain, layers)
    if scheme != "deepscalelm":
        return StackInitPlan(1.0, 1.0, (), (), 1.0, layers)

    causal = stack == "decoder"
    r_encoder = None
    if has_cross:
        # Cross-attention averages the encoder's output tokens (bidirectionally) at the encoder's final correlation.
        r_encoder = _residual_and_correlations(key, num_layers, ("attention", "ffn"), False)[2][-1][0]
    kinds = ("attention", "cross", "ffn") if has_cross else ("attention", "ffn")
    lam, beta, correlations = _residual_and_correlations(key, layers, kinds, causal, r_encoder)
    self_vo = tuple(
        value_output_std(p, _attention_ratio(recurrence, r[0], seq_len, causal, d, p_attn), d) for r in correlations[:-1]
    )
    cross_vo = ()
    if has_cross:
        cross_vo = (value_output_std(p, _attention_ratio(recurrence, r_encoder, seq_len, False, d, p_attn), d),) * layers
    return StackInitPlan(lam, beta, self_vo, cross_vo, 1.0, layers)


def output_logit_scale(config) -> float:
    """The factor the LM head's input is multiplied by.

    "standard" width rule: with a tied output embedding under DeepScaleLM, 1/sqrt(d sigma_e^2) (initial logits of
    variance 1), else 1. "mup": that factor at the base width times muP's 1/m_w (`width_output_multiplier`). Not
    1/m_w times the factor at width d: DeepScaleLM's factor already falls as d^-1/2, and muP needs the whole readout
    multiplier to fall as 1/d (the readout's Adam step moves the logits by ~ lr d times it), so d^-3/2 would freeze the
    readout as the model widens. At the base width both rules give the same factor.
    """
    parameterization = config.width_parameterization
    width = config.hidden_size if parameterization == "standard" else config.width_base
    scale = 1.0
    if config.init_scheme == "deepscalelm" and config.tie_word_embeddings:
        scale = tied_logit_scale(width, embedding_std(config.hidden_dropout_prob, config.num_embedding_tables))
    return scale * width_output_multiplier(parameterization, config.hidden_size / config.width_base)


def embedding_table_std(config, shape: tuple[int, int]) -> float:
    """Std of an embedding table (word, position or token type) under config.init_scheme."""
    if config.init_scheme == "deepscalelm":
        return embedding_std(config.hidden_dropout_prob, config.num_embedding_tables)
    if config.init_scheme == "standard":
        return config.initializer_range
    return xavier_std(*shape)


LINEAR_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2", "head_dense", "lm_head", "score")


def linear_init_std(config, role: str, stack: str | None, layer_idx: int | None, cross: bool, fan_in: int, fan_out: int) -> float:
    """Std of a Linear weight by its role under config.init_scheme (biases are zero, LayerNorms identity).

    deepscalelm: section 2 (q/k 1/d; v/o per layer from the correlation recurrence; FFN from ffn_stds;
    heads 1/d). xavier: xavier-normal everywhere. standard: N(0, initializer_range), o_proj and fc2 at
    initializer_range / sqrt(2 N). deepnet: xavier-normal with gain beta on v_proj, o_proj, fc1, fc2.
    """
    if role not in LINEAR_ROLES:
        raise ValueError(f"unknown Linear role {role!r}; expected one of {LINEAR_ROLES}")
    scheme, d = config.init_scheme, config.hidden_size
    if role in ("head_dense", "lm_head", "score"):
        if scheme == "standard":
            return config.initializer_range
        return xavier_std(fan_in, fan_out) if scheme in ("xavier", "deepnet") else head_dense_std(fan_in)
    plan = stack_init_plan(config, stack)
    if scheme == "deepscalelm":
        if role in ("q_proj", "k_proj"):
            return query_key_std(d)
        if role in ("v_proj", "o_proj"):
            return (plan.cross_value_output_stds if cross else plan.value_output_stds)[layer_idx]
        fc1, fc2 = ffn_stds(config.hidden_act, config.hidden_dropout_prob, d, config.intermediate_size)
        return fc1 if role == "fc1" else fc2
    if scheme == "standard":
        if role in ("o_proj", "fc2"):
            return scaled_output_std(config.initializer_range, plan.num_layers)
        return config.initializer_range
    gain = plan.branch_gain if role in ("v_proj", "o_proj", "fc1", "fc2") else 1.0
    return xavier_std(fan_in, fan_out, gain)
