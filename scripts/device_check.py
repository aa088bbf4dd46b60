"""Device check: what a machine with a GPU must confirm before the GPU paths are trusted, in one run and one table.

    scripts/device_check.sh                  # GPU, under 8 minutes on one H100/H200-class GPU
    scripts/device_check.sh --cpu            # the same checks at tiny sizes on CPU (what the test suite runs)

1. Attention equivalence in bf16: eager, sdpa, flex_attention and flash_attention_2 (when installed) give the same
   logits on one model and batch (causal, with left padding in one row); the RMS and maximum differences are reported
   relative to the logits' standard deviation; bf16 rounding keeps the RMS near 1e-2 (ATTENTION_TOLERANCE: 2e-2).
2. Pretraining on one device: the plain loop in bf16 autocast (`accelerate launch`) and the FSDP2 loop (torchrun,
   --fully_shard, bf16 MixedPrecisionPolicy, a checkpoint and a resume from it); the first and last training losses
   of each and whether the resumed run reproduced the uninterrupted one bit for bit. On CPU the FSDP2 run uses two
   gloo ranks (one process has no process group to shard over).
3. Throughput of a 192-layer DeepScaleLM (bf16 autocast, forward + backward + AdamW) without and with per-layer
   (regional) compilation (dslm_hf.pretraining.compile_layers, what dslm-pretrain --torch_compile does: each
   DeepScaleLMLayer compiled in place, one graph reused by every layer).

Prints one Markdown table and writes it with the raw numbers to OUTPUT_DIR/device_check.{md,json}.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dslm_hf import DeepScaleLMConfig, DeepScaleLMForCausalLM
from dslm_hf.cli import run_command, usage_errors_as_user_errors
from dslm_hf.pretraining import compile_layers
from dslm_hf.run_metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2")
# RMS logit difference / std(logits). bf16 logits of magnitude ~3 are spaced 2^-6 = 1.6e-2 apart: differences of a
# few roundings give an RMS near 1e-2 of the std (measured 0.5-1e-2 on CPU) and a maximum of a few such steps.
ATTENTION_TOLERANCE = 2e-2
SIZES = {
    "gpu": {"attention": dict(layers=8, hidden=512, heads=8, length=512, batch=4),
            "pretrain": ["--preset", "deep-48", "--block_size", "256", "--per_device_train_batch_size", "32",
                         "--max_steps", "60", "--save_steps", "30", "--eval_steps", "30"],
            "throughput": dict(layers=192, hidden=256, heads=4, length=512, batch=16, steps=10, backend="inductor")},
    "cpu": {"attention": dict(layers=2, hidden=64, heads=4, length=32, batch=2),
            "pretrain": ["--preset", "tiny", "--default_corpus_megabytes", "0.3", "--vocab_size", "512",
                         "--block_size", "32", "--per_device_train_batch_size", "4", "--max_steps", "4",
                         "--save_steps", "2", "--eval_steps", "4"],
            "throughput": dict(layers=4, hidden=32, heads=2, length=32, batch=4, steps=3, backend="eager")},
}


def tiny_config(layers: int, hidden: int, heads: int, length: int, **unused) -> DeepScaleLMConfig:
    return DeepScaleLMConfig(vocab_size=4096, hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                             max_position_embeddings=length)


def first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:120] if str(error).strip() else ''}"


def check_attention(device: str, sizes: dict) -> list[dict]:
    torch.manual_seed(0)
    model = DeepScaleLMForCausalLM(tiny_config(**sizes)).to(device=device, dtype=torch.bfloat16).eval()
    input_ids = torch.randint(4096, (sizes["batch"], sizes["length"]), device=device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, : sizes["length"] // 4] = 0  # left padding in the first row
    rows, reference = [], None
    for implementation in ATTENTION_IMPLEMENTATIONS:
        row = {"check": "attention bf16", "setting": implementation}
        try:
            model.set_attn_implementation(implementation)
            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        except Exception as error:  # an implementation this machine lacks (flash-attn not installed, no kernel)
            rows.append({**row, "result": f"unavailable ({first_line(error)})", "ok": None})
            continue
        kept = attention_mask.bool()  # padded positions' logits are not compared
        if reference is None:
            reference = logits
            rows.append({**row, "result": f"reference, logits std {reference[kept].std():.3f}", "ok": True})
            continue
        difference = (logits - reference)[kept]
        rms, largest = (difference.square().mean().sqrt() / reference[kept].std()).item(), (difference.abs().max() / reference[kept].std()).item()
        rows.append({**row, "result": f"rms diff / std = {rms:.2e} (max {largest:.2e})", "value": rms,
                     "ok": rms <= ATTENTION_TOLERANCE})
    return rows


def launch_pretraining(run_dir: Path, device: str, sharded: bool, arguments: list[str]) -> subprocess.CompletedProcess:
    """scripts/pretrain.py in bf16: the plain loop through `accelerate launch` (one process), or --fully_shard through
    torchrun (one GPU; on CPU two gloo ranks, as FSDP2 needs a process group)."""
    if sharded:
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1" if device == "cuda" else "2"]
    else:
        launcher = ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                    "--dynamo_backend", "no", "--mixed_precision", "bf16", *(["--cpu"] if device == "cpu" else [])]
    command = [sys.executable, *launcher, str(REPO / "scripts" / "pretrain.py"), "--output_dir", str(run_dir),
               "--mixed_precision", "bf16", "--report_to", "none", "--logging_steps", "1", "--sample_max_new_tokens",
               "0", *(["--fully_shard"] if sharded else []), *arguments]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true" if device == "cpu" else "false"}
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment)


def failure(result: subprocess.CompletedProcess) -> str:
    lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
    return f"failed (exit {result.returncode}): {lines[-1][:150]}"


def losses_of(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def check_pretraining(work: Path, device: str, arguments: list[str]) -> list[dict]:
    rows = []
    for sharded in (False, True):
        name = "--fully_shard, bf16 policy" if sharded else "plain loop, bf16 autocast"
        run_dir = work / ("fully_shard" if sharded else "plain")
        started = time.monotonic()
        result = launch_pretraining(run_dir, device, sharded, arguments)
        row = {"check": "pretraining 1 device", "setting": name, "seconds": round(time.monotonic() - started, 1)}
        if result.returncode != 0:
            rows.append({**row, "result": failure(result), "ok": False})
            continue
        losses = losses_of(run_dir)
        first, last = losses[min(losses)], losses[max(losses)]
        rows.append({**row, "result": f"loss {first:.4f} at step 1, {last:.4f} at step {max(losses)}", "value": last,
                     "ok": math.isfinite(last) and last < first})
        if sharded:  # resume from the first checkpoint: the same losses afterwards, bit for bit
            checkpoint = sorted((run_dir / "checkpoints").glob("step_*"))[0]
            result = launch_pretraining(run_dir, device, sharded, [*arguments, "--resume_from_checkpoint", str(checkpoint)])
            resumed_from = int(checkpoint.name.removeprefix("step_"))
            same = result.returncode == 0 and all(losses_of(run_dir)[s] == losses[s] for s in losses if s > resumed_from)
            outcome = failure(result) if result.returncode else (
                f"steps {resumed_from + 1}-{max(losses)} {'bit-identical' if same else 'DIFFERENT'} after the resume")
            rows.append({"check": "pretraining 1 device", "setting": f"--fully_shard resume from step {resumed_from}",
                         "result": outcome, "ok": same})
    return rows


def measure_throughput(device: str, sizes: dict, compiled: bool) -> dict:
    torch.manual_seed(0)
    model = DeepScaleLMForCausalLM(tiny_config(**sizes)).to(device)
    if compiled:
        compile_layers(model, sizes["backend"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    input_ids = torch.randint(4096, (sizes["batch"], sizes["length"]), device=device)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.monotonic()
    step()  # the first step compiles (once per distinct layer graph) and warms the allocator
    first = time.monotonic() - started
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.monotonic()
    for _ in range(sizes["steps"]):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.monotonic() - started
    tokens_per_second = sizes["steps"] * input_ids.numel() / seconds
    return {"check": f"throughput {sizes['layers']} layers bf16", "value": tokens_per_second, "ok": True,
            "setting": f"compiled layers ({sizes['backend']})" if compiled else "eager (no compilation)",
            "result": f"{tokens_per_second:,.0f} tokens/s (first step {first:.1f} s)"}


def check_throughput(device: str, sizes: dict) -> list[dict]:
    rows = []
    for compiled in (False, True):
        try:
            rows.append(measure_throughput(device, sizes, compiled))
        except Exception as error:  # a compiler missing on this machine: say so, keep the other numbers
            rows.append({"check": f"throughput {sizes['layers']} layers bf16", "setting": "compiled layers" if compiled
                         else "eager", "result": f"failed ({first_line(error)})", "ok": False})
    return rows


def markdown_table(rows: list[dict]) -> str:
    marks = {True: "yes", False: "NO", None: "n/a"}
    lines = ["| check | setting | result | ok |", "|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['setting']} | {r['result']} | {marks[r['ok']]} |" for r in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="device_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="Tiny sizes on CPU (no GPU needed).")
    parser.add_argument("--output_dir", "--output-dir", default="device_check", help="Where device_check.md/.json and runs go.")
    return usage_errors_as_user_errors(parser)


def main(argv=None) -> int:
    """0: every check passed, 1: one failed, 2: a usage error (one line, as every dslm command) or no CUDA device."""
    status = []
    run_command("device_check", lambda arguments: status.append(run(arguments)), argv)
    return status[0]


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("device_check: no CUDA device visible; run with --cpu for the CPU check", file=sys.stderr)
        return 2
    device, sizes = ("cpu", SIZES["cpu"]) if args.cpu else ("cuda", SIZES["gpu"])
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    machine = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    started = time.monotonic()
    rows = check_attention(device, sizes["attention"])
    with tempfile.TemporaryDirectory(dir=output) as work:
        rows += check_pretraining(Path(work), device, sizes["pretrain"])
    rows += check_throughput(device, sizes["throughput"])
    table = f"Device check on {machine}, torch {torch.__version__}, {time.monotonic() - started:.0f} s\n\n{markdown_table(rows)}\n"
    print(table)
    (output / "device_check.md").write_text(table)
    (output / "device_check.json").write_text(json.dumps({"machine": machine, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0 if all(r["ok"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
