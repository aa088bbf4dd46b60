"""Signal propagation during training: per-layer gradient spread, the variance of each pre-LayerNorm sum and its
shared-across-tokens fraction (rank collapse), measured every `every` steps.

DeepScaleLM keeps these flat at initialisation; this module says whether training keeps them so. One monitor for
every loop: the pretraining loop calls `monitor.measure(step)` between backward and the optimizer step, and
`LayerSignalCallback` does the same inside `transformers.Trainer` (its `on_pre_optimizer_step` hook):

    from dslm_hf.monitoring import LayerSignalCallback
    trainer = Trainer(model=model, args=args, ..., callbacks=[LayerSignalCallback(every=25)])

What is measured, per layer l of the first layer stack:
  grad_norm[l]       norm of the gradient of the layer's weight matrices
  sum_variance[l]    mean square of the input of the layer's last LayerNorm (Post-LN: the residual sum
                     lambda*x + beta*F(x) that the LayerNorm divides by its std; Pre-LN: the stream the next layer reads)
  shared_fraction[l] the correlation of two positions of that sum (`measurements.token_correlation`): 0 for
                     independent tokens, 1 when every position holds the same vector (rank collapse)
and the summaries `grad_first_last` (first layer / last layer gradient norm: 1 when the gradient is flat over depth) and
`grad_spread` (max / min over layers).
"""

import json
import math
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from .layers import find_layer_stacks
from .measurements import token_correlation, weight_gradient_norm

SCALARS = ("grad_first_last", "grad_spread", "sum_variance_min", "sum_variance_max", "shared_fraction_max")


def _last_norm(layer: torch.nn.Module) -> torch.nn.LayerNorm | None:
    norms = [m for m in layer.modules() if isinstance(m, torch.nn.LayerNorm)]
    return norms[-1] if norms else None


class LayerSignalMonitor:
    """Hooks on the first layer stack of `model`; `measure(step)` returns this step's values, or None off-schedule.

    Forward hooks record only on measuring steps (`arm(step)` before the forward), so the cost on the other steps is
    one Python check per layer.
    """

    def __init__(self, model: torch.nn.Module, every: int = 25):
        if every < 1:
            raise ValueError(f"LayerSignalMonitor every={every}: expected a positive number of steps")
        self.every = every
        stacks = find_layer_stacks(model)
        if not stacks:
            raise ValueError(f"{type(model).__name__} has no layer stack (an nn.ModuleList of the classes its "
                             "_no_split_modules names): LayerSignalMonitor measures transformers built as a list of layers")
        (_, self.layers), *_ = stacks
        self.post_norm = getattr(model.config, "norm_placement", "pre") == "post"
        self._armed = False
        self._sums: dict[int, tuple[float, float]] = {}
        self._handles = []
        for index, layer in enumerate(self.layers):
            if self.post_norm and _last_norm(layer) is not None:
                self._handles.append(_last_norm(layer).register_forward_pre_hook(self._input_hook(index)))
            else:
                self._handles.append(layer.register_forward_hook(self._output_hook(index)))

    def _record(self, index: int, hidden: torch.Tensor):
        if self._armed and index not in self._sums:
            hidden = hidden.detach()
            self._sums[index] = (float(hidden.double().pow(2).mean()), token_correlation(hidden) if hidden.shape[1] > 1 else float("nan"))

    def _input_hook(self, index):
        def hook(module, args):
            self._record(index, args[0])
        return hook

    def _output_hook(self, index):
        def hook(module, args, output):
            self._record(index, output[0] if isinstance(output, tuple) else output)
        return hook

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def arm(self, step: int):
        """Call before the forward of `step`: hooks record that forward if the step is on the schedule."""
        self._armed = self.due(step)
        self._sums = {}

    def measure(self, step: int) -> dict | None:
        """Call after backward (gradients present): the per-layer profiles and summary scalars, or None."""
        if not self.due(step):
            return None
        self._armed = False
        grads = [weight_gradient_norm(layer) for layer in self.layers]
        grads = [float("nan") if g is None else g for g in grads]
        variances = [self._sums.get(i, (float("nan"), float("nan")))[0] for i in range(len(self.layers))]
        shared = [self._sums.get(i, (float("nan"), float("nan")))[1] for i in range(len(self.layers))]
        finite = [g for g in grads if math.isfinite(g)]
        finite_var = [v for v in variances if math.isfinite(v)]
        finite_shared = [s for s in shared if math.isfinite(s)]
        return {
            "step": step,
            "grad_norm": grads, "sum_variance": variances, "shared_fraction": shared,
            "grad_first_last": grads[0] / grads[-1] if grads and grads[-1] > 0 else float("nan"),
            "grad_spread": max(finite) / min(finite) if finite and min(finite) > 0 else float("nan"),
            "sum_variance_min": min(finite_var, default=float("nan")),
            "sum_variance_max": max(finite_var, default=float("nan")),
            "shared_fraction_max": max(finite_shared, default=float("nan")),
        }

    @staticmethod
    def scalars(values: dict, prefix: str = "signals/") -> dict:
        """The summary numbers as flat scalars for trackers (TensorBoard, metrics.jsonl)."""
        return {prefix + name: values[name] for name in SCALARS}

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []


class LayerSignalCallback(TrainerCallback):
    """`LayerSignalMonitor` inside `transformers.Trainer`: profiles to `<output_dir>/layer_signals.jsonl`, summary
    scalars to the Trainer's log history and, when `report_to` includes tensorboard, to TensorBoard."""

    def __init__(self, every: int = 25):
        self.every = every
        self.monitor = None
        self.writer = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.monitor = LayerSignalMonitor(model, self.every)
        self.path = Path(args.output_dir) / "layer_signals.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if "tensorboard" in (args.report_to or []) and state.is_world_process_zero:
            from torch.utils.tensorboard import SummaryWriter

            # beside Trainer's own TensorBoard events (TENSORBOARD_LOGGING_DIR, else <output_dir>/runs)
            log_dir = os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs")
            self.writer = SummaryWriter(log_dir=os.path.join(log_dir, "layer_signals"))
        self.monitor.arm(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.monitor.arm(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        values = self.monitor.measure(state.global_step)
        if values is None or not state.is_world_process_zero:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(values) + "\n")
        scalars = LayerSignalMonitor.scalars(values)
        state.log_history.append({**scalars, "step": state.global_step})
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.remove()
        if self.writer is not None:
            self.writer.close()


def read_signals(path: str | Path) -> list[dict]:
    """The rows of a `layer_signals.jsonl` (or of a metrics.jsonl holding `signals/...` profiles)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_signals(rows: list[dict], path: str | Path):
    """Per-layer gradient norm, sum variance and shared fraction, one curve per measured step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    colours = plt.cm.viridis([i / max(1, len(rows) - 1) for i in range(len(rows))])
    for row, colour in zip(rows, colours):
        for axis, key in zip(axes, ("grad_norm", "sum_variance", "shared_fraction")):
            axis.plot(range(len(row[key])), row[key], color=colour, label=f"step {row['step']}")
    for axis, (key, log) in zip(axes, (("gradient norm", True), ("pre-LN sum variance", True), ("shared fraction", False))):
        axis.set(xlabel="layer", ylabel=key, yscale="log" if log else "linear")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


__all__ = ["LayerSignalMonitor", "LayerSignalCallback", "read_signals", "plot_signals"]
