"""Recipes (dslm_hf/run_recipes.py, `dslm pretrain --recipe NAME|PATH`): the recipe's values are the defaults, flags
given win, --preset replaces its model section; unknown keys and bad --config_overrides are one-line errors (exit 2);
every shipped recipe starts a real run (2 steps, shrunk to 2 layers x 32 on the shipped excerpt) and the run records
the recipe in the first line of metrics.jsonl."""

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from dslm_hf import cli, pretraining, run_recipes
from dslm_hf.run_metrics import read_metrics
from shakespeare_data import EXCERPT

SHIPPED = ["deepscalelm-1000x16-byte-decoder", "deepscalelm-16x64-byte-decoder", "deepscalelm-48l-decoder",
           "deepscalelm-48l-encoder", "deepscalelm-48x48l-encoder-decoder"]
CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


def recorded_command(checkpoint: str) -> list[str]:
    """The dslm-pretrain arguments a shipped checkpoint was trained with (its evaluation file's record), without the
    run folder and the text file, which a rebuild gives anew."""
    record = json.loads((CHECKPOINTS / checkpoint / "eval_results.json").read_text())
    argv = record["training"]["command"].split()[1:]
    for flag in ("--output_dir", "--dataset"):
        index = argv.index(flag)
        del argv[index:index + 2]
    return argv


# The command deepscalelm-16x64-byte-decoder writes out (with that commit's defaults pinned).
DECODER_16X64_COMMAND = recorded_command("deepscalelm-16x64-byte-decoder")
# Shrinks any shipped recipe to a model that steps in milliseconds; everything else stays the recipe's.
SMALL = {"clm": "num_hidden_layers=2,hidden_size=32", "mlm": "num_hidden_layers=2,hidden_size=32",
         "seq2seq": "num_hidden_layers=2,decoder_layers=2,hidden_size=32"}
QUICK = ["--max_steps", "2", "--block_size", "32", "--max_eval_blocks", "8", "--per_device_eval_batch_size", "8",
         "--sample_max_new_tokens", "0", "--report_to", "none"]


def parse(*argv) -> pretraining.PretrainingArguments:
    return pretraining.parse_arguments(["--output_dir", "unused", "--dataset", str(EXCERPT), *map(str, argv)])


def train(output_dir: Path, *argv) -> dict:
    """One in-process run, one thread, accelerate's process-wide state reset around it."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pretraining.train(pretraining.parse_arguments(["--output_dir", str(output_dir), "--dataset",
                                                              str(EXCERPT), *map(str, argv)]))
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def one_line_error(capfd, run) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run()
    stderr = capfd.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_the_shipped_recipes_are_the_checkpoints_and_decoder_16x64_bytes():
    # each checkpoint's recipe and its GPU version (tests/test_gpu_recipes.py)
    assert run_recipes.shipped_recipes() == sorted(SHIPPED + [f"{name}-gpu" for name in SHIPPED])
    checkpoints = sorted(path.name for path in (Path(__file__).parents[1] / "checkpoints").iterdir() if path.is_dir())
    assert set(checkpoints) <= set(SHIPPED)


def test_recipe_values_are_defaults_and_explicit_flags_win():
    args = parse("--recipe", "deepscalelm-16x64-byte-decoder")
    assert (args.objective, args.preset, args.vocab_size, args.block_size, args.per_device_train_batch_size,
            args.max_steps, args.learning_rate, args.validation_fraction, args.depth_parameterization) == (
        "clm", "deep-48", 261, 128, 8, 6000, 0.008, 0.1, "depth_mup")
    model = pretraining.preset_kwargs(args)
    assert (model["num_hidden_layers"], model["hidden_size"], model["hidden_dropout_prob"],
            model["width_parameterization"]) == (16, 64, 0.0, "mup")

    explicit = parse("--recipe", "deepscalelm-16x64-byte-decoder", "--max_steps", "7", "--block_size=64",
                     "--validation_fraction", "0.2", "--config_overrides", "num_hidden_layers=3")
    assert (explicit.max_steps, explicit.block_size, explicit.validation_fraction, explicit.vocab_size) == (7, 64, 0.2, 261)
    model = pretraining.preset_kwargs(explicit)  # --config_overrides on top of the recipe's model section
    assert (model["num_hidden_layers"], model["hidden_dropout_prob"], model["hidden_size"]) == (3, 0.0, 64)

    replaced = parse("--recipe", "deepscalelm-16x64-byte-decoder", "--preset", "tiny")  # the recipe's model section is replaced
    model = pretraining.preset_kwargs(replaced)
    assert (replaced.preset, model["num_hidden_layers"], model["hidden_size"], model["hidden_dropout_prob"]) == (
        "tiny", 2, 32, 0.1)
    assert json.loads(replaced.recipe_content)["content"]["model"] is None
    assert replaced.max_steps == 6000  # the run settings still come from the recipe


def test_decoder_16x64_bytes_is_its_command_with_the_defaults_pinned():
    recipe, command = parse("--recipe", "deepscalelm-16x64-byte-decoder"), parse(*DECODER_16X64_COMMAND)
    differ = {field.name for field in dataclasses.fields(command)
              if getattr(recipe, field.name) != getattr(command, field.name)}
    # the command leaves the learning rate and the depth rule to the defaults, which the recipe pins
    assert differ == {"recipe", "recipe_content", "config_overrides", "learning_rate", "depth_parameterization"}
    assert (command.learning_rate, command.depth_parameterization) == (None, None)
    recipe_model, command_model = pretraining.preset_kwargs(recipe), pretraining.preset_kwargs(command)
    assert {key: recipe_model[key] for key in command_model} == command_model
    config = pretraining.DeepScaleLMConfig(**recipe_model, vocab_size=261)
    assert pretraining.default_learning_rate(config)[0] == recipe.learning_rate == 0.008
    shipped = json.loads((CHECKPOINTS / "deepscalelm-16x64-byte-decoder" / "config.json").read_text())
    assert {key: shipped[key] for key in recipe_model if key in shipped} == {
        key: value for key, value in recipe_model.items() if key in shipped}


def test_a_recipe_leaving_the_text_to_the_command_line_requires_dataset(capfd):
    line = one_line_error(capfd, lambda: pretraining.main(["--recipe", "deepscalelm-48l-decoder", "--output_dir", "x"]))
    assert line.startswith("dslm-pretrain: error: --recipe deepscalelm-48l-decoder trains on Tiny Shakespeare")
    assert line.endswith("give that text file with --dataset PATH")


@pytest.mark.parametrize("content, expected", [
    ({"max_step": 5, "model": {"preset": "tiny"}}, "unknown key 'max_step'; did you mean 'max_steps'?"),
    ({"model": {"preset": "tiny", "hiden_size": 64}}, "model: unknown key 'hiden_size'; did you mean 'hidden_size'?"),
    ({"model": {"preset": "tiny"}, "max_steps": "ten"}, "max_steps=\"ten\" is invalid: expected int"),
    ({"model": {"preset": "tinny"}}, "model.preset='tinny' is invalid: expected one of"),
    ({"model": {"preset": "tiny"}, "output_dir": "runs/x"}, "'output_dir' belongs to one run, not to a recipe"),
])
def test_a_bad_recipe_is_one_line_with_exit_2(tmp_path, capfd, content, expected):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(content))
    line = one_line_error(capfd, lambda: cli.main(["pretrain", "--recipe", str(path), "--output_dir", str(tmp_path / "run")]))
    assert line.startswith(f"dslm-pretrain: error: --recipe {path} ({path}): ") and expected in line, line
    assert not (tmp_path / "run").exists()


def test_an_unknown_recipe_name_lists_the_shipped_ones(tmp_path, capfd):
    line = one_line_error(capfd, lambda: pretraining.main(["--recipe", "deepscalelm-16x64-byte-decode", "--output_dir", "x"]))
    assert line == ("dslm-pretrain: error: --recipe deepscalelm-16x64-byte-decode: no shipped recipe of that name; did you mean "
                    f"'deepscalelm-16x64-byte-decoder'? shipped recipes: {', '.join(run_recipes.shipped_recipes())} (or give the "
                    "path of a recipe JSON file)")
    (tmp_path / "pickled.json").write_bytes(b"\x80\x04\x95")  # a pickle is not JSON, and is never unpickled
    line = one_line_error(capfd, lambda: pretraining.main(["--recipe", str(tmp_path / "pickled.json"), "--output_dir", "x"]))
    assert "is not JSON" in line


@pytest.mark.parametrize("override, expected", [
    ("hidden_size=abc", "(item 'hidden_size=abc': invalid literal for int() with base 10: 'abc')"),
    ("layernorm_scaling=maybe", "(item 'layernorm_scaling=maybe': can't derive true or false from maybe"),
    ("num_hidden_layers", "('num_hidden_layers' is not key=value)"),
    ("hiden_size=4", "--config_overrides: unknown key 'hiden_size'; did you mean 'hidden_size'?"),
])
def test_a_bad_config_override_is_one_line_naming_the_item(tmp_path, capfd, override, expected):
    line = one_line_error(capfd, lambda: pretraining.main(["--recipe", "deepscalelm-16x64-byte-decoder", "--dataset", str(EXCERPT),
                                                           "--output_dir", str(tmp_path), "--config_overrides", override]))
    assert line.startswith("dslm-pretrain: error: --config_overrides") and expected in line, line


def test_config_overrides_are_read_with_update_from_string():
    # values take the config field's type (as PretrainedConfig.update_from_string converts them)
    assert pretraining.parse_config_overrides("hidden_dropout_prob=0,num_hidden_layers=4,layernorm_scaling=yes,"
                                              "hidden_act=gelu,decoder_layers=3") == {
        "hidden_dropout_prob": 0.0, "num_hidden_layers": 4, "layernorm_scaling": True, "hidden_act": "gelu",
        "decoder_layers": 3}
    assert isinstance(pretraining.parse_config_overrides("hidden_dropout_prob=0")["hidden_dropout_prob"], float)
    # blanks around items and a trailing comma, as the hand-written parser before it accepted
    assert pretraining.parse_config_overrides("num_hidden_layers=4, hidden_size=32,") == {
        "num_hidden_layers": 4, "hidden_size": 32}


def test_an_abbreviated_flag_is_refused_rather_than_laid_under_the_recipes_model(capfd):
    """`--pre tiny` would otherwise parse as --preset tiny unseen by the recipe's check for an explicit preset."""
    line = one_line_error(capfd, lambda: pretraining.main(["--recipe", "deepscalelm-16x64-byte-decoder", "--dataset",
                                                           str(EXCERPT), "--output_dir", "x", "--pre", "tiny"]))
    assert line.startswith("dslm-pretrain: error: ") and "--pre" in line


def test_build_checkpoint_refuses_the_held_out_share_or_text_after_the_separator(capfd):
    main = load_build_script().main
    common = ["staged", "--repo_id", "me/x", "--text_file", str(EXCERPT), "--run_dir", "runs", "--"]
    for extra in (["--validation_fraction", "0.2"], ["--dataset=other.txt"]):
        with pytest.raises(SystemExit) as exit_info:
            main(common + ["--recipe", "deepscalelm-16x64-byte-decoder", *extra])
        assert exit_info.value.code == 2
        line = capfd.readouterr().err.strip()
        assert "after --: build_checkpoint.py sets dslm-pretrain's held-out share and text itself" in line, line


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_starts_a_real_run_and_is_recorded(tmp_path, name):
    recipe = json.loads((run_recipes.RECIPES_DIR / f"{name}.json").read_text())
    objective = recipe["objective"]
    metrics = train(tmp_path, "--recipe", name, "--config_overrides", SMALL[objective], *QUICK)
    assert metrics["step"] == 2 and metrics["nonfinite_steps"] == 0
    # a 2-step model is near uniform over its vocabulary: loss within a few nats of log(vocab)
    assert 0.5 * math.log(recipe["vocab_size"]) < metrics["eval_loss"] < 1.5 * math.log(recipe["vocab_size"]) + 2
    first = read_metrics(tmp_path / "metrics.jsonl")[0]["config"]
    recorded = json.loads(first["recipe_content"])
    assert (first["recipe"], recorded["name"], recorded["file"]) == (name, name, f"{name}.json")
    assert recorded["content"] == recipe
    # recipe values and explicit flags, as the run used them
    assert (first["objective"], first["learning_rate"], first["max_steps"], first["block_size"],
            first["validation_fraction"]) == (objective, recipe["learning_rate"], 2, 32, recipe["validation_fraction"])
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"]) == (2, 32)
    # the BPE's vocabulary (seq2seq adds the span sentinels a 32-token block needs)
    assert config["vocab_size"] - recipe["vocab_size"] == (2 if objective == "seq2seq" else 0)
    for key, value in recipe["model"].items():
        if key not in ("preset", "hidden_size", "decoder_layers", "num_hidden_layers"):
            assert config[key] == value, key
    assert config["depth_parameterization"] == recipe["depth_parameterization"]


def load_build_script():
    spec = importlib.util.spec_from_file_location("build_checkpoint", Path(__file__).parents[1] / "scripts" /
                                                  "build_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_checkpoint_takes_the_held_out_share_from_the_recipe(tmp_path):
    parse_args = load_build_script().parse_args
    common = ["staged", "--repo_id", "me/x", "--text_file", str(EXCERPT), "--run_dir", "runs"]
    recipe = json.loads((run_recipes.RECIPES_DIR / "deepscalelm-16x64-byte-decoder.json").read_text())
    (tmp_path / "share.json").write_text(json.dumps(recipe | {"validation_fraction": 0.05}))
    assert parse_args(common + ["--", "--recipe", str(tmp_path / "share.json")]).held_out_fraction == 0.05
    assert parse_args(common + ["--", "--recipe", "deepscalelm-16x64-byte-decoder"]).held_out_fraction == 0.1
    assert parse_args(common + ["--validation_fraction", "0.2", "--", "--recipe", str(tmp_path / "share.json")]
                      ).held_out_fraction == 0.2
    assert parse_args(common + ["--", "--preset", "tiny"]).held_out_fraction == 0.1


def test_build_checkpoint_with_a_recipe_records_it(tmp_path):
    staged, runs = tmp_path / "staged", tmp_path / "runs"
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    load_build_script().main([str(staged), "--repo_id", "me/recipe", "--text_file", str(EXCERPT), "--run_dir", str(runs),
                              "--baseline_layers", "3", "--", "--recipe", "deepscalelm-16x64-byte-decoder", "--config_overrides",
                              "num_hidden_layers=2,hidden_size=32", *QUICK])
    record = json.loads((staged / "eval_results.json").read_text())
    recipe = json.loads((run_recipes.RECIPES_DIR / "deepscalelm-16x64-byte-decoder.json").read_text())
    assert record["training"]["recipe"] == {"name": "deepscalelm-16x64-byte-decoder", "file": "deepscalelm-16x64-byte-decoder.json",
                                            "content": recipe}
    assert record["dataset"]["held_out_fraction"] == recipe["validation_fraction"] == 0.1  # the recipe's share
    assert record["training"]["optimizer_steps"] == 2 and record["training"]["peak_learning_rate"] == 0.008
    assert "| recipe | deepscalelm-16x64-byte-decoder (dslm pretrain --recipe" in (staged / "README.md").read_text()
    model_run = read_metrics(runs / "model" / "metrics.jsonl")[0]["config"]
    assert (model_run["validation_fraction"], model_run["recipe"]) == (0.1, "deepscalelm-16x64-byte-decoder")
