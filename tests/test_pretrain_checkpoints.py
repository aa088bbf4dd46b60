"""Checkpoints: atomic safetensors + JSON folders, corrupt/partial ones detected, SIGKILL + resume replays the run
exactly."""

import os
import signal
import subprocess
import time

import pytest

from dslm_hf import checkpointing
from dslm_hf.checkpointing import CheckpointError, checkpoint_folders, resolve_checkpoint, verify_checkpoint
from dslm_hf.cli import UserError
from dslm_hf.run_metrics import read_metrics
from pretrain_helpers import REPO, cpu_environment, pretrain_command, run_in_process, train_losses

KILL_RUN = ["--max_steps", 16, "--save_steps", 4, "--eval_steps", 100, "--per_device_train_batch_size", 8,
            "--checkpoints_total_limit", 10]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 6-step run with checkpoints at steps 2, 4 and 6."""
    run_dir = tmp_path_factory.mktemp("finished")
    run_in_process(run_dir, "--max_steps", 6, "--save_steps", 2, "--eval_steps", 100)
    return run_dir


def test_checkpoints_are_complete_folders_with_a_marker(finished_run):
    folders = checkpoint_folders(finished_run)
    assert [f.name for f in folders] == ["step_00000006", "step_00000004", "step_00000002"]
    for folder in folders:
        assert verify_checkpoint(folder) == int(folder.name[5:])
        assert {p.name for p in folder.iterdir()} == {"model.safetensors", "optimizer.safetensors", "trainer_state.json",
                                                      "checkpoint_complete.json"}
    assert not list((finished_run / "checkpoints").glob(".tmp-*"))


def test_truncated_file_is_reported_as_corrupt(finished_run, tmp_path):
    broken = tmp_path / "step_00000006"
    os.system(f"cp -r {finished_run / 'checkpoints' / 'step_00000006'} {broken}")
    with open(broken / "optimizer.safetensors", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(CheckpointError, match="corrupt: optimizer.safetensors has 100 bytes, expected"):
        verify_checkpoint(broken)


def test_changed_bytes_are_reported_as_corrupt(finished_run, tmp_path):
    broken = tmp_path / "step_00000006"
    os.system(f"cp -r {finished_run / 'checkpoints' / 'step_00000006'} {broken}")
    with open(broken / "model.safetensors", "r+b") as handle:
        handle.seek(-8, os.SEEK_END)
        handle.write(b"\xff" * 8)
    with pytest.raises(CheckpointError, match="model.safetensors does not match its recorded sha256"):
        verify_checkpoint(broken)


def test_folder_without_marker_is_incomplete(finished_run, tmp_path):
    partial = tmp_path / "step_00000006"
    os.system(f"cp -r {finished_run / 'checkpoints' / 'step_00000006'} {partial}")
    (partial / checkpointing.CHECKPOINT_MARKER).unlink()
    with pytest.raises(CheckpointError, match="incomplete: it has no checkpoint_complete.json"):
        verify_checkpoint(partial)


def test_latest_skips_a_corrupt_newest_checkpoint_and_says_so(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    os.system(f"cp -r {finished_run} {run_dir}")
    (run_dir / "checkpoints" / "step_00000006" / "model.safetensors").write_bytes(b"garbage")
    messages = []
    chosen = resolve_checkpoint("latest", run_dir, messages.append)
    assert chosen.name == "step_00000004"
    assert "skipping checkpoint" in messages[0] and "step_00000006 is corrupt" in messages[0]
    assert messages[1].startswith("resuming from the newest complete checkpoint") and "step_00000004" in messages[1]


def test_resuming_from_an_explicit_corrupt_checkpoint_is_an_error(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    os.system(f"cp -r {finished_run} {run_dir}")
    corrupt = run_dir / "checkpoints" / "step_00000004"
    (corrupt / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="checkpoint .*step_00000004 is corrupt: optimizer.safetensors is missing"):
        run_in_process(run_dir, "--max_steps", 6, "--resume_from_checkpoint", corrupt)


def test_fresh_run_into_a_folder_with_checkpoints_is_refused(finished_run):
    with pytest.raises(UserError, match="already holds checkpoints: pass --resume_from_checkpoint latest"):
        run_in_process(finished_run, "--max_steps", 6)


def test_overwrite_output_dir_starts_over_without_the_old_checkpoints(finished_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    os.system(f"cp -r {finished_run} {run_dir}")
    run_in_process(run_dir, "--max_steps", 3, "--save_steps", 3, "--overwrite_output_dir")
    assert [f.name for f in checkpoint_folders(run_dir)] == ["step_00000003"]
    assert sorted(train_losses(run_dir)) == [1, 2, 3]
    assert "removed the previous run's checkpoints" in capsys.readouterr().out


def test_resume_from_the_final_checkpoint_has_nothing_left_to_train(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    os.system(f"cp -r {finished_run} {run_dir}")
    metrics = run_in_process(run_dir, "--max_steps", 6, "--save_steps", 2, "--resume_from_checkpoint", "latest")
    assert metrics["step"] == 6
    assert train_losses(run_dir) == train_losses(finished_run)


@pytest.mark.slow
def test_sigkill_then_resume_replays_the_uninterrupted_losses_bit_identically(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(pretrain_command(reference, *KILL_RUN), env=cpu_environment(), check=True, capture_output=True,
                   cwd=REPO, timeout=300)

    process = subprocess.Popen(pretrain_command(killed, *KILL_RUN), env=cpu_environment(), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "step_00000008").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its step-8 checkpoint"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and the training process, mid-training
    process.wait()
    assert not (killed / "final").exists()
    last_logged_before_kill = max(train_losses(killed))
    assert last_logged_before_kill < 16

    result = subprocess.run(pretrain_command(killed, *KILL_RUN, "--resume_from_checkpoint", "latest"),
                            env=cpu_environment(), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from the newest complete checkpoint" in result.stdout
    reference_losses, killed_losses = train_losses(reference), train_losses(killed)
    assert set(killed_losses) == set(range(1, 17))
    logged_steps = [r["step"] for r in read_metrics(killed / "metrics.jsonl") if "loss" in r]
    assert sorted(logged_steps) == list(range(1, 17))  # each step once: the resumed run dropped the killed run's rows
    assert all(killed_losses[step] == reference_losses[step] for step in range(1, 17))  # bit-identical floats
