"""Shared pieces of the standalone multi-process tests (FSDP2, pipeline): a tiny causal model, learnable batches, the
one-process reference run, two gloo ranks through torch.multiprocessing, and the training state in the files a
checkpoint holds (model.safetensors, optimizer.safetensors + the optimizer's JSON part)."""

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from dslm_hf import DeepScaleLMForCausalLM
from dslm_hf.checkpointing import join_optimizer_state, split_optimizer_state
from dslm_hf.data import CausalLMCollator
from dslm_hf.optimization import depth_parameter_groups
from pretrain_helpers import free_port
import tiny_models

STEPS, BATCH, LENGTH, VOCAB, LEARNING_RATE = 20, 8, 16, 96, 1e-3


def tiny_model() -> DeepScaleLMForCausalLM:
    """4 layers, 32 wide, no dropout: the same initialisation in every process (seed 0)."""
    return tiny_models.tiny_model(vocab_size=VOCAB, num_hidden_layers=4, max_position_embeddings=LENGTH, dropout=0.0,
                                  seed=0).train()


def batch(step: int) -> torch.Tensor:
    """Arithmetic sequences (random start and stride 1-3, modulo the vocabulary): learnable within a few steps."""
    generator = torch.Generator().manual_seed(step)
    start, stride = torch.randint(VOCAB, (BATCH, 1), generator=generator), torch.randint(1, 4, (BATCH, 1), generator=generator)
    return (start + stride * torch.arange(LENGTH)) % VOCAB  # (B, T)


def parameter_groups(model) -> list[dict]:
    return depth_parameter_groups(model, learning_rate=LEARNING_RATE, weight_decay=0.01)


def label_count(batch: dict) -> torch.Tensor:
    return CausalLMCollator.count_label_tokens(batch)


def one_process_run(steps: int = STEPS) -> tuple[list[float], DeepScaleLMForCausalLM, torch.optim.Optimizer]:
    """(losses, model, optimizer) of one process training on the whole batch of 8 per step, clipping at 1."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=LEARNING_RATE)
    losses = []
    for step in range(steps):
        input_ids = batch(step)
        loss = model(input_ids=input_ids, labels=input_ids, num_items_in_batch=label_count({"labels": input_ids})).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, model, optimizer


def _join_group(rank: int, port: int, worker, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def two_gloo_ranks(worker, *args) -> None:
    """worker(rank, *args) in two processes joined in one gloo process group on a free port. Forked, not spawned:
    a spawned child spends ~10 s importing torch and transformers again."""
    mp.start_processes(_join_group, args=(free_port(), worker, args), nprocs=2, start_method="fork")


def write_state(folder: Path, model_state: dict, optimizer_state: dict) -> None:
    save_file(model_state, folder / "model.safetensors")
    tensors, rest = split_optimizer_state(optimizer_state)
    save_file(tensors, folder / "optimizer.safetensors")
    (folder / "optimizer.json").write_text(json.dumps(rest))


def read_state(folder: Path) -> tuple[dict, dict]:
    rest = json.loads((folder / "optimizer.json").read_text())
    return load_file(folder / "model.safetensors"), join_optimizer_state(load_file(folder / "optimizer.safetensors"), rest)


def assert_one_process_layout(folder: Path) -> None:
    """The saved state has exactly the tensor names and optimizer numbering one process's model and AdamW have."""
    _, model, optimizer = one_process_run(steps=1)
    tensors, rest = split_optimizer_state(optimizer.state_dict())
    model_state, optimizer_state = read_state(folder)
    assert set(model_state) == set(model.state_dict()) - {"lm_head.weight"}  # the tied head is stored once
    assert split_optimizer_state(optimizer_state)[0].keys() == tensors.keys()
    assert [g["params"] for g in optimizer_state["param_groups"]] == [g["params"] for g in rest["param_groups"]]


def write_losses(folder: Path, name: str, losses: list[float]) -> None:
    (Path(folder) / f"losses-{name}.json").write_text(json.dumps(losses))


def read_losses(folder: Path, name: str) -> list[float]:
    return json.loads((Path(folder) / f"losses-{name}.json").read_text())
