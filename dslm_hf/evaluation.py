"""Held-out metrics of a language model, shared by pretraining (every --eval_steps) and publishing (the numbers a
model card reports): the token-level mean loss over whole blocks and its perplexity.

Masking (MLM) and span corruption (seq2seq) of evaluation batch i on rank r are seeded from (seed, "eval", i, r),
so the same weights on the same blocks always give the same number, whichever command measures them.
"""

import math

import torch

from .data import derived_seed


def to_device(batch: dict, device) -> dict:
    return {name: tensor.to(device) for name, tensor in batch.items()}


@torch.no_grad()
def evaluate(accelerator, model, dataloader, collator, seed: int) -> dict:
    """{"eval_loss", "eval_perplexity"}: the mean loss per label token over the held-out blocks of all ranks."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    tokens = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for index, blocks in enumerate(dataloader):
        generator = torch.Generator().manual_seed(derived_seed(seed, "eval", index, accelerator.process_index))
        batch = to_device(collator(blocks.cpu(), generator), accelerator.device)
        count = collator.count_label_tokens(batch)
        loss_sum += model(**batch).loss.double() * count
        tokens += count
    model.train(was_training)
    loss = (accelerator.reduce(loss_sum, "sum") / accelerator.reduce(tokens, "sum")).item()
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}
