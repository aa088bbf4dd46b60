"""Shared pieces of the pretraining tests: tiny-run arguments, in-process and subprocess runs, metric readers."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState

from dslm_hf import pretraining
from dslm_hf.run_metrics import read_metrics

REPO = Path(__file__).parents[1]
PRETRAIN_SCRIPT = REPO / "scripts" / "pretrain.py"

# A 2-layer, 32-wide model on 0.3 MB of the embedded corpus with a 512-token BPE: a step takes milliseconds.
TINY_RUN = ["--preset", "tiny", "--default_corpus_megabytes", "0.3", "--vocab_size", "512", "--block_size", "32",
            "--per_device_eval_batch_size", "8", "--max_eval_blocks", "32", "--report_to", "none",
            "--logging_steps", "1", "--sample_max_new_tokens", "0"]
NO_DROPOUT = ["--config_overrides", "hidden_dropout_prob=0,attention_probs_dropout_prob=0"]


def run_in_process(output_dir, *extra) -> dict:
    """pretraining.train on TINY_RUN + extra; accelerate's process-wide state is reset around it.

    One intra-op thread: the tiny model gains nothing from more, and on a shared 2-core machine spinning
    threads of several test processes slow each other down severalfold."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pretraining.train(pretraining.parse_arguments(["--output_dir", str(output_dir), *TINY_RUN, *map(str, extra)]))
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pretrain_command(output_dir, *extra, processes: int = 1) -> list[str]:
    """`accelerate launch` of scripts/pretrain.py: one CPU process, or `processes` gloo ranks (the shipped
    accelerate_configs/cpu_2proc.yaml; cpu_environment() sets the ACCELERATE_USE_CPU it needs)."""
    if processes == 1:
        launch = ["--cpu", "--num_processes", "1"]
    else:
        launch = ["--config_file", str(REPO / "accelerate_configs" / "cpu_2proc.yaml"), "--num_processes", str(processes),
                  "--main_process_port", str(free_port())]
    return [sys.executable, "-m", "accelerate.commands.launch", *launch, "--mixed_precision", "no",
            "--dynamo_backend", "no", str(PRETRAIN_SCRIPT), "--output_dir", str(output_dir), *TINY_RUN, *map(str, extra)]


def cpu_environment() -> dict:
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_launched(output_dir, *extra, processes: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(pretrain_command(output_dir, *extra, processes=processes), env=cpu_environment(),
                            capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_losses(output_dir) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (each step is logged once, also across a kill and resume)."""
    return {r["step"]: r["loss"] for r in read_metrics(Path(output_dir) / "metrics.jsonl") if "loss" in r}


def eval_losses(output_dir) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(Path(output_dir) / "metrics.jsonl") if "eval_loss" in r}
