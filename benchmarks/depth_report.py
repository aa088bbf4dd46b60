"""Tables and the transfer figure of the Depth section of RESULTS.md, from the result files only.

    python benchmarks/depth_report.py --transfer benchmarks/results/depth_transfer_part*.json \
        --deep-vs-shallow benchmarks/results/deep_vs_shallow_char.json --postln benchmarks/results/postln_remedies.json \
        --out benchmarks/results/depth_tables.md

Runs of one table must come from one code version: files whose recorded commit differs, or whose tree was dirty,
are refused unless `--allow-commits` names every commit that may be mixed (say why in RESULTS.md).
"""

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from depth_transfer import SCHEMES, expand, optimum, plot  # noqa: E402


def code_changes(dirty_paths: list[str]) -> list[str]:
    """Dirty paths that could change a result: anything but other result files (benchmarks/results/)."""
    return [p for p in dirty_paths if not p.startswith("benchmarks/results/")]


def load(paths: list[str], allowed: set[str]) -> list[dict]:
    documents = [json.loads(Path(p).read_text()) for p in paths]
    commits = {d["code"]["git_commit"] for d in documents}
    dirty = [p for p, d in zip(paths, documents) if code_changes(d["code"]["git_dirty_paths"])]
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transfer", nargs="*", default=[])
    parser.add_argument("--deep-vs-shallow", nargs="*", default=[])
    parser.add_argument("--postln", nargs="*", default=[])
    parser.add_argument("--allow-commits", nargs="*", default=[])
    parser.add_argument("--out", default="benchmarks/results/depth_tables.md")
    args = parser.parse_args(argv)
    allowed = set(args.allow_commits)
    lines = ["<!-- generated by benchmarks/depth_report.py from the files named in each heading's section -->", ""]
    if args.transfer:
        documents = load(args.transfer, allowed)
        lines += [f"Sources: {', '.join(args.transfer)} (commit {documents[0]['code']['git_commit'][:10]}).", ""]
        table, runs = transfer_tables(documents)
        lines += table
        plot(runs, Path(args.out).with_name("depth_transfer.png"))
    for path in args.deep_vs_shallow:
        (document,) = load([path], allowed)
        lines += [f"Source: {path} (commit {document['code']['git_commit'][:10]}).", ""] + deep_vs_shallow_table(document)
    for path in args.postln:
        (document,) = load([path], allowed)
        lines += [f"Source: {path} (commit {document['code']['git_commit'][:10]}).", ""] + postln_table(document)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
