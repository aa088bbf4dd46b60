"""Pipeline parallelism (dslm_hf.pipeline) on CPU: two gloo ranks, one stage each, GPipe and 1F1B schedules with 4
micro-batches, against one process training the same model on the same batches.

Tolerance 1e-5 relative: the gradients are the same sums taken in another order (micro-batches, the tied
embedding's two halves added after backward, the global norm from two partial sums), float32 rounding ~1e-7 per
operation; over 20 AdamW steps the losses stayed within ~1e-6 of each other when this was written.
"""

from pathlib import Path

import pytest
import torch

from dslm_hf.pipeline import Pipeline, check_pipeline_layout, stage_layer_range
from parallel_helpers import (
    LEARNING_RATE, STEPS, assert_one_process_layout, batch, label_count, one_process_run, parameter_groups, read_losses,
    read_state, tiny_model, two_gloo_ranks, write_losses, write_state,
)

MICROBATCHES = 4


def pipeline_worker(rank: int, folder: str, schedules: list[str], start: int, stop: int, save_at: int | None):
    """Train steps [start, stop) with each schedule in turn (resuming from `folder` when start > 0, saving the
    gathered state there after step `save_at`); rank 0 writes the losses."""
    folder = Path(folder)
    for schedule in schedules:
        model = tiny_model()
        pipeline = Pipeline(model, parameter_groups(model), MICROBATCHES, schedule)
        optimizer = torch.optim.AdamW(pipeline.parameter_groups, lr=LEARNING_RATE)
        if start:
            pipeline.load_training_state(optimizer, *read_state(folder))
        losses = []
        for step in range(start, stop):
            # GPipe also accumulates: two windows of 4 blocks (each in 4 micro-batches) make the batch of 8.
            parts = batch(step).chunk(2 if schedule == "gpipe" else 1)
            loss, _ = pipeline.train_window([{"input_ids": p, "labels": p} for p in parts], label_count)
            losses.append(loss.item())
            pipeline.clip_grad_norm_(1.0)
            optimizer.step()
            optimizer.zero_grad()
            if step + 1 == save_at:
                state = pipeline.training_state(optimizer)
                if rank == 0:
                    write_state(folder, *state)
        if rank == 0:
            write_losses(folder, f"{schedule}-{start}", losses)


def run_pipeline(folder, schedules: list[str], start: int = 0, stop: int = STEPS, save_at: int | None = None) -> dict:
    two_gloo_ranks(pipeline_worker, str(folder), schedules, start, stop, save_at)
    return {s: read_losses(folder, f"{s}-{start}") for s in schedules}


@pytest.mark.slow
def test_two_stage_pipeline_gpipe_with_accumulation_and_1f1b_train_like_one_process_over_20_steps(tmp_path):
    reference = one_process_run()[0]
    losses = run_pipeline(tmp_path, ["gpipe", "1f1b"])
    for schedule in ("gpipe", "1f1b"):
        assert losses[schedule] == pytest.approx(reference, rel=1e-5), schedule
    assert reference[-1] < reference[0] - 0.25  # it learned: the comparison is not of two flat lines


@pytest.mark.slow
def test_pipeline_checkpoint_resumes_bit_identical_from_the_one_process_layout(tmp_path):
    uninterrupted = run_pipeline(tmp_path, ["1f1b"], stop=8, save_at=4)["1f1b"]
    assert_one_process_layout(tmp_path)
    resumed = run_pipeline(tmp_path, ["1f1b"], start=4, stop=8)["1f1b"]
    assert resumed == uninterrupted[4:]


def test_stage_layer_ranges_cover_the_stack_evenly():
    assert [list(stage_layer_range(10, 3, s)) for s in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [len(stage_layer_range(192, 8, s)) for s in range(8)] == [24] * 8


@pytest.mark.parametrize("stages, microbatches, message", [
    (5, 4, "--pipeline_parallel_size=5 is more stages than the model's 4 layers"),
    (2, 3, "--pipeline_microbatches=3 does not divide --per_device_eval_batch_size=8"),
])
def test_pipeline_layout_refuses_impossible_splits(stages, microbatches, message):
    with pytest.raises(ValueError, match=message):
        check_pipeline_layout(4, stages, {"--per_device_train_batch_size": 12, "--per_device_eval_batch_size": 8},
                              microbatches)
