"""Every console command answers --help (argparse formats help strings with %: a stray % breaks it), and the command
line convention holds: snake_case flags (the kebab-case spellings still parse, to the same value), one `dslm COMMAND`
front end, usage errors as one line with status 2."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dslm_hf import cli, diagnostics, export, publishing
from dslm_hf.cli import CommandExit, UserError

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("module", ["pretraining", "finetuning", "publishing", "diagnostics", "export", "cli"])
def test_console_command_prints_help(module):
    result = subprocess.run([sys.executable, "-m", f"dslm_hf.{module}", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()


def test_front_end_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dslm COMMAND")
    for command in ("pretrain", "finetune", "publish", "export", "diagnose"):
        assert f"\n  {command} " in out and f"(dslm-{command})" in out


@pytest.mark.parametrize("command", ["pretrain", "finetune", "publish", "export", "diagnose"])
def test_front_end_runs_each_commands_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"dslm-{command}" in capsys.readouterr().out


@pytest.mark.parametrize("argv, line", [
    (["pretrian"], "dslm: error: unknown command 'pretrian'; did you mean 'pretrain'? (see dslm --help)"),
    (["zzz"], "dslm: error: unknown command 'zzz'; commands: pretrain, finetune, publish, export, diagnose "
              "(see dslm --help)"),
    ([], "dslm: error: give a command: pretrain, finetune, publish, export, diagnose (see dslm --help)"),
])
def test_front_end_unknown_command_is_one_line_status_2(argv, line, capsys):
    with pytest.raises(CommandExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == line + "\n"


def test_front_end_passes_the_commands_own_usage_error_through(capsys):
    with pytest.raises(CommandExit) as exit_info:
        cli.main(["export", "src", "--output_dir", "out", "--no-such-flag"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dslm-export: error: ") and err.count("\n") == 1 and "--no-such-flag" in err


def argparse_parsers():
    return {"dslm-publish": publishing.build_parser, "dslm-export": export.build_parser,
            "dslm-diagnose": diagnostics.build_parser,
            **{f"scripts/{name}.py": (lambda name=name: load_script(name).build_parser())
               for name in ("build_checkpoint", "evaluate_checkpoint", "device_check")}}


def sample_value(action) -> list[str]:
    if action.nargs == 0:
        return []
    if action.choices:
        return [list(action.choices)[-1]]
    return {int: ["3"], float: ["0.25"]}.get(action.type, ["some/value"])


def flag_actions(parser):
    return [action for action in parser._actions if action.option_strings and action.dest != "help"]


def required_arguments(parser) -> list[str]:
    argv = [value for action in parser._actions if not action.option_strings and action.nargs is None
            for value in sample_value(action)]
    for action in flag_actions(parser):
        if action.required:
            argv += [action.option_strings[0], *sample_value(action)]
    return argv


@pytest.mark.parametrize("name", list(argparse_parsers()))
def test_every_flag_is_snake_case_first_and_each_alias_parses_the_same(name):
    parser = argparse_parsers()[name]()
    base = required_arguments(parser)
    checked = 0
    for action in flag_actions(parser):
        primary = action.option_strings[0]
        assert "-" not in primary[2:], f"{name}: {primary} is shown in --help; its first spelling must be snake_case"
        for spelling in action.option_strings:
            if "-" in spelling[2:]:
                assert spelling.replace("-", "_").replace("__", "--", 1) in action.option_strings, (name, spelling)
        value = sample_value(action)
        expected = vars(parser.parse_args(base + [primary, *value]))
        assert expected[action.dest] != action.default, (name, primary)  # the flag was read, not left at its default
        for alias in action.option_strings[1:]:
            assert vars(parser.parse_args(base + [alias, *value])) == expected, (name, alias)
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize("name", ["build_checkpoint", "evaluate_checkpoint"])
def test_scripts_held_out_share_is_spelt_validation_fraction_as_in_dslm_pretrain(name):
    parser = load_script(name).build_parser()
    base = required_arguments(parser)
    for spelling in ("--validation_fraction", "--held_out_fraction", "--held-out-fraction"):
        assert parser.parse_args(base + [spelling, "0.05"]).held_out_fraction == 0.05


def test_build_checkpoint_takes_the_staged_folder_as_output_dir_or_first_argument(tmp_path):
    module = load_script("build_checkpoint")
    rest = ["--repo_id", "me/x", "--text_file", "t.txt", "--run_dir", "runs", "--", "--preset", "tiny"]
    assert module.parse_args(["--output_dir", "staged", *rest]).output == Path("staged")
    assert module.parse_args(["staged", *rest]).output == Path("staged")
    assert module.parse_args(["staged", "--output_dir", "staged", *rest]).output == Path("staged")
    with pytest.raises(UserError, match="OUTPUT staged and --output_dir other differ: give the staged folder once"):
        module.parse_args(["staged", "--output_dir", "other", *rest])
    with pytest.raises(UserError, match=r"give the staged repository folder to create: --output_dir DIR"):
        module.parse_args(rest)


@pytest.fixture
def evaluate_script(tmp_path, monkeypatch):
    """scripts/evaluate_checkpoint.py with the measurement replaced by a recorder of the held-out share it is asked
    for (the measurement itself is tested in test_publish)."""
    module = load_script("evaluate_checkpoint")
    asked = []

    def measure(checkpoint_dir, text_file, training, *, held_out_fraction, **_):
        asked.append(held_out_fraction)
        return {"metrics": {"loss": 1.0}, "dataset": {"held_out_fraction": held_out_fraction}}

    monkeypatch.setattr(module, "evaluate_checkpoint", measure)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "text.txt").write_text("to be or not to be\n")
    argv = [str(tmp_path / "ckpt"), "--text_file", str(tmp_path / "text.txt"), "--training", "{}"]
    return module, argv, asked, tmp_path / "ckpt" / "eval_results.json"


def test_evaluate_without_the_flag_reuses_the_fraction_its_existing_record_holds(evaluate_script, capsys):
    module, argv, asked, record = evaluate_script
    record.write_text(json.dumps({"dataset": {"held_out_fraction": 0.05}}))
    assert module.main(argv) == 0
    assert f"--validation_fraction 0.05 (not given: the fraction recorded in {record})" in capsys.readouterr().out
    assert module.main(argv + ["--held-out-fraction", "0.2"]) == 0
    assert asked == [0.05, 0.2]


def test_evaluate_without_the_flag_or_a_record_uses_the_shipped_records_fraction(evaluate_script, capsys):
    module, argv, asked, record = evaluate_script
    assert module.main(argv) == 0
    assert "--validation_fraction 0.1 (not given: the default)" in capsys.readouterr().out
    assert asked == [0.1] and json.loads(record.read_text())["dataset"]["held_out_fraction"] == 0.1


def test_shipped_records_hold_the_scripts_default_fraction():
    """Re-evaluating a shipped checkpoint without the flag measures the split its record reports."""
    records = sorted((SCRIPTS.parent / "checkpoints").glob("*/eval_results.json"))
    assert records
    module = load_script("evaluate_checkpoint")
    for record in records:
        assert module.recorded_fraction(record) == module.DEFAULT_VALIDATION_FRACTION == 0.1, record


@pytest.mark.parametrize("name", ["device_check", "evaluate_checkpoint", "build_checkpoint"])
def test_script_usage_errors_are_one_line(name, capsys):
    with pytest.raises(CommandExit) as exit_info:
        load_script(name).main(["--no-such-flag", "--"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{name}{'' if name == 'device_check' else '.py'}: error: ") and err.count("\n") == 1
    assert err.endswith(f" (see {name}{'' if name == 'device_check' else '.py'} --help)\n")
