"""What a checkpoint has to beat, measured on the same held-out tokens as the checkpoint itself.

- `KneserNeyLM`: an interpolated Kneser-Ney n-gram model over token ids (Chen & Goodman 1999, one absolute discount
  per order, estimated as n1 / (n1 + 2 n2)), fitted on the training split: the count-based baseline of a causal LM.
- `UnigramLM`: add-one smoothed token frequencies of the training split: the baseline of masked-token filling
  (top-1 = the most frequent token) and of span-corruption targets.
- `masked_position_metrics`: top-1 accuracy and loss of a model and of `UnigramLM` at the same positions of the
  same corrupted held-out batches (masked tokens for an encoder, hidden span tokens for an encoder-decoder).
- `same_parameter_shape`: the width of a shallow model with the parameter count of a deep one.
- `held_out_baselines`: all of the above for a checkpoint and its same-parameter twin, as the "baselines" entry of
  the evaluation record its model card is rendered from.

All of it is numpy/torch on CPU; fitting a 4-gram model on a few million tokens takes seconds.
"""

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from transformers import AutoTokenizer

from .data import derived_seed, hold_out_documents, load_corpus, make_collator, pack_into_blocks
from .diagnostics import measure_signal_propagation
from .folder_checks import check_checkpoint
from .heads import OBJECTIVE_OF_TASK, architecture_class, parameter_count
from .modeling_deepscalelm import IGNORE_INDEX

# A context that was never seen in training backs off entirely to the next lower order.
_MAX_CODE = 2**62


class KneserNeyLM:
    """Interpolated Kneser-Ney over token ids, orders 1..`order`, interpolated down to the uniform distribution.

        P_n(w | h) = max(c(h w) - D_n, 0) / c(h .) + D_n * N1+(h .) / c(h .) * P_{n-1}(w | h')

    where the highest order counts n-grams, each lower order k counts N1+(. g): the distinct tokens seen before the
    k-gram g (continuation counts), and the unigram level interpolates with 1 / vocab_size, so every token has
    positive probability and the probabilities over the vocabulary sum to 1 in every context. A token with a
    history shorter than order - 1 (the start of a block) uses the levels its history reaches.
    """

    def __init__(self, vocab_size: int, order: int = 3, discount: float | None = None):
        if order < 1:
            raise ValueError(f"order={order} must be >= 1")
        if vocab_size ** order >= _MAX_CODE:
            raise ValueError(f"vocab_size={vocab_size} ** order={order} does not fit n-gram codes in 62 bits")
        if discount is not None and not 0.0 < discount <= 1.0:
            raise ValueError(f"discount={discount} must lie in (0, 1]")
        self.vocab_size, self.order, self.fixed_discount = vocab_size, order, discount
        self.levels: list[dict] = []

    def _codes(self, stream: np.ndarray, length: int) -> np.ndarray:
        """Base-vocab_size codes of every `length`-gram of the stream (first token most significant)."""
        codes = np.zeros(len(stream) - length + 1, dtype=np.int64)
        for offset in range(length):
            codes = codes * self.vocab_size + stream[offset: len(stream) - length + 1 + offset]
        return codes

    def _level(self, grams: np.ndarray, values: np.ndarray) -> dict:
        """One order's table: sorted gram codes, their (continuation) counts, per-context totals and types."""
        contexts, starts, types = np.unique(grams // self.vocab_size, return_index=True, return_counts=True)
        if self.fixed_discount is not None:
            discount = self.fixed_discount
        else:
            once, twice = int((values == 1).sum()), int((values == 2).sum())
            discount = once / (once + 2 * twice) if once else 0.5
        return {"grams": grams, "values": values, "contexts": contexts, "totals": np.add.reduceat(values, starts),
                "types": types, "discount": discount}

    def fit(self, stream) -> "KneserNeyLM":
        """Count the n-grams of one token stream (the training split's blocks, concatenated)."""
        stream = np.asarray(stream, dtype=np.int64).ravel()
        if len(stream) <= self.order:
            raise ValueError(f"{len(stream)} training tokens are too few for a {self.order}-gram model")
        if stream.min() < 0 or stream.max() >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        grams, counts = np.unique(self._codes(stream, self.order), return_counts=True)
        levels = [self._level(grams, counts)]
        for length in range(self.order - 1, 0, -1):
            # N1+(. g): how many distinct (length + 1)-grams end in g.
            longer = np.unique(self._codes(stream, length + 1))
            grams, continuations = np.unique(longer % self.vocab_size ** length, return_counts=True)
            levels.append(self._level(grams, continuations))
        self.levels = levels[::-1]  # index k - 1 holds order k
        return self

    @property
    def discounts(self) -> list[float]:
        return [level["discount"] for level in self.levels]

    @staticmethod
    def _lookup(keys: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = np.searchsorted(table, keys).clip(max=max(len(table) - 1, 0))
        return index, table[index] == keys

    def probabilities(self, histories: np.ndarray, history_lengths: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """P(target | history) for each row. `histories` is (rows, order - 1), most recent token last; only the
        last history_lengths[i] tokens of row i are real."""
        if not self.levels:
            raise ValueError("fit the model first")
        targets = np.asarray(targets, dtype=np.int64)
        probability = np.full(len(targets), 1.0 / self.vocab_size)
        context = np.zeros(len(targets), dtype=np.int64)
        for order, level in enumerate(self.levels, start=1):
            if order > 1:  # extend each context by one more token to the left
                context = context + histories[:, -(order - 1)] * self.vocab_size ** (order - 2)
            reached = history_lengths >= order - 1
            at, seen = self._lookup(context, level["contexts"])
            totals = np.where(seen, level["totals"][at], 0)
            types = np.where(seen, level["types"][at], 0)
            gram_at, gram_seen = self._lookup(context * self.vocab_size + targets, level["grams"])
            counts = np.where(gram_seen, level["values"][gram_at], 0)
            discount = level["discount"]
            with np.errstate(divide="ignore", invalid="ignore"):
                interpolated = (np.maximum(counts - discount, 0) + discount * types * probability) / totals
            probability = np.where(reached & (totals > 0), interpolated, probability)
        return probability

    def distribution(self, history) -> np.ndarray:
        """P(w | history) for every token w of the vocabulary."""
        history = list(history)[-(self.order - 1):] if self.order > 1 else []
        padded = np.zeros((self.vocab_size, max(self.order - 1, 1)), dtype=np.int64)
        if history:
            padded[:, -len(history):] = history
        return self.probabilities(padded, np.full(self.vocab_size, len(history)), np.arange(self.vocab_size))

    def block_log_probs(self, blocks) -> np.ndarray:
        """(blocks, length - 1): log P(block[t] | block[:t]) for t >= 1, the tokens a causal LM is scored on."""
        blocks = np.asarray(blocks, dtype=np.int64)
        rows, length = blocks.shape
        width = max(self.order - 1, 1)
        padded = np.concatenate([np.zeros((rows, width), dtype=np.int64), blocks], axis=1)
        positions = np.arange(1, length)
        # history of position t: padded[:, t : t + width] (the `width` tokens before block[t])
        histories = np.stack([padded[:, t: t + width] for t in positions], axis=1).reshape(-1, width)
        lengths = np.broadcast_to(positions, (rows, length - 1)).reshape(-1)
        return np.log(self.probabilities(histories, lengths, blocks[:, 1:].reshape(-1))).reshape(rows, length - 1)

    def causal_lm_metrics(self, blocks) -> dict:
        """{"loss", "perplexity", "tokens"}: per-token cross-entropy (nats) over the tokens a causal LM predicts in
        these blocks (each block on its own, as the model sees it)."""
        log_probs = self.block_log_probs(blocks)
        loss = float(-log_probs.mean())
        return {"loss": loss, "perplexity": math.exp(loss), "tokens": int(log_probs.size)}


class UnigramLM:
    """Add-one smoothed token frequencies: P(w) = (c(w) + 1) / (N + vocab_size)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.log_probs: torch.Tensor | None = None

    def fit(self, stream) -> "UnigramLM":
        counts = torch.bincount(torch.as_tensor(stream).flatten().long(), minlength=self.vocab_size).double()
        if len(counts) > self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        self.log_probs = ((counts + 1) / (counts.sum() + self.vocab_size)).log()
        return self

    @property
    def top_token(self) -> int:
        return int(self.log_probs.argmax())

    def metrics(self, targets: torch.Tensor) -> dict:
        """{"loss", "accuracy"} of predicting each target token from frequencies alone (top-1 = the top token)."""
        targets = targets.flatten().long()
        return {"loss": float(-self.log_probs[targets].mean()),
                "accuracy": float((targets == self.top_token).double().mean())}


def held_out_batches(blocks: torch.Tensor, collator, batch_size: int, seed: int) -> list[dict]:
    """The held-out blocks corrupted as `dslm_hf.evaluation.evaluate` corrupts them on one process: batch i masked
    from seed (seed, "eval", i, 0), so these are the very masks behind the evaluation record's loss."""
    return [collator(blocks[start: start + batch_size],
                     torch.Generator().manual_seed(derived_seed(seed, "eval", index, 0)))
            for index, start in enumerate(range(0, len(blocks), batch_size))]


@torch.no_grad()
def masked_position_metrics(model, batches: Iterable[dict], scored: Callable[[dict], torch.Tensor],
                            unigram: UnigramLM) -> dict:
    """Top-1 accuracy and loss (nats per token) of `model` and of `unigram` at the positions `scored(batch)` selects
    (a boolean tensor shaped like the labels), over the same batches: {"tokens", "model": {...}, "unigram": {...}}.

    The model's logits must line up with its labels (masked LM, or seq2seq with its decoder inputs built from the
    labels); the model is scored teacher-forced.
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, targets = 0.0, 0, []
    for batch in batches:
        positions = scored(batch)
        logits = model(**batch).logits[positions].double()
        labels = batch["labels"][positions]
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        targets.append(labels)
    model.train(was_training)
    targets = torch.cat(targets)
    if len(targets) == 0:
        raise ValueError("no position was selected for scoring")
    return {"tokens": len(targets), "model": {"loss": loss_sum / len(targets), "accuracy": correct / len(targets)},
            "unigram": unigram.metrics(targets)}


def fill_mask_positions(mask_token_id: int) -> Callable[[dict], torch.Tensor]:
    """The fill-mask query positions of a masked-LM batch: a mask token in the input and a label to predict."""
    return lambda batch: (batch["input_ids"] == mask_token_id) & (batch["labels"] != IGNORE_INDEX)


def same_parameter_shape(parameter_count: Callable[[int, int], int], target: int, layers: int,
                         width_multiple: int) -> tuple[int, int]:
    """(width, parameters) of the `layers`-deep model whose parameter count, `parameter_count(layers, width)`, is
    closest to `target`, over widths that are multiples of `width_multiple` (the attention heads)."""
    low, high = 1, 1
    while parameter_count(layers, high * width_multiple) < target:
        low, high = high, high * 2
    while high - low > 1:  # parameter counts grow with width: bisect for the first width at or above the target
        middle = (low + high) // 2
        low, high = (middle, high) if parameter_count(layers, middle * width_multiple) < target else (low, middle)
    candidates = [(abs(parameter_count(layers, m * width_multiple) - target), m * width_multiple) for m in (low, high)]
    width = min(candidates)[1]
    return width, parameter_count(layers, width)


def weight_gradient_spread(model, input_ids: torch.Tensor) -> dict[str, float]:
    """{stack: max / min over its layers of the weight-gradient norm} of one training-mode step on `input_ids`
    (dslm_hf.diagnostics): 1 is perfectly even; DeepScaleLM keeps it near 1.4 at initialisation at any depth."""
    records = measure_signal_propagation(model, input_ids, progress=False)
    spreads = {}
    for stack, layers in records.items():
        norms = [layer["weight_gradient_norm"] for layer in layers]
        spreads[stack] = max(norms) / min(norms) if all(n is not None and n > 0 for n in norms) else math.inf
    return spreads


def held_out_baselines(model_dir, same_parameter_dir, same_parameter_record: dict, text_file, *,
                       held_out_fraction: float, block_size: int, batch_size: int = 8, seed: int = 0,
                       ngram_order: int = 4) -> dict:
    """What the checkpoint in `model_dir` is compared with, on the held-out split its evaluation record uses:

    - "same_parameters": the same-parameter model's held-out loss and perplexity (from `same_parameter_record`, its
      own evaluation record: its shape, parameters, weights digest and training run);
    - causal LM: "ngram" (interpolated Kneser-Ney of `ngram_order` fitted on the training split) and "unigram",
      each on the tokens the model predicts;
    - masked LM: "fill_mask", top-1 accuracy and loss at the held-out mask-token positions of the model, the
      same-parameter model and token frequencies, on the same masks as the record's loss;
    - encoder-decoder: "spans", the same at the hidden span tokens (teacher-forced; sentinels and EOS not scored).
    """
    config = check_checkpoint(model_dir)
    same_config = check_checkpoint(same_parameter_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    splits = hold_out_documents(load_corpus(str(text_file)), held_out_fraction)
    train_stream = pack_into_blocks(splits["train"], tokenizer, block_size)[:]["input_ids"].flatten()
    held_out = pack_into_blocks(splits["validation"], tokenizer, block_size)[:]["input_ids"]
    unigram = UnigramLM(len(tokenizer)).fit(train_stream)
    metrics = same_parameter_record["metrics"]
    stacks = {f"{stack}_layers": layers for stack, layers, _ in same_config.residual_stacks()}
    result = {"same_parameters": {**stacks, "hidden_size": same_config.hidden_size,
                                  "parameters": parameter_count(same_config), "loss": metrics["loss"],
                                  "perplexity": metrics["perplexity"],
                                  "weights_sha256": same_parameter_record["weights_sha256"],
                                  "training": same_parameter_record["training"]}}
    task = same_parameter_record["task"]
    if task == "causal-lm":
        ngram = KneserNeyLM(len(tokenizer), ngram_order).fit(train_stream.numpy())
        result["ngram"] = {"order": ngram_order, "smoothing": "interpolated Kneser-Ney", "discounts": ngram.discounts,
                           **ngram.causal_lm_metrics(held_out.numpy())}
        frequencies = unigram.metrics(held_out[:, 1:])
        result["unigram"] = {"loss": frequencies["loss"], "perplexity": math.exp(frequencies["loss"])}
        return result
    collator = make_collator(OBJECTIVE_OF_TASK[task], tokenizer, block_size)
    batches = held_out_batches(held_out, collator, batch_size, seed)
    scored = fill_mask_positions(tokenizer.mask_token_id) if task == "masked-lm" else collator.span_token_mask
    model = masked_position_metrics(architecture_class(config).from_pretrained(model_dir), batches, scored, unigram)
    same = masked_position_metrics(architecture_class(same_config).from_pretrained(same_parameter_dir), batches,
                                   scored, unigram)
    result["fill_mask" if task == "masked-lm" else "spans"] = {
        "tokens": model["tokens"], "model": model["model"], "same_parameters": same["model"], "unigram": model["unigram"]}
    return result
