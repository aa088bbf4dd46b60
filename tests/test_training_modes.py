"""The training modes (dslm_hf.training_modes): every mode has the same operations, the loop in dslm_hf.pretraining
never asks which mode it runs, checkpoints are written and read through one interface in the bytes they had, and a
resume is bit-identical in every mode (DDP, fully_shard, pipeline over two gloo ranks)."""

import inspect
import shutil
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file, save_model

from dslm_hf import pretraining, training_modes
from dslm_hf.checkpointing import OneProcessState, load_checkpoint, save_checkpoint
from dslm_hf.training_modes import AccelerateMode, FullyShardMode, PipelineMode, TrainingMode
from parallel_helpers import LEARNING_RATE, batch, label_count, parameter_groups, tiny_model
from pretrain_helpers import NO_DROPOUT, run_launched, train_losses

MODES = (AccelerateMode, FullyShardMode, PipelineMode)
LOOP = ("setup", "resume", "train_step", "nonfinite_parameters", "save", "train_loop", "stop_on_signal", "finish",
        "train", "release_the_process_group", "save_final_model")


def public_operations(cls) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


@pytest.mark.parametrize("mode", MODES, ids=lambda cls: cls.__name__)
def test_every_mode_implements_exactly_the_base_operations(mode):
    assert issubclass(mode, TrainingMode) and not inspect.isabstract(mode)
    assert public_operations(mode) == public_operations(TrainingMode)


@pytest.mark.parametrize("name", LOOP)
def test_the_loop_never_asks_which_mode_it_runs(name):
    source = inspect.getsource(getattr(pretraining, name))
    for word in ("fully_shard", "pipeline", "Pipeline", "isinstance(run.model", "parallel."):
        assert word not in source, f"{name} mentions {word!r}"


@pytest.mark.parametrize("arguments, mode, data_parallel, shards", [
    ({}, AccelerateMode, 1, 1),
    ({"fully_shard": True}, FullyShardMode, 1, 1),
    ({"pipeline_parallel_size": 2}, PipelineMode, 1, 2),
])
def test_the_factory_picks_the_mode_the_arguments_ask_for(arguments, mode, data_parallel, shards):
    args = SimpleNamespace(**{"pipeline_parallel_size": 1, "pipeline_microbatches": 4, "pipeline_schedule": "1f1b",
                              "fully_shard": False, "mixed_precision": "no", **arguments})
    chosen = training_modes.training_mode(args, Accelerator(cpu=True))
    assert type(chosen) is mode
    assert (chosen.data_parallel_size, chosen.weight_shards) == (data_parallel, shards)


class OneProcess:
    """What save_checkpoint asks of an Accelerator, for one process."""
    is_main_process = True

    @staticmethod
    def wait_for_everyone():
        pass


def steps(model, optimizer, first: int, count: int) -> list[float]:
    losses = []
    for step in range(first, first + count):
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids, num_items_in_batch=label_count({"labels": ids})).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def trained(count: int):
    model = tiny_model()
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=LEARNING_RATE)
    return model, optimizer, steps(model, optimizer, 0, count)


def test_one_process_checkpoint_keeps_its_bytes_and_resumes_bit_identically(tmp_path):
    model, optimizer, _ = trained(2)
    folder = save_checkpoint(OneProcess, tmp_path, OneProcessState(model, optimizer), {"step": 2}, limit=None)
    save_model(model, str(tmp_path / "reference.safetensors"))  # what one-process checkpoints have always held
    assert (folder / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    expected = steps(model, optimizer, 2, 3)
    fresh = tiny_model()
    fresh_optimizer = torch.optim.AdamW(parameter_groups(fresh), lr=LEARNING_RATE)
    assert load_checkpoint(folder, OneProcessState(fresh, fresh_optimizer)) == {"step": 2}
    assert steps(fresh, fresh_optimizer, 2, 3) == expected  # bit-identical floats


def test_one_process_loads_the_sharded_modes_layout_of_a_tied_model(tmp_path):
    """fully_shard and pipeline runs store the tied head under the input embedding's name, one process under
    lm_head.weight: each loads the other's."""
    model, optimizer, _ = trained(1)
    sharded_layout = {name: t for name, t in model.state_dict().items() if name != "lm_head.weight"}
    fresh = tiny_model()
    fresh_optimizer = torch.optim.AdamW(parameter_groups(fresh), lr=LEARNING_RATE)
    OneProcessState(fresh, fresh_optimizer).load_training_state(sharded_layout, optimizer.state_dict())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    save_file({k: v.contiguous() for k, v in sharded_layout.items()}, tmp_path / "m.safetensors")
    assert set(load_file(tmp_path / "m.safetensors")) == set(sharded_layout)


RUN = ["--max_steps", 4, "--eval_steps", 100, "--save_steps", 2, "--learning_rate", 5e-4, *NO_DROPOUT]
LAUNCHED_MODES = {
    "ddp": ["--per_device_train_batch_size", 4],
    "fully_shard": ["--per_device_train_batch_size", 4, "--fully_shard"],
    "pipeline": ["--per_device_train_batch_size", 8, "--pipeline_parallel_size", 2, "--pipeline_microbatches", 4],
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(LAUNCHED_MODES))
def test_a_resume_is_bit_identical_in_every_mode(tmp_path, mode):
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run_launched(uninterrupted, *RUN, *LAUNCHED_MODES[mode], processes=2)
    shutil.copytree(uninterrupted, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    run_launched(resumed, *RUN, *LAUNCHED_MODES[mode], "--resume_from_checkpoint", "latest", processes=2)
    expected, losses = train_losses(uninterrupted), train_losses(resumed)
    assert sorted(expected) == [1, 2, 3, 4] and losses == expected  # bit-identical floats
    step_4 = [folder / "checkpoints" / "step_00000004" / "model.safetensors" for folder in (uninterrupted, resumed)]
    assert step_4[0].read_bytes() == step_4[1].read_bytes()


@pytest.mark.parametrize("order", ["encoder-first", "decoder-first"])
def test_tied_copies_fill_a_chain_whatever_the_order_of_the_pairs(order):
    """A one-process seq2seq checkpoint stores the three tied tensors once, as lm_head.weight (safetensors keeps the
    alphabetically first name); the resume fills the encoder and decoder embeddings whichever pair comes first."""
    from dslm_hf.parallel import with_tied_copies
    pairs = {"encoder.embed_tokens.weight": "lm_head.weight",
             "decoder.embed_tokens.weight": "encoder.embed_tokens.weight"}
    if order == "decoder-first":
        pairs = dict(reversed(list(pairs.items())))
    weight = torch.ones(2)
    state = with_tied_copies(SimpleNamespace(_tied_weights_keys=pairs), {"lm_head.weight": weight})
    assert sorted(state) == ["decoder.embed_tokens.weight", "encoder.embed_tokens.weight", "lm_head.weight"]
    assert all(tensor is weight for tensor in state.values())
