"""Faults around pretraining checkpoints, the run folder and stop signals: each case is refused with a message that
names the input (exit status 2, no traceback, nothing loaded or run) or handled correctly (a checkpoint written,
a lock taken over, a resumed run logging each step once)."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dslm_hf import checkpointing
from dslm_hf.checkpointing import CheckpointError, OneProcessState, load_checkpoint, verify_checkpoint, write_manifest
from dslm_hf.cli import UserError
from dslm_hf.run_control import LOCK_NAME, StopSignals
from dslm_hf.run_metrics import drop_records_after, read_metrics
from pretrain_helpers import REPO, TINY_RUN, cpu_environment, pretrain_command, run_in_process, train_losses
from tiny_models import tiny_model


class CodeExecutionPayload:
    """Unpickling this creates `marker`: the proof that a loader ran code from the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("finished")
    run_in_process(run_dir, "--max_steps", 4, "--save_steps", 2, "--eval_steps", 100)
    return run_dir


def copy_checkpoint(finished_run, tmp_path, step=4) -> Path:
    folder = tmp_path / "checkpoints" / f"step_{step:08d}"
    shutil.copytree(finished_run / "checkpoints" / folder.name, folder)
    return folder


def add_pickle_payload(folder: Path, marker: Path, name: str = "custom_checkpoint_0.pkl") -> None:
    (folder / name).write_bytes(pickle.dumps(CodeExecutionPayload(marker)))


def rewrite_manifest(folder: Path, change) -> None:
    path = folder / checkpointing.CHECKPOINT_MARKER
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def set_trainer_step(folder: Path, step: int) -> None:
    state = json.loads((folder / checkpointing.TRAINER_STATE).read_text())
    (folder / checkpointing.TRAINER_STATE).write_text(json.dumps({**state, "step": step}))
    write_manifest(folder, 4)  # a consistent manifest: only the step disagrees


def tamper_cases(marker: Path):
    """name -> (how the checkpoint is damaged, the message the refusal must contain)."""
    return {
        "pickle_payload_beside_the_files": (lambda f: add_pickle_payload(f, marker),
                                            "holds custom_checkpoint_0.pkl, a pickle file"),
        "pickle_payload_listed_in_a_rewritten_manifest": (
            lambda f: (add_pickle_payload(f, marker), write_manifest(f, 4)), "holds custom_checkpoint_0.pkl, a pickle file"),
        "optimizer_as_a_torch_pickle": (lambda f: add_pickle_payload(f, marker, "optimizer.pt"), "holds optimizer.pt"),
        "manifest_with_no_files": (lambda f: rewrite_manifest(f, lambda m: m.update(files={})),
                                   "does not list model.safetensors"),
        "manifest_missing_the_optimizer": (lambda f: rewrite_manifest(f, lambda m: m["files"].pop("optimizer.safetensors")),
                                           "does not list optimizer.safetensors"),
        "manifest_pointing_outside_the_folder": (
            lambda f: rewrite_manifest(f, lambda m: m["files"].update({"../outside": {"bytes": 1, "sha256": "0"}})),
            "names '../outside', outside the folder"),
        "manifest_that_is_not_json": (lambda f: (f / checkpointing.CHECKPOINT_MARKER).write_text("{not json"),
                                      "unreadable checkpoint_complete.json"),
        "trainer_state_of_another_step": (lambda f: set_trainer_step(f, 5),
                                          "trainer_state.json is at step 5, its manifest at step 4"),
    }


CASE_NAMES = list(tamper_cases(Path("unused")))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_tampered_checkpoint_is_refused_before_anything_is_loaded(finished_run, tmp_path, case):
    marker = tmp_path / "payload_ran"
    damage, message = tamper_cases(marker)[case]
    folder = copy_checkpoint(finished_run, tmp_path)
    damage(folder)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        verify_checkpoint(folder)
    assert not marker.exists()


def test_checkpoint_holds_only_safetensors_and_json_and_round_trips_the_optimizer(finished_run):
    folder = finished_run / "checkpoints" / "step_00000004"
    assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".json", ".safetensors", ".safetensors"]
    tensors, rest = checkpointing.split_optimizer_state(
        checkpointing.join_optimizer_state(load_file(folder / "optimizer.safetensors"),
                                           json.loads((folder / "trainer_state.json").read_text())["optimizer"]))
    assert len(tensors) == 3 * len({key.split(".")[0] for key in tensors})  # step, exp_avg, exp_avg_sq per parameter
    assert all(group["betas"] == [0.9, 0.98] for group in rest["param_groups"])


def test_checkpoint_of_another_model_is_refused_with_the_reason(finished_run):
    other = tiny_model(hidden_size=16, num_hidden_layers=3, max_position_embeddings=16)  # not the run's shape
    optimizer = torch.optim.AdamW(other.parameters())
    with pytest.raises(CheckpointError, match="does not fit this model and optimizer"):
        load_checkpoint(finished_run / "checkpoints" / "step_00000004", OneProcessState(other, optimizer))


def run_module(*argv, timeout=300) -> subprocess.CompletedProcess:
    """`dslm-pretrain ARGV` as a user runs it (the console script's module), capturing its output."""
    return subprocess.run([sys.executable, "-m", "dslm_hf.pretraining", *map(str, argv)], env=cpu_environment(),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_resuming_a_pickle_payload_checkpoint_exits_2_names_the_file_and_runs_nothing(finished_run, tmp_path):
    marker = tmp_path / "payload_ran"
    folder = copy_checkpoint(finished_run, tmp_path)
    add_pickle_payload(folder, marker)
    write_manifest(folder, 4)
    result = run_module("--output_dir", tmp_path, *TINY_RUN, "--max_steps", 6, "--resume_from_checkpoint", folder)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("dslm-pretrain: error: checkpoint ")
    assert "custom_checkpoint_0.pkl, a pickle file" in result.stderr
    assert not marker.exists()


def test_latest_skips_a_checkpoint_with_a_pickle_and_resumes_from_the_previous_one(finished_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    marker = tmp_path / "payload_ran"
    add_pickle_payload(run_dir / "checkpoints" / "step_00000004", marker)
    metrics = run_in_process(run_dir, "--max_steps", 4, "--save_steps", 2, "--eval_steps", 100,
                             "--resume_from_checkpoint", "latest")
    output = capsys.readouterr().out
    assert "skipping checkpoint" in output and "custom_checkpoint_0.pkl" in output
    assert "resumed at step 2" in output and metrics["step"] == 4
    assert train_losses(run_dir) == train_losses(finished_run)  # steps 3 and 4 replayed bit-identically
    assert not marker.exists()


def test_trainer_state_with_foreign_scheduler_keys_is_refused_before_the_scheduler_sees_them(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    folder = run_dir / "checkpoints" / "step_00000004"
    state = json.loads((folder / checkpointing.TRAINER_STATE).read_text())
    state["scheduler"]["optimizer"] = "replaced"  # would overwrite the scheduler's attribute through __dict__
    (folder / checkpointing.TRAINER_STATE).write_text(json.dumps(state))
    write_manifest(folder, 4)
    with pytest.raises(CheckpointError, match="trainer_state.json lacks this run's layout, counters or scheduler state"):
        run_in_process(run_dir, "--max_steps", 6, "--resume_from_checkpoint", folder)


def test_resuming_without_the_runs_tokenizer_is_refused_instead_of_training_a_new_one(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    shutil.rmtree(run_dir / "tokenizer")
    with pytest.raises(UserError, match=r"cannot resume: the run's tokenizer .*tokenizer is missing"):
        run_in_process(run_dir, "--max_steps", 6, "--resume_from_checkpoint", "latest")
    assert not (run_dir / "tokenizer").exists()


def test_metrics_of_steps_after_the_resumed_checkpoint_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"config": {"seed": 1}}, *({"step": s, "loss": float(s)} for s in range(1, 7))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')  # torn last line (killed)
    assert drop_records_after(path, 4) == 3
    assert read_metrics(path) == rows[:5]


def test_stale_lock_of_a_dead_run_is_taken_over_with_a_message(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead_pid, "host": "node-7", "started": "yesterday"}))
    metrics = run_in_process(tmp_path, "--max_steps", 1, "--save_steps", 0)
    assert metrics["step"] == 1
    assert f"taking over the lock of {tmp_path} left by a run that is gone (pid {dead_pid} on host node-7" in \
        capsys.readouterr().out
    assert (tmp_path / LOCK_NAME).read_text() == ""  # released at the end


def test_a_repeated_signal_after_the_grace_period_exits_at_once():
    with StopSignals(announce=False, grace_seconds=0.0) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGTERM"
        with pytest.raises(SystemExit) as exit_info:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode boundary
    assert exit_info.value.code == 128 + signal.SIGINT


def test_signals_within_the_grace_period_count_as_one():
    # whatever handler the test process started with (a shell's background job starts with SIGINT ignored)
    before = signal.getsignal(signal.SIGINT)
    with StopSignals(announce=False, grace_seconds=60.0) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # a launcher forwarding the terminal's Ctrl-C
        assert stop.received == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is before  # restored


def wait_for(condition, process, what: str, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path) if "loss" in r] if path.is_file() else []


@pytest.mark.slow
def test_second_run_into_a_locked_folder_refuses_and_the_first_stops_cleanly_on_ctrl_c(tmp_path):
    first = subprocess.Popen([sys.executable, "-m", "dslm_hf.pretraining", "--output_dir", str(tmp_path), *TINY_RUN,
                              "--max_steps", "100000", "--save_steps", "0", "--eval_steps", "100000"],
                             env=cpu_environment(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(logged_steps(tmp_path)) >= 1, first, "its first step")
    second = run_module("--output_dir", tmp_path, *TINY_RUN, "--max_steps", 3)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"is in use by another dslm-pretrain run (pid {first.pid} on host" in second.stderr
    first.send_signal(signal.SIGINT)  # Ctrl-C
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    steps = logged_steps(tmp_path)
    assert steps == list(range(1, len(steps) + 1))  # only the first run logged, each step once
    assert f"stopped by SIGINT after step {steps[-1]}" in stdout and "--resume_from_checkpoint latest" in stdout
    assert verify_checkpoint(tmp_path / "checkpoints" / f"step_{steps[-1]:08d}") == steps[-1]
    assert sum(1 for r in read_metrics(tmp_path / "metrics.jsonl") if "config" in r) == 1


def worker_processes(run_dir: Path) -> list[int]:
    """Processes whose command line names `run_dir` (the launcher's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(run_dir) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


SIGTERM_RUN = ["--max_steps", 12, "--save_steps", 0, "--eval_steps", 100, "--per_device_train_batch_size", 4]


@pytest.mark.slow
def test_sigterm_to_accelerate_launch_checkpoints_every_rank_and_the_resume_is_bit_identical(tmp_path):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    subprocess.run(pretrain_command(reference, *SIGTERM_RUN, processes=2), env=cpu_environment(), check=True,
                   capture_output=True, cwd=REPO, timeout=400)
    launcher = subprocess.Popen(pretrain_command(stopped, *SIGTERM_RUN, processes=2), env=cpu_environment(), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(logged_steps(stopped)) >= 3, launcher, "step 3")
    launcher.send_signal(signal.SIGTERM)  # what SLURM sends the job step: the launcher, not the ranks
    output, _ = launcher.communicate(timeout=120)
    assert not worker_processes(stopped), "a rank outlived the launcher"
    checkpoints = checkpointing.checkpoint_folders(stopped)
    assert len(checkpoints) == 1, output[-3000:]
    step = verify_checkpoint(checkpoints[0])
    assert 3 <= step < 12 and not (stopped / "final").exists()
    assert f"stopped by SIGTERM after step {step}" in output

    resumed = subprocess.run(pretrain_command(stopped, *SIGTERM_RUN, "--resume_from_checkpoint", "latest", processes=2),
                             env=cpu_environment(), capture_output=True, text=True, cwd=REPO, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step {step}" in resumed.stdout
    assert logged_steps(stopped) == list(range(1, 13))  # each step once
    assert train_losses(stopped) == train_losses(reference)  # bit-identical floats


@pytest.mark.slow
def test_dslm_pretrain_launches_two_ranks_and_a_user_error_exits_2_without_a_traceback(finished_run, tmp_path):
    folder = copy_checkpoint(finished_run, tmp_path)
    (folder / "optimizer.safetensors").write_bytes(b"truncated")
    result = run_module("--num_processes", 2, "--output_dir", tmp_path, *TINY_RUN, "--max_steps", 6,
                        "--resume_from_checkpoint", folder)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "CalledProcessError" not in result.stderr
    assert result.stderr.count("optimizer.safetensors has 9 bytes") == 1  # once, not once per rank


@pytest.mark.slow
def test_killing_a_one_process_accelerate_launch_leaves_no_orphan_writing(tmp_path):
    launcher = subprocess.Popen(pretrain_command(tmp_path, "--max_steps", 100000, "--save_steps", 0, "--eval_steps",
                                                 100000), env=cpu_environment(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: len(logged_steps(tmp_path)) >= 2, launcher, "step 2")
    launcher.kill()  # SIGKILL: accelerate's launcher can forward nothing; the kernel tells the worker
    launcher.wait()
    deadline = time.monotonic() + 120
    while worker_processes(tmp_path):
        assert time.monotonic() < deadline, "the orphaned worker kept running"
        time.sleep(0.1)
    (checkpoint,) = checkpointing.checkpoint_folders(tmp_path)
    step = verify_checkpoint(checkpoint)
    assert logged_steps(tmp_path)[-1] == step  # it stopped after the step it checkpointed


# A launcher that pipes its worker's stdout and stderr and reads neither (accelerate >= 1.16 tees a one-process
# worker's stderr this way): once it is SIGKILLed, the pipes have no reader and a write raises BrokenPipeError.
PIPING_LAUNCHER = """
import subprocess, sys
worker = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
print(worker.pid, flush=True)
worker.wait()
"""


def test_a_worker_whose_piping_launcher_was_sigkilled_still_checkpoints_the_step_it_finished(tmp_path):
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-c", PIPING_LAUNCHER, sys.executable, "-m", "dslm_hf.pretraining", "--output_dir",
         str(run_dir), *TINY_RUN, "--max_steps", "100000", "--save_steps", "0", "--eval_steps", "100000"],
        env={**cpu_environment(), "DSLM_PRETRAIN_WORKER": "1"}, cwd=REPO, stdout=subprocess.PIPE, text=True)
    worker = int(launcher.stdout.readline())
    wait_for(lambda: len(logged_steps(run_dir)) >= 2, launcher, "step 2")
    launcher.kill()  # the worker's pipes now lead nowhere; the kernel sends it SIGTERM (PR_SET_PDEATHSIG)
    launcher.wait()
    deadline = time.monotonic() + 120
    while worker in worker_processes(run_dir):
        assert time.monotonic() < deadline, "the orphaned worker kept running"
        time.sleep(0.1)
    (checkpoint,) = checkpointing.checkpoint_folders(run_dir)
    step = verify_checkpoint(checkpoint)
    assert step >= 2 and logged_steps(run_dir)[-1] == step  # it stopped after the step it checkpointed


@pytest.mark.slow
def test_sigterm_to_dslm_pretrain_num_processes_reaches_both_ranks_and_exits_0_with_a_checkpoint(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-m", "dslm_hf.pretraining", "--num_processes", "2", "--output_dir",
                                 str(tmp_path), *TINY_RUN, "--max_steps", "100000", "--save_steps", "0", "--eval_steps",
                                 "100000", "--per_device_train_batch_size", "4"],
                                env=cpu_environment(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(logged_steps(tmp_path)) >= 2, launcher, "step 2")
    launcher.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    stdout, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    # Both ranks ended by themselves: the launcher's last resort against a rank hung in its shutdown was not needed.
    assert "had not exited" not in stderr and time.monotonic() - signalled < 60
    assert not worker_processes(tmp_path)
    (checkpoint,) = checkpointing.checkpoint_folders(tmp_path)
    step = verify_checkpoint(checkpoint)
    assert f"stopped by SIGTERM after step {step}" in stdout
    assert logged_steps(tmp_path) == list(range(1, step + 1))


def test_launcher_ends_a_rank_still_alive_long_after_its_peer_ended_cleanly(tmp_path, monkeypatch, capsys):
    import time

    from dslm_hf import run_control

    (tmp_path / "straggler_rank.py").write_text("import os, time\nif os.environ['RANK'] != '0':\n    time.sleep(600)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(run_control, "SHUTDOWN_GRACE_SECONDS", 1.0)
    started = time.monotonic()
    assert run_control.launch_workers("straggler_rank", [], 2) == 0
    assert time.monotonic() - started < 60  # not the straggler's 600 s
    assert "rank(s) [1] had not exited 1 s after another rank ended cleanly" in capsys.readouterr().err
