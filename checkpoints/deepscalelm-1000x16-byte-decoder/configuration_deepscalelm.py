"""DeepScaleLM configuration."""

import dataclasses
import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .recipe_deepscalelm import (
    ACTIVATIONS,
    BRANCH_COUNTINGS,
    DEPTH_PARAMETERIZATIONS,
    INIT_SCHEMES,
    NORM_PLACEMENTS,
    RECURRENCES,
    WIDTH_PARAMETERIZATIONS,
    depth_exponent,
    embedding_correlation_estimate,
    residual_branch_total,
)

POSITION_EMBEDDING_TYPES = ("absolute", "rotary")
# r0 when the config gives none, per architecture: chosen on the text we ship (tests/data, Tiny Shakespeare) with the
# 192-layer, width-128 stacks of tests/test_fidelity.py, where the reference's 0.221 (BERT on Wikipedia, 3 tables)
# lets the stream variance sag to 0.65-0.75. Byte-level text estimates r0 ~0.029 (2 tables), BPE ~0.01.
DEFAULT_EMBEDDING_CORRELATIONS = {"decoder": 0.01, "encoder": 0.03, "encoder-decoder": 0.02}


@strict
class DeepScaleLMConfig(PreTrainedConfig):
    r"""
    Configuration of a DeepScaleLM transformer (Kedia et al., "Transformers Get Stable", ICML 2024): a decoder
    (`is_decoder=True`, causal LM), an encoder (`is_decoder=False`, masked LM) or a Bart-style encoder-decoder
    (`is_encoder_decoder=True`, `decoder_layers`), Pre-LN or Post-LN, initialised so that the forward signal and
    the gradients keep unit variance at any depth.

    Args:
        vocab_size (`int`, defaults to 32000): vocabulary size.
        hidden_size (`int`, defaults to 768): width d of the residual stream.
        num_hidden_layers (`int`, defaults to 12): layers of the decoder-only / encoder-only stack, or of the encoder.
        num_attention_heads (`int`, defaults to 12): heads; must divide `hidden_size`.
        intermediate_size (`int`, *optional*): FFN width d_ff; `None` means 4 * hidden_size as in the paper.
        hidden_act (`str`, defaults to `"relu"`): FFN and MLM-head activation, `"relu"` (the paper) or `"gelu"`.
        hidden_dropout_prob (`float`, defaults to 0.1): dropout p on embeddings and every residual branch.
        attention_probs_dropout_prob (`float`, defaults to 0.1): dropout on attention probabilities.
        max_position_embeddings (`int`, defaults to 512): rows of the learned position table (and the longest input).
        position_embedding_type (`str`, defaults to `"absolute"`): learned absolute positions (the paper) or `"rotary"`.
        rope_theta (`float`, defaults to 10000.0): rotary base, used only with `"rotary"`.
        type_vocab_size (`int`, defaults to 0): token-type (segment) table rows; 0 disables the table.
        layer_norm_eps (`float`, defaults to 1e-5): LayerNorm epsilon.
        norm_placement (`str`, defaults to `"pre"`): `"pre"` (LN inside each branch, final LN), `"post"` (BERT order)
            or `"mix"` (Mix-LN, Li et al. 2024: the first `mix_ln_post_fraction` of each stack's layers Post-LN, the
            rest Pre-LN, a final LN and no embedding LN; `init_scheme` `"standard"` or `"xavier"` only).
        mix_ln_post_fraction (`float`, defaults to 0.25): with `norm_placement="mix"`, the fraction of layers that are
            Post-LN: the first floor(fraction * layers), at least one. Leave it at 0.25 otherwise.
        layernorm_scaling (`bool`, defaults to `False`): LayerNorm Scaling (Sun et al. 2025, "The Curse of Depth in
            LLMs"): every LayerNorm inside layer l (l = 1, 2, ...) has its output multiplied by 1/sqrt(l), so the
            branches of deep layers read a smaller input and Pre-LN's stream variance grows more slowly. Pre-LN with
            `init_scheme` `"standard"` or `"xavier"` only; the final LayerNorm is not scaled.
        init_scheme (`str`, defaults to `"deepscalelm"`): `"deepscalelm"` (the recipe and its residual scaling),
            `"xavier"` (the paper's vanilla baseline), `"standard"` (N(0, initializer_range), GPT-2 scaled output
            projections) or `"deepnet"` (DeepNorm, Post-LN only).
        residual_k (`float`, defaults to 2.0): k in beta^2 = k / N.
        residual_branch_count (`str`, defaults to `"branches"`): what N counts: the stack's residual `"branches"`
            (2 per layer, 3 in a decoder with cross-attention; k=2 gives the reference code's beta^2 ~ 1/layers) or its
            `"layers"` (k=2 gives beta^2 = 2/layers as in other re-implementations).
        residual_beta2 (`float`, *optional*): a raw beta^2 overriding k / N; lambda^2 = 1 - beta^2 always.
        depth_parameterization (`str`, defaults to `"deepscalelm"`): how the residual branches and the optimizer
            scale with depth, relative to `depth_base_layers`. `"deepscalelm"`: beta^2 = k / N and one learning rate
            for every depth (the paper). `"depth_mup"`: the same beta (~ 1/sqrt(depth)) with the depth-muP AdamW rule
            for the parameters inside the layers (learning rate and epsilon * (layers / base)^-1/2, weight decay *
            (layers / base)^1/2; `dslm_hf.optimization.depth_parameter_groups`). `"completep"`: CompleteP's branch
            multiplier ~ 1/depth (beta^2 = k / N * base / layers) with epsilon * base / layers (Pre-LN only).
            `init_scheme="deepscalelm"` only; the initialisation is DeepScaleLM's in every case.
        depth_base_layers (`int`, defaults to 4): the depth at which the learning rate was tuned; every
            parameterization equals `"deepscalelm"` at this depth.
        width_parameterization (`str`, defaults to `"standard"`): how the optimizer and the readout scale with width,
            relative to `width_base` (m_w = hidden_size / width_base). `"standard"`: no rule. `"mup"`: muP for AdamW
            (Yang et al., Tensor Programs V): the hidden matrices (attention, FFN, cross-attention, MLM transform)
            get learning rate and epsilon * 1/m_w and weight decay * m_w (composed with the depth rule), vector-like
            parameters (embeddings, biases, LayerNorms, the readout) keep the base values, and the LM head reads the
            hidden state times the base width's `logit_scale` times 1/m_w. The initialisation is DeepScaleLM's in
            both cases.
        width_base (`int`, defaults to 64): the width at which the learning rate was tuned; `"mup"` equals
            `"standard"` at this width.
        embedding_correlation (`float`, *optional*): r0, the correlation of two positions' summed embeddings. It
            depends on the data: estimate it with `DeepScaleLMConfig.estimate_embedding_correlation(token_ids)` for
            your tokenizer and corpus. `None` takes `DEFAULT_EMBEDDING_CORRELATIONS` for the architecture (decoder
            0.01, encoder 0.03, encoder-decoder 0.02); the reference code's BERT/Wikipedia value is 0.221.
        recurrence (`str`, defaults to `"refined"`): how the correlation recurrence (which sets W_v, W_o per layer)
            treats attention. `"refined"`: attention's output variance and output correlation follow the sequence
            length and the mask (`init_sequence_length`, causal in a decoder). `"reference"`: exactly the reference
            code - attention's output variance is the input correlation r and its outputs are identical across
            positions (correlation 1, then 1 - p after dropout).
        init_sequence_length (`int`, *optional*): sequence length the recipe assumes when it undoes attention's
            averaging; `None` means `max_position_embeddings`.
        initializer_range (`float`, defaults to 0.02): std of the `"standard"` scheme.
        classifier_dropout (`float`, *optional*): dropout of the classification heads; `None` means hidden dropout.
        is_decoder (`bool`, defaults to `True`): causal self-attention (decoder) or bidirectional (encoder).
        is_encoder_decoder (`bool`, defaults to `False`): build an encoder-decoder (`DeepScaleLMForSeq2SeqLM`).
        decoder_layers (`int`, *optional*): decoder depth of an encoder-decoder; `None` means `num_hidden_layers`.
        tie_word_embeddings (`bool`, defaults to `True`): tie the output projection to the word embeddings.
    """

    model_type = "deepscalelm"
    keys_to_ignore_at_inference = ["cache"]
    # One stack's plans (layers.*); the encoder-decoder's stacks prefix them with encoder./decoder. and its decoder
    # adds cross_attn (see DeepScaleLMModel.init_parallel_plans).
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.fc1": "colwise",
        "layers.*.mlp.fc2": "rowwise",
    }

    vocab_size: int = 32000
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int | None = None
    hidden_act: str = "relu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    max_position_embeddings: int = 512
    position_embedding_type: str = "absolute"
    rope_theta: float | int = 10000.0
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-5
    norm_placement: str = "pre"
    mix_ln_post_fraction: float = 0.25
    layernorm_scaling: bool = False
    init_scheme: str = "deepscalelm"
    residual_k: float | int = 2.0
    residual_branch_count: str = "branches"
    residual_beta2: float | None = None
    depth_parameterization: str = "deepscalelm"
    depth_base_layers: int = 4
    width_parameterization: str = "standard"
    width_base: int = 64
    embedding_correlation: float | None = None
    recurrence: str = "refined"
    init_sequence_length: int | None = None
    initializer_range: float = 0.02
    classifier_dropout: float | int | None = None
    is_decoder: bool = True
    is_encoder_decoder: bool = False
    decoder_layers: int | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    decoder_start_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.init_sequence_length is None:
            self.init_sequence_length = self.max_position_embeddings
        if self.is_encoder_decoder and self.decoder_layers is None:
            self.decoder_layers = self.num_hidden_layers
        if self.embedding_correlation is None:
            architecture = "encoder-decoder" if self.is_encoder_decoder else "decoder" if self.is_decoder else "encoder"
            self.embedding_correlation = DEFAULT_EMBEDDING_CORRELATIONS[architecture]
        self.check_values()
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation (construction and save): the same checks as at construction."""
        self.check_values()

    def check_values(self):
        """Raise ValueError naming the field, the value and what is allowed for the first invalid value."""

        def fail(field, allowed):
            raise ValueError(f"DeepScaleLMConfig.{field}={getattr(self, field)!r} is invalid: {allowed}")

        for spec in dataclasses.fields(self):  # nan and inf pass every comparison below unnoticed
            value = getattr(self, spec.name, None)
            if isinstance(value, float) and not math.isfinite(value):
                fail(spec.name, "expected a finite number")

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                      "max_position_embeddings", "init_sequence_length"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(field, "expected a positive integer")
        if self.hidden_size % self.num_attention_heads != 0:
            fail("num_attention_heads", f"must divide hidden_size={self.hidden_size}")
        if self.position_embedding_type == "rotary" and (self.hidden_size // self.num_attention_heads) % 2:
            fail("num_attention_heads", "rotary positions need an even head size (hidden_size / num_attention_heads)")
        if self.hidden_act not in ACTIVATIONS:
            fail("hidden_act", f"expected one of {ACTIVATIONS} (the recipe's constants are derived for these only)")
        for field in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, field) < 1.0:
                fail(field, "expected a probability in [0, 1)")
        if self.classifier_dropout is not None and not 0.0 <= self.classifier_dropout < 1.0:
            fail("classifier_dropout", "expected None or a probability in [0, 1)")
        if self.position_embedding_type not in POSITION_EMBEDDING_TYPES:
            fail("position_embedding_type", f"expected one of {POSITION_EMBEDDING_TYPES}")
        if self.rope_theta <= 0:
            fail("rope_theta", "expected a positive number")
        if isinstance(self.type_vocab_size, bool) or self.type_vocab_size < 0:
            fail("type_vocab_size", "expected 0 (no token-type table) or a positive number of segment ids")
        if self.layer_norm_eps <= 0:
            fail("layer_norm_eps", "expected a positive number")
        if self.norm_placement not in NORM_PLACEMENTS:
            fail("norm_placement", f"expected one of {NORM_PLACEMENTS}")
        if self.init_scheme not in INIT_SCHEMES:
            fail("init_scheme", f"expected one of {INIT_SCHEMES}")
        if self.init_scheme == "deepnet" and self.norm_placement != "post":
            fail("init_scheme", "'deepnet' (DeepNorm) is a Post-LN method: set norm_placement='post'")
        self._check_curse_of_depth_baselines(fail)
        if self.residual_k <= 0:
            fail("residual_k", "expected a positive number (beta^2 = k / N)")
        if self.residual_branch_count not in BRANCH_COUNTINGS:
            fail("residual_branch_count", f"expected one of {BRANCH_COUNTINGS}")
        if self.residual_beta2 is not None and not 0.0 < self.residual_beta2 < 1.0:
            fail("residual_beta2", "expected None or a beta^2 in (0, 1) (lambda^2 = 1 - beta^2)")
        if self.depth_parameterization not in DEPTH_PARAMETERIZATIONS:
            fail("depth_parameterization", f"expected one of {DEPTH_PARAMETERIZATIONS}")
        if isinstance(self.depth_base_layers, bool) or not isinstance(self.depth_base_layers, int) or self.depth_base_layers < 1:
            fail("depth_base_layers", "expected a positive integer (the depth the learning rate was tuned at)")
        if self.width_parameterization not in WIDTH_PARAMETERIZATIONS:
            fail("width_parameterization", f"expected one of {WIDTH_PARAMETERIZATIONS}")
        if isinstance(self.width_base, bool) or not isinstance(self.width_base, int) or self.width_base < 1:
            fail("width_base", "expected a positive integer (the width the learning rate was tuned at)")
        if self.width_parameterization == "mup" and self.init_scheme == "standard":
            fail("width_parameterization", "muP scales the optimizer around matrices drawn with variance ~ 1/fan_in; "
                 "init_scheme='standard' draws every matrix with the fixed std initializer_range: use another "
                 "init_scheme, or width_parameterization='standard'")
        if self.depth_parameterization != "deepscalelm" and self.init_scheme != "deepscalelm":
            fail("depth_parameterization", "the depth rules scale DeepScaleLM's lambda/beta and its optimizer: "
                 "use init_scheme='deepscalelm', or depth_parameterization='deepscalelm'")
        if self.depth_parameterization == "completep" and self.norm_placement != "pre":
            fail("depth_parameterization", "CompleteP's 1/depth branch multiplier is derived for Pre-LN streams (a "
                 "Post-LN LayerNorm after each sum undoes it): use norm_placement='pre', or 'depth_mup' (its optimizer "
                 "rule only) for Post-LN")
        if not 0.0 < self.embedding_correlation < 1.0:
            fail("embedding_correlation", "expected r0 in (0, 1); estimate it with estimate_embedding_correlation")
        if self.initializer_range <= 0:
            fail("initializer_range", "expected a positive standard deviation")
        if self.is_encoder_decoder:
            if isinstance(self.decoder_layers, bool) or not isinstance(self.decoder_layers, int) or self.decoder_layers < 1:
                fail("decoder_layers", "expected a positive integer for an encoder-decoder")
        elif self.decoder_layers is not None:
            fail("decoder_layers", "only an encoder-decoder (is_encoder_decoder=True) has decoder layers; leave it None")
        for field in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, field)
            ids = value if isinstance(value, list) else [value]
            if any(i is not None and (isinstance(i, bool) or not 0 <= i < self.vocab_size) for i in ids):
                fail(field, f"expected None or a token id in [0, vocab_size={self.vocab_size})")
        if self.recurrence not in RECURRENCES:
            fail("recurrence", f"expected one of {RECURRENCES}")
        if self.init_scheme == "deepscalelm":
            for stack, layers, branches in self.residual_stacks():
                beta2 = self.residual_beta2 if self.residual_beta2 is not None else self.residual_k / self._branch_total(layers, branches) * (
                    layers / self.depth_base_layers) ** (1.0 - 2.0 * depth_exponent(self.depth_parameterization))
                if beta2 >= 1.0:
                    fail("residual_k", f"beta^2 = {beta2:.3g} >= 1 for the {stack} ({layers} layers): lower k")

    def _check_curse_of_depth_baselines(self, fail):
        """Mix-LN and LayerNorm Scaling are remedies for plain (x + F(x)) residuals. DeepScaleLM's recipe already
        keeps the stream at unit variance with its lambda/beta (and derives each sigma for unit-variance branch
        inputs, which LayerNorm Scaling breaks); DeepNorm's constants assume every layer Post-LN. So both options
        take init_scheme 'standard' or 'xavier' only."""
        baselines = ("standard", "xavier")
        if self.layernorm_scaling:
            if self.norm_placement != "pre":
                fail("layernorm_scaling", f"LayerNorm Scaling scales the Pre-LN branch inputs; norm_placement="
                     f"{self.norm_placement!r} has none to scale: set norm_placement='pre'")
            if self.init_scheme not in baselines:
                fail("layernorm_scaling", f"LayerNorm Scaling is a baseline for plain residuals; init_scheme="
                     f"{self.init_scheme!r} sets its own residual scales (and DeepScaleLM derives its sigmas for "
                     f"unit-variance branch inputs): use init_scheme in {baselines}")
        if self.norm_placement == "mix":
            if self.init_scheme not in baselines:
                fail("norm_placement", f"Mix-LN is a baseline for plain residuals; init_scheme={self.init_scheme!r} "
                     f"sets its own residual scales: use init_scheme in {baselines}, or norm_placement 'pre'/'post'")
            if not 0.0 < self.mix_ln_post_fraction < 1.0:
                fail("mix_ln_post_fraction", "expected a fraction in (0, 1) of the layers to be Post-LN")
            for stack, layers, _ in self.residual_stacks():
                post = self.post_norm_layers(layers)
                if post == 0:  # a fraction below 1 always leaves a Pre-LN layer
                    fail("mix_ln_post_fraction", f"floor({self.mix_ln_post_fraction} x {layers} layers) = 0 Post-LN "
                         f"layers in the {stack}, which is plain Pre-LN: raise the fraction, or use norm_placement='pre'")
        elif self.mix_ln_post_fraction != 0.25:
            fail("mix_ln_post_fraction", f"applies only to norm_placement='mix' (this config has "
                 f"{self.norm_placement!r}): leave it at 0.25, or set norm_placement='mix'")

    # -- helpers the model and the theory share ----------------------------------------------------------------
    def post_norm_layers(self, num_layers: int) -> int:
        """How many of a stack's first layers are Post-LN: all (post), none (pre), floor(fraction x layers) (mix)."""
        if self.norm_placement == "mix":
            return math.floor(self.mix_ln_post_fraction * num_layers + 1e-9)  # 0.29 x 100 = 28.999...: still 29
        return num_layers if self.norm_placement == "post" else 0

    @property
    def num_embedding_tables(self) -> int:
        """Word table, plus the learned position table, plus the token-type table when present."""
        return 1 + (self.position_embedding_type == "absolute") + (self.type_vocab_size > 0)

    def residual_stacks(self) -> list[tuple[str, int, int]]:
        """(name, layers, residual branches per layer) of each stack of the model."""
        if self.is_encoder_decoder:
            return [("encoder", self.num_hidden_layers, 2), ("decoder", self.decoder_layers, 3)]
        return [("decoder" if self.is_decoder else "encoder", self.num_hidden_layers, 2)]

    def _branch_total(self, layers: int, branches_per_layer: int) -> int:
        return residual_branch_total(layers, branches_per_layer, self.residual_branch_count)

    def estimate_embedding_correlation(self, token_ids, token_type_ids=None) -> float:
        """r0 for this config's embedding tables from a sample of token ids (a list of sequences or a 2-D tensor)."""
        return embedding_correlation_estimate(token_ids, self.num_embedding_tables, token_type_ids)


__all__ = ["DeepScaleLMConfig"]
