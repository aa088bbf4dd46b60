"""The GPU recipes (dslm_hf/recipes/*-gpu.json): one per shipped checkpoint, bf16 + sdpa + compiled layers, and
their CPU smoke mode (scripts/gpu_recipes.py --smoke); dslm-pretrain's --attn_implementation and --torch_compile
(regional, in place: the compiled run's checkpoints and final folder carry the eager model's names and resume)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dslm_hf import pretraining, run_recipes
from dslm_hf.cli import CommandExit
from dslm_hf.run_metrics import read_metrics
from shakespeare_data import EXCERPT
from test_recipes import QUICK, SHIPPED, train

REPO = Path(__file__).resolve().parents[1]
GPU_SETTINGS = {"mixed_precision": "bf16", "attn_implementation": "sdpa", "torch_compile": True}


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_recipes", REPO / "scripts" / "gpu_recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe(name: str) -> dict:
    return json.loads((run_recipes.RECIPES_DIR / f"{name}.json").read_text())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_checkpoint_has_a_gpu_recipe_of_its_objective_and_corpus(name):
    cpu, gpu = recipe(name), recipe(f"{name}-gpu")
    assert {key: gpu[key] for key in GPU_SETTINGS} == GPU_SETTINGS
    assert (gpu["objective"], gpu["corpus"], gpu["block_size"], gpu["validation_fraction"]) == \
        (cpu["objective"], cpu["corpus"], cpu["block_size"], cpu["validation_fraction"])
    # more tokens than the CPU recipe, at most ~30 passes over the ~1.0M training tokens of the corpus
    tokens = gpu["max_steps"] * gpu["per_device_train_batch_size"] * gpu["block_size"]
    assert cpu["max_steps"] * cpu["per_device_train_batch_size"] * cpu["block_size"] < tokens <= 33e6
    if "byte-decoder" in name:  # the same model, rules and rate as the shipped byte decoders: their cards compare
        assert (gpu["model"], gpu["learning_rate"], gpu["depth_parameterization"]) == \
            (cpu["model"], cpu["learning_rate"], cpu["depth_parameterization"])
    else:  # rebuilds under the default rules: the rate is picked from the shape
        assert "learning_rate" not in gpu and gpu["model"]["width_parameterization"] == "mup"
    assert "not measured" in gpu["notes"]  # sized by estimate until a GPU times it (scripts/gpu_recipes.py)


@pytest.mark.slow
def test_gpu_recipes_smoke_on_cpu_times_every_recipe_and_records_it(tmp_path, capsys):
    out = tmp_path / "probe.json"
    status = load_script().main(["--text_file", str(EXCERPT), "--smoke", "--steps", "4", "--log_every", "2",
                                 "--run_dir", str(tmp_path / "runs"), "--out", str(out)])
    assert status == 0
    record = json.loads(out.read_text())
    assert [row["recipe"] for row in record["rows"]] == sorted(f"{name}-gpu" for name in SHIPPED)
    assert record["smoke"] and record["device"].startswith("CPU")
    assert record["command"].startswith("scripts/gpu_recipes.py --text_file ")
    if (REPO / ".git").exists():
        assert record["git_commit"]
    for row in record["rows"]:
        assert row["returncode"] == 0 and math.isfinite(row["eval_loss"]), row
        assert row["settings"] == {"mixed_precision": "bf16", "attn_implementation": "sdpa", "torch_compile": True,
                                   "torch_compile_backend": "aot_eager", "per_device_train_batch_size": 4,
                                   "block_size": 32}
        assert row["tokens_per_step"] == 4 * 32
        assert row["seconds_per_step"] == pytest.approx(row["tokens_per_step"] / row["tokens_per_second"])
        assert row["projected_training_minutes"] == pytest.approx(
            recipe(row["recipe"])["max_steps"] * row["seconds_per_step"] / 60)
    table = capsys.readouterr().out
    assert table.startswith("| recipe | s/step |") and len(table.strip().splitlines()) == 2 + len(SHIPPED)


def test_gpu_recipes_script_refuses_unknown_recipes_and_missing_text(tmp_path, capsys):
    script = load_script()
    with pytest.raises(CommandExit):
        script.main(["--text_file", str(EXCERPT), "--recipes", "deepscalelm-48l-decoder"])
    assert capsys.readouterr().err.strip() == (
        "gpu_recipes.py: error: --recipes deepscalelm-48l-decoder: not a shipped GPU recipe; shipped: "
        + ", ".join(f"{name}-gpu" for name in sorted(SHIPPED)))
    with pytest.raises(CommandExit):
        script.main(["--text_file", str(tmp_path / "missing.txt")])
    assert "--text_file" in capsys.readouterr().err and not (tmp_path / "missing.txt").exists()


@pytest.mark.slow
@pytest.mark.skipif(pretraining.compile_backend_problem("inductor") is not None, reason="inductor cannot compile here")
def test_compiled_run_with_inductor_checkpoints_eager_names_and_resumes(tmp_path):
    """The 16 x 64 GPU recipe as written (bf16, sdpa, inductor-compiled layers) at a tiny size on CPU: the run
    compiles its 2 layers, its checkpoint holds the eager model's tensor names, and a resume finishes the run."""
    import torch._dynamo

    torch._dynamo.reset()  # no graphs or recompile counts left by earlier tests in this worker
    small = ["--recipe", "deepscalelm-16x64-byte-decoder-gpu", "--config_overrides", "num_hidden_layers=2,hidden_size=32",
             *QUICK]
    small[small.index("--max_steps") + 1] = "4"
    train(tmp_path, *small, "--save_steps", "2", "--per_device_train_batch_size", "4", "--eval_steps", "4")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled, not run eager
    config = read_metrics(tmp_path / "metrics.jsonl")[0]["config"]
    assert (config["torch_compile"], config["torch_compile_backend"], config["attn_implementation"],
            config["mixed_precision"]) == (True, "inductor", "sdpa", "bf16")
    eager = set(AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict())  # the eager model's names
    checkpoint = tmp_path / "checkpoints" / "step_00000002"
    for saved in (tmp_path / "final" / "model.safetensors", checkpoint / "model.safetensors"):
        names = set(load_file(saved))
        assert len(names) >= len(eager) - 1 and names <= eager, saved  # (one of the tied embedding pair may be left out)
    resumed = train(tmp_path, *small, "--save_steps", "2", "--per_device_train_batch_size", "4", "--eval_steps", "4",
                    "--resume_from_checkpoint", str(checkpoint))
    assert resumed["step"] == 4 and math.isfinite(resumed["eval_loss"])
    torch._dynamo.reset()


@pytest.mark.parametrize(("flags", "expected"), [
    (["--attn_implementation", "flash"], "--attn_implementation='flash' is invalid: expected one of ('eager', 'sdpa', "
                                          "'flex_attention', 'flash_attention_2')"),
    (["--torch_compile", "--fully_shard"], "--torch_compile=True is invalid: regional compilation is wired to the "
                                            "one-process and DDP loops"),
    (["--torch_compile", "--torch_compile_backend", "nope"], "--torch_compile_backend='nope' is invalid: expected one of"),
    (["--torch_compile_backend", "aot_eager"], "--torch_compile_backend='aot_eager' is invalid: it applies to "
                                                "--torch_compile only"),
])
def test_attention_and_compile_flags_are_checked_before_any_data(flags, expected):
    with pytest.raises(Exception) as raised:
        pretraining.parse_arguments(["--output_dir", "unused", *flags])
    assert str(raised.value).startswith(expected)


def test_an_attention_kernel_this_machine_lacks_is_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("flash_attention_2 may be usable here")
    with pytest.raises(Exception) as raised:
        pretraining.build_model(pretraining.DeepScaleLMConfig(vocab_size=64, hidden_size=32, num_attention_heads=2,
                                                              num_hidden_layers=2, is_decoder=True), "clm",
                                "flash_attention_2")
    assert type(raised.value).__name__ == "UserError"
    assert str(raised.value).startswith("--attn_implementation flash_attention_2: ")
    assert "\n" not in str(raised.value)
