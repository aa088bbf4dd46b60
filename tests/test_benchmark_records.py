"""Benchmark bookkeeping: what every result file records, and report.py's refusal to mix code versions in a plot."""

import hashlib
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from shakespeare_data import EXCERPT

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_result_file_records_commit_dirty_flag_command_machine_wall_time_and_text(tmp_path):
    common = load_script("common")
    path = common.write_results(tmp_path / "result.json", {"settings": {"text": str(EXCERPT)}, "runs": []})
    record = json.loads(path.read_text())
    machine = record["machine"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCHMARKS, capture_output=True, text=True).stdout.strip()
    assert machine["git_commit"] == head and len(head) == 40
    assert isinstance(machine["git_dirty"], bool) and machine["git_dirty"] == bool(machine["git_dirty_paths"])
    assert machine["command"] and machine["hostname"] and machine["lscpu"] and machine["torch"]
    assert 0 <= machine["wall_time_s"] < 24 * 3600
    assert record["text"] == {"path": str(EXCERPT), "bytes": 299_867, "shipped_excerpt": True,
                              "sha256": hashlib.sha256(EXCERPT.read_bytes()).hexdigest()}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # written atomically: no partial file left


def write_stability_file(folder: Path, name: str, commit: str | None, dirty: bool | None = False) -> None:
    runs = json.loads((BENCHMARKS / "results" / "legacy" / "stability_192.json").read_text())["runs"]
    machine = {"command": f"benchmarks/stability.py --out {name}", "wall_time_s": 12.0}
    if commit is not None:
        machine |= {"git_commit": commit, "git_dirty": dirty}
    (folder / name).write_text(json.dumps({"machine": machine, "runs": runs}))


def run_report(folder: Path, *extra: str) -> int:
    try:
        load_script("report").main(["--results", str(folder), "--out", str(folder / "tables.md"), *extra])
    except SystemExit as stop:
        return stop.code
    return 0


@pytest.mark.parametrize("second_commit, second_dirty", [("b" * 40, False), (None, None), ("a" * 40, True)],
                         ids=["other-commit", "commit-not-recorded", "dirty-tree"])
def test_report_refuses_to_plot_runs_of_different_code_unless_declared_comparable(tmp_path, capsys, second_commit,
                                                                                   second_dirty):
    write_stability_file(tmp_path, "stability.json", "a" * 40)
    write_stability_file(tmp_path, "stability_other.json", second_commit, second_dirty)
    assert run_report(tmp_path) == 2
    assert "do not come from one clean commit" in capsys.readouterr().err
    assert not (tmp_path / "tables.md").exists() and not (tmp_path / "stability_all.png").exists()

    assert run_report(tmp_path, "--comparable", "stability.json", "stability_other.json") == 0
    tables = (tmp_path / "tables.md").read_text()
    assert "`stability_all.png` combines stability.json, stability_other.json (declared comparable" in tables
    assert f"code: commit {'a' * 10}" in tables and (tmp_path / "stability_all.png").stat().st_size > 0


def test_report_plots_files_of_one_clean_commit_without_being_told(tmp_path):
    write_stability_file(tmp_path, "stability.json", "a" * 40)
    write_stability_file(tmp_path, "stability_other.json", "a" * 40)
    assert run_report(tmp_path) == 0
    assert "(one clean commit)" in (tmp_path / "tables.md").read_text()


def test_report_names_an_unknown_comparable_file(tmp_path, capsys):
    write_stability_file(tmp_path, "stability.json", "a" * 40)
    assert run_report(tmp_path, "--comparable", "nothere.json") == 2
    assert "--comparable names nothere.json" in capsys.readouterr().err
