"""Multi-process pretraining on CPU: two gloo ranks (DDP through accelerate, FSDP2 --fully_shard, and a 2-stage
pipeline with GPipe or 1F1B) reproduce one process with the same global batch, write checkpoints in the one-process
layout, resume bit-identically after a SIGKILL, and export a full model that loads with from_pretrained.

Tolerance: float summation order differs between 1 and 2 ranks (gradient all-reduce), so losses and gradient norms
agree to 1e-5 relative, and weights to 1e-4 absolute after 4 AdamW steps at lr 5e-4: Adam divides by sqrt(v), so
parameters with near-zero gradients turn rounding noise into up to ~10% of one step (5e-4).
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dslm_hf import pretraining
from dslm_hf.run_metrics import read_metrics
from pretrain_helpers import (
    REPO, NO_DROPOUT, TINY_RUN, cpu_environment, eval_losses, pretrain_command, run_in_process, run_launched, train_losses,
)

RUN = ["--max_steps", 4, "--eval_steps", 2, "--save_steps", 0, "--learning_rate", 5e-4, *NO_DROPOUT]  # lr: see the tolerance


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one_process")
    run_in_process(run_dir, *RUN, "--per_device_train_batch_size", 8)
    return run_dir


def assert_same_training(run_dir, reference):
    losses, expected = train_losses(run_dir), train_losses(reference)
    assert sorted(losses) == [1, 2, 3, 4]
    for step in expected:
        assert losses[step] == pytest.approx(expected[step], rel=1e-5)
    norms, expected_norms = ({r["step"]: r["grad_norm"] for r in read_metrics(d / "metrics.jsonl")
                              if "grad_norm" in r} for d in (run_dir, reference))
    assert norms == pytest.approx(expected_norms, rel=1e-5)
    for step, loss in eval_losses(reference).items():
        assert eval_losses(run_dir)[step] == pytest.approx(loss, rel=1e-5)
    weights, expected_weights = (load_file(d / "final" / "model.safetensors") for d in (run_dir, reference))
    assert weights.keys() == expected_weights.keys()
    assert max((weights[k] - expected_weights[k]).abs().max().item() for k in weights) < 1e-4


@pytest.mark.slow
def test_two_gloo_ranks_train_identical_replicas_like_one_process(tmp_path, one_process):
    run_launched(tmp_path, *RUN, "--per_device_train_batch_size", 4, processes=2)
    assert_same_training(tmp_path, one_process)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["replica_spread"] for r in records if "replica_spread" in r] == [0.0]
    assert records[0]["config"]["per_device_train_batch_size"] == 4


@pytest.mark.slow
def test_fully_shard_over_two_gloo_ranks_matches_one_process_and_exports_a_loadable_model(tmp_path, one_process):
    run_launched(tmp_path, *RUN, "--per_device_train_batch_size", 4, "--fully_shard", processes=2)
    assert_same_training(tmp_path, one_process)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    saved = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


KILL_RUN = ["--max_steps", 16, "--save_steps", 4, "--eval_steps", 100, "--per_device_train_batch_size", 4,
            "--checkpoints_total_limit", 10, "--fully_shard"]


@pytest.mark.slow
def test_fully_shard_checkpoints_survive_sigkill_and_the_resume_is_bit_identical(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_launched(reference, *KILL_RUN, processes=2)
    process = subprocess.Popen(pretrain_command(killed, *KILL_RUN, processes=2), env=cpu_environment(), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "step_00000008").exists():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its step-8 checkpoint"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks, mid-training
    process.wait()
    assert not (killed / "final").exists()
    result = run_launched(killed, *KILL_RUN, "--resume_from_checkpoint", "latest", processes=2)
    assert "resuming from the newest complete checkpoint" in result.stdout
    reference_losses, killed_losses = train_losses(reference), train_losses(killed)
    assert set(killed_losses) == set(range(1, 17))
    assert all(killed_losses[step] == reference_losses[step] for step in range(1, 17))  # bit-identical floats
    # The sharded run's checkpoint holds the tensors of a one-process checkpoint, under the same names.
    one_process_names = set(AutoModelForCausalLM.from_pretrained(killed / "final").state_dict()) - {"lm_head.weight"}
    assert set(load_file(killed / "checkpoints" / "step_00000016" / "model.safetensors")) == one_process_names


PIPELINE = ["--pipeline_parallel_size", 2, "--pipeline_microbatches", 4, "--per_device_train_batch_size", 8]


@pytest.fixture(scope="module")
def pipelined_1f1b(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pipeline_1f1b")
    run_launched(run_dir, *RUN, *PIPELINE, "--pipeline_schedule", "1f1b", "--save_steps", 2, processes=2)
    return run_dir


@pytest.mark.slow
def test_two_stage_1f1b_pipeline_matches_one_process_and_exports_a_loadable_model(pipelined_1f1b, one_process):
    assert_same_training(pipelined_1f1b, one_process)
    model = AutoModelForCausalLM.from_pretrained(pipelined_1f1b / "final")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert "pipeline_parallel_size" in read_metrics(pipelined_1f1b / "metrics.jsonl")[0]["config"]


@pytest.mark.slow
def test_two_stage_gpipe_pipeline_matches_one_process(tmp_path, one_process):
    run_launched(tmp_path, *RUN, *PIPELINE, "--pipeline_schedule", "gpipe", processes=2)
    assert_same_training(tmp_path, one_process)


@pytest.mark.slow
def test_pipeline_checkpoint_resumes_bit_identically_in_the_pipeline_and_closely_in_one_process(tmp_path, pipelined_1f1b):
    resumed, single = tmp_path / "resumed", tmp_path / "single"
    for run_dir in (resumed, single):
        shutil.copytree(pipelined_1f1b, run_dir)
        shutil.rmtree(run_dir / "final")
    middle = "checkpoints/step_00000002"
    run_launched(resumed, *RUN, *PIPELINE, "--save_steps", 2, "--resume_from_checkpoint", resumed / middle, processes=2)
    losses, expected = train_losses(resumed), train_losses(pipelined_1f1b)
    assert all(losses[step] == expected[step] for step in (3, 4))  # bit-identical floats
    # The same checkpoint resumed by one process with the same batch: the layouts agree, the sums differ in order.
    run_in_process(single, *RUN, "--per_device_train_batch_size", 8, "--resume_from_checkpoint", single / middle)
    assert [train_losses(single)[step] for step in (3, 4)] == pytest.approx([expected[3], expected[4]], rel=1e-5)


@pytest.mark.parametrize("arguments, message", [
    (["--pipeline_parallel_size", "3"], "--pipeline_parallel_size=3 is more stages than the model's 2 layers"),
    (["--pipeline_parallel_size", "2", "--pipeline_microbatches", "3"],
     "--pipeline_microbatches=3 does not divide --per_device_train_batch_size=16: pick a divisor"),
])
def test_impossible_pipeline_layouts_exit_2_with_the_reason(tmp_path, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        pretraining.main(["--output_dir", str(tmp_path / "run"), "--preset", "tiny", *arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert message in error.splitlines()[-1] and "Traceback" not in error


def test_shardable_layers_are_the_deepscalelm_layers():
    from dslm_hf.parallel import shardable_layers
    from tiny_models import tiny_model

    model = tiny_model(hidden_size=16, num_hidden_layers=3, max_position_embeddings=16)
    assert [type(m).__name__ for m in shardable_layers(model)] == ["DeepScaleLMLayer"] * 3


def test_shipped_accelerate_configs_parse_and_shard_deepscalelm_layers():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: load_config_from_file(str(p)) for p in (REPO / "accelerate_configs").glob("*.yaml")}
    assert sorted(configs) == ["cpu_2proc", "ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"]
    # fsdp2.yaml launches the processes; the script's --fully_shard shards (the path the CPU tests run).
    assert configs["fsdp2"].distributed_type == "MULTI_GPU" and "--fully_shard" in (REPO / "accelerate_configs" / "fsdp2.yaml").read_text()
    assert [configs[f"deepspeed_zero{n}"].deepspeed_config["zero_stage"] for n in (2, 3)] == [2, 3]
    assert configs["cpu_2proc"].num_processes == 2


# ----------------------------------------------------------------------------------------------------------------
# dslm-pretrain --num_processes: what the launcher says when ranks fail, and how ranks end
# ----------------------------------------------------------------------------------------------------------------
# A rank of launch_workers that runs the code given for it on the command line (argv[RANK]) as the worker's
# training would run: inside failures_reported_to_the_launcher.
SCRIPTED_RANK = """
import os, signal, sys, time
from dslm_hf.cli import UserError
from dslm_hf.run_control import failures_reported_to_the_launcher
with failures_reported_to_the_launcher():
    exec(sys.argv[1 + int(os.environ["RANK"])])
"""


def launch_scripted_ranks(tmp_path, monkeypatch, *code_per_rank, grace=10.0):
    from dslm_hf import run_control

    (tmp_path / "scripted_rank.py").write_text(SCRIPTED_RANK)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return run_control.launch_workers("scripted_rank", list(code_per_rank), len(code_per_rank), grace)


def test_a_user_error_met_by_one_rank_is_raised_once_and_its_peers_failure_is_not_shown(tmp_path, monkeypatch, capsys):
    import tempfile

    from dslm_hf.cli import UserError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the launcher keeps the ranks' reports
    with pytest.raises(UserError, match=r"^--tokenizer_name /x is not a tokenizer folder: give one$"):
        launch_scripted_ranks(tmp_path, monkeypatch, "raise UserError('--tokenizer_name /x is not a tokenizer folder: give one')",
                              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(2); "
                              "raise RuntimeError('Connection closed by peer')")  # a peer in a collective
    assert capsys.readouterr().err == ""  # run_command prints the UserError, once
    assert not list(tmp_path.glob("dslm-pretrain-ranks-*"))


def test_a_rank_killed_from_outside_is_named_and_its_peer_is_stopped(tmp_path, monkeypatch, capsys):
    status = launch_scripted_ranks(tmp_path, monkeypatch, "time.sleep(120)", "os.kill(os.getpid(), signal.SIGKILL)")
    assert status == 128 + signal.SIGKILL
    error = capsys.readouterr().err
    assert error.count("dslm-pretrain: rank 1 was killed by SIGKILL (not by dslm-pretrain") == 1
    assert "rank 0" not in error  # stopped by the launcher's SIGTERM: a consequence, not news


def test_a_crash_is_shown_once_from_the_rank_that_failed_first(tmp_path, monkeypatch, capsys):
    status = launch_scripted_ranks(tmp_path, monkeypatch,
                                   "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(2); "
                                   "raise RuntimeError('Connection closed by peer')",
                                   "raise ValueError('a bug on rank 1')")
    assert status == 1
    error = capsys.readouterr().err
    assert error.startswith("dslm-pretrain: rank 1 failed (the other ranks were stopped):\nTraceback")
    assert error.count("Traceback") == 1 and "ValueError: a bug on rank 1" in error
    assert "Connection closed by peer" not in error


def test_ranks_on_a_machine_without_an_accelerator_are_put_on_the_cpu(monkeypatch):
    from dslm_hf.cli import UserError
    from dslm_hf.run_control import cpu_process_group_environment

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert cpu_process_group_environment({}) == {"ACCELERATE_USE_CPU": "true"}
    assert cpu_process_group_environment({"ACCELERATE_USE_CPU": "1"}) == {}
    with pytest.raises(UserError, match="^ACCELERATE_USE_CPU=false keeps the ranks off the CPU, and this machine"):
        cpu_process_group_environment({"ACCELERATE_USE_CPU": "false"})


@pytest.mark.slow
def test_a_user_error_of_rank_0_while_rank_1_waits_in_a_barrier_prints_once_without_a_gloo_traceback(tmp_path):
    empty = tmp_path / "not_a_tokenizer"
    empty.mkdir()
    # Rank 0 loads --tokenizer_name while rank 1 waits (main_process_first); ACCELERATE_USE_CPU is left to the launcher.
    environment = {k: v for k, v in cpu_environment().items() if k != "ACCELERATE_USE_CPU"}
    result = subprocess.run([sys.executable, "-m", "dslm_hf.pretraining", "--num_processes", "2", "--output_dir",
                             str(tmp_path / "run"), *TINY_RUN, "--max_steps", "2", "--tokenizer_name", str(empty)],
                            env=environment, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 2, result.stderr[-3000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("dslm-pretrain: error:")]
    assert len(error_lines) == 1 and str(empty) in error_lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "[rank" not in result.stderr


# Records the default process group a rank's run creates, runs dslm-pretrain's command line, then reports whether
# anything but this script still holds that group (it would then be destroyed, and its gloo threads joined, only at
# interpreter teardown).
PROCESS_GROUP_PROBE = """
import json, os, sys
import torch.distributed
from dslm_hf import pretraining

groups = []
init_process_group = torch.distributed.init_process_group
def recording_init_process_group(*args, **kwargs):
    init_process_group(*args, **kwargs)
    groups.append(torch.distributed.distributed_c10d._get_default_group())
torch.distributed.init_process_group = recording_init_process_group
status = pretraining.main(sys.argv[2:])
(group,) = groups
report = {"status": status, "world_size": group.size(), "initialized": torch.distributed.is_initialized(),
          "other_references": sys.getrefcount(group) - 3}  # groups, group, getrefcount's argument
with open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"] + ".json"), "w") as handle:
    json.dump(report, handle)
"""


@pytest.mark.slow
def test_a_finished_rank_has_released_its_process_group_before_interpreter_teardown(tmp_path, monkeypatch):
    import json

    from dslm_hf import run_control

    (tmp_path / "process_group_probe.py").write_text(PROCESS_GROUP_PROBE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)  # the launcher puts the ranks on the CPU itself
    status = run_control.launch_workers("process_group_probe", [str(tmp_path), "--output_dir", str(tmp_path / "run"),
                                                                *TINY_RUN, "--max_steps", "2", "--save_steps", "0",
                                                                "--per_device_train_batch_size", "4"], 2)
    assert status == 0
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert reports == [{"status": 0, "world_size": 2, "initialized": False, "other_references": 0}] * 2
