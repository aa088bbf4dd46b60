"""Export a DeepScaleLM checkpoint to a native transformers architecture: no remote code, same logits.

    dslm-export checkpoints/deepscalelm-48l-decoder --output-dir native/decoder
    dslm-export org/deepscalelm-48 --revision main --output-dir native/decoder      # a Hub repository id

At inference a DeepScaleLM model is an ordinary transformer whose constants fold into its weights:

- Post-LN, x_next = LN(lambda x + beta F(x)): every LayerNorm output the next residual reads is stored multiplied
  by that residual's lambda (its weight and bias), the Linears reading it (q, k, v, fc1; a cross-attention's q)
  divide their weights by lambda, and the branch's output projection (weight and bias) is multiplied by beta. The
  sum the LayerNorm sees is then exactly lambda x + beta F(x): BERT's / BART's layer, with the LayerNorm epsilon
  unchanged (rewriting it as LN(x + (beta/lambda) F(x)) would need eps / lambda^2 in the layers but eps in the
  embedding and head LayerNorms; BERT has one `layer_norm_eps` and BART hard-codes 1e-5).
- Pre-LN, x_{l+1} = lambda x_l + beta F(LN(x_l)): the native stream is y_l = x_l / prod(lambda up to l), so every
  block is GPT-2's y + F(LN(y)) with the output projection scaled by beta / prod(lambda up to l+1). LayerNorm is
  scale-invariant only up to eps: LN_eps(x / c) = LN_{eps c^2}(x), and one native eps cannot match every depth's c.
  Where the target has a configurable eps and no other LayerNorm (GPT-2, GPT-NeoX) it is set to the minimax value
  2 eps / (1 + c_min^2); the remaining error, at most (1 - c_min^2) eps / (2 var(x)) relative per LayerNorm, is
  measured and written in the card (about 1e-6 of the logits' scale for the shipped checkpoints).
- The output logit scale (DeepScaleLM multiplies the last hidden state by it before the tied embedding) folds into
  the weight and bias of the LayerNorm that produces that hidden state; the embeddings stay tied.

Supported (architecture, LayerNorm placement, positions) -> native class:

    causal LM,      Pre-LN,  learned  -> GPT2LMHeadModel
    causal LM,      Pre-LN,  rotary   -> GPTNeoXForCausalLM (sequential residual, full-width rotary)
    masked LM,      Pre-LN,  learned  -> MegatronBertForMaskedLM
    masked LM,      Post-LN, learned  -> BertForMaskedLM
    seq2seq LM,     Pre-LN,  learned  -> BlenderbotForConditionalGeneration
    seq2seq LM,     Post-LN, learned  -> BartForConditionalGeneration

Everything else is refused with the reason (`ExportRefusal`).
"""

import argparse
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import ModelCardData, metadata_load, snapshot_download
from torch import nn
from transformers import (
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    BlenderbotConfig,
    BlenderbotForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    MegatronBertConfig,
    MegatronBertForMaskedLM,
)

from .checkpointing import (check_model_folder, check_no_foreign_code, give_normal_permissions, loading,
                            read_json_object, save_tokenizer)
from .cli import UserError, check_output_dir, run_command, usage_errors_as_user_errors
from .configuration_deepscalelm import DeepScaleLMConfig
from .heads import HEADS, architecture_class
from .model_size import check_config_matches_stored_size
from .modeling_deepscalelm import (
    DeepScaleLMForCausalLM,
    DeepScaleLMForMaskedLM,
    DeepScaleLMForSeq2SeqLM,
    DeepScaleLMModel,
)

# Bart and Blenderbot build every LayerNorm with torch's default epsilon.
HARD_CODED_EPS = 1e-5
# Exported logits further than this from DeepScaleLM's (max |difference| / max |logit|) are not written.
EXPORT_TOLERANCE = 1e-4

SUPPORTED = (
    ("DeepScaleLMForCausalLM", "pre", "absolute", "GPT2LMHeadModel"),
    ("DeepScaleLMForCausalLM", "pre", "rotary", "GPTNeoXForCausalLM"),
    ("DeepScaleLMForMaskedLM", "pre", "absolute", "MegatronBertForMaskedLM"),
    ("DeepScaleLMForMaskedLM", "post", "absolute", "BertForMaskedLM"),
    ("DeepScaleLMForSeq2SeqLM", "pre", "absolute", "BlenderbotForConditionalGeneration"),
    ("DeepScaleLMForSeq2SeqLM", "post", "absolute", "BartForConditionalGeneration"),
)
SUPPORTED_TEXT = "; ".join(f"{arch} {norm}-LN {pos} -> {target}" for arch, norm, pos, target in SUPPORTED)


class ExportRefusal(UserError):
    """This checkpoint has no exactly equivalent native architecture; the message says why."""


def refuse(reason: str):
    raise ExportRefusal(f"cannot export exactly: {reason}. Supported: {SUPPORTED_TEXT}")


def native_target(config: DeepScaleLMConfig, architecture: str | None) -> str:
    """Name of the native class a DeepScaleLM `architecture` (class name) with this config exports to, or
    ExportRefusal saying why not."""
    heads = {arch for arch, *_ in SUPPORTED}
    if architecture not in heads:
        refuse(f"{architecture or 'a checkpoint without config.architectures'} is not a language-model head "
               f"({', '.join(sorted(heads))}); task heads have no native twin with the same head")
    norm, positions = config.norm_placement, config.position_embedding_type
    if norm == "mix" or config.layernorm_scaling:
        refuse("Mix-LN (norm_placement='mix') and LayerNorm Scaling (layernorm_scaling=True) have no native twin: "
               "no transformers architecture mixes LayerNorm placements or scales a LayerNorm by its layer's depth")
    if architecture == "DeepScaleLMForCausalLM" and norm == "post":
        refuse("a Post-LN causal LM has no native twin: the only Post-LN causal LMs (BertLMHeadModel and kin) put a "
               "dense -> activation -> LayerNorm transform before the output embedding, which DeepScaleLM's head lacks")
    if positions == "rotary" and architecture != "DeepScaleLMForCausalLM":
        refuse(f"rotary positions with {architecture}: BERT, Megatron-BERT, Bart and Blenderbot use learned positions")
    if config.type_vocab_size > 0 and architecture != "DeepScaleLMForMaskedLM":
        refuse(f"token types (type_vocab_size={config.type_vocab_size}) in a {architecture}: GPT-2 adds token types "
               "through its word table, GPT-NeoX, Bart and Blenderbot have none")
    if architecture == "DeepScaleLMForSeq2SeqLM" and config.layer_norm_eps != HARD_CODED_EPS:
        refuse(f"layer_norm_eps={config.layer_norm_eps} in an encoder-decoder: Bart and Blenderbot hard-code "
               f"LayerNorm eps {HARD_CODED_EPS}")
    return next(target for arch, n, p, target in SUPPORTED if (arch, n, p) == (architecture, norm, positions))


# ----------------------------------------------------------------------------------------------------------------
# Folding: a float64 copy of every parameter, rescaled so that the native block computes the same function
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Branch:
    """One residual branch of a layer: the Linears reading the stream, the output projection, its LayerNorm
    (before the branch in Pre-LN, after the sum in Post-LN) and the residual's lambda and beta."""

    reads: tuple[nn.Linear, ...]
    output: nn.Linear
    norm: nn.LayerNorm
    skip: float
    gain: float


def branches(stack: DeepScaleLMModel) -> list[Branch]:
    """The residual branches of `stack` in the order the stream passes them."""
    out = []
    for layer in stack.layers:
        parts = [((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj), layer.self_attn.o_proj,
                  layer.self_attn_norm)]
        if layer.cross_attn is not None:  # keys and values read the encoder's output, not this stream
            parts.append(((layer.cross_attn.q_proj,), layer.cross_attn.o_proj, layer.cross_attn_norm))
        parts.append(((layer.mlp.fc1,), layer.mlp.fc2, layer.mlp_norm))
        out += [Branch(reads, output, norm, layer.residual_skip, layer.residual_branch) for reads, output, norm in parts]
    return out


class Folded:
    """Float64 copies of a model's parameters, addressed by module, to be rescaled and then exported as float32."""

    def __init__(self, model: nn.Module):
        self.tensors = {
            module: {name: p.detach().to(torch.float64).clone() for name, p in module.named_parameters(recurse=False)}
            for module in model.modules()
        }

    def scale(self, module: nn.Module, factor: float, names=("weight", "bias")):
        for name in names:
            if self.tensors[module].get(name) is not None:
                self.tensors[module][name] *= factor

    def get(self, module: nn.Module, name: str = "weight") -> torch.Tensor:
        return self.tensors[module][name].to(torch.float32)


def stack_output_norm(stack: DeepScaleLMModel) -> nn.LayerNorm:
    """The LayerNorm whose output is the stack's output: the final norm (Pre-LN) or the last layer's (Post-LN)."""
    return stack.norm if stack.norm is not None else branches(stack)[-1].norm


def fold_stack(folded: Folded, stack: DeepScaleLMModel) -> float:
    """Fold lambda and beta of every branch of `stack` into `folded`; return the smallest stream scale c (Pre-LN:
    prod(lambda), the native stream being x / c; 1 for Post-LN, whose LayerNorms see the exact sums)."""
    if stack.norm is not None:  # Pre-LN
        scale = 1.0
        for branch in branches(stack):
            scale *= branch.skip
            folded.scale(branch.output, branch.gain / scale)
        return scale
    producer = stack.embed_norm  # the LayerNorm whose output the next residual reads as its skip
    for branch in branches(stack):
        folded.scale(producer, branch.skip)
        for linear in branch.reads:
            folded.scale(linear, 1.0 / branch.skip, names=("weight",))
        folded.scale(branch.output, branch.gain)
        producer = branch.norm
    return 1.0


def masked_lm_parts(model: DeepScaleLMForMaskedLM) -> tuple[nn.Module, torch.Tensor | None]:
    """The MLM transform (the child with `dense` and `norm`: dense -> act -> LN) and the vocabulary bias if any."""
    head = next(m for name, m in model.named_children() if hasattr(m, "dense") and hasattr(m, "norm"))
    vocab = model.config.vocab_size
    bias = next((p for p in (getattr(model.lm_head, "bias", None), getattr(head, "bias", None), getattr(model, "bias", None))
                 if isinstance(p, torch.Tensor) and tuple(p.shape) == (vocab,)), None)
    return head, bias


# ----------------------------------------------------------------------------------------------------------------
# Native state dicts and configs, one builder per target family
# ----------------------------------------------------------------------------------------------------------------
def _norm(folded: Folded, prefix: str, module: nn.LayerNorm) -> dict:
    return {f"{prefix}.weight": folded.get(module, "weight"), f"{prefix}.bias": folded.get(module, "bias")}


def _linear(folded: Folded, prefix: str, module: nn.Linear, conv1d: bool = False) -> dict:
    """A Linear's weight and bias (GPT-2's Conv1D stores the weight transposed, (in, out))."""
    weight = folded.get(module)
    return {f"{prefix}.weight": weight.t().contiguous() if conv1d else weight, f"{prefix}.bias": folded.get(module, "bias")}


def _common_config(config: DeepScaleLMConfig) -> dict:
    """Vocabulary, tying and DeepScaleLM's special token ids (None where it has none, not GPT-2's 50256)."""
    tokens = {name: getattr(config, name) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    if config.decoder_start_token_id is not None:  # Bart's field takes no None
        tokens["decoder_start_token_id"] = config.decoder_start_token_id
    return dict(vocab_size=config.vocab_size, tie_word_embeddings=config.tie_word_embeddings, **tokens)


def gpt2(model: DeepScaleLMForCausalLM, folded: Folded, eps: float):
    config, stack = model.config, model.model
    native = GPT2Config(
        n_embd=config.hidden_size, n_layer=config.num_hidden_layers, n_head=config.num_attention_heads,
        n_inner=config.intermediate_size, n_positions=config.max_position_embeddings,
        activation_function=config.hidden_act,  # ACT2FN "gelu" is the exact erf GELU, as in DeepScaleLM
        resid_pdrop=config.hidden_dropout_prob, embd_pdrop=config.hidden_dropout_prob,
        attn_pdrop=config.attention_probs_dropout_prob, layer_norm_epsilon=eps, **_common_config(config),
    )
    state = {"transformer.wte.weight": folded.get(stack.embed_tokens),
             "transformer.wpe.weight": folded.get(stack.embed_positions)}
    for i, layer in enumerate(stack.layers):
        p, attn = f"transformer.h.{i}", layer.self_attn
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        state[f"{p}.attn.c_attn.weight"] = torch.cat([folded.get(m) for m in qkv]).t().contiguous()  # (d, 3d)
        state[f"{p}.attn.c_attn.bias"] = torch.cat([folded.get(m, "bias") for m in qkv])
        state |= _linear(folded, f"{p}.attn.c_proj", attn.o_proj, conv1d=True)
        state |= _norm(folded, f"{p}.ln_1", layer.self_attn_norm) | _norm(folded, f"{p}.ln_2", layer.mlp_norm)
        state |= _linear(folded, f"{p}.mlp.c_fc", layer.mlp.fc1, conv1d=True)
        state |= _linear(folded, f"{p}.mlp.c_proj", layer.mlp.fc2, conv1d=True)
    state |= _norm(folded, "transformer.ln_f", stack.norm)
    state["lm_head.weight"] = folded.get(model.lm_head)
    return GPT2LMHeadModel, native, state


def gpt_neox(model: DeepScaleLMForCausalLM, folded: Folded, eps: float):
    config, stack = model.config, model.model
    native = GPTNeoXConfig(
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta, "partial_rotary_factor": 1.0},
        use_parallel_residual=False, attention_bias=True, layer_norm_eps=eps,
        hidden_dropout=config.hidden_dropout_prob, attention_dropout=config.attention_probs_dropout_prob,
        **_common_config(config),
    )
    heads, head_dim, d = config.num_attention_heads, config.hidden_size // config.num_attention_heads, config.hidden_size
    state = {"gpt_neox.embed_in.weight": folded.get(stack.embed_tokens)}
    for i, layer in enumerate(stack.layers):
        p, attn = f"gpt_neox.layers.{i}", layer.self_attn
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        # GPT-NeoX interleaves per head: rows [q_h; k_h; v_h] for each head h
        state[f"{p}.attention.query_key_value.weight"] = torch.stack(
            [folded.get(m).view(heads, head_dim, d) for m in qkv], dim=1).reshape(3 * d, d)
        state[f"{p}.attention.query_key_value.bias"] = torch.stack(
            [folded.get(m, "bias").view(heads, head_dim) for m in qkv], dim=1).reshape(3 * d)
        state |= _linear(folded, f"{p}.attention.dense", attn.o_proj)
        state |= _norm(folded, f"{p}.input_layernorm", layer.self_attn_norm)
        state |= _norm(folded, f"{p}.post_attention_layernorm", layer.mlp_norm)
        state |= _linear(folded, f"{p}.mlp.dense_h_to_4h", layer.mlp.fc1)
        state |= _linear(folded, f"{p}.mlp.dense_4h_to_h", layer.mlp.fc2)
    state |= _norm(folded, "gpt_neox.final_layer_norm", stack.norm)
    state["lm_head.weight"] = folded.get(model.lm_head)
    return GPTNeoXForCausalLM, native, state


def bert(model: DeepScaleLMForMaskedLM, folded: Folded, eps: float):
    """BertForMaskedLM (Post-LN) or MegatronBertForMaskedLM (Pre-LN: no embedding LayerNorm, LN before each branch,
    a final LayerNorm); both add a token-type table (a zero row when DeepScaleLM has none) and the same MLM head."""
    config, stack = model.config, model.model
    pre = config.norm_placement == "pre"
    cls, native_config = (MegatronBertForMaskedLM, MegatronBertConfig) if pre else (BertForMaskedLM, BertConfig)
    native = native_config(
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=max(config.type_vocab_size, 1), layer_norm_eps=eps,
        hidden_dropout_prob=config.hidden_dropout_prob, attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        **_common_config(config),
    )
    types = (folded.get(stack.embed_token_types) if stack.embed_token_types is not None
             else torch.zeros(1, config.hidden_size))
    state = {"bert.embeddings.word_embeddings.weight": folded.get(stack.embed_tokens),
             "bert.embeddings.position_embeddings.weight": folded.get(stack.embed_positions),
             "bert.embeddings.token_type_embeddings.weight": types}
    if not pre:
        state |= _norm(folded, "bert.embeddings.LayerNorm", stack.embed_norm)
    for i, layer in enumerate(stack.layers):
        p, attn = f"bert.encoder.layer.{i}", layer.self_attn
        for name, module in (("query", attn.q_proj), ("key", attn.k_proj), ("value", attn.v_proj)):
            state |= _linear(folded, f"{p}.attention.self.{name}", module)
        state |= _linear(folded, f"{p}.attention.output.dense", attn.o_proj)
        state |= _linear(folded, f"{p}.intermediate.dense", layer.mlp.fc1)
        state |= _linear(folded, f"{p}.output.dense", layer.mlp.fc2)
        if pre:
            state |= _norm(folded, f"{p}.attention.ln", layer.self_attn_norm) | _norm(folded, f"{p}.ln", layer.mlp_norm)
        else:
            state |= _norm(folded, f"{p}.attention.output.LayerNorm", layer.self_attn_norm)
            state |= _norm(folded, f"{p}.output.LayerNorm", layer.mlp_norm)
    if pre:
        state |= _norm(folded, "bert.encoder.ln", stack.norm)
    head, bias = masked_lm_parts(model)
    bias = bias.detach().float() if bias is not None else torch.zeros(config.vocab_size)
    state |= _linear(folded, "cls.predictions.transform.dense", head.dense)
    state |= _norm(folded, "cls.predictions.transform.LayerNorm", head.norm)
    state |= {"cls.predictions.decoder.weight": folded.get(model.lm_head), "cls.predictions.decoder.bias": bias,
              "cls.predictions.bias": bias}
    return cls, native, state


def bart(model: DeepScaleLMForSeq2SeqLM, folded: Folded, eps: float):
    """BartForConditionalGeneration (Post-LN: layernorm_embedding, learned positions offset by 2) or
    BlenderbotForConditionalGeneration (Pre-LN: final layer_norm per stack, positions without offset)."""
    config = model.config
    pre = config.norm_placement == "pre"
    cls, native_config = (BlenderbotForConditionalGeneration, BlenderbotConfig) if pre else (BartForConditionalGeneration, BartConfig)
    native = native_config(
        d_model=config.hidden_size, encoder_layers=config.num_hidden_layers, decoder_layers=config.decoder_layers,
        encoder_attention_heads=config.num_attention_heads, decoder_attention_heads=config.num_attention_heads,
        encoder_ffn_dim=config.intermediate_size, decoder_ffn_dim=config.intermediate_size,
        activation_function=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
        dropout=config.hidden_dropout_prob, attention_dropout=config.attention_probs_dropout_prob,
        activation_dropout=0.0, scale_embedding=False,
        is_encoder_decoder=True, **_common_config(config),
    )
    state = {"model.shared.weight": folded.get(model.model.encoder.embed_tokens),
             "lm_head.weight": folded.get(model.lm_head),
             "final_logits_bias": torch.zeros(1, config.vocab_size)}
    for name in ("encoder", "decoder"):
        stack, p = getattr(model.model, name), f"model.{name}"
        positions = folded.get(stack.embed_positions)
        if not pre:  # Bart looks up position i + 2
            positions = torch.cat([torch.zeros(2, config.hidden_size), positions])
        state |= {f"{p}.embed_tokens.weight": folded.get(stack.embed_tokens), f"{p}.embed_positions.weight": positions}
        state |= _norm(folded, f"{p}.layer_norm", stack.norm) if pre else _norm(folded, f"{p}.layernorm_embedding", stack.embed_norm)
        for i, layer in enumerate(stack.layers):
            lp = f"{p}.layers.{i}"
            attentions = [("self_attn", layer.self_attn, layer.self_attn_norm)]
            if layer.cross_attn is not None:
                attentions.append(("encoder_attn", layer.cross_attn, layer.cross_attn_norm))
            for native_name, attn, norm in attentions:
                for proj, module in (("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("v_proj", attn.v_proj),
                                     ("out_proj", attn.o_proj)):
                    state |= _linear(folded, f"{lp}.{native_name}.{proj}", module)
                state |= _norm(folded, f"{lp}.{native_name}_layer_norm", norm)
            state |= _linear(folded, f"{lp}.fc1", layer.mlp.fc1) | _linear(folded, f"{lp}.fc2", layer.mlp.fc2)
            state |= _norm(folded, f"{lp}.final_layer_norm", layer.mlp_norm)
    return cls, native, state


BUILDERS = {
    "GPT2LMHeadModel": gpt2,
    "GPTNeoXForCausalLM": gpt_neox,
    "MegatronBertForMaskedLM": bert,
    "BertForMaskedLM": bert,
    "BlenderbotForConditionalGeneration": bart,
    "BartForConditionalGeneration": bart,
}


def native_twin(model) -> nn.Module:
    """The native transformers model computing the same logits as the DeepScaleLM `model` (fp32, eval mode)."""
    config = model.config
    target = native_target(config, type(model).__name__)
    folded = Folded(model)
    stacks = [model.model.encoder, model.model.decoder] if config.is_encoder_decoder else [model.model]
    smallest = min(fold_stack(folded, stack) for stack in stacks)
    # The logit scale multiplies the last hidden state: fold it into the LayerNorm that produces it.
    head_norm = masked_lm_parts(model)[0].norm if target.endswith("MaskedLM") else stack_output_norm(stacks[-1])
    folded.scale(head_norm, model.logit_scale)
    eps = config.layer_norm_eps
    if target in ("GPT2LMHeadModel", "GPTNeoXForCausalLM"):  # minimax eps over the stream scales 1 .. smallest
        eps = 2.0 * eps / (1.0 + smallest**2)
    cls, native_config, state = BUILDERS[target](model, folded, eps)
    native = cls(native_config)
    missing, unexpected = native.load_state_dict(state, strict=False)
    tied = set(native.all_tied_weights_keys) if native_config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"export to {target} left weights unset {sorted(set(missing) - tied)} or unused {unexpected}")
    if native.can_generate():
        native.generation_config = model.generation_config
    return native.eval()


# ----------------------------------------------------------------------------------------------------------------
# Measuring the equivalence on probe inputs
# ----------------------------------------------------------------------------------------------------------------
def probe_inputs(config: DeepScaleLMConfig, seed: int = 0, length: int = 16) -> dict:
    """A fixed batch of two random sequences, the second one padded (encoders see an attention mask)."""
    generator = torch.Generator().manual_seed(seed)
    length = min(length, config.max_position_embeddings)
    ids = torch.randint(0, config.vocab_size, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, length // 2:] = 0
    if config.is_encoder_decoder:
        decoder_ids = torch.randint(0, config.vocab_size, (2, length), generator=generator)
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids}
    if config.is_decoder:
        return {"input_ids": ids}
    return {"input_ids": ids, "attention_mask": mask}


def relative_difference(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """max |logits - reference| / max |reference|: the error on the scale of the logits."""
    return float((logits - reference).abs().max() / reference.abs().max())


@torch.no_grad()
def measure(model, native, inputs: dict) -> float:
    return relative_difference(native(**inputs).logits, model(**inputs).logits)


# ----------------------------------------------------------------------------------------------------------------
# Writing the exported checkpoint
# ----------------------------------------------------------------------------------------------------------------
def local_folder(source: str, revision: str | None) -> Path:
    """A local checkpoint folder as is; anything else is a Hub repository id, downloaded (or read from the cache)."""
    if Path(source).is_dir():
        return Path(source)
    try:
        return Path(snapshot_download(source, revision=revision))
    except Exception as error:  # bad id, missing repository or revision, no network: all the same to the user
        raise UserError(f"SRC {source!r} is neither a local folder nor a downloadable Hub repository "
                        f"({type(error).__name__}: {error}): pass a checkpoint folder or a model repository id") from None


def load_deepscalelm(folder: Path):
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{folder} has no config.json: pass a DeepScaleLM checkpoint folder (save_pretrained output)")
    check_model_folder(folder)
    check_no_foreign_code(folder)
    if read_json_object(config_file).get("model_type") != DeepScaleLMConfig.model_type:
        raise UserError(f"{config_file} is not a DeepScaleLM config (model_type is not 'deepscalelm')")
    with loading("the model config", config_file):
        config = DeepScaleLMConfig.from_pretrained(folder)
    architecture = (config.architectures or [None])[0]
    native_target(config, architecture)  # refuse before loading any weights
    with loading("the weights' headers", folder):
        check_config_matches_stored_size(folder, config)  # before any module of a 200000-layer config is built
    with loading("the weights", folder):
        model, info = architecture_class(config).from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"]:  # freshly initialised weights would be exported as if they were trained
        raise UserError(f"{folder} lacks weights {sorted(info['missing_keys'])} that {architecture} needs (saved "
                        "by another version of the model code?): re-save the checkpoint with this version")
    return model.eval()


CARD = """---
{metadata}
---
# {name}: native `{target}` export of a DeepScaleLM checkpoint

Exported with `dslm-export` from `{source}`{revision} (`{architecture}`, {layers}, {norm}-LN, {positions} positions).
DeepScaleLM's residual scales (lambda, beta) and its output logit scale are folded into the weights, so this
checkpoint loads with plain transformers, no `trust_remote_code`:

```python
from transformers import {auto}
model = {auto}.from_pretrained("{name}"{subfolder})
```

Measured equivalence (fp32, probe batch of 2 x {length} tokens): max |logit difference| = {abs_diff:.3g},
{rel_diff:.3g} of the largest logit.
"""


def card_metadata(source: str, folder: Path, license: str | None) -> str:
    """The exported card's YAML metadata: the source's license (its own card's, else `license`) and, for a Hub
    source, the repository it was exported from as base_model."""
    card = folder / "README.md"
    source_license = metadata_load(card).get("license") if card.is_file() else None
    base_model = source if not Path(source).is_dir() else None
    return ModelCardData(library_name="transformers", license=source_license or license, base_model=base_model,
                         tags=["deepscalelm", "exported"]).to_yaml()


@dataclass
class ExportReport:
    output_dir: Path
    target: str
    max_abs_difference: float
    max_relative_difference: float


def export_native(source: str | Path, output_dir: str | Path, *, revision: str | None = None,
                  repo_id: str | None = None, subfolder: str | None = None, license: str | None = None) -> ExportReport:
    """Write the native twin of the DeepScaleLM checkpoint `source` (folder or Hub id) into `output_dir` (new or
    empty): safetensors weights, config, generation config, tokenizer, and a card with the measured equivalence
    (its loading example names `repo_id` and `subfolder` when the folder is staged for the Hub; its license is the
    source card's, else `license`), all readable by others as the umask allows."""
    output_dir = Path(output_dir)
    if output_dir.is_symlink():  # the finished export replaces the folder by a rename, never through a link
        raise UserError(f"--output-dir {output_dir} is a symbolic link (to {os.readlink(output_dir)}): give the folder "
                        "itself, or a new path")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UserError(f"--output-dir {output_dir} exists and is not an empty folder: choose a new or empty folder")
    check_output_dir(output_dir, flag="--output-dir")
    folder = local_folder(str(source), revision)
    model = load_deepscalelm(folder)
    native = native_twin(model)
    inputs = probe_inputs(model.config)
    with torch.no_grad():
        reference, logits = model(**inputs).logits, native(**inputs).logits
    abs_diff, rel_diff = float((logits - reference).abs().max()), relative_difference(logits, reference)
    if not rel_diff <= EXPORT_TOLERANCE:
        raise RuntimeError(f"exported logits differ from DeepScaleLM's by {rel_diff:.3g} of the largest logit "
                           f"(tolerance {EXPORT_TOLERANCE}): nothing written")
    target = type(native).__name__
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        native.save_pretrained(staging)
        if (folder / "tokenizer_config.json").is_file():
            with loading("the tokenizer", folder):
                tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
            save_tokenizer(tokenizer, staging, model.config)
        config = model.config
        layers = (f"{config.num_hidden_layers}+{config.decoder_layers} layers" if config.is_encoder_decoder
                  else f"{config.num_hidden_layers} layers")
        (staging / "README.md").write_text(CARD.format(
            metadata=card_metadata(str(source), folder, license).strip(), name=repo_id or output_dir.name, subfolder=f", subfolder={subfolder!r}" if subfolder else "", target=target, source=source, revision=f" at revision `{revision}`" if revision else "",
            architecture=config.architectures[0], layers=layers, norm=config.norm_placement.capitalize(),
            positions="learned" if config.position_embedding_type == "absolute" else "rotary",
            auto=HEADS[type(model).__name__][0], length=inputs["input_ids"].shape[1], abs_diff=abs_diff, rel_diff=rel_diff,
        ))
        give_normal_permissions(staging)
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportReport(output_dir, target, abs_diff, rel_diff)


NATIVE_SUBFOLDER = "native"


def stage_native_twin(checkpoint_dir: Path, staging_dir: Path, repo_id: str, mode: str,
                      license: str | None = None) -> ExportReport:
    """dslm-publish --native: the twin in `staging_dir`/native next to the remote-code files ("also") or as the
    whole repository ("only", `staging_dir` empty)."""
    if mode == "only":
        return export_native(checkpoint_dir, staging_dir, repo_id=repo_id, license=license)
    return export_native(checkpoint_dir, Path(staging_dir) / NATIVE_SUBFOLDER, repo_id=repo_id, subfolder=NATIVE_SUBFOLDER,
                         license=license)


def build_parser() -> argparse.ArgumentParser:
    """Flags are snake_case (as dslm-pretrain's); each kebab-case spelling still works as an alias."""
    parser = argparse.ArgumentParser(
        prog="dslm-export",
        description="Export a DeepScaleLM checkpoint to a native transformers architecture (GPT-2, GPT-NeoX, BERT, "
                    "Megatron-BERT, Bart, Blenderbot) with the same logits: loads without trust_remote_code.",
    )
    parser.add_argument("source", metavar="SRC", help="a DeepScaleLM checkpoint folder or a Hub repository id")
    parser.add_argument("--output_dir", "--output-dir", required=True, type=Path, help="new or empty folder to write the export into")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) when SRC is a repository id")
    return usage_errors_as_user_errors(parser)


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(argv: list[str]) -> ExportReport:
    args = parse_args(argv)
    report = export_native(args.source, args.output_dir, revision=args.revision)
    print(f"exported {args.source} as {report.target} to {report.output_dir}: max |logit difference| "
          f"{report.max_abs_difference:.3g} ({report.max_relative_difference:.3g} of the largest logit)")
    return report


def main(argv=None) -> int:
    return run_command("dslm-export", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
