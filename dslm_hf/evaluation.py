"""Held-out metrics of a language model, shared by pretraining (every --eval_steps), publishing (the numbers a model
card reports) and the benchmarks (benchmarks/common.py): the token-level mean loss over whole blocks and its
perplexity.

Masking (MLM) and span corruption (seq2seq) of evaluation batch i on rank r are seeded from (seed, "eval", i, r),
so the same weights on the same blocks always give the same number, whichever command measures them: `evaluate` over
a data loader on any number of processes, or `held_out_loss` over a tensor of blocks in one process (the same number
as `evaluate` on one process with a loader of the same blocks and batch size).
"""

import math

import torch

from .data import derived_seed


def to_device(batch: dict, device) -> dict:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def _batch_loss_sum(model, collator, blocks: torch.Tensor, seed: int, index: int, rank: int,
                    device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the token losses, label tokens) of evaluation batch `index` on `rank`, in float64 on `device`."""
    generator = torch.Generator().manual_seed(derived_seed(seed, "eval", index, rank))
    batch = to_device(collator(blocks.cpu(), generator), device)
    count = collator.count_label_tokens(batch).to(device)
    return model(**batch).loss.double() * count, count.double()


@torch.no_grad()
def evaluate(accelerator, model, dataloader, collator, seed: int) -> dict:
    """{"eval_loss", "eval_perplexity"}: the mean loss per label token over the held-out blocks of all ranks."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    tokens = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for index, blocks in enumerate(dataloader):
        batch_sum, count = _batch_loss_sum(model, collator, blocks, seed, index, accelerator.process_index,
                                           accelerator.device)
        loss_sum += batch_sum
        tokens += count
    model.train(was_training)
    loss = (accelerator.reduce(loss_sum, "sum") / accelerator.reduce(tokens, "sum")).item()
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}


@torch.no_grad()
def held_out_loss(model, blocks: torch.Tensor, collator, seed: int, batch_size: int = 16) -> float:
    """The mean loss per label token over `blocks` ((count, length) token ids), in one process, without accelerate.

    `collator` (dslm_hf.data's CausalLMCollator, MaskedLMCollator or SpanCorruptionCollator, or one with the same
    `__call__(blocks, generator)` and `count_label_tokens(batch)`) makes each batch of `batch_size` consecutive blocks;
    its masks are seeded from (seed, "eval", batch index, 0) as in `evaluate`, so every model measured with the same
    blocks, seed and batch size sees the same masks, and the number equals what `evaluate` reports for one process
    with a loader of these blocks in order. Each batch's mean loss is weighted by its label tokens (a shorter last
    batch or a batch with fewer masked tokens counts for what it holds). Runs on the model's device; an enclosing
    `torch.autocast` applies. The model's train/eval mode is restored afterwards.
    """
    if len(blocks) == 0:
        raise ValueError("held_out_loss needs at least one block")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for index, start in enumerate(range(0, len(blocks), batch_size)):
            batch = blocks[start:start + batch_size]
            batch_sum, count = _batch_loss_sum(model, collator, batch, seed, index, 0, device)
            loss_sum += batch_sum
            tokens += count
    finally:
        model.train(was_training)
    return (loss_sum / tokens).item()
