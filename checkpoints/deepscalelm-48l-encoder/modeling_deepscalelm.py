"""DeepScaleLM: transformers that keep unit signal and gradient variance at any depth.

Kedia et al., "Transformers Get Stable: An End-to-End Signal Propagation Theory for Language Models", ICML 2024.
The file reads like the paper: embeddings, attention, feed-forward, the scaled residual, the layer, the stacks,
the heads. Every initialisation constant comes from `recipe_deepscalelm.py` (pure math shared with the theory).

    out = lambda * skip + beta * Dropout(F(h)),   lambda^2 + beta^2 = 1,   beta^2 = k / N      (Pre-LN: h = LN(skip))
    x_next = LN(lambda * x + beta * Dropout(F(x)))                                               (Post-LN)
"""

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
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import is_torchdynamo_compiling

from .configuration_deepscalelm import DeepScaleLMConfig
from .recipe_deepscalelm import embedding_table_std, linear_init_std, output_logit_scale, stack_init_plan


# ----------------------------------------------------------------------------------------------------------------
# Positions: learned absolute (the paper) or rotary
# ----------------------------------------------------------------------------------------------------------------
class DeepScaleLMRotaryEmbedding(nn.Module):
    def __init__(self, config: DeepScaleLMConfig):
        super().__init__()
        head_dim = config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)

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
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Tq, Tk)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (B, Tq, H, hd)
    return output, probs


class DeepScaleLMAttention(nn.Module):
    """Multi-head attention (self or cross) through transformers' attention interface (sdpa, eager)."""

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

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_value_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
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

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
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
    def __init__(self, config: DeepScaleLMConfig, layer_idx: int, stack: str, has_cross_attention: bool = False):
        super().__init__()
        plan = stack_init_plan(config, stack)
        self.residual_skip, self.residual_branch = plan.residual_skip, plan.residual_branch
        self.pre_norm = config.norm_placement == "pre"
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

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        branch_in = self.self_attn_norm(hidden_states) if self.pre_norm else hidden_states
        attn_out, self_probs = self.self_attn(
            branch_in, attention_mask=attention_mask, position_embeddings=position_embeddings, cache=cache, **kwargs
        )
        hidden_states = self.residual(hidden_states, attn_out, self.self_attn_norm)

        cross_probs = None
        if self.cross_attn is not None:
            branch_in = self.cross_attn_norm(hidden_states) if self.pre_norm else hidden_states
            attn_out, cross_probs = self.cross_attn(
                branch_in, attention_mask=encoder_attention_mask, key_value_states=encoder_hidden_states, cache=cache,
                **kwargs,
            )
            hidden_states = self.residual(hidden_states, attn_out, self.cross_attn_norm)

        branch_in = self.mlp_norm(hidden_states) if self.pre_norm else hidden_states
        hidden_states = self.residual(hidden_states, self.mlp(branch_in), self.mlp_norm)
        return hidden_states, self_probs, cross_probs


# ----------------------------------------------------------------------------------------------------------------
# Pretrained base: initialisation through transformers.initialization (never touches loaded tensors)
# ----------------------------------------------------------------------------------------------------------------
class DeepScaleLMPreTrainedModel(PreTrainedModel):
    config: DeepScaleLMConfig
    config_class = DeepScaleLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepScaleLMLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    def _init_weights(self, module: nn.Module):
        config = self.config
        if isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=embedding_table_std(config, tuple(module.weight.shape)))
        elif isinstance(module, nn.Linear):
            stack, layer_idx, cross = getattr(module, "_dslm_owner", (None, None, False))
            fan_out, fan_in = module.weight.shape
            std = linear_init_std(config, module._dslm_name, stack, layer_idx, cross, fan_in, fan_out)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, DeepScaleLMRotaryEmbedding):
            head_dim = config.hidden_size // config.num_attention_heads
            inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            init.copy_(module.inv_freq, inv_freq)

    def post_init(self):
        # Name each Linear for the init table (its role and, inside a layer, its stack/index/cross flag).
        for module in self.modules():
            if isinstance(module, DeepScaleLMAttention):
                for role in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    linear = getattr(module, role)
                    linear._dslm_name = role
                    linear._dslm_owner = (module.stack, module.layer_idx, module.is_cross_attention)
            elif isinstance(module, DeepScaleLMMLP):
                for role in ("fc1", "fc2"):
                    linear = getattr(module, role)
                    linear._dslm_name = role
                    linear._dslm_owner = (module.stack, None, False)
        super().post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Map every Auto class to its head so any head of this checkpoint loads with trust_remote_code.
        self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)


def _check_inputs(config: DeepScaleLMConfig, input_ids, attention_mask, position_ids, past_length: int, seq_length: int, batch: int):
    """Bad input fails here with a message that says what to do, not deep inside an embedding or kernel."""
    if is_torchdynamo_compiling():
        return
    if input_ids is not None and input_ids.numel() > 0:
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= config.vocab_size:
            raise ValueError(
                f"input_ids hold token id {low if low < 0 else high}, outside the vocabulary [0, {config.vocab_size}): "
                "use the tokenizer this model was trained with, or resize the embeddings (model.resize_token_embeddings)"
            )
    if attention_mask is not None and attention_mask.dim() == 2:
        expected = (batch, past_length + seq_length)
        if tuple(attention_mask.shape) != expected:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the inputs need {expected} "
                "(batch, cached + new tokens): pass the tokenizer's attention_mask for the same input_ids"
            )
    elif attention_mask is not None and attention_mask.dim() != 4:
        raise ValueError(
            f"attention_mask must be 2-D (batch, sequence) or a prepared 4-D mask, got shape {tuple(attention_mask.shape)}"
        )
    if config.position_embedding_type == "absolute":
        longest = int(position_ids.max()) + 1 if position_ids is not None else past_length + seq_length
        if longest > config.max_position_embeddings:
            raise ValueError(
                f"sequence reaches position {longest} but the learned position table has max_position_embeddings="
                f"{config.max_position_embeddings} rows: truncate inputs (tokenizer truncation=True, "
                f"max_length={config.max_position_embeddings}) or generate fewer tokens"
            )


# ----------------------------------------------------------------------------------------------------------------
# The stacks
# ----------------------------------------------------------------------------------------------------------------
class DeepScaleLMModel(DeepScaleLMPreTrainedModel):
    """A stack of DeepScaleLM layers with its embeddings.

    `stack="decoder"` (causal; with cross-attention inside an encoder-decoder) or `stack="encoder"` (bidirectional).
    By default the config decides: `is_decoder=True` gives a decoder, `False` an encoder.
    """

    def __init__(self, config: DeepScaleLMConfig, stack: str | None = None, embed_tokens: nn.Embedding | None = None):
        if stack is None and config.is_encoder_decoder:
            raise ValueError("an encoder-decoder config (is_encoder_decoder=True) builds DeepScaleLMSeq2SeqModel or "
                             "DeepScaleLMForSeq2SeqLM, not a single DeepScaleLMModel stack")
        super().__init__(config)
        self.stack = stack or ("decoder" if config.is_decoder else "encoder")
        has_cross = config.is_encoder_decoder and self.stack == "decoder"
        num_layers = config.decoder_layers if has_cross else config.num_hidden_layers
        d = config.hidden_size
        self.embed_tokens = embed_tokens if embed_tokens is not None else nn.Embedding(config.vocab_size, d)
        absolute = config.position_embedding_type == "absolute"
        self.embed_positions = nn.Embedding(config.max_position_embeddings, d) if absolute else None
        self.rotary_emb = None if absolute else DeepScaleLMRotaryEmbedding(config)
        self.embed_token_types = nn.Embedding(config.type_vocab_size, d) if config.type_vocab_size > 0 else None
        self.embed_norm = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.norm_placement == "post" else None
        self.embed_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList(
            [DeepScaleLMLayer(config, i, self.stack, has_cross_attention=has_cross) for i in range(num_layers)]
        )
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.norm_placement == "pre" else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.embed_tokens = value

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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        causal = self.stack == "decoder"
        use_cache = causal and (use_cache if use_cache is not None else self.config.use_cache) and not self.training
        if use_cache and cache is None:
            self_cache = DynamicCache(config=self.config)
            cache = EncoderDecoderCache(self_cache, DynamicCache(config=self.config)) if self.config.is_encoder_decoder else self_cache
        if not causal:
            cache = None
        self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache

        batch, seq_length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        past_length = self_cache.get_seq_length() if self_cache is not None else 0
        _check_inputs(self.config, input_ids, attention_mask, position_ids, past_length, seq_length, batch)
        device = (input_ids if input_ids is not None else inputs_embeds).device
        if position_ids is None:
            position_ids = (torch.arange(seq_length, device=device) + past_length).unsqueeze(0)  # (1, T)

        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if self.embed_positions is not None:
            embeds = embeds + self.embed_positions(position_ids)
        if self.embed_token_types is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros((batch, seq_length), dtype=torch.long, device=device)
            embeds = embeds + self.embed_token_types(token_type_ids)
        if self.embed_norm is not None:
            embeds = self.embed_norm(embeds)
        hidden_states = self.embed_dropout(embeds)
        position_embeddings = self.rotary_emb(hidden_states, position_ids) if self.rotary_emb is not None else None

        if causal:
            mask = create_causal_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask, cache=self_cache,
                position_ids=position_ids,
            )
        else:
            mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask)
        cross_mask = None
        if encoder_hidden_states is not None:
            cross_mask = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden_states, attention_mask=encoder_attention_mask,
                encoder_hidden_states=encoder_hidden_states,
            )

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        all_cross_attentions = () if output_attentions and encoder_hidden_states is not None else None
        for layer in self.layers:
            hidden_states, self_probs, cross_probs = layer(
                hidden_states,
                mask,
                encoder_hidden_states,
                encoder_attention_mask=cross_mask,
                position_embeddings=position_embeddings,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (self_probs,)
                if all_cross_attentions is not None:
                    all_cross_attentions += (cross_probs,)

        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
            if output_hidden_states:
                all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            cross_attentions=all_cross_attentions,
        )


class DeepScaleLMSeq2SeqModel(DeepScaleLMPreTrainedModel):
    """Bart-style encoder-decoder: a bidirectional encoder stack and a causal decoder stack with cross-attention."""

    _tied_weights_keys = {"decoder.embed_tokens.weight": "encoder.embed_tokens.weight"}

    def __init__(self, config: DeepScaleLMConfig):
        if not config.is_encoder_decoder:
            raise ValueError("DeepScaleLMSeq2SeqModel needs config.is_encoder_decoder=True (and decoder_layers)")
        super().__init__(config)
        self.encoder = DeepScaleLMModel(config, stack="encoder")
        self.decoder = DeepScaleLMModel(config, stack="decoder")
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding):
        self.encoder.embed_tokens = value
        self.decoder.embed_tokens = value

    def get_encoder(self, modality=None):
        return self.encoder

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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> Seq2SeqModelOutput:
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states, **kwargs,
            )
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
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
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


class DeepScaleLMForCausalLM(DeepScaleLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepScaleLMConfig):
        _require(config, "DeepScaleLMForCausalLM", is_decoder=True)
        super().__init__(config)
        self.model = DeepScaleLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head._dslm_name = "lm_head"
        self.logit_scale = output_logit_scale(config)
        self.post_init()

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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, cache=cache, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :] * self.logit_scale)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class DeepScaleLMMaskedLMHead(nn.Module):
    """dense d->d (N(0, 1/d)), activation, LayerNorm: the recipe's MLM head before the (tied) output projection."""

    def __init__(self, config: DeepScaleLMConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense._dslm_name = "head_dense"
        self.act = ACT2FN[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden_states)))


class DeepScaleLMForMaskedLM(DeepScaleLMPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepScaleLMConfig):
        _require(config, "DeepScaleLMForMaskedLM", is_decoder=False)
        super().__init__(config)
        self.model = DeepScaleLMModel(config)
        self.head = DeepScaleLMMaskedLMHead(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head._dslm_name = "lm_head"
        self.logit_scale = output_logit_scale(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, **kwargs,
        )
        logits = self.lm_head(self.head(outputs.last_hidden_state) * self.logit_scale)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def shift_tokens_right(labels: torch.Tensor, pad_token_id: int | None, decoder_start_token_id: int | None) -> torch.Tensor:
    """Decoder inputs from labels: start token, then labels[:-1], with ignored (-100) positions padded."""
    if decoder_start_token_id is None or pad_token_id is None:
        raise ValueError(
            "training DeepScaleLMForSeq2SeqLM from labels needs config.decoder_start_token_id and config.pad_token_id "
            "(or pass decoder_input_ids yourself)"
        )
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


class DeepScaleLMForSeq2SeqLM(DeepScaleLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {
        "lm_head.weight": "model.encoder.embed_tokens.weight",
        "model.decoder.embed_tokens.weight": "model.encoder.embed_tokens.weight",
    }

    def __init__(self, config: DeepScaleLMConfig):
        _require(config, "DeepScaleLMForSeq2SeqLM", is_encoder_decoder=True)
        super().__init__(config)
        self.model = DeepScaleLMSeq2SeqModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head._dslm_name = "lm_head"
        self.logit_scale = output_logit_scale(config)
        self.post_init()

    def get_encoder(self, modality=None):
        return self.model.encoder

    def get_decoder(self):
        return self.model.decoder

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
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask, decoder_position_ids=decoder_position_ids,
            encoder_outputs=encoder_outputs, cache=cache, inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state * self.logit_scale)
        loss = None
        if labels is not None:
            # Labels are already aligned with the decoder outputs (the decoder inputs were shifted): an unshifted
            # loss. transformers' name-based loss lookup would pick the causal loss and shift a second time.
            loss = ForMaskedLMLoss(logits, labels, self.config.vocab_size, num_items_in_batch=num_items_in_batch)
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


def _pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """Causal models summarise a sequence in its last real token, bidirectional ones in the first."""
    if not causal:
        return hidden_states[:, 0]
    if attention_mask is None:
        return hidden_states[:, -1]
    last = attention_mask.shape[-1] - 1 - attention_mask.flip(-1).long().argmax(-1)  # (B,)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]


class DeepScaleLMForSequenceClassification(DeepScaleLMPreTrainedModel):
    def __init__(self, config: DeepScaleLMConfig):
        _require(config, "DeepScaleLMForSequenceClassification")
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = DeepScaleLMModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.score._dslm_name = "score"
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=False,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, **kwargs,
        )
        pooled = _pool(outputs.last_hidden_state, attention_mask, self.model.stack == "decoder")
        logits = self.score(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class DeepScaleLMForTokenClassification(DeepScaleLMPreTrainedModel):
    def __init__(self, config: DeepScaleLMConfig):
        _require(config, "DeepScaleLMForTokenClassification")
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = DeepScaleLMModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.score._dslm_name = "score"
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> TokenClassifierOutput:
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=False,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, **kwargs,
        )
        logits = self.score(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, config=self.config)
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


class DeepScaleLMForQuestionAnswering(DeepScaleLMPreTrainedModel):
    def __init__(self, config: DeepScaleLMConfig):
        _require(config, "DeepScaleLMForQuestionAnswering")
        super().__init__(config)
        self.model = DeepScaleLMModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.qa_outputs._dslm_name = "score"
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> QuestionAnsweringModelOutput:
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=False,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, **kwargs,
        )
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).split(1, dim=-1)  # (B, T, 1) each
        start_logits, end_logits = start_logits.squeeze(-1).contiguous(), end_logits.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
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
DeepScaleLMConfig.register_for_auto_class()
for _auto_class, _model_class in AUTO_CLASSES.items():
    _model_class.register_for_auto_class(_auto_class)

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
