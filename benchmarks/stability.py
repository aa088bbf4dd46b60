"""Stability with depth: decoder (causal LM) and encoder (masked LM) at several depths, every init scheme.

    python benchmarks/stability.py --out benchmarks/results/stability.json

Schemes: DeepScaleLM Pre-LN and Post-LN, xavier (the paper's vanilla baseline) Pre-LN and Post-LN, standard
(N(0, 0.02), GPT-2 scaled output projections, Pre-LN) and deepnet (DeepNorm, Post-LN). Every run sees the same
batches. Reports divergence (non-finite loss), final train and validation loss, and the spread (max/min) of the
per-layer weight-gradient norm at initialisation and at the last step. The deepest depth runs only
`--deep-schemes` (it is the expensive one); runs that no longer fit `--budget-s` are listed as skipped.
"""

import argparse
import time
from pathlib import Path

import torch

import common

SCHEMES = {  # name: (init_scheme, norm_placement)
    "deepscalelm-pre": ("deepscalelm", "pre"),
    "deepscalelm-post": ("deepscalelm", "post"),
    "xavier-pre": ("xavier", "pre"),
    "xavier-post": ("xavier", "post"),
    "standard-pre": ("standard", "pre"),
    "deepnet-post": ("deepnet", "post"),
}


def parse_arguments(argv=None):
    parser = common.add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                                         "benchmarks/results/stability.json")
    parser.add_argument("--depths", type=int, nargs="*", default=[12, 48], help="depths run with every --schemes")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--deep-depth", type=int, default=192, help="the extra, expensive depth (0: none)")
    parser.add_argument("--deep-schemes", nargs="+", default=["deepscalelm-pre", "deepscalelm-post", "xavier-pre", "xavier-post"],
                        choices=list(SCHEMES))
    parser.add_argument("--deep-steps", type=int, default=40, help="steps at the deep depth")
    parser.add_argument("--objectives", nargs="+", default=list(common.OBJECTIVES), choices=common.OBJECTIVES)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=2400, help="wall-time budget of the whole grid")
    args = parser.parse_args(argv)
    if args.smoke:
        args.depths, args.deep_depth, args.deep_schemes, args.deep_steps, args.steps = [2], 3, args.deep_schemes[:1], 2, 3
        args.hidden, args.heads, args.batch, args.context = 16, 2, 2, 16
    return args


def planned_runs(args) -> list[tuple[str, int, str, int]]:
    """(objective, depth, scheme, steps), shallow depths first so a budget cut only loses the deepest runs."""
    runs = [(o, d, s, args.steps) for d in args.depths for o in args.objectives for s in args.schemes]
    if args.deep_depth:
        runs += [(o, args.deep_depth, s, args.deep_steps) for o in args.objectives for s in args.deep_schemes]
    return runs


def plot(records: list[dict], path: Path):
    """Per-layer gradient-norm spread against depth: at initialisation (top) and at the last step (bottom; x marks a
    diverged run). Validation losses are in the tables: runs of different depths may train different step counts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = sorted({r["objective"] for r in records})
    figure, axes = plt.subplots(2, len(objectives), figsize=(6 * len(objectives), 8), squeeze=False)
    for column, objective in enumerate(objectives):
        for scheme in SCHEMES:
            rows = sorted((r for r in records if r["objective"] == objective and r["scheme"] == scheme),
                          key=lambda r: r["layers"])
            if not rows:
                continue
            depths = [r["layers"] for r in rows]
            line, = axes[0][column].plot(depths, [r["grad_norm_spread_init"] for r in rows], "o-", label=scheme)
            axes[1][column].plot(depths, [r["grad_norm_spread_end"] for r in rows], "o-", color=line.get_color())
            for r in rows:
                if r["diverged"]:
                    axes[1][column].plot([r["layers"]], [1.0], "x", color=line.get_color(), markersize=10)
        for row, when in enumerate(("at initialisation", "at the last step")):
            axes[row][column].set(title=f"{objective}: per-layer weight-gradient norm max/min {when}", xscale="log",
                                  yscale="log", xlabel="layers")
        axes[0][column].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv=None):
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    corpus = common.CharCorpus(args.text)
    started = time.perf_counter()
    records, skipped = [], []
    for objective, depth, scheme, steps in planned_runs(args):
        if time.perf_counter() - started > args.budget_s:
            skipped.append({"objective": objective, "layers": depth, "scheme": scheme})
            continue
        init_scheme, norm = SCHEMES[scheme]
        config = common.deepscalelm_config(corpus, objective, layers=depth, hidden=args.hidden, heads=args.heads,
                                           context=args.context, init_scheme=init_scheme, norm_placement=norm)
        model = common.build_deepscalelm(config)
        settings = common.TrainingSettings(steps=steps, batch=args.batch, context=args.context, learning_rate=args.lr,
                                           warmup_steps=min(args.warmup, steps // 2),
                                           validation_blocks=4 if args.smoke else 64)
        result = common.train(model, corpus, objective, settings)
        record = {"objective": objective, "layers": depth, "scheme": scheme, "steps": steps,
                  "r0": config.embedding_correlation, **vars(result)}
        records.append(record)
        print(f"{objective} {depth:4d} {scheme:17s} diverged={result.diverged} train={result.final_train_loss:.3f} "
              f"val={result.validation_loss:.3f} spread init={result.grad_norm_spread_init:.2f} "
              f"end={result.grad_norm_spread_end:.2f} ({result.wall_s:.0f}s)", flush=True)
        common.write_results(args.out, {"settings": vars(args), "runs": records, "skipped": skipped})
    path = common.write_results(args.out, {"settings": vars(args), "runs": records, "skipped": skipped})
    plot(records, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}; skipped {len(skipped)} run(s) over the budget")


if __name__ == "__main__":
    main()
