"""Pipeline parallelism (dslm_hf.pipeline) on CPU: two gloo ranks, one stage each, GPipe and 1F1B schedules with 4
micro-batches, against one process training the same model on the same batches.

Tolerance 1e-5 relative: the gradients are the same sums taken in another order (micro-batches, the tied
embedding's two halves added after backward, the global norm from two partial sums), float32 rounding ~1e-7 per
operation; 20 AdamW steps at lr 1e-3 keep the losses within ~1e-6 of each other in practice.
"""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from dslm_hf import DeepScaleLMConfig, DeepScaleLMForCausalLM
from dslm_hf.checkpointing import join_optimizer_state, split_optimizer_state
from dslm_hf.data import CausalLMCollator
from dslm_hf.optimization import depth_parameter_groups
from dslm_hf.pipeline import Pipeline, check_pipeline_layout, stage_layer_range
from pretrain_helpers import free_port

STEPS, BATCH, MICROBATCHES, LENGTH, VOCAB = 20, 8, 4, 16, 96


def tiny_model() -> DeepScaleLMForCausalLM:
    torch.manual_seed(0)
    return DeepScaleLMForCausalLM(DeepScaleLMConfig(
        vocab_size=VOCAB, hidden_size=32, num_attention_heads=2, num_hidden_layers=4, max_position_embeddings=LENGTH,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def batch(step: int) -> torch.Tensor:
    """Arithmetic sequences (random start and stride 1-3, modulo the vocabulary): learnable within a few steps."""
    generator = torch.Generator().manual_seed(step)
    start, stride = torch.randint(VOCAB, (BATCH, 1), generator=generator), torch.randint(1, 4, (BATCH, 1), generator=generator)
    return (start + stride * torch.arange(LENGTH)) % VOCAB  # (B, T)


def parameter_groups(model) -> list[dict]:
    return depth_parameter_groups(model, learning_rate=1e-3, weight_decay=0.01)


def label_count(batch: dict) -> torch.Tensor:
    return CausalLMCollator.count_label_tokens(batch)


@pytest.fixture(scope="module")
def reference_losses() -> list[float]:
    """One process, the whole batch of 8 per step."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=1e-3)
    losses = []
    for step in range(STEPS):
        input_ids = batch(step)
        count = label_count({"labels": input_ids})
        loss = model(input_ids=input_ids, labels=input_ids, num_items_in_batch=count).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def pipeline_worker(rank: int, port: int, folder: str, schedules: list[str], start: int, stop: int, save_at: int | None):
    """Train steps [start, stop) of each schedule in turn on two gloo ranks (resuming from `folder` when start > 0,
    saving there after step `save_at`, in the checkpoint files' layout); rank 0 writes the losses to
    folder/losses-{schedule}-{start}.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    folder = Path(folder)
    try:
        for schedule in schedules:
            model = tiny_model()
            pipeline = Pipeline(model, parameter_groups(model), MICROBATCHES, schedule)
            optimizer = torch.optim.AdamW(pipeline.parameter_groups, lr=1e-3)
            if start:
                rest = json.loads((folder / "optimizer.json").read_text())
                pipeline.load_training_state(optimizer, load_file(folder / "model.safetensors"),
                                              join_optimizer_state(load_file(folder / "optimizer.safetensors"), rest))
            losses = []
            for step in range(start, stop):
                input_ids = batch(step)
                loss, _ = pipeline.train_window([{"input_ids": input_ids, "labels": input_ids}], label_count)
                losses.append(loss.item())
                pipeline.clip_grad_norm_(1.0)
                optimizer.step()
                optimizer.zero_grad()
                if step + 1 == save_at:
                    state = pipeline.training_state(optimizer)
                    if rank == 0:
                        model_state, optimizer_state = state
                        save_file(model_state, folder / "model.safetensors")
                        tensors, rest = split_optimizer_state(optimizer_state)
                        save_file(tensors, folder / "optimizer.safetensors")
                        (folder / "optimizer.json").write_text(json.dumps(rest))
            if rank == 0:
                (folder / f"losses-{schedule}-{start}.json").write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()


def run_pipeline(folder, schedules: list[str], start: int = 0, stop: int = STEPS, save_at: int | None = None) -> dict:
    mp.spawn(pipeline_worker, args=(free_port(), str(folder), schedules, start, stop, save_at), nprocs=2)
    return {s: json.loads((folder / f"losses-{s}-{start}.json").read_text()) for s in schedules}


@pytest.mark.slow
def test_two_stage_pipeline_gpipe_and_1f1b_train_like_one_process_over_20_steps(tmp_path, reference_losses):
    losses = run_pipeline(tmp_path, ["gpipe", "1f1b"])
    for schedule in ("gpipe", "1f1b"):
        assert losses[schedule] == pytest.approx(reference_losses, rel=1e-5), schedule
    assert reference_losses[-1] < reference_losses[0] - 0.25  # it learned: the comparison is not of two flat lines


@pytest.mark.slow
def test_pipeline_checkpoint_resumes_bit_identical_from_the_one_process_layout(tmp_path):
    uninterrupted = run_pipeline(tmp_path, ["1f1b"], stop=8, save_at=4)["1f1b"]
    resumed = run_pipeline(tmp_path, ["1f1b"], start=4, stop=8)["1f1b"]
    assert resumed == uninterrupted[4:]
    # The gathered state has the names and optimizer numbering of one process's model and optimizer.
    model = tiny_model()
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=1e-3)
    model(input_ids=batch(0), labels=batch(0)).loss.backward()
    optimizer.step()
    tensors, rest = split_optimizer_state(optimizer.state_dict())
    assert load_file(tmp_path / "optimizer.safetensors").keys() == tensors.keys()
    saved_groups = json.loads((tmp_path / "optimizer.json").read_text())["param_groups"]
    assert [g["params"] for g in saved_groups] == [g["params"] for g in rest["param_groups"]]
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict()) - {"lm_head.weight"}  # tied: once


def test_stage_layer_ranges_cover_the_stack_evenly():
    assert [list(stage_layer_range(10, 3, s)) for s in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [len(stage_layer_range(192, 8, s)) for s in range(8)] == [24] * 8


@pytest.mark.parametrize("stages, microbatches, message", [
    (5, 4, "more stages than the model's 4 layers"),
    (2, 3, "does not divide the per-step batch of 8"),
])
def test_pipeline_layout_refuses_impossible_splits(stages, microbatches, message):
    with pytest.raises(ValueError, match=message):
        check_pipeline_layout(4, stages, 8, microbatches)
