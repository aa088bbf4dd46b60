"""Signal propagation during training (dslm_hf.monitoring): the monitor's numbers, in a loop and inside Trainer."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from dslm_hf import DeepScaleLMForCausalLM
from dslm_hf.measurements import token_correlation
from dslm_hf.monitoring import LayerSignalCallback, LayerSignalMonitor, plot_signals, read_signals
from tiny_models import tiny_model


def post_ln_model(layers: int = 6) -> DeepScaleLMForCausalLM:
    return tiny_model(vocab_size=62, num_hidden_layers=layers, max_position_embeddings=32, norm_placement="post",
                      dropout=0.0).train()


def test_monitor_reports_gradient_norms_and_pre_ln_sums_of_every_layer(text_batch):
    model = post_ln_model()
    ids = text_batch(8, 32)
    captured = {}
    last_norm = model.model.layers[2].mlp_norm
    handle = last_norm.register_forward_pre_hook(lambda module, args: captured.update(sum=args[0].detach()))
    monitor = LayerSignalMonitor(model, every=5)
    monitor.arm(10)
    model(input_ids=ids, labels=ids).loss.backward()
    values = monitor.measure(10)
    handle.remove()

    manual = [float(torch.stack([p.grad.pow(2).sum() for p in layer.parameters() if p.dim() >= 2]).sum().sqrt())
              for layer in model.model.layers]
    assert values["grad_norm"] == pytest.approx(manual, rel=1e-6)
    assert values["grad_first_last"] == pytest.approx(manual[0] / manual[-1], rel=1e-6)
    assert values["sum_variance"][2] == pytest.approx(float(captured["sum"].double().pow(2).mean()), rel=1e-9)
    assert values["shared_fraction"][2] == pytest.approx(token_correlation(captured["sum"]), rel=1e-9)
    # At initialisation lambda^2 + beta^2 = 1 with unit-variance branches: each pre-LN sum has variance ~1
    # (0.25: sampling noise of 8 x 32 x 32 values plus the finite-width attention terms of a 32-wide model).
    assert all(abs(v - 1.0) < 0.25 for v in values["sum_variance"])
    assert monitor.measure(11) is None  # off schedule: nothing measured


def test_callback_logs_profiles_and_scalars_inside_trainer(tmp_path, text_batch):
    model = post_ln_model(4)
    ids = text_batch(16, 32)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3,
                             report_to=["tensorboard"], save_strategy="no", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[LayerSignalCallback(every=2)])
    trainer.train()
    rows = read_signals(tmp_path / "layer_signals.jsonl")
    assert [row["step"] for row in rows] == [0, 2]
    assert all(len(row["grad_norm"]) == 4 and all(g > 0 for g in row["grad_norm"]) for row in rows)
    logged = [entry for entry in trainer.state.log_history if "signals/grad_first_last" in entry]
    assert [entry["step"] for entry in logged] == [0, 2]
    plot_signals(rows, tmp_path / "signals.png")
    assert (tmp_path / "signals.png").stat().st_size > 0
    assert json.loads((tmp_path / "layer_signals.jsonl").read_text().splitlines()[0])["grad_spread"] >= 1.0
    assert list((tmp_path / "runs" / "layer_signals").glob("events.out.tfevents.*"))


def test_dslm_diagnose_plots_a_runs_layer_signals(tmp_path, text_batch):
    import subprocess
    import sys

    model = post_ln_model(4)
    monitor = LayerSignalMonitor(model, every=1)
    rows = []
    for step in range(2):
        ids = text_batch(4, 32, offset=step * 5000)
        monitor.arm(step)
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        rows.append(monitor.measure(step))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "layer_signals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = subprocess.run([sys.executable, "-m", "dslm_hf.diagnostics", "--signals", str(tmp_path / "run"),
                           "--output-dir", str(tmp_path / "plots")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"first/last layer gradient {rows[-1]['grad_first_last']:.3g}" in done.stdout
    assert (tmp_path / "plots" / "layer_signals.png").stat().st_size > 0
    missing = subprocess.run([sys.executable, "-m", "dslm_hf.diagnostics", "--signals", str(tmp_path / "nowhere"),
                              "--output-dir", str(tmp_path / "plots")], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "layer_signals.jsonl" in missing.stderr and "Traceback" not in missing.stderr
