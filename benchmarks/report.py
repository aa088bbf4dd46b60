"""Markdown tables and plots of the benchmark results for benchmarks/RESULTS.md, from the result files only.

    # Section 5 (depth): tables from the named files, and depth_transfer.png beside --out
    python benchmarks/report.py --transfer benchmarks/results/depth_transfer_part*.json \
        --deep-vs-shallow benchmarks/results/deep_vs_shallow_char.json \
        --postln benchmarks/results/postln_remedies.json benchmarks/results/postln_remedies_dropout.json \
        --out benchmarks/results/depth_tables.md
    # every stability/quality/speed/memory file of a folder, and stability_all.png and quality_all.png in it
    python benchmarks/report.py --results benchmarks/results/legacy --out benchmarks/results/legacy/tables.md \
        --comparable stability.json ...

One provenance layout: the code that made a result is `machine.git_commit`, `machine.git_dirty` and
`machine.git_dirty_paths`, as `common.write_results` records them (changes under benchmarks/results/ do not count).
Each folder table says which code made its file, the command and its wall time. A plot or a depth table combines
files only when they come from one commit with a clean tree: otherwise report.py refuses (exit 2) unless told which
files are comparable (`--comparable FILE...` for a plot, `--allow-commits COMMIT...` for a depth table; say why in
RESULTS.md). The files in results/legacy/ record no commit at all.
"""

import argparse
import json
import math
from pathlib import Path

import depth_transfer
import quality
import stability
from depth_transfer import SCHEMES, expand, optimum


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


def load(paths: list[str], allowed: set[str]) -> list[dict]:
    """The result files of one table, refusing files made from a dirty tree or, unless every commit is in
    `allowed`, from more than one commit."""
    documents = [json.loads(Path(p).read_text()) for p in paths]
    commits = {code_of(d)[0] for d in documents}
    unrecorded = [p for p, d in zip(paths, documents) if code_of(d)[0] is None]
    if unrecorded:
        raise SystemExit(f"{', '.join(unrecorded)}: no machine.git_commit, not a recorded code version: rerun from a commit")
    dirty = [p for p, d in zip(paths, documents) if code_of(d)[1]]
    if dirty:
        raise SystemExit(f"{', '.join(dirty)}: made from a dirty tree, not a recorded code version: rerun from a commit")
    if len(commits) > 1 and not commits <= allowed:
        raise SystemExit(f"{', '.join(paths)} come from {len(commits)} commits {sorted(commits)}: one table needs one "
                         "code version (or name them all in --allow-commits and say why they are comparable)")
    return documents


def transfer_tables(documents: list[dict]) -> tuple[list[str], list[dict]]:
    runs = [r for d in documents for r in d["runs"]]
    best = optimum(runs)
    lines = ["### Optimal base learning rate per depth (held-out loss at the optimum)", ""]
    widths = sorted({r["hidden"] for r in runs})
    for hidden in widths:
        depths = sorted({r["layers"] for r in runs if r["hidden"] == hidden})
        lines += [f"Width {hidden}:", "", "| scheme | " + " | ".join(f"{l} layers" for l in depths) + " | LR shift 4 -> deepest |",
                  "|---|" + "---|" * (len(depths) + 1)]
        for scheme in SCHEMES:
            cells, lrs = [], []
            for layers in depths:
                entry = best.get(f"{scheme}/{hidden}/{layers}")
                if entry is None:
                    cells.append("not run")
                    continue
                lrs.append(entry["best_learning_rate"])
                cells.append(f"{entry['best_learning_rate']:g} ({entry['validation_loss']:.3f})")
            if not lrs:
                continue
            shift = lrs[-1] / lrs[0] if len(lrs) > 1 else 1.0
            lines.append(f"| {scheme} | " + " | ".join(cells) + f" | x{shift:g} |")
        lines.append("")
    lines += ["### Every run (held-out loss; `div` = diverged)", "",
              "| scheme | width | depth | " + " | ".join(f"{lr:g}" for lr in sorted({r['learning_rate'] for r in runs})) + " |",
              "|---|---|---|" + "---|" * len({r["learning_rate"] for r in runs})]
    rates = sorted({r["learning_rate"] for r in runs})
    for scheme in SCHEMES:
        for hidden in widths:
            for layers in sorted({r["layers"] for r in runs if r["hidden"] == hidden}):
                row = {r["learning_rate"]: r for r in expand(runs) if (r["scheme"], r["hidden"], r["layers"]) == (scheme, hidden, layers)}
                if not row:
                    continue
                cells = [("div" if row[lr]["diverged"] else f"{row[lr]['validation_loss']:.3f}") if lr in row else "" for lr in rates]
                lines.append(f"| {scheme} | {hidden} | {layers} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines, runs


def deep_vs_shallow_table(document: dict) -> list[str]:
    s = document["settings"]
    lines = [f"### Deep vs shallow: {s['corpus']}, {s['steps']} steps x {s['batch']} x {s['context']} tokens, "
             f"{s['parameterization']} rule from {s['base_layers']} layers, each shape at its best base LR of "
             f"{', '.join(f'{lr:g}' for lr in s['learning_rates'])}", "",
             "| shape | parameters | best base LR | seeds | held-out loss mean | min | max | stdev |",
             "|---|---|---|---|---|---|---|---|"]
    params = {r["shape"]: r["parameters"] for r in document["runs"]}
    for shape, row in document["table"].items():
        lines.append(f"| {shape} | {params[shape]:,} | {row['learning_rate']:g} | {row['seeds']} | {row['mean']:.4f} | {row['min']:.4f} | "
                     f"{row['max']:.4f} | {row['stdev']:.4f} |")
    lines += ["", "| comparison | crossover (tokens after which the deeper model stays ahead) | final mean gap |",
              "|---|---|---|"]
    for name, c in document["crossover"].items():
        lines.append(f"| {name} | {c['tokens'] if c['tokens'] is not None else 'none within the run'} | {c['final_mean_gap']:+.4f} |")
    return lines + [""]


def postln_table(document: dict) -> list[str]:
    s = document["settings"]
    lines = [f"### Post-LN remedies: {s['steps']} steps x {s['batch']} x {s['context']} characters, width 64, "
             f"dropout {s.get('dropout', 0.0):g}", "",
             "| depth | remedy | held-out loss | first/last grad at init | after training | within 10x |",
             "|---|---|---|---|---|---|"]
    for r in sorted(document["runs"], key=lambda r: (r["layers"], r["remedy"])):
        ratio = r["grad_first_last_end"]
        within = math.isfinite(ratio) and 0.1 <= ratio <= 10
        lines.append(f"| {r['layers']} | {r['remedy']} | {r['validation_loss']:.4f} | {r['grad_first_last_init']:.3g} | "
                     f"{ratio:.3g} | {'yes' if within else 'no'} |")
    return lines + [""]


SECTIONS = {"stability": stability_tables, "quality": quality_table, "speed": speed_table, "memory": memory_tables}
PLOTS = {"stability": stability.plot, "quality": quality.plot}


def code_changes(dirty_paths: list[str]) -> list[str]:
    """Dirty paths that could change a result: anything but other result files (benchmarks/results/)."""
    return [p for p in dirty_paths if not p.startswith("benchmarks/results/")]


def code_of(results: dict) -> tuple[str | None, bool | None]:
    """(git commit, whether the tree had changes that could alter a result) as `common.write_results` records them
    in `machine`: git_commit, git_dirty and git_dirty_paths (changes under benchmarks/results/ do not count).
    (None, None) for a file that records no commit (the ones in results/legacy/)."""
    machine = results.get("machine", {})
    commit, paths = machine.get("git_commit"), machine.get("git_dirty_paths")
    if commit is None:
        return None, None
    return commit, bool(code_changes(paths)) if paths is not None else machine.get("git_dirty")


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


def depth_report(args) -> list[str]:
    allowed = set(args.allow_commits)
    lines = ["<!-- generated by benchmarks/report.py from the files named in each heading's section -->", ""]
    if args.transfer:
        documents = load(args.transfer, allowed)
        lines += [f"Sources: {', '.join(args.transfer)} (commit {code_of(documents[0])[0][:10]}).", ""]
        table, runs = transfer_tables(documents)
        lines += table
        depth_transfer.plot(runs, Path(args.out).with_name("depth_transfer.png"))
    for path in args.deep_vs_shallow:
        (document,) = load([path], allowed)
        lines += [f"Source: {path} (commit {code_of(document)[0][:10]}).", ""] + deep_vs_shallow_table(document)
    for path in args.postln:
        (document,) = load([path], allowed)
        lines += [f"Source: {path} (commit {code_of(document)[0][:10]}).", ""] + postln_table(document)
    return lines


def folder_report(args, parser) -> list[str]:
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
    return ["\n\n".join(notes + parts)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="benchmarks/results", help="folder of stability/quality/speed/memory files")
    parser.add_argument("--out", help="the markdown file to write (default: tables.md in --results, or "
                        "benchmarks/results/depth_tables.md for the depth tables)")
    parser.add_argument("--comparable", nargs="+", default=[], metavar="FILE",
                        help="result files (names in --results) whose runs may share a plot although their commits "
                             "differ or were not recorded; only these are plotted for their kind")
    depth = parser.add_argument_group("depth tables (any of these instead of --results)")
    depth.add_argument("--transfer", nargs="*", default=[], metavar="FILE", help="depth_transfer.py result files")
    depth.add_argument("--deep-vs-shallow", nargs="*", default=[], metavar="FILE", help="deep_vs_shallow.py result files")
    depth.add_argument("--postln", nargs="*", default=[], metavar="FILE", help="postln_remedies.py result files")
    depth.add_argument("--allow-commits", nargs="*", default=[], metavar="COMMIT",
                       help="commits whose files may share a depth table")
    args = parser.parse_args(argv)
    if args.transfer or args.deep_vs_shallow or args.postln:
        args.out = args.out or "benchmarks/results/depth_tables.md"
        lines = depth_report(args)
        Path(args.out).write_text("\n".join(lines))
        print("\n".join(lines))
    else:
        args.out = args.out or str(Path(args.results) / "tables.md")
        Path(args.out).write_text("\n".join(folder_report(args, parser)) + "\n")
        print(f"wrote {args.out}")

if __name__ == "__main__":
    main()
