"""The benchmark scripts (benchmarks/*.py) still run: each one at trivial sizes (`--smoke`), in this process."""

import importlib.util
import json
import math
from pathlib import Path

import torch

from shakespeare_data import EXCERPT as TEXT

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_script_runs_at_smoke_size(tmp_path):
    threads = torch.get_num_threads()
    outputs = {name: tmp_path / f"{name}.json" for name in ("stability", "quality", "speed", "memory")}
    try:
        for name, out in outputs.items():
            text = ["--text", str(TEXT)] if name in ("stability", "quality") else []
            load_script(name).main(["--smoke", "--out", str(out), "--threads", str(threads), *text])
    finally:
        torch.set_num_threads(threads)
    results = {name: json.loads(out.read_text()) for name, out in outputs.items()}

    stability = results["stability"]["runs"]
    assert len(stability) == 2 * 6 + 2 * 1  # both objectives: every scheme at 2 layers, one at the deep depth (3)
    assert all(not r["diverged"] and math.isfinite(r["validation_loss"]) for r in stability)
    assert all(len(r["layer_grad_norms_init"]) == r["layers"] and r["grad_norm_spread_init"] >= 1 for r in stability)
    assert (tmp_path / "stability.png").stat().st_size > 0

    quality = results["quality"]["runs"]
    assert [r["variant"] for r in quality] == ["4x128-standard", "16x64-deepscalelm"]
    assert all(0 < r["validation_loss"] < 10 and r["parameters"] > 0 for r in quality)

    speed = results["speed"]["comparisons"]
    assert len(speed) == 7
    assert all(r["ratio"] > 0 and min(r["median_tokens_per_s"].values()) > 0 for r in speed)

    memory = results["memory"]["comparison"]
    assert [r["checkpointing"] for r in memory] == [False, True]
    assert all(r["trained"] and r["peak_rss_bytes"] >= r["rss_after_build_bytes"] > 0 for r in memory)
    assert results["memory"]["largest_trained_depth"] == 4
