"""Pipeline parallelism for very deep stacks with torch.distributed.pipelining (its PipelineStage and its GPipe and
1F1B schedules; nothing here schedules anything itself).

Depth is what a pipeline splits: stage s of N holds a contiguous run of layers (by layer index, as even as
possible), the first stage also the embeddings, the last the final norm and the head. Every rank builds the same
model (same seed, so the same initialisation as one process) and keeps only its stage: the kept layers stay under
their global index (`model.layers.37...`), so a stage's state dict is a slice of the whole model's and the
checkpoint shards of all stages form one ordinary state dict. A tied output embedding lives on the first stage (as
input embedding) and on the last (as head): its two gradients are summed after each backward, so both copies take
the same optimizer steps as the single tied parameter of one process.

The loss is token-level over the whole accumulation window (the model's own loss function with
`num_items_in_batch`, as in single-process training) and the schedules do not rescale gradients
(`scale_grads=False`), so N stages and M micro-batches compute the same gradients as one process with the same
batch, up to float summation order.
"""

import json

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from transformers.modeling_outputs import CausalLMOutput

from . import parallel
from .checkpointing import join_optimizer_state, split_optimizer_state
from .layers import find_layer_stacks
from .modeling_deepscalelm import IGNORE_INDEX

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def layer_list_name(base_model: nn.Module) -> str:
    """The attribute of `base_model` holding its repeated layers (`dslm_hf.layers.find_layer_stacks`): one stack,
    a direct child, as a decoder-only model has."""
    names = [name for name, _ in find_layer_stacks(base_model)]
    if len(names) != 1 or "." in names[0]:
        raise ValueError(f"{type(base_model).__name__} has layer stacks {names}: pipeline parallelism splits one "
                         "stack held by the base model (a decoder-only model)")
    return names[0]


def check_pipeline_layout(num_layers: int, num_stages: int, batch_sizes: dict[str, int], num_microbatches: int) -> None:
    """ValueError naming the setting and what to do when the stack or a batch ({flag: size}) cannot be split."""
    if num_stages > num_layers:
        raise ValueError(f"--pipeline_parallel_size={num_stages} is more stages than the model's {num_layers} layers: "
                         f"use at most {num_layers} stages")
    for flag, size in batch_sizes.items():
        if num_microbatches < 1 or size % num_microbatches:
            raise ValueError(f"--pipeline_microbatches={num_microbatches} does not divide {flag}={size}: pick a divisor "
                             "of it (each batch is split into that many micro-batches)")


def stage_layer_range(num_layers: int, num_stages: int, stage: int) -> range:
    """The layers of `stage`: contiguous, sizes differing by at most one (earlier stages take the extra ones)."""
    size, extra = divmod(num_layers, num_stages)
    start = stage * size + min(stage, extra)
    return range(start, start + size + (stage < extra))


class StageLayers(nn.ModuleDict):
    """A stage's layers under their global indices; iterates over the layers in order, like the ModuleList it
    replaces, so the model's own forward runs them unchanged."""

    def __iter__(self):
        return iter(self.values())


class PipelineStageModel(nn.Module):
    """One stage: the model pruned to its layers; takes token ids (first stage) or the stream, returns the stream
    (inner stages) or the logits (last stage).

    Held as `self.model` so that `self.model.state_dict()` has the whole model's names."""

    def __init__(self, model: nn.Module, stage: int, num_stages: int):
        super().__init__()
        base = model.base_model
        name = layer_list_name(base)
        layers = getattr(base, name)
        kept = stage_layer_range(len(layers), num_stages, stage)
        setattr(base, name, StageLayers({str(i): layers[i] for i in kept}))
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.ties_embedding = bool(getattr(model.config, "tie_word_embeddings", False)) and num_stages > 1
        if not self.is_first:  # the stream arrives embedded: the embedding side is the first stage's
            base.embed_positions = base.embed_token_types = base.embed_norm = None
            base.embed_dropout = nn.Identity()
            if not (self.is_last and self.ties_embedding):
                base.embed_tokens = None
        if not self.is_last:  # the head side is the last stage's
            base.norm = None
            for child_name, child in list(model.named_children()):
                if child is not base:
                    setattr(model, child_name, None)
        self.model = model

    def forward(self, stream: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": stream} if self.is_first else {"inputs_embeds": stream}
        if self.is_last:
            return self.model(**inputs, use_cache=False).logits
        return self.model.base_model(**inputs, use_cache=False).last_hidden_state

    def tied_embedding(self) -> nn.Parameter | None:
        """The tied embedding/head weight on the first and last stage (None elsewhere or when untied)."""
        if not self.ties_embedding or not (self.is_first or self.is_last):
            return None
        return self.model.base_model.embed_tokens.weight

    def owned_parameters(self) -> list[nn.Parameter]:
        """This stage's parameters, the tied embedding counted on the first stage only (for the global norm)."""
        tied = self.tied_embedding() if self.is_last else None
        return [p for p in self.model.parameters() if p is not tied]


def _send_tensors(tensors: dict[str, torch.Tensor], header: dict, destination: int, group, device) -> None:
    """Send named tensors (and a JSON-able header) to one rank: a JSON description first, then the tensors."""
    description = json.dumps({"header": header, "tensors": [[name, list(t.shape), str(t.dtype).removeprefix("torch.")]
                                                             for name, t in tensors.items()]}).encode()
    dist.send(torch.tensor([len(description)], device=device), destination, group=group)
    dist.send(torch.frombuffer(bytearray(description), dtype=torch.uint8).to(device), destination, group=group)
    for tensor in tensors.values():
        dist.send(tensor.detach().contiguous().to(device), destination, group=group)


def _receive_tensors(source: int, group, device) -> tuple[dict[str, torch.Tensor], dict]:
    length = torch.zeros(1, dtype=torch.long, device=device)
    dist.recv(length, source, group=group)
    description = torch.empty(int(length), dtype=torch.uint8, device=device)
    dist.recv(description, source, group=group)
    description = json.loads(bytes(description.cpu().tolist()).decode())
    tensors = {}
    for name, shape, dtype in description["tensors"]:
        tensors[name] = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.recv(tensors[name], source, group=group)
        tensors[name] = tensors[name].cpu()
    return tensors, description["header"]


class Pipeline:
    """A model split into stages over a process group, one stage per rank, trained with a torch.distributed.pipelining
    schedule.

    Build it from the whole model and that model's optimizer parameter groups (before the split, so depth-dependent
    groups see the whole stack); make the optimizer from `self.parameter_groups`. `train_window` runs an
    accumulation window forward and backward; `clip_grad_norm_`, `training_state`/`load_training_state` and
    `full_model_state` stand in for what one process does on its whole model. Called like a model (`pipeline(
    input_ids=..., labels=...)`) it evaluates a batch, so held-out evaluation code works unchanged.
    """

    def __init__(self, model: nn.Module, parameter_groups: list[dict], num_microbatches: int, schedule: str = "1f1b",
                 group=None, device: torch.device | str = "cpu"):
        if schedule not in SCHEDULES:
            raise ValueError(f"--pipeline_schedule={schedule!r}: expected one of {sorted(SCHEDULES)}")
        self.group = group or dist.group.WORLD
        self.num_stages = dist.get_world_size(self.group)
        self.stage_index = dist.get_rank(self.group)
        self.device = torch.device(device)
        self.config = model.config
        self.loss_function = model.loss_function
        number = {id(p): i for i, p in enumerate(p for group in parameter_groups for p in group["params"])}
        self.group_numbers = [[number[id(p)] for p in group["params"]] for group in parameter_groups]
        self.module = PipelineStageModel(model, self.stage_index, self.num_stages).to(self.device)
        kept = {id(p) for p in self.module.parameters()}
        self.parameter_groups = [{**group, "params": [p for p in group["params"] if id(p) in kept]}
                                 for group in parameter_groups]
        # The number each of this stage's optimizer entries has in the whole model's optimizer.
        self.numbers = [number[id(p)] for group in self.parameter_groups for p in group["params"]]
        self.stage = PipelineStage(self.module, self.stage_index, self.num_stages, self.device, group=self.group)
        self.schedule = SCHEDULES[schedule](self.stage, num_microbatches, loss_fn=self._loss, scale_grads=False)
        self.ranks = [dist.get_global_rank(self.group, stage) for stage in range(self.num_stages)]
        # new_group is collective over the whole world: every rank creates it, only the two ends use it.
        self.ends_group = dist.new_group([self.ranks[0], self.ranks[-1]]) if self.module.ties_embedding else None

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor) -> torch.Tensor:
        return self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                  num_items_in_batch=num_items_in_batch)

    def _run(self, run, input_ids: torch.Tensor, labels: torch.Tensor, num_items: torch.Tensor) -> torch.Tensor:
        """The batch's token losses summed over micro-batches and divided by num_items, on every rank."""
        losses = []
        run(input_ids.to(self.device) if self.module.is_first else None,
            target=labels.to(self.device) if self.module.is_last else None,
            losses=losses if self.module.is_last else None, loss_kwargs={"num_items_in_batch": num_items.to(self.device)})
        total = torch.stack(losses).sum().detach().float() if self.module.is_last else torch.zeros((), device=self.device)
        dist.broadcast(total, self.ranks[-1], group=self.group)
        return total

    def train_window(self, batches: list[dict], count_label_tokens) -> tuple[torch.Tensor, bool]:
        """Forward and backward over an accumulation window (token-level loss over the whole window); the gradients
        of the tied embedding are then summed across its two stages. Returns (mean token loss, finite)."""
        items = sum(count_label_tokens(batch) for batch in batches)
        loss = sum(self._run(self.schedule.step, b["input_ids"], b["labels"], items) for b in batches)
        tied = self.module.tied_embedding()
        if tied is not None and tied.grad is not None:
            dist.all_reduce(tied.grad, group=self.ends_group)
        return loss, bool(torch.isfinite(loss))

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The gradient norm over all stages (as one process computes it), clipping to `max_norm` when positive."""
        grads = [p.grad for p in self.module.owned_parameters() if p.grad is not None]
        squared = torch.nn.utils.get_total_norm(grads).double().square() if grads else torch.zeros((), dtype=torch.float64)
        squared = squared.to(self.device)
        dist.all_reduce(squared, group=self.group)
        total = squared.sqrt().float()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(list(self.module.model.parameters()), max_norm, total)
        return total

    # Evaluation through the model interface ------------------------------------------------------------------
    @property
    def training(self) -> bool:
        return self.module.training

    def train(self, mode: bool = True) -> "Pipeline":
        self.module.train(mode)
        return self

    def eval(self) -> "Pipeline":
        return self.train(False)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor, **unused) -> CausalLMOutput:
        """The batch's mean token loss (every rank gets it); the other inputs (an all-ones attention mask) are
        implied by packed blocks."""
        count = (labels[:, 1:] != IGNORE_INDEX).sum()  # the causal LM's label tokens after its shift
        return CausalLMOutput(loss=self._run(self.schedule.eval, input_ids, labels, count))

    # Checkpoints ---------------------------------------------------------------------------------------------
    def _foreign_tied(self) -> nn.Parameter | None:
        """The tied embedding on the last stage: a copy of the first stage's, which owns it in checkpoints."""
        return self.module.tied_embedding() if self.module.is_last and not self.module.is_first else None

    def _owned_model_state(self) -> dict[str, torch.Tensor]:
        model = self.module.model
        state = {name: t.cpu() for name, t in parallel.without_tied_copies(model, model.state_dict()).items()}
        if self._foreign_tied() is not None:
            state = {name: t for name, t in state.items() if name not in set(model._tied_weights_keys.values())}
        return state

    def _owned_optimizer_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """This stage's optimizer tensors keyed '<whole-model number>.<name>', and its non-tensor entries."""
        tied = self._foreign_tied()
        local = [p for group in self.parameter_groups for p in group["params"]]
        entries = optimizer.state_dict()["state"]
        tensors, rest = split_optimizer_state({"param_groups": [], "state": {
            self.numbers[i]: v for i, v in entries.items() if tied is None or local[i] is not tied}})
        return tensors, rest["state"]

    def training_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict, dict] | None:
        """(model tensors, optimizer state) of the whole model, gathered on the first stage in the layout one process
        saves; None on the other stages. A collective over the pipeline group."""
        model_state = self._owned_model_state()
        optimizer_tensors, scalars = self._owned_optimizer_state(optimizer)
        if self.stage_index != 0:
            _send_tensors({**{f"model:{n}": t for n, t in model_state.items()},
                           **{f"optimizer:{n}": t for n, t in optimizer_tensors.items()}}, scalars,
                          self.ranks[0], self.group, self.device)
            return None
        for source in self.ranks[1:]:
            tensors, more_scalars = _receive_tensors(source, self.group, self.device)
            for name, tensor in tensors.items():
                kind, name = name.split(":", 1)
                (model_state if kind == "model" else optimizer_tensors)[name] = tensor
            scalars.update(more_scalars)
        groups = optimizer.state_dict()["param_groups"]
        rest = {"state": scalars, "param_groups": [{**g, "params": n} for g, n in zip(groups, self.group_numbers)]}
        return model_state, join_optimizer_state(optimizer_tensors, rest)

    def load_training_state(self, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict) -> None:
        """Take this stage's part of a whole-model training state (as one process or training_state saves it)."""
        model = self.module.model
        whole = parallel.with_tied_copies(model, model_state)
        model.load_state_dict({name: whole[name] for name in model.state_dict()})
        local = optimizer.state_dict()
        saved = {int(n): entries for n, entries in optimizer_state["state"].items()}
        optimizer.load_state_dict({
            "state": {i: saved[n] for i, n in enumerate(self.numbers) if n in saved},
            "param_groups": [{**g, "params": l["params"]} for g, l in zip(optimizer_state["param_groups"], local["param_groups"])]})

    def full_model_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model's tensors on the first stage (None elsewhere), e.g. for save_pretrained. Collective."""
        model_state = self._owned_model_state()
        if self.stage_index != 0:
            _send_tensors(model_state, {}, self.ranks[0], self.group, self.device)
            return None
        for source in self.ranks[1:]:
            model_state.update(_receive_tensors(source, self.group, self.device)[0])
        return parallel.with_tied_copies(self.module.model, model_state)
