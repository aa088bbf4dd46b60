"""The depth benchmarks (LR transfer, deep vs shallow, Post-LN remedies) and their report run end to end at
trivial sizes (`--smoke`), as the commands in RESULTS.md run them (subprocesses: they fan out to worker processes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "tinyshakespeare_excerpt.txt"


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, f"benchmarks/{script}.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_depth_benchmarks_and_report_run_at_smoke_size(tmp_path):
    outputs = {name: tmp_path / f"{name}.json" for name in ("depth_transfer", "deep_vs_shallow", "postln_remedies")}
    for name, out in outputs.items():
        run(name, "--smoke", "--text", str(TEXT), "--out", str(out))
    results = {name: json.loads(out.read_text()) for name, out in outputs.items()}

    transfer = results["depth_transfer"]
    # 2 depths x 2 learning rates: DeepScaleLM at 4 layers stands for all three rules (the base depth), then
    # depth_mup and completep at 16 layers, and the standard init at both depths
    assert len(transfer["runs"]) == 2 + 2 * 3 + 2 * 2
    assert set(transfer["optimum"]) == {f"{s}/64/{l}" for s in ("deepscalelm", "depth_mup", "completep", "standard")
                                        for l in (4, 16)}
    assert transfer["machine"]["git_commit"] and "code" not in transfer  # one provenance layout

    dvs = results["deep_vs_shallow"]
    assert set(dvs["table"]) == {"2x32", "8x16"} and all(row["seeds"] == 2 for row in dvs["table"].values())
    assert all(len(r["curve"]) == 3 for r in dvs["runs"])  # evaluations at steps 0 and 2, and the final one
    assert list(dvs["crossover"]) == ["8x16 vs 2x32"]

    postln = results["postln_remedies"]["runs"]
    assert len(postln) == 2 and all(len(r["after_training"]["grad_norm"]) == 4 for r in postln)

    for out in outputs.values():  # the report refuses dirty trees; a test checkout may be dirty
        document = json.loads(out.read_text())
        document["machine"]["git_dirty_paths"] = []
        out.write_text(json.dumps(document))
    report = run("report", "--transfer", str(outputs["depth_transfer"]), "--deep-vs-shallow",
                 str(outputs["deep_vs_shallow"]), "--postln", str(outputs["postln_remedies"]),
                 "--out", str(tmp_path / "tables.md"))
    assert "| depth_mup | 64 | 16 |" in report and "8x16 vs 2x32" in report and "Post-LN remedies" in report
    assert (tmp_path / "depth_transfer.png").stat().st_size > 0
