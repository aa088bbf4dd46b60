"""scripts/device_check.sh --cpu: every check of the GPU device check runs at tiny sizes on CPU and lands in one table
(the GPU run itself needs a machine with a GPU; docs/pretraining.md, "Device check")."""

import json
import subprocess

import pytest

from pretrain_helpers import REPO, cpu_environment


@pytest.mark.slow
def test_device_check_cpu_mode_runs_every_check_and_writes_one_table(tmp_path):
    result = subprocess.run(["bash", str(REPO / "scripts" / "device_check.sh"), "--cpu", "--output_dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO, env=cpu_environment(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {(r["check"], r["setting"]): r for r in json.loads((tmp_path / "device_check.json").read_text())["rows"]}
    # eager is the reference; sdpa and flex agree within the bf16 tolerance (RMS / std <= 2e-2)
    assert rows[("attention bf16", "eager")]["ok"]
    assert rows[("attention bf16", "sdpa")]["value"] <= 2e-2
    assert ("attention bf16", "flash_attention_2") in rows  # measured, or reported unavailable with the reason
    plain, sharded = rows[("pretraining 1 device", "plain loop, bf16 autocast")], rows[("pretraining 1 device", "--fully_shard, bf16 policy")]
    assert plain["ok"] and sharded["ok"]  # finite, and the last loss below the first
    assert [r["ok"] for key, r in rows.items() if key[1].startswith("--fully_shard resume")] == [True]
    throughput = [r["value"] for (check, _), r in rows.items() if check.startswith("throughput")]
    assert len(throughput) == 2 and min(throughput) > 0
    table = (tmp_path / "device_check.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and table in result.stdout  # header + one row per check, printed
