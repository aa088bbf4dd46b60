"""The training modes of dslm-pretrain, one object each with the same operations, so that the loop reads the same in
every mode (torchtitan keeps its parallelisms apart from its loop the same way):

    wrap(model, parameter_groups)        parallelize the built model (shard it, split it into stages); returns the
                                         optimizer's parameter groups
    prepare(optimizer, train, eval)      hand what needs it to accelerate; returns the loaders
    train_window(window, collator)       forward and backward over one accumulation window: (mean token loss, finite)
    clip_grad_norm_(max_norm)            the whole model's gradient norm, clipped (None where the engine clips)
    training_state() / load_training_state(model_state, optimizer_state)
                                         the whole model and optimizer in one process's layout, as checkpoints hold
                                         them (dslm_hf.checkpointing.Checkpointable)
    full_model()                         (whole model, its state dict) for the final folder, None on ranks that do
                                         not write

`training_mode(args, accelerator)` picks the mode once. A new parallelism is a new class here; the loop in
dslm_hf.pretraining does not change.
"""

from abc import ABC, abstractmethod
from contextlib import nullcontext

import torch
from accelerate.utils import DistributedType

from . import parallel
from .checkpointing import OneProcessState
from .cli import UserError
from .pipeline import Pipeline


def compute_loss(model, batch: dict, num_items_in_batch: torch.Tensor) -> torch.Tensor:
    """Sum of this micro-batch's token losses divided by the label tokens of the whole window on all ranks."""
    return model(**batch, num_items_in_batch=num_items_in_batch).loss


def training_window(accelerator, model, batches: list[dict], collator) -> tuple[torch.Tensor, bool]:
    """Forward/backward over one accumulation window with token-level normalisation.

    The label tokens of the window are counted on every rank and summed, so each micro-batch's loss is its token
    sum over that global count; DDP averages gradients over ranks, hence the factor num_processes. Returns the
    window's mean token loss (all ranks) and whether every micro-batch was finite (agreed on by all ranks; a
    non-finite one stops the window before its backward so the gradients stay clean).
    """
    local_items = sum(collator.count_label_tokens(b) for b in batches)
    items = accelerator.reduce(local_items.to(accelerator.device), "sum")
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for index, batch in enumerate(batches):
        last = index == len(batches) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            loss = compute_loss(model, batch, items)
            nonfinite = accelerator.reduce((~torch.isfinite(loss.detach())).float(), "sum")
            if nonfinite.item() > 0:
                return loss_sum, False
            accelerator.backward(loss * accelerator.num_processes)
            loss_sum += loss.detach().double() * items
    return accelerator.reduce(loss_sum, "sum") / items, True


class TrainingMode(ABC):
    """One way of training a model over the launched processes. After `wrap` and `prepare`, `model` is what the loop
    calls (training, evaluation) and `optimizer` what it steps."""

    description = ""  # appended to the setup line that names the processes

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.model = self.optimizer = None

    @property
    def data_parallel_size(self) -> int:
        """How many processes read different batches."""
        return self.accelerator.num_processes

    @property
    def weight_shards(self) -> int:
        """Into how many parts the weights, gradients and optimizer state are split (for the memory check)."""
        return 1

    @property
    def has_replicas(self) -> bool:
        """Whether every process holds the whole model (whose copies must agree)."""
        return False

    @abstractmethod
    def wrap(self, model: torch.nn.Module, parameter_groups) -> list[dict]:
        """Take the built model; `parameter_groups(module)` makes the optimizer groups. Returns this rank's groups."""

    @abstractmethod
    def prepare(self, optimizer, train_loader, eval_loader) -> tuple:
        """Keep the optimizer; returns the (train, eval) loaders as this mode reads them."""

    @abstractmethod
    def train_window(self, window: list[dict], collator) -> tuple[torch.Tensor, bool]:
        """Forward and backward over one accumulation window: (mean token loss on every rank, finite)."""

    @abstractmethod
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor | None:
        """The whole model's gradient norm, gradients clipped to `max_norm`."""

    @abstractmethod
    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """This rank's parameters by name (local shards, or this stage's)."""

    @abstractmethod
    def training_state(self) -> tuple | None:
        """(model tensors or the whole model, optimizer state) to checkpoint; None on ranks that do not write.
        A collective where the state is spread over ranks."""

    @abstractmethod
    def load_training_state(self, model_state: dict, optimizer_state: dict) -> None:
        """Take this rank's part of a whole-model training state (tensors by name, optimizer.state_dict() layout)."""

    @abstractmethod
    def full_model(self) -> tuple[torch.nn.Module | None, dict | None]:
        """(whole model, state dict) to save_pretrained; (None, None) on ranks that do not write. A collective."""


class AccelerateMode(TrainingMode):
    """accelerate's own modes: one process, DDP replicas, or accelerate's FSDP/DeepSpeed plugins."""

    @property
    def has_replicas(self) -> bool:
        return self.accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def wrap(self, model, parameter_groups):
        self.model = model
        return parameter_groups(model)

    def prepare(self, optimizer, train_loader, eval_loader):
        self.model, self.optimizer, train_loader, eval_loader = self.accelerator.prepare(
            self.model, optimizer, train_loader, eval_loader)
        return train_loader, eval_loader

    def train_window(self, window, collator):
        return training_window(self.accelerator, self.model, window, collator)

    def clip_grad_norm_(self, max_norm):
        # DeepSpeed clips inside its engine (gradient_clipping in its config) and returns no norm.
        return parallel.grad_norm_value(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))

    def named_parameters(self):
        return list(self.model.named_parameters())

    def _one_process(self) -> OneProcessState:
        return OneProcessState(self.accelerator.unwrap_model(self.model), self.optimizer)

    def training_state(self):
        return self._one_process().training_state()

    def load_training_state(self, model_state, optimizer_state):
        self._one_process().load_training_state(model_state, optimizer_state)

    def full_model(self):
        return self.accelerator.unwrap_model(self.model), self.accelerator.get_state_dict(self.model)


class FullyShardMode(AccelerateMode):
    """FSDP2 (`fully_shard`, dslm_hf.parallel) over the launched processes: each holds a shard of every parameter."""

    description = ", fully_shard"

    def __init__(self, accelerator, mixed_precision: str):
        super().__init__(accelerator)
        self.mixed_precision = mixed_precision

    @property
    def weight_shards(self) -> int:
        return self.accelerator.num_processes

    @property
    def has_replicas(self) -> bool:
        return False

    def wrap(self, model, parameter_groups):
        if not torch.distributed.is_initialized():
            raise UserError("--fully_shard shards over the processes of a process group: launch through torchrun or a "
                            "multi-process accelerate launch (e.g. ACCELERATE_USE_CPU=true dslm-pretrain --num_processes 2 ...)")
        self.model = parallel.shard_model(model.to(self.accelerator.device), mixed_precision=self.mixed_precision)
        return parameter_groups(self.model)

    def prepare(self, optimizer, train_loader, eval_loader):
        # The model is already sharded: accelerate must not wrap it in DDP.
        self.optimizer, train_loader, eval_loader = self.accelerator.prepare(optimizer, train_loader, eval_loader)
        return train_loader, eval_loader

    def training_state(self):
        return parallel.sharded_training_state(self.model, self.optimizer)

    def load_training_state(self, model_state, optimizer_state):
        parallel.load_sharded_training_state(self.model, self.optimizer, model_state, optimizer_state)

    def full_model(self):
        full = parallel.full_state_dict(self.model)  # collective: every rank takes part
        if not self.accelerator.is_main_process:
            return None, None
        whole = parallel.unsharded_copy(self.model, full)
        return whole, whole.state_dict()  # tied weights share storage again


class PipelineMode(TrainingMode):
    """A pipeline (dslm_hf.pipeline.Pipeline), one stage per process; every stage reads the same batches."""

    def __init__(self, accelerator, num_stages: int, num_microbatches: int, schedule: str):
        super().__init__(accelerator)
        self.num_stages, self.num_microbatches, self.schedule = num_stages, num_microbatches, schedule

    @property
    def data_parallel_size(self) -> int:
        return 1

    @property
    def weight_shards(self) -> int:
        return self.num_stages

    def wrap(self, model, parameter_groups):
        processes = self.accelerator.num_processes
        if processes != self.num_stages:
            raise UserError(f"--pipeline_parallel_size={self.num_stages} needs exactly that many processes, "
                            f"{processes} were launched (pipelines do not combine with data parallelism here)")
        groups = parameter_groups(model)  # the whole model's groups, built before the split
        self.model = Pipeline(model, groups, self.num_microbatches, self.schedule, device=self.accelerator.device)
        return self.model.parameter_groups

    def prepare(self, optimizer, train_loader, eval_loader):
        self.optimizer = optimizer  # a pipeline's stages read the whole batches, nothing to wrap
        return train_loader, eval_loader

    def train_window(self, window, collator):
        return self.model.train_window(window, collator.count_label_tokens)

    def clip_grad_norm_(self, max_norm):
        return self.model.clip_grad_norm_(max_norm)  # the norm over all stages

    def named_parameters(self):
        return list(self.model.module.named_parameters())

    def training_state(self):
        return self.model.training_state(self.optimizer)

    def load_training_state(self, model_state, optimizer_state):
        self.model.load_training_state(self.optimizer, model_state, optimizer_state)

    def full_model(self):
        full = self.model.full_model_state()  # collective: every stage sends its layers to the first
        if not self.accelerator.is_main_process:
            return None, None
        whole = parallel.unsharded_copy(self.model.module.model, full)
        return whole, whole.state_dict()


def training_mode(args, accelerator) -> TrainingMode:
    """The mode the arguments ask for (dslm_hf.pretraining.PretrainingArguments)."""
    if args.pipeline_parallel_size > 1:
        return PipelineMode(accelerator, args.pipeline_parallel_size, args.pipeline_microbatches, args.pipeline_schedule)
    if args.fully_shard:
        return FullyShardMode(accelerator, args.mixed_precision)
    return AccelerateMode(accelerator)
