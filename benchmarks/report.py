"""Markdown tables of the benchmark results (the JSON files the other scripts write), for benchmarks/RESULTS.md, and
the stability and quality plots over the result files of each kind (stability_all.png, quality_all.png).

    python benchmarks/report.py --results benchmarks/results --out benchmarks/results/tables.md

Each file's table says which code made it (git commit, dirty tree), the command and its wall time. A plot combines
the runs of several files only when they come from one commit with a clean tree; otherwise report.py refuses
(exit 2) unless told which files are comparable (`--comparable stability.json stability_192.json ...`), and then
plots only those and says so in tables.md.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402
import stability  # noqa: E402


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def stability_tables(results: dict) -> str:
    out = []
    groups = sorted({(r["objective"], r["layers"]) for r in results["runs"]}, key=lambda g: (g[0], g[1]))
    for objective, layers in groups:
        rows = []
        for r in (r for r in results["runs"] if (r["objective"], r["layers"]) == (objective, layers)):
            init = r["layer_grad_norms_init"]
            first_last = init[0] / init[-1] if init and init[-1] else None
            rows.append([r["scheme"], r["steps_done"], "yes at step %d" % r["diverged_at"] if r["diverged"] else "no",
                         r["final_train_loss"], r["validation_loss"], r["grad_norm_spread_init"], first_last,
                         r["grad_norm_spread_end"], round(r["wall_s"])])
        out.append(f"**{objective}, {layers} layers**\n\n" + table(
            ["scheme", "steps", "diverged", "train loss", "val loss", "grad spread init (max/min)",
             "first/last layer grad init", "grad spread end", "wall s"], rows))
    if results.get("skipped"):
        out.append("Skipped (over the time budget): " + ", ".join(
            f"{s['objective']} {s['layers']} {s['scheme']}" for s in results["skipped"]))
    return "\n\n".join(out)


def quality_table(results: dict) -> str:
    rows = [[r["variant"], f"{r['layers']} x {r['hidden']}", f"{r['parameters'] / 1e6:.3f}M", f"{r['learning_rate']:g}",
             r["r0"], r["steps_done"], r["final_train_loss"], r["validation_loss"], round(r["wall_s"])]
            for r in results["runs"]]
    text = table(["variant", "layers x width", "params", "lr", "r0", "steps", "train loss", "val loss", "wall s"], rows)
    if results.get("skipped"):
        text += "\n\nSkipped (over the time budget): " + ", ".join(results["skipped"])
    return text


def speed_table(results: dict) -> str:
    rows = []
    for r in results["comparisons"]:
        medians = r["median_tokens_per_s"]
        residual = "residual" in r["comparison"]
        target = 0.98 if residual else 1.0
        paired = r.get("median_round_ratio")
        if paired is None:  # results written before the per-round ratio was recorded
            paired = sorted(a / b for a, b in zip(r["per_round"]["deepscalelm"], r["per_round"]["counterpart"]))[
                len(r["per_round"]["deepscalelm"]) // 2]
        rows.append([r["comparison"], medians["deepscalelm"], medians["counterpart"], r["ratio"], paired,
                     f">= {target}: " + ("met" if min(r["ratio"], paired) >= target else "MISSED")])
    return table(["comparison", "DeepScaleLM tok/s (median)", "counterpart tok/s (median)", "ratio of medians",
                  "median of per-round ratios", "target"], rows)


def memory_tables(results: dict) -> str:
    gib = 2 ** 30
    rows = [[r["layers"], "on" if r["checkpointing"] else "off", r.get("parameters"),
             r["peak_rss_bytes"] / gib if r.get("trained") else r.get("failure"), r.get("seconds_per_step")]
            for r in results["comparison"] + results["depth_search"][1:]]
    text = table(["layers", "activation checkpointing", "parameters", "peak RSS GiB", "s/step"], rows)
    text += (f"\n\nLargest depth trained: {results['largest_trained_depth']} (search stopped: "
             f"{results['search_stopped']}).")
    if results.get("bytes_per_layer_with_checkpointing"):
        text += (f" Peak RSS grows by {results['bytes_per_layer_with_checkpointing'] / 2**20:.2f} MiB per layer with "
                 f"checkpointing; a straight-line extrapolation to all {results['machine_memory_bytes'] / gib:.1f} GiB "
                 f"of the machine gives about {results['extrapolated_max_depth_whole_machine']} layers (a prediction, "
                 "not a run).")
    return text


SECTIONS = {"stability": stability_tables, "quality": quality_table, "speed": speed_table, "memory": memory_tables}
PLOTS = {"stability": stability.plot, "quality": quality.plot}


def code_of(results: dict) -> tuple[str | None, bool | None]:
    """(git commit, dirty tree) a result file records; (None, None) for files written before they were recorded."""
    machine = results.get("machine", {})
    return machine.get("git_commit"), machine.get("git_dirty")


def provenance(results: dict) -> str:
    machine = results.get("machine", {})
    commit, dirty = code_of(results)
    code = "code: commit not recorded" if commit is None else f"code: commit {commit[:10]}" + (
        " with uncommitted changes" if dirty else "")
    wall = machine.get("wall_time_s")
    return "; ".join([code, f"command: `{machine.get('command', '?')}`",
                      "wall time: not recorded" if wall is None else f"wall time {wall:.0f} s"])


def same_code(files: dict[str, dict]) -> bool:
    """True when every file records one and the same commit with a clean tree."""
    codes = {code_of(results) for results in files.values()}
    return len(codes) == 1 and next(iter(codes))[0] is not None and next(iter(codes))[1] is False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="benchmarks/results")
    parser.add_argument("--out", default="benchmarks/results/tables.md")
    parser.add_argument("--comparable", nargs="+", default=[], metavar="FILE",
                        help="result files (names in --results) whose runs may share a plot although their commits "
                             "differ or were not recorded; only these are plotted for their kind")
    args = parser.parse_args(argv)
    parts, files = [], {}
    for name, render in SECTIONS.items():
        for path in sorted(Path(args.results).glob(f"{name}*.json")):
            results = json.loads(path.read_text())
            parts.append(f"## {path.name}\n\n{provenance(results)}\n\n{render(results)}")
            files.setdefault(name, {})[path.name] = results
    unknown = sorted(set(args.comparable) - {file for kind in files.values() for file in kind})
    if unknown:
        parser.exit(2, f"report.py: --comparable names {', '.join(unknown)}, not result files in {args.results}\n")
    notes = []
    for name, plot in PLOTS.items():
        kind = files.get(name)
        if not kind:
            continue
        declared = {file: results for file, results in kind.items() if file in args.comparable}
        if not declared and not same_code(kind):
            listing = ", ".join(f"{file} ({provenance(results).split(';')[0]})" for file, results in kind.items())
            parser.exit(2, f"report.py: the {name} files do not come from one clean commit ({listing}); pass "
                           f"--comparable with the files whose runs may share {name}_all.png\n")
        chosen = declared or kind
        plot([run for results in chosen.values() for run in results.get("runs", [])], Path(args.results) / f"{name}_all.png")
        how = "declared comparable with --comparable" if declared else "one clean commit"
        notes.append(f"`{name}_all.png` combines {', '.join(chosen)} ({how}).")
    Path(args.out).write_text("\n\n".join(notes + parts) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
