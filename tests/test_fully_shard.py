"""FSDP2 (dslm_hf.parallel: fully_shard per DeepScaleLMLayer) on CPU with two gloo ranks, each holding half of every
batch and half of every parameter, against one process training the same model on the whole batches.

Tolerance 1e-5 relative for fp32: the same gradient sums in another order (two half-batches reduce-scattered), float32
rounding ~1e-7 per operation. bf16 (MixedPrecisionPolicy: bf16 compute, fp32 master weights and reductions) keeps
~3 significant digits per matmul: its losses are checked to 2e-2 relative of fp32's (8 bits of mantissa: 2^-8 = 4e-3
per rounding, a few roundings deep).
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dslm_hf import parallel
from parallel_helpers import (
    BATCH, LEARNING_RATE, STEPS, assert_one_process_layout, batch, label_count, one_process_run, parameter_groups,
    read_losses, read_state, tiny_model, two_gloo_ranks, write_losses, write_state,
)


def sharded_worker(rank: int, folder: str, mixed_precision: str, start: int, stop: int, save_at: int | None,
                   accumulation: int):
    """Train steps [start, stop) sharded over 2 ranks, each on its half of the batch split into `accumulation`
    micro-batches (resuming from `folder` when start > 0, saving the gathered state after step `save_at`)."""
    folder = Path(folder)
    model = parallel.shard_model(tiny_model(), mixed_precision=mixed_precision)
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=LEARNING_RATE)
    if start:
        parallel.load_sharded_training_state(model, optimizer, *read_state(folder))
    losses = []
    for step in range(start, stop):
        whole = batch(step)
        items = label_count({"labels": whole})  # the token count of the whole batch on both ranks
        mine = whole[rank * BATCH // 2:(rank + 1) * BATCH // 2].chunk(accumulation)
        loss_sum = torch.zeros(())
        for micro in mine:
            loss = model(input_ids=micro, labels=micro, num_items_in_batch=items).loss
            (loss * 2).backward()  # FSDP averages gradients over the 2 ranks; the loss is already a global mean
            loss_sum += loss.detach().float()
        dist.all_reduce(loss_sum)
        losses.append(loss_sum.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step + 1 == save_at:
            state = parallel.sharded_training_state(model, optimizer)
            if rank == 0:
                write_state(folder, *state)
    if rank == 0:
        write_losses(folder, f"{mixed_precision}-{accumulation}-{start}", losses)


def run_sharded(folder, mixed_precision="no", start=0, stop=STEPS, save_at=None, accumulation=1) -> list[float]:
    two_gloo_ranks(sharded_worker, str(folder), mixed_precision, start, stop, save_at, accumulation)
    return read_losses(folder, f"{mixed_precision}-{accumulation}-{start}")


@pytest.mark.slow
def test_fully_shard_trains_like_one_process_over_20_steps_with_gradient_accumulation(tmp_path):
    reference = one_process_run()[0]
    assert run_sharded(tmp_path, accumulation=2) == pytest.approx(reference, rel=1e-5)
    assert reference[-1] < reference[0] - 0.25  # it learned: the comparison is not of two flat lines


@pytest.mark.slow
def test_fully_shard_checkpoint_resumes_bit_identical_from_the_one_process_layout(tmp_path):
    uninterrupted = run_sharded(tmp_path, stop=8, save_at=4)
    assert_one_process_layout(tmp_path)
    assert run_sharded(tmp_path, start=4, stop=8) == uninterrupted[4:]


@pytest.mark.slow
def test_fully_shard_bf16_mixed_precision_follows_fp32(tmp_path):
    reference = one_process_run(steps=6)[0]
    assert run_sharded(tmp_path, mixed_precision="bf16", stop=6) == pytest.approx(reference, rel=2e-2)


def test_fully_shard_refuses_fp16():
    with pytest.raises(ValueError, match="fp16"):
        parallel.shard_model(tiny_model(), mixed_precision="fp16")
