"""DeepScaleLM: transformers that keep unit signal and gradient variance at any depth.

Kedia et al., "Transformers Get Stable: An End-to-End Signal Propagation Theory for Language Models", ICML 2024.
The file reads like the paper: embeddings, attention, feed-forward, the scaled residual, the layer, the stacks,
the heads. Every initialisation constant comes from `recipe_deepscalelm.py` (pure math shared with the theory).

Notation: d hidden size, d_ff FFN width, p hidden dropout, N the number of residual branches of a stack, r the
correlation between the hidden vectors of two different positions, sigma_e the std of each embedding table.

    out = lambda * skip + beta * Dropout(F(h)),   lambda^2 + beta^2 = 1,   beta^2 = k / N      (Pre-LN: h = LN(skip))
    x_next = LN(lambda * x + beta * Dropout(F(x)))                                               (Post-LN)

Each branch F is initialised to output unit variance, so the stream keeps variance 1 at every depth; the tied
output embedding reads the final hidden state times `logit_scale` = 1/sqrt(d sigma_e^2), which gives the initial
logits variance 1.
"""

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.loss.loss_utils import ForMaskedLMLoss
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_deepscalelm import DeepScaleLMConfig
from .input_checks_deepscalelm import (
    IGNORE_INDEX,
    check_inputs,
    check_sequence_labels,
    check_span_positions,
    check_token_labels,
)
from .recipe_deepscalelm import embedding_table_std, linear_init_std, output_logit_scale, stack_init_plan

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Positions: learned absolute (the paper) or rotary
# ----------------------------------------------------------------------------------------------------------------
class DeepScaleLMRotaryEmbedding(nn.Module):
    """Rotary position angles (cos, sin) per position, used only with `position_embedding_type="rotary"`: the default
    (unscaled) RoPE, whose frequencies transformers' own initialisation recomputes through
    `compute_default_rope_parameters` (the buffers are not saved)."""

    def __init__(self, config: DeepScaleLMConfig):
        super().__init__()
        self.config = config
        self.rope_type = "default"
        inv_freq, _ = self.compute_default_rope_parameters(config)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: DeepScaleLMConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        """(inverse frequencies theta^(-2i/hd), attention scaling 1.0: default RoPE scales nothing)."""
        head_dim = config.hidden_size // config.num_attention_heads
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim  # (hd/2,)
        return 1.0 / (config.rope_theta**exponents), 1.0

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # (B, T, hd/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd): broadcast over heads
    return x * cos + _rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------------
def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Tq, Tk)
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # an sdpa mask: True attends
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:  # an eager mask: added to the scores
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (B, Tq, H, hd)
    return output, probs


def _returns_attention_maps(config: DeepScaleLMConfig, kwargs: dict) -> bool:
    """sdpa computes no attention maps: when they are asked for, attention runs eagerly (with explicit masks)."""
    return bool(kwargs.get("output_attentions")) and config._attn_implementation == "sdpa"


class DeepScaleLMAttention(nn.Module):
    """Multi-head attention (self or cross) through transformers' attention interface (sdpa, eager, flex, flash).

    Returns (output, attention probabilities or None). Under the default sdpa, `output_attentions=True` runs the
    eager computation for that call (with a one-time warning) so the maps are real, not None.
    """

    def __init__(self, config: DeepScaleLMConfig, layer_idx: int, stack: str, is_cross_attention: bool = False):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.stack = stack
        self.is_cross_attention = is_cross_attention
        self.is_causal = stack == "decoder" and not is_cross_attention
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_value_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

        layer_cache, reuse_cross = cache, False
        if isinstance(cache, EncoderDecoderCache):
            layer_cache = cache.cross_attention_cache if self.is_cross_attention else cache.self_attention_cache
            reuse_cross = self.is_cross_attention and cache.is_updated.get(self.layer_idx, False)

        if reuse_cross:
            key = layer_cache.layers[self.layer_idx].keys
            value = layer_cache.layers[self.layer_idx].values
        else:
            source = key_value_states if self.is_cross_attention else hidden_states
            kv_shape = (*source.shape[:-1], -1, self.head_dim)
            key = self.k_proj(source).view(kv_shape).transpose(1, 2)  # (B, H, S, hd)
            value = self.v_proj(source).view(kv_shape).transpose(1, 2)
            if position_embeddings is not None and not self.is_cross_attention:
                cos, sin = position_embeddings
                query, key = _apply_rotary(query, cos, sin), _apply_rotary(key, cos, sin)
            if layer_cache is not None:
                key, value = layer_cache.update(key, value, self.layer_idx)
                if self.is_cross_attention:
                    cache.is_updated[self.layer_idx] = True

        if _returns_attention_maps(self.config, kwargs):
            logger.warning_once(
                "sdpa attention computes no attention maps: output_attentions=True runs eager attention for these "
                "calls (load with attn_implementation='eager' to make it the default)"
            )
            attention_interface: Callable = eager_attention_forward
        else:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        output, probs = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        output = self.o_proj(output.reshape(*input_shape, -1).contiguous())  # (B, T, d)
        return output, probs


# ----------------------------------------------------------------------------------------------------------------
# Feed-forward
# ----------------------------------------------------------------------------------------------------------------
class DeepScaleLMMLP(nn.Module):
    """FFN branch fc2(act(fc1(h))), d -> d_ff -> d (ReLU in the paper)."""

    def __init__(self, config: DeepScaleLMConfig, stack: str):
        super().__init__()
        self.stack = stack
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


# ----------------------------------------------------------------------------------------------------------------
# The layer: every branch (self-attention, cross-attention, FFN) joins the stream through the scaled residual
# ----------------------------------------------------------------------------------------------------------------
class DeepScaleLMLayer(GradientCheckpointingLayer):
    """Self-attention, cross-attention (decoder of an encoder-decoder only) and FFN branches, each joined to the
    stream by lambda * skip + beta * Dropout(branch) (Pre-LN: the branch reads LN(stream); Post-LN: LN of the sum).

    Mix-LN makes the first layers of a stack Post-LN and the rest Pre-LN (`config.post_norm_layers`); LayerNorm
    Scaling multiplies the branch input LN(stream) of layer l = layer_idx + 1 by 1/sqrt(l)."""

    def __init__(self, config: DeepScaleLMConfig, layer_idx: int, stack: str, has_cross_attention: bool = False):
        super().__init__()
        plan = stack_init_plan(config, stack)
        self.residual_skip, self.residual_branch = plan.residual_skip, plan.residual_branch
        self.pre_norm = layer_idx >= config.post_norm_layers(plan.num_layers)
        self.norm_output_scale = (layer_idx + 1) ** -0.5 if config.layernorm_scaling else 1.0
        self.self_attn = DeepScaleLMAttention(config, layer_idx, stack)
        self.self_attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cross_attn = DeepScaleLMAttention(config, layer_idx, stack, is_cross_attention=True) if has_cross_attention else None
        self.cross_attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if has_cross_attention else None
        self.mlp = DeepScaleLMMLP(config, stack)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def residual(self, skip: torch.Tensor, branch: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        """lambda * skip + beta * Dropout(branch); Post-LN normalises the sum."""
        branch = self.dropout(branch)
        if self.residual_skip == 1.0:
            out = torch.add(skip, branch, alpha=self.residual_branch) if self.residual_branch != 1.0 else skip + branch
        else:
            out = torch.add(skip * self.residual_skip, branch, alpha=self.residual_branch)
        return out if self.pre_norm else norm(out)

    def branch_input(self, hidden_states: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        """What a branch reads: LN(stream) (times 1/sqrt(l) under LayerNorm Scaling) in Pre-LN, the stream in Post-LN."""
        if not self.pre_norm:
            return hidden_states
        normed = norm(hidden_states)
        return normed * self.norm_output_scale if self.norm_output_scale != 1.0 else normed

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        branch_in = self.branch_input(hidden_states, self.self_attn_norm)
        attn_out, _ = self.self_attn(
            branch_in, attention_mask=attention_mask, position_embeddings=position_embeddings, cache=cache, **kwargs
        )
        hidden_states = self.residual(hidden_states, attn_out, self.self_attn_norm)

        if self.cross_attn is not None:
            branch_in = self.branch_input(hidden_states, self.cross_attn_norm)
            attn_out, _ = self.cross_attn(
                branch_in, attention_mask=encoder_attention_mask, key_value_states=encoder_hidden_states, cache=cache,
                **kwargs,
            )
            hidden_states = self.residual(hidden_states, attn_out, self.cross_attn_norm)

        branch_in = self.branch_input(hidden_states, self.mlp_norm)
        return self.residual(hidden_states, self.mlp(branch_in), self.mlp_norm)


class DeepScaleLMPredictionHeadTransform(nn.Module):
    """The masked-LM head before the output projection: dense d->d (N(0, 1/d)), activation, LayerNorm."""

    def __init__(self, config: DeepScaleLMConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden_states)))


# ----------------------------------------------------------------------------------------------------------------
# Pretrained base: initialisation through transformers.initialization (never touches loaded tensors)
# ----------------------------------------------------------------------------------------------------------------
def _linear_roles(owner: nn.Module) -> dict[str, str]:
    """The Linears a module owns that the recipe initialises: attribute name -> role in `linear_init_std`."""
    if isinstance(owner, DeepScaleLMAttention):
        return {name: name for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if isinstance(owner, DeepScaleLMMLP):
        return {"fc1": "fc1", "fc2": "fc2"}
    if isinstance(owner, DeepScaleLMPredictionHeadTransform):
        return {"dense": "head_dense"}
    if isinstance(owner, DeepScaleLMPreTrainedModel):  # a task head's own output layer
        return {"lm_head": "lm_head", "score": "score", "qa_outputs": "score"}
    return {}


@auto_docstring(
    custom_intro="""
    Base class of every DeepScaleLM model: the recipe's initialisation (each Linear's std chosen from the module that
    owns it - attention projection, FFN layer, MLM transform, task head - and, inside a layer, its stack and depth),
    the Auto-class map written into saved configs, and the parallelism plans.
    """
)
class DeepScaleLMPreTrainedModel(PreTrainedModel):
    config: DeepScaleLMConfig
    config_class = DeepScaleLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepScaleLMLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": DeepScaleLMLayer,
        "attentions": OutputRecorder(DeepScaleLMAttention, index=1, layer_name="self_attn"),
    }

    def _init_weights(self, module: nn.Module):
        """The recipe's std for each embedding table and each Linear (chosen by the Linear's role in the module that
        owns it); transformers' own initialisation for the rest (LayerNorms, rotary frequencies). Each draw goes
        through `transformers.initialization`, which leaves tensors loaded from a checkpoint alone."""
        if isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=embedding_table_std(self.config, tuple(module.weight.shape)))
            return
        owner = self._recipe_linear_owner(module) if isinstance(module, nn.Linear) else None
        if owner is None:
            super()._init_weights(module)
            return
        owner_module, role = owner
        stack, layer_idx = getattr(owner_module, "stack", None), getattr(owner_module, "layer_idx", None)
        cross = getattr(owner_module, "is_cross_attention", False)
        fan_out, fan_in = module.weight.shape
        std = linear_init_std(self.config, role, stack, layer_idx, cross, fan_in, fan_out)
        init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)

    def _recipe_linear_owner(self, linear: nn.Linear) -> tuple[nn.Module, str] | None:
        """(owning module, recipe role) of a Linear of this model, None for a Linear the recipe does not cover.

        transformers initialises remote code Linear by Linear: a module that owns no parameter itself (an attention
        or FFN module) counts as loaded and is skipped, so the role is looked up from the Linear. The table is built
        once per model and again when a Linear is new to it (a replaced module)."""
        table = self.__dict__.get("_recipe_linear_owners")
        if table is None or linear not in table:
            table = {
                getattr(owner, name): (owner, role)
                for owner in self.modules()
                for name, role in _linear_roles(owner).items()
                if isinstance(getattr(owner, name, None), nn.Linear)
            }
            self.__dict__["_recipe_linear_owners"] = table
        return table.get(linear)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Map every Auto class to its head so any head of this checkpoint loads with trust_remote_code.
        self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)



def _with_label_count(labels: torch.Tensor, kwargs: dict, shift: bool) -> dict:
    """The loss kwargs with `num_items_in_batch`: the label tokens (`shift`: the causal loss's labels[:, 1:]), >= 1.

    The losses then divide a summed cross-entropy by that count: the mean for any batch with a label token, and for
    a batch whose labels are all -100 a loss of 0, still connected to the graph (zero gradients), where the mean
    would be NaN and poison the optimizer state. A caller's own count (gradient accumulation) is kept.
    """
    if kwargs.get("num_items_in_batch") is not None:
        return kwargs
    counted = labels[..., 1:] if shift else labels
    return {**kwargs, "num_items_in_batch": (counted != IGNORE_INDEX).sum().clamp(min=1)}



# ----------------------------------------------------------------------------------------------------------------
# The stacks
# ----------------------------------------------------------------------------------------------------------------
@auto_docstring(
    custom_intro="""
    A stack of DeepScaleLM layers with its embeddings: a causal decoder (`config.is_decoder=True`) or a bidirectional
    encoder (`False`). Built from an encoder-decoder config (`is_encoder_decoder=True`), `DeepScaleLMModel(config)`
    returns a `DeepScaleLMSeq2SeqModel`, so `AutoModel` gives the right base model for every config.
    """
)
class DeepScaleLMModel(DeepScaleLMPreTrainedModel):
    def __new__(cls, config: DeepScaleLMConfig | None = None, *args, **kwargs):
        # AutoModel maps a config class to one model class; the encoder-decoder is told apart by a config value.
        if cls is DeepScaleLMModel and getattr(config, "is_encoder_decoder", False) and not args and "stack" not in kwargs:
            return DeepScaleLMSeq2SeqModel(config)
        return super().__new__(cls)

    def __init__(self, config: DeepScaleLMConfig, stack: str | None = None):
        r"""
        stack (`str`, *optional*):
            `"decoder"` (causal) or `"encoder"` (bidirectional); `None` follows `config.is_decoder`.
        """
        super().__init__(config)
        self.stack = stack or ("decoder" if config.is_decoder else "encoder")
        has_cross = config.is_encoder_decoder and self.stack == "decoder"
        num_layers = config.decoder_layers if has_cross else config.num_hidden_layers
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        absolute = config.position_embedding_type == "absolute"
        self.embed_positions = nn.Embedding(config.max_position_embeddings, d) if absolute else None
        self.rotary_emb = None if absolute else DeepScaleLMRotaryEmbedding(config)
        self.embed_token_types = nn.Embedding(config.type_vocab_size, d) if config.type_vocab_size > 0 else None
        self.embed_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.embed_norm = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.norm_placement == "post" else None
        self.layers = nn.ModuleList(
            [DeepScaleLMLayer(config, i, self.stack, has_cross_attention=has_cross) for i in range(num_layers)]
        )
        # Mix-LN ends in Pre-LN layers, so it keeps the final LayerNorm (and, like Pre-LN, has no embedding one).
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.norm_placement != "post" else None
        self.gradient_checkpointing = False
        self.post_init()

    def init_parallel_plans(self):
        super().init_parallel_plans()
        if self.layers[0].cross_attn is not None:  # the config's plan names self-attention and FFN only
            self._tp_plan |= {
                f"layers.*.cross_attn.{name}": style
                for name, style in (("q_proj", "colwise"), ("k_proj", "colwise"), ("v_proj", "colwise"), ("o_proj", "rowwise"))
            }
        if self.norm is None:  # Post-LN has no final LayerNorm
            self._pp_plan.pop("norm", None)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.embed_tokens = value

    def embed(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        position_ids: torch.LongTensor,
        token_type_ids: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """The stream entering the first layer: the sum of the word, position and token-type tables (each of std
        sigma_e), dropout, then (Post-LN) the embedding LayerNorm. The tables keep their names on the stack
        (`embed_tokens`, `embed_positions`, `embed_token_types`): checkpoints, tied weights and the parallelism
        plans address them there."""
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        if self.embed_positions is not None:
            embeds = embeds + self.embed_positions(position_ids)
        if self.embed_token_types is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            embeds = embeds + self.embed_token_types(token_type_ids)
        # Embedding dropout first, then (Post-LN) the embedding LayerNorm, as the reference code orders them: the
        # first layer sees unit variance, not 1/(1-p).
        hidden_states = self.embed_dropout(embeds)
        return self.embed_norm(hidden_states) if self.embed_norm is not None else hidden_states

    def attention_masks(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        position_ids: torch.LongTensor,
        encoder_hidden_states: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
        explicit: bool,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(self-attention mask, cross-attention mask) in the form the attention implementation wants; `explicit`
        builds them even where sdpa would skip them (attention maps are then computed eagerly)."""
        if self.stack == "decoder":
            mask = create_causal_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask, cache=cache,
                position_ids=position_ids, allow_is_causal_skip=not explicit,
            )
        else:
            mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask,
                allow_is_bidirectional_skip=not explicit,
            )
        cross_mask = None
        if encoder_hidden_states is not None:
            cross_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=encoder_attention_mask,
                encoder_hidden_states=encoder_hidden_states, allow_is_bidirectional_skip=not explicit,
            )
        return mask, cross_mask

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        r"""
        token_type_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Segment ids, read only when `config.type_vocab_size > 0`; otherwise only 0 is accepted.
        encoder_hidden_states (`torch.Tensor` of shape `(batch_size, source_length, hidden_size)`, *optional*):
            The encoder's output, read by the cross-attention of an encoder-decoder's decoder stack.
        encoder_attention_mask (`torch.Tensor` of shape `(batch_size, source_length)`, *optional*):
            Padding mask of `encoder_hidden_states` (1 keeps, 0 masks).
        """
        causal = self.stack == "decoder"
        use_cache = causal and use_cache and not self.training  # use_cache: the config's unless passed
        if not causal:
            cache = None
        elif use_cache and cache is None:
            self_cache = DynamicCache(config=self.config)
            cache = EncoderDecoderCache(self_cache, DynamicCache(config=self.config)) if self.config.is_encoder_decoder else self_cache
        self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        past_length = self_cache.get_seq_length() if self_cache is not None else 0
        check_inputs(self.config, input_ids, inputs_embeds, attention_mask, position_ids, token_type_ids, past_length,
                     fixed_size_cache=self_cache is not None and not isinstance(self_cache, DynamicCache))

        if position_ids is None:
            tokens = input_ids if input_ids is not None else inputs_embeds
            position_ids = (torch.arange(tokens.shape[1], device=tokens.device) + past_length).unsqueeze(0)  # (1, T)
        hidden_states = self.embed(input_ids, inputs_embeds, position_ids, token_type_ids)
        position_embeddings = self.rotary_emb(hidden_states, position_ids) if self.rotary_emb is not None else None

        # Attention maps under sdpa are computed eagerly, which needs the masks sdpa would otherwise skip.
        if self.config.output_attentions and kwargs.get("output_attentions") is None:
            kwargs["output_attentions"] = True
        mask, cross_mask = self.attention_masks(
            hidden_states, attention_mask, self_cache, position_ids, encoder_hidden_states, encoder_attention_mask,
            explicit=_returns_attention_maps(self.config, kwargs),
        )
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                mask,
                encoder_hidden_states,
                encoder_attention_mask=cross_mask,
                position_embeddings=position_embeddings,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states, cache=cache if use_cache else None)


class DeepScaleLMSeq2SeqDecoder(DeepScaleLMModel):
    """The decoder stack of an encoder-decoder: causal self-attention plus cross-attention to the encoder."""

    _can_record_outputs = {
        "hidden_states": OutputRecorder(DeepScaleLMLayer, num_hidden_layers_key="decoder_layers"),
        "attentions": OutputRecorder(DeepScaleLMAttention, index=1, layer_name="self_attn"),
        "cross_attentions": OutputRecorder(DeepScaleLMAttention, index=1, layer_name="cross_attn"),
    }

    def __init__(self, config: DeepScaleLMConfig):
        super().__init__(config, stack="decoder")


@auto_docstring(
    custom_intro="""
    Bart-style encoder-decoder: a bidirectional encoder stack and a causal decoder stack with cross-attention,
    sharing one word embedding.
    """
)
class DeepScaleLMSeq2SeqModel(DeepScaleLMPreTrainedModel):
    _tied_weights_keys = {"decoder.embed_tokens.weight": "encoder.embed_tokens.weight"}

    def __init__(self, config: DeepScaleLMConfig):
        if not config.is_encoder_decoder:
            raise ValueError("DeepScaleLMSeq2SeqModel needs config.is_encoder_decoder=True (and decoder_layers)")
        super().__init__(config)
        self.encoder = DeepScaleLMModel(config, stack="encoder")
        self.decoder = DeepScaleLMSeq2SeqDecoder(config)
        self.post_init()

    def init_parallel_plans(self):
        super().init_parallel_plans()
        # The config's plans describe one stack; here they arrive through the encoder and decoder, prefixed.
        self._tp_plan = {k: v for k, v in self._tp_plan.items() if k.startswith(("encoder.", "decoder."))}
        self._pp_plan = {}  # transformers' pipeline parallelism splits a single stack of layers

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.encoder.embed_tokens = value
        self.decoder.embed_tokens = value

    def get_encoder(self, modality=None):
        return self.encoder

    def get_decoder(self):
        return self.decoder

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.LongTensor | None = None,
        encoder_outputs: tuple | BaseModelOutputWithPastAndCrossAttentions | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqModelOutput:
        r"""
        decoder_position_ids (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*):
            Positions of the decoder inputs; by default 0, 1, ... after the cached tokens.
        """
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        elif not isinstance(encoder_outputs, BaseModelOutputWithPastAndCrossAttentions):
            encoder_outputs = BaseModelOutputWithPastAndCrossAttentions(
                last_hidden_state=encoder_outputs[0],
                hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
                attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
            )
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            position_ids=decoder_position_ids,
            inputs_embeds=decoder_inputs_embeds,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


# ----------------------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------------------
def _require(config: DeepScaleLMConfig, head: str, *, is_decoder: bool | None = None, is_encoder_decoder: bool = False):
    if config.is_encoder_decoder != is_encoder_decoder:
        want = "True" if is_encoder_decoder else "False"
        raise ValueError(f"{head} needs config.is_encoder_decoder={want}; this config has {config.is_encoder_decoder}")
    if is_decoder is not None and config.is_decoder != is_decoder:
        kind = "a causal decoder (is_decoder=True)" if is_decoder else "a bidirectional encoder (is_decoder=False)"
        raise ValueError(
            f"{head} needs {kind}, but this config has is_decoder={config.is_decoder}: load this checkpoint with "
            f"{'DeepScaleLMForMaskedLM' if config.is_decoder is False else 'DeepScaleLMForCausalLM'} or its "
            "classification heads instead"
        )


_LOGIT_SCALE_DOC = """
    `logit_scale` (float attribute): the logits are `lm_head(hidden_states * logit_scale)`. Under the recipe with a
    tied output embedding it is 1/sqrt(d sigma_e^2) (initial logits of variance 1); otherwise 1. With
    `width_parameterization="mup"` it is that value at `width_base` times width_base / hidden_size (muP's readout
    multiplier). Code that computes `hidden_states @ embed_tokens.weight.T` itself must multiply by it.
"""


@auto_docstring(custom_intro="A DeepScaleLM causal decoder with a (tied) language-modelling head." + _LOGIT_SCALE_DOC)
class DeepScaleLMForCausalLM(DeepScaleLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: DeepScaleLMConfig):
        _require(config, "DeepScaleLMForCausalLM", is_decoder=True)
        super().__init__(config)
        self.model = DeepScaleLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logit_scale = output_logit_scale(config)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets aligned with `input_ids` (shifted inside the loss); -100 marks positions without a loss.
            A batch without any label token has loss 0 (connected to the graph), not NaN.
        """
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, cache=cache, use_cache=use_cache, **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep) * self.logit_scale)
        loss = None
        if labels is not None:
            check_token_labels(labels, outputs.last_hidden_state.shape[:2], self.config.vocab_size, "input token")
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **_with_label_count(labels, kwargs, shift=True)
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


@auto_docstring(
    custom_intro="""
    A DeepScaleLM bidirectional encoder with the reference masked-LM head: transform (dense, activation, LayerNorm),
    then the tied output embedding plus a trainable vocabulary bias (zeros at initialisation), as in the reference
    code.
    """ + _LOGIT_SCALE_DOC
)
class DeepScaleLMForMaskedLM(DeepScaleLMPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: DeepScaleLMConfig):
        _require(config, "DeepScaleLMForMaskedLM", is_decoder=False)
        super().__init__(config)
        self.model = DeepScaleLMModel(config)
        self.transform = DeepScaleLMPredictionHeadTransform(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.logit_scale = output_logit_scale(config)
        self.post_init()

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MaskedLMOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Original token ids at the masked positions, -100 elsewhere. A batch without any label token has loss 0
            (connected to the graph), not NaN.
        """
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs,
        )
        logits = self.lm_head(self.transform(outputs.last_hidden_state) * self.logit_scale)
        loss = None
        if labels is not None:
            check_token_labels(labels, logits.shape[:2], self.config.vocab_size, "input token")
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **_with_label_count(labels, kwargs, shift=False)
            )
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int | None, decoder_start_token_id: int | None) -> torch.Tensor:
    """Decoder inputs from labels (as Bart): start token, then labels[:-1], with ignored (-100) positions padded."""
    if decoder_start_token_id is None or pad_token_id is None:
        raise ValueError(
            "training DeepScaleLMForSeq2SeqLM from labels needs config.decoder_start_token_id and config.pad_token_id "
            "(or pass decoder_input_ids yourself)"
        )
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad_token_id)


@auto_docstring(
    custom_intro="""
    A DeepScaleLM encoder-decoder with a (tied) language-modelling head on the decoder. Given `labels` and no
    decoder inputs, the decoder reads the labels shifted right (`shift_tokens_right`, as Bart).
    """ + _LOGIT_SCALE_DOC
)
class DeepScaleLMForSeq2SeqLM(DeepScaleLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {
        "lm_head.weight": "model.encoder.embed_tokens.weight",
        "model.decoder.embed_tokens.weight": "model.encoder.embed_tokens.weight",
    }
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: DeepScaleLMConfig):
        _require(config, "DeepScaleLMForSeq2SeqLM", is_encoder_decoder=True)
        super().__init__(config)
        self.model = DeepScaleLMSeq2SeqModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logit_scale = output_logit_scale(config)
        self.post_init()

    def get_encoder(self, modality=None):
        return self.model.encoder

    def get_decoder(self):
        return self.model.decoder

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.LongTensor | None = None,
        encoder_outputs: tuple | BaseModelOutputWithPastAndCrossAttentions | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqLMOutput:
        r"""
        decoder_position_ids (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*):
            Positions of the decoder inputs; by default 0, 1, ... after the cached tokens.
        labels (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*):
            Target token ids, -100 where there is no loss. Without decoder inputs the decoder reads them shifted right.
            A batch without any label token has loss 0 (connected to the graph), not NaN.
        """
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask, decoder_position_ids=decoder_position_ids,
            encoder_outputs=encoder_outputs, cache=cache, inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds, use_cache=use_cache, **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep) * self.logit_scale)
        loss = None
        if labels is not None:
            check_token_labels(labels, outputs.last_hidden_state.shape[:2], self.config.vocab_size, "decoder token")
            # Labels are already aligned with the decoder outputs (the decoder inputs were shifted): an unshifted
            # loss. transformers' name-based loss lookup would pick the causal loss and shift a second time.
            counted = _with_label_count(labels, {"num_items_in_batch": num_items_in_batch}, shift=False)
            loss = ForMaskedLMLoss(logits, labels, self.config.vocab_size, **counted)
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
        )

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)


def _pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, causal: bool,
          input_ids: torch.Tensor | None = None, pad_token_id: int | None = None) -> torch.Tensor:
    """Causal models summarise a sequence in its last real token, bidirectional ones in the first. Without an
    attention mask the real tokens are those that are not `pad_token_id`, as in transformers' native heads."""
    if not causal:
        return hidden_states[:, 0]
    if attention_mask is None and input_ids is not None and pad_token_id is not None:
        attention_mask = input_ids != pad_token_id  # (B, T)
    if attention_mask is None:
        return hidden_states[:, -1]
    last = attention_mask.shape[-1] - 1 - attention_mask.flip(-1).long().argmax(-1)  # (B,)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]


@auto_docstring(
    custom_intro="""
    A DeepScaleLM stack with a sequence classification (or regression) head on the pooled hidden state: the last
    real token of a causal decoder, the first token of an encoder.
    """
)
class DeepScaleLMForSequenceClassification(DeepScaleLMPreTrainedModel):
    def __init__(self, config: DeepScaleLMConfig):
        _require(config, "DeepScaleLMForSequenceClassification")
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = DeepScaleLMModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=False, **kwargs,
        )
        pooled = _pool(outputs.last_hidden_state, attention_mask, self.model.stack == "decoder", input_ids,
                       self.config.pad_token_id)
        logits = self.score(self.dropout(pooled))
        loss = None
        if labels is not None:
            check_sequence_labels(labels, logits.shape[0], self.num_labels)
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


@auto_docstring(custom_intro="A DeepScaleLM stack with a token classification head (one label per token).")
class DeepScaleLMForTokenClassification(DeepScaleLMPreTrainedModel):
    def __init__(self, config: DeepScaleLMConfig):
        _require(config, "DeepScaleLMForTokenClassification")
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = DeepScaleLMModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> TokenClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            A class id in `[0, num_labels)` per token, -100 where there is no loss. A batch without any label token
            has loss 0 (connected to the graph), not NaN.
        """
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=False, **kwargs,
        )
        logits = self.score(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            check_token_labels(labels, logits.shape[:2], self.num_labels, "input token")
            loss = self.loss_function(logits, labels, self.config, **_with_label_count(labels, kwargs, shift=False))
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


@auto_docstring(custom_intro="A DeepScaleLM stack with an extractive question-answering head (span start/end logits).")
class DeepScaleLMForQuestionAnswering(DeepScaleLMPreTrainedModel):
    def __init__(self, config: DeepScaleLMConfig):
        _require(config, "DeepScaleLMForQuestionAnswering")
        super().__init__(config)
        self.model = DeepScaleLMModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> QuestionAnsweringModelOutput:
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=False, **kwargs,
        )
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).split(1, dim=-1)  # (B, T, 1) each
        start_logits, end_logits = start_logits.squeeze(-1).contiguous(), end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            check_span_positions(start_positions, end_positions, start_logits.shape[0])
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions, **kwargs)
        return QuestionAnsweringModelOutput(
            loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


AUTO_CLASSES = {
    "AutoModel": DeepScaleLMModel,
    "AutoModelForCausalLM": DeepScaleLMForCausalLM,
    "AutoModelForMaskedLM": DeepScaleLMForMaskedLM,
    "AutoModelForSeq2SeqLM": DeepScaleLMForSeq2SeqLM,
    "AutoModelForSequenceClassification": DeepScaleLMForSequenceClassification,
    "AutoModelForTokenClassification": DeepScaleLMForTokenClassification,
    "AutoModelForQuestionAnswering": DeepScaleLMForQuestionAnswering,
}
AUTO_MAP = {"AutoConfig": "configuration_deepscalelm.DeepScaleLMConfig"} | {
    auto: f"modeling_deepscalelm.{cls.__name__}" for auto, cls in AUTO_CLASSES.items()
}
# Saving writes these files beside the weights (trust_remote_code); the in-process Auto registration is in
# dslm_hf/__init__.py.
DeepScaleLMConfig.register_for_auto_class()
for _auto_class, _model_class in AUTO_CLASSES.items():
    _model_class.register_for_auto_class(_auto_class)

# PEFT's default LoRA targets for model_type "deepscalelm" (PEFT has none for a model type it does not know): every
# linear layer of every residual branch. Heads are not targets: PEFT's task types train fresh heads in full.
DEFAULT_LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
_PEFT_TABLE_MODULE = "peft.utils.constants"


def _register_lora_targets(constants) -> None:
    constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(
        DeepScaleLMConfig.model_type, list(DEFAULT_LORA_TARGET_MODULES))


class _RegisterLoraTargetsOnPeftImport(importlib.abc.MetaPathFinder):
    """Registers the targets in PEFT's table when PEFT loads it, so that `get_peft_model(model, LoraConfig(...))`
    works after `import dslm_hf` or with remote code alike, without importing PEFT (a training library) here."""

    registers_deepscalelm_lora_targets = True

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _PEFT_TABLE_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        execute = spec.loader.exec_module

        def execute_and_register(module):
            execute(module)
            _register_lora_targets(module)

        spec.loader.exec_module = execute_and_register
        return spec


if _PEFT_TABLE_MODULE in sys.modules:
    _register_lora_targets(sys.modules[_PEFT_TABLE_MODULE])
elif not any(getattr(finder, "registers_deepscalelm_lora_targets", False) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterLoraTargetsOnPeftImport())

__all__ = [
    "DeepScaleLMPreTrainedModel",
    "DeepScaleLMModel",
    "DeepScaleLMSeq2SeqModel",
    "DeepScaleLMLayer",
    "DeepScaleLMForCausalLM",
    "DeepScaleLMForMaskedLM",
    "DeepScaleLMForSeq2SeqLM",
    "DeepScaleLMForSequenceClassification",
    "DeepScaleLMForTokenClassification",
    "DeepScaleLMForQuestionAnswering",
]
