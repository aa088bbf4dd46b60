"""Memory: peak RSS of training steps of a very deep DeepScaleLM with and without activation checkpointing, and the
largest depth that trains on this machine.

    python benchmarks/memory.py --out benchmarks/results/memory.json

Every measurement is a fresh subprocess (so ru_maxrss is that run's own peak): build a causal DeepScaleLM of width
`--hidden`, run `--steps` steps of forward + backward + AdamW on (batch, context) tokens, report the peak resident
set size. The depth search then doubles the depth with checkpointing on, starting from `--depth`, while the run
trains, the next depth's predicted peak (linear in depth, fitted on the runs so far) stays under `--memory-fraction`
of the memory available now (the machine is shared: an out-of-memory kill could hit someone else's process), and
the `--budget-s` lasts. Depths the prediction rules out are reported as predictions, not measurements.
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import common

from dslm_hf.optimization import build_adamw


def parse_arguments(argv=None):
    parser = common.add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                                         "benchmarks/results/memory.json", trains_on_text=False)
    parser.add_argument("--depth", type=int, default=1000, help="depth of the with/without checkpointing comparison")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=68, help="vocabulary (68: tinyshakespeare characters + specials)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per measurement")
    parser.add_argument("--memory-fraction", type=float, default=0.6,
                        help="largest share of the currently available memory a search run may be predicted to use")
    parser.add_argument("--budget-s", type=float, default=1200, help="wall-time budget of the whole script")
    parser.add_argument("--run-timeout-s", type=float, default=600, help="limit of one measurement subprocess")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.depth, args.hidden, args.heads, args.context, args.batch, args.steps = 4, 16, 2, 8, 2, 1
        args.budget_s = 0  # the comparison only: no depth search
    return args


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def available_memory_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("cannot read MemAvailable from /proc/meminfo")


def worker(args) -> dict:
    """One measurement, in this (fresh) process."""
    import dslm_hf

    config = dslm_hf.DeepScaleLMConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        max_position_embeddings=args.context, init_sequence_length=args.context, is_decoder=True,
    )
    start = time.perf_counter()
    model = common.build_deepscalelm(config)
    build_s = time.perf_counter() - start
    after_build = peak_rss_bytes()
    if args.checkpointing:
        model.activation_checkpointing_enable()
    optimizer = build_adamw(model, 1e-4)  # the package's AdamW groups, as every benchmark and dslm-pretrain
    ids = torch.randint(args.vocab, (args.batch, args.context), generator=torch.Generator().manual_seed(0))
    model.train()
    losses, start = [], time.perf_counter()
    for _ in range(args.steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"layers": args.layers, "checkpointing": args.checkpointing, "parameters": common.parameter_count(model),
            "peak_rss_bytes": peak_rss_bytes(), "rss_after_build_bytes": after_build, "build_s": build_s,
            "seconds_per_step": (time.perf_counter() - start) / args.steps, "losses": losses}


def measure(args, layers: int, checkpointing: bool, timeout_s: float) -> dict:
    """Run one measurement in a subprocess; a failure or a timeout is recorded, not raised."""
    command = [sys.executable, __file__, "--worker", "--layers", str(layers), "--hidden", str(args.hidden),
               "--heads", str(args.heads), "--context", str(args.context), "--batch", str(args.batch),
               "--vocab", str(args.vocab), "--steps", str(args.steps), "--threads", str(args.threads)]
    if checkpointing:
        command.append("--checkpointing")
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"layers": layers, "checkpointing": checkpointing, "trained": False,
                "failure": f"timed out after {timeout_s:.0f}s", "wall_s": time.perf_counter() - start}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"layers": layers, "checkpointing": checkpointing, "trained": False,
                "failure": f"exit code {done.returncode}: {tail}", "wall_s": time.perf_counter() - start}
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record.update(trained=all(math.isfinite(loss) for loss in record["losses"]),
                  wall_s=time.perf_counter() - start)
    return record


def predicted_peak(records: list[dict], layers: int) -> float | None:
    """Peak RSS at `layers` from a straight line through the two deepest successful runs (None with fewer)."""
    done = sorted((r for r in records if r.get("trained")), key=lambda r: r["layers"])[-2:]
    if len(done) < 2:
        return None
    (x0, y0), (x1, y1) = ((r["layers"], r["peak_rss_bytes"]) for r in done)
    return y1 + (y1 - y0) / (x1 - x0) * (layers - x1)


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def main(argv=None):
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    deadline = time.perf_counter() + args.budget_s

    def remaining() -> float:
        return deadline - time.perf_counter()

    comparison = [measure(args, args.depth, checkpointing, args.run_timeout_s) for checkpointing in (False, True)]
    for r in comparison:
        print(f"{r['layers']} layers, checkpointing={r['checkpointing']}: "
              + (f"peak RSS {gib(r['peak_rss_bytes'])}, {r['seconds_per_step']:.1f}s/step" if r.get("trained")
                 else r.get("failure", "not trained")), flush=True)
    search = [r for r in comparison if r["checkpointing"]]
    stop_reason, layers = "budget", args.depth * 2
    while remaining() > 0 and search[-1].get("trained"):
        prediction = predicted_peak(search, layers)
        limit = args.memory_fraction * available_memory_bytes()
        if prediction is not None and prediction > limit:
            stop_reason = (f"{layers} layers predicted to peak at {gib(prediction)}, over {args.memory_fraction:.0%} "
                           f"of the {gib(available_memory_bytes())} available now")
            break
        record = measure(args, layers, True, min(args.run_timeout_s, remaining()))
        search.append(record)
        print(f"search {layers} layers: " + (f"peak RSS {gib(record['peak_rss_bytes'])}, "
              f"{record['seconds_per_step']:.1f}s/step" if record.get("trained") else record.get("failure")), flush=True)
        if not record.get("trained"):
            stop_reason = f"{layers} layers failed: {record.get('failure')}"
            break
        layers *= 2
    trained = [r for r in search if r.get("trained")]
    largest = max((r["layers"] for r in trained), default=None)
    slope = None
    if len(trained) >= 2:
        a, b = sorted(trained, key=lambda r: r["layers"])[-2:]
        slope = (b["peak_rss_bytes"] - a["peak_rss_bytes"]) / (b["layers"] - a["layers"])
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    extrapolated = None
    if slope:
        b = max(trained, key=lambda r: r["layers"])
        extrapolated = int(b["layers"] + (total - b["peak_rss_bytes"]) / slope)
    results = {"settings": vars(args), "comparison": comparison, "depth_search": search,
               "largest_trained_depth": largest, "search_stopped": stop_reason,
               "bytes_per_layer_with_checkpointing": slope, "machine_memory_bytes": total,
               "extrapolated_max_depth_whole_machine": extrapolated}
    path = common.write_results(args.out, results)
    print(f"largest depth trained: {largest} (search stopped: {stop_reason}); "
          f"extrapolated to the whole {gib(total)}: {extrapolated}; wrote {path}")


if __name__ == "__main__":
    main()
