"""Checks of the inputs a DeepScaleLM model is called with: bad input fails at the model's door with one message
that names the input and says what to do, not deep inside an embedding, a kernel or the loss.

The stacks call `check_inputs` once per forward, the heads `check_token_labels`, `check_sequence_labels` or
`check_span_positions` once for their targets. Shapes and dtypes are always checked; value ranges only where reading
them costs no host sync per generated token (`_values_checkable`); nothing while torch.compile traces.
"""

import torch
from transformers.utils import is_torchdynamo_compiling

from .configuration_deepscalelm import DeepScaleLMConfig

IGNORE_INDEX = -100  # label positions that carry no loss (padding, unmasked tokens), as everywhere in transformers


def _is_token_tensor(tensor: torch.Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def _values_checkable(tensor: torch.Tensor, past_length: int) -> bool:
    """Reading a tensor's min/max forces a host sync on an accelerator: do it on CPU always, elsewhere only outside
    cached decoding (training, a prompt's prefill), so generation on a GPU adds no sync per token."""
    return tensor.device.type == "cpu" or past_length == 0


def _check_range(name: str, tensor: torch.Tensor | None, high: int, domain: str, advice: str, past_length: int,
                 ignore: int | None = None):
    """ValueError unless every value of `tensor` (other than `ignore`) lies in [0, high)."""
    if tensor is None or tensor.numel() == 0 or not _values_checkable(tensor, past_length):
        return
    values = tensor[tensor != ignore] if ignore is not None else tensor
    if values.numel() == 0:
        return
    low, top = int(values.min()), int(values.max())
    if low < 0 or top >= high:
        allowed = f"{domain} [0, {high})" + (f" or {ignore} (no loss)" if ignore is not None else "")
        raise ValueError(f"{name} holds {low if low < 0 else top}, outside {allowed}: {advice}")


def _check_mask_4d(mask: torch.Tensor, batch: int, heads: int, queries: int, keys: int, fixed_size_cache: bool):
    """A prepared 4-D mask must broadcast against the scores (B, H, T, past + T); a fixed-size (static) cache holds
    more key slots than tokens, so its masks may be longer. Otherwise torch fails later with a bare broadcast error."""
    size = tuple(mask.shape)
    fits = (size[0] in (1, batch) and size[1] in (1, heads) and size[2] in (1, queries)
            and (size[3] >= keys if fixed_size_cache else size[3] == keys))
    if not fits:
        broadcast = [f"{name}={n}" + (" or 1" if n != 1 else "") for name, n in
                     (("batch", batch), ("heads", heads), ("new tokens", queries))]
        raise ValueError(
            f"a 4-D attention_mask must have shape ({', '.join(broadcast)}, cached + new tokens={keys}"
            f"{' or more' if fixed_size_cache else ''}), got {size}: pass the 2-D (batch, sequence) mask and the "
            "model builds the 4-D one"
        )


def check_inputs(config: DeepScaleLMConfig, input_ids, inputs_embeds, attention_mask, position_ids, token_type_ids,
                 past_length: int, fixed_size_cache: bool = False):
    """Bad input fails here with a message that says what to do, not deep inside an embedding or kernel.

    Shapes and dtypes are always checked (free). Value ranges (token ids, token types, positions) need the tensors'
    min/max, a host sync on an accelerator: see `_values_checkable`. Nothing is checked while torch.compile traces.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds")
    if is_torchdynamo_compiling():
        return
    if input_ids is not None:
        if not _is_token_tensor(input_ids):
            raise ValueError(
                f"input_ids must hold integer token ids, got dtype {input_ids.dtype}: pass the tokenizer's input_ids "
                "(torch.long), or pass vectors as inputs_embeds"
            )
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must have shape (batch, sequence), got {tuple(input_ids.shape)}: batch a single sequence "
                "with input_ids[None] (or tokenizer(..., return_tensors='pt'))"
            )
        shape = tuple(input_ids.shape)
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape (batch, sequence, hidden_size={config.hidden_size}), "
                f"got {tuple(inputs_embeds.shape)}"
            )
        shape = tuple(inputs_embeds.shape[:2])
    if 0 in shape:
        raise ValueError(f"empty input: shape {shape} (batch, sequence); pass at least one sequence of one token or more")
    batch, seq_length = shape
    _check_range("input_ids", input_ids, config.vocab_size, "the vocabulary", "use the tokenizer this model was "
                 "trained with, or resize the embeddings (model.resize_token_embeddings)", past_length)

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
    elif attention_mask is not None:  # 4-D: it is added to (or masks) scores of shape (B, H, T, past + T)
        _check_mask_4d(attention_mask, batch, config.num_attention_heads, seq_length, past_length + seq_length,
                       fixed_size_cache)

    if token_type_ids is not None:
        if not _is_token_tensor(token_type_ids) or tuple(token_type_ids.shape) != shape:
            raise ValueError(
                f"token_type_ids must be integers of shape {shape} (batch, sequence), got {tuple(token_type_ids.shape)} "
                f"{token_type_ids.dtype}"
            )
        rows = max(config.type_vocab_size, 1)  # without a token-type table only segment 0 means "nothing"
        _check_range("token_type_ids", token_type_ids, rows, "the segment ids", f"this model has type_vocab_size="
                     f"{config.type_vocab_size} segment rows: pass segment ids below it, or no token_type_ids", past_length)

    if position_ids is not None:
        if not _is_token_tensor(position_ids) or position_ids.dim() != 2 or position_ids.shape[-1] != seq_length:
            raise ValueError(
                f"position_ids must be integers of shape (batch or 1, {seq_length}), got {tuple(position_ids.shape)} "
                f"{position_ids.dtype}"
            )
        longest = config.max_position_embeddings if config.position_embedding_type == "absolute" else 2**62
        _check_range("position_ids", position_ids, longest, "the positions", _position_table_advice(config, past_length),
                     past_length)
    elif config.position_embedding_type == "absolute" and past_length + seq_length > config.max_position_embeddings:
        raise ValueError(f"the sequence reaches position {past_length + seq_length}, but "
                         f"{_position_table_advice(config, past_length)}")


def _position_table_advice(config: DeepScaleLMConfig, past_length: int) -> str:
    """Why a position is out of range and what to do: a cache means generation ran past the learned table."""
    table = f"the position table holds max_position_embeddings={config.max_position_embeddings} positions"
    if past_length:
        return (f"{table}; generation has reached its end ({past_length} cached tokens): ask for fewer new tokens "
                "(prompt length + max_new_tokens must not exceed it) or shorten the prompt")
    return (f"{table} (counted from 0): truncate the inputs (tokenizer truncation=True, "
            f"max_length={config.max_position_embeddings})")


def check_token_labels(labels: torch.Tensor, expected_shape: tuple, classes: int, what: str):
    """Token-level labels: the inputs' shape, each a class id in [0, classes) or -100 (no loss)."""
    if is_torchdynamo_compiling():
        return
    if not _is_token_tensor(labels) or tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(
            f"labels must be integer class ids of shape {tuple(expected_shape)} (one per {what}), got "
            f"{tuple(labels.shape)} {labels.dtype}"
        )
    _check_range("labels", labels, classes, "the classes", "labels are class ids of the output layer; mark "
                 "positions without a loss with -100", past_length=0, ignore=IGNORE_INDEX)


def check_sequence_labels(labels: torch.Tensor, batch: int, num_labels: int):
    """Class ids (B,) in [0, num_labels), or floats: (B,) regression with one label, (B, num_labels) multi-label."""
    if is_torchdynamo_compiling():
        return
    if _is_token_tensor(labels):
        if tuple(labels.shape) != (batch,):
            raise ValueError(f"labels must be class ids of shape ({batch},) (one per sequence), got {tuple(labels.shape)}")
        _check_range("labels", labels, num_labels, "the classes", f"the classifier has num_labels={num_labels} "
                     "outputs: relabel the data or build the head with more labels", past_length=0)
        return
    expected = (batch,) if num_labels == 1 else (batch, num_labels)
    if tuple(labels.shape) != expected:
        raise ValueError(
            f"float labels must have shape {expected} ({'regression' if num_labels == 1 else 'multi-label'} with "
            f"num_labels={num_labels}), got {tuple(labels.shape)}"
        )


def check_span_positions(start_positions: torch.Tensor, end_positions: torch.Tensor, batch: int):
    """Extractive QA targets: one integer token position per sequence for the span's start and its end."""
    for name, positions in (("start_positions", start_positions), ("end_positions", end_positions)):
        if not _is_token_tensor(positions) or positions.numel() != batch:
            raise ValueError(f"{name} must be {batch} integer token positions (one per sequence), got "
                             f"{tuple(positions.shape)} {positions.dtype}")


__all__ = ["IGNORE_INDEX", "check_inputs", "check_sequence_labels", "check_span_positions", "check_token_labels"]
