"""Learning-rate transfer across depth: a learning-rate x depth sweep for each depth parameterization.

    python benchmarks/depth_transfer.py --out benchmarks/results/depth_transfer.json --workers 2 --budget-s 4500

Causal character-level LM on tinyshakespeare; every run sees the same batches (seed 0) for the same number of
steps (AdamW betas (0.9, 0.98), warmup then linear decay to 0, clipping 1.0, no dropout). Schemes:
  standard     N(0, 0.02) init with GPT-2's scaled output projections, one learning rate (the usual baseline)
  deepscalelm  DeepScaleLM as in the paper (beta^2 = k/N), one learning rate for every depth
  depth_mup    DeepScaleLM + depth-muP's AdamW rule inside the layers: lr, eps * (L/L0)^-1/2, wd * (L/L0)^1/2
  completep    CompleteP's branch 1/L (beta^2 = k/N * L0/L) + its AdamW rule: lr * 1, eps * L0/L
with base depth L0 = 4, so the three DeepScaleLM schemes are the same model at 4 layers (run once). The learning
rate on the x axis is the base learning rate (embeddings, final LN, head; and the layers at L0).
Runs go out to `--workers` processes, one torch thread each, cheapest first within each priority tier; results are
written after every run, so a run cut by `--budget-s` keeps what finished.
"""

import argparse
import math
import time
from pathlib import Path

import common

SCHEMES = ("deepscalelm", "depth_mup", "completep", "standard")
BASE_LAYERS = 4
HEAD_SIZE = 16
GRID = {64: (4, 16, 64, 256), 128: (4, 16, 64)}
LEARNING_RATES = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)


def run_key(scheme: str, layers: int, hidden: int) -> str:
    """The three DeepScaleLM schemes coincide at the base depth: one run stands for all of them."""
    if scheme != "standard" and layers == BASE_LAYERS:
        return "deepscalelm"
    return scheme


def tasks(args) -> list[tuple]:
    """(scheme, layers, hidden, lr) in priority order: width 64 DeepScaleLM family, standard, then width 128."""
    ordered, seen = [], set()
    tiers = [(64, ("deepscalelm", "depth_mup", "completep")), (64, ("standard",)),
             (128, ("deepscalelm", "depth_mup", "completep")), (128, ("standard",))]
    for hidden, schemes in tiers:
        if hidden not in args.widths:
            continue
        tier = []
        for layers in GRID[hidden]:
            if layers not in args.depths:
                continue
            for scheme in schemes:
                if scheme not in args.schemes:
                    continue
                for lr in args.learning_rates:
                    key = (run_key(scheme, layers, hidden), layers, hidden, lr)
                    if key not in seen:
                        seen.add(key)
                        tier.append(key)
        ordered += sorted(tier, key=lambda t: t[1] * t[2] ** 2)  # cheapest first within a tier
    return ordered


def run_one(task: tuple, args_dict: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    scheme, layers, hidden, lr = task
    corpus = common.CharCorpus(args_dict["text"])
    overrides = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if scheme == "standard":
        config = common.deepscalelm_config(corpus, "clm", layers=layers, hidden=hidden, heads=hidden // HEAD_SIZE,
                                           context=args_dict["context"], init_scheme="standard", **overrides)
    else:
        config = common.deepscalelm_config(corpus, "clm", layers=layers, hidden=hidden, heads=hidden // HEAD_SIZE,
                                           context=args_dict["context"], depth_parameterization=scheme,
                                           depth_base_layers=BASE_LAYERS, **overrides)
    model = common.build_deepscalelm(config)
    settings = common.TrainingSettings(
        steps=args_dict["steps"], batch=args_dict["batch"], context=args_dict["context"], learning_rate=lr,
        warmup_steps=args_dict["warmup"], validation_blocks=args_dict["validation_blocks"],
        log_every=max(1, args_dict["steps"] // 10))
    result = common.train(model, corpus, "clm", settings)
    return {"scheme": scheme, "layers": layers, "hidden": hidden, "learning_rate": lr,
            "parameters": common.parameter_count(model),
            "non_embedding_parameters": common.parameter_count(model, exclude_embeddings=True),
            "tokens": settings.steps * settings.batch * settings.context, **vars(result)}


def expand(records: list[dict]) -> list[dict]:
    """Give every DeepScaleLM scheme its copy of the shared base-depth runs (marked `shared_base_run`)."""
    out = []
    for r in records:
        out.append(r)
        if r["scheme"] == "deepscalelm" and r["layers"] == BASE_LAYERS:
            out += [{**r, "scheme": s, "shared_base_run": True} for s in ("depth_mup", "completep")]
    return out


def optimum(records: list[dict]) -> dict:
    """Best base learning rate (lowest validation loss, diverged runs count as +inf) per (scheme, width, depth)."""
    best = {}
    for r in expand(records):
        key = (r["scheme"], r["hidden"], r["layers"])
        loss = r["validation_loss"] if math.isfinite(r["validation_loss"]) else math.inf
        if key not in best or loss < best[key][1]:
            best[key] = (r["learning_rate"], loss)
    return {f"{s}/{h}/{l}": {"scheme": s, "hidden": h, "layers": l, "best_learning_rate": lr, "validation_loss": loss}
            for (s, h, l), (lr, loss) in sorted(best.items())}


def plot(records: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = expand(records)
    panels = [(s, h) for h in sorted({r["hidden"] for r in records}) for s in SCHEMES
              if any(r["scheme"] == s and r["hidden"] == h for r in records)]
    if not panels:
        return
    figure, axes = plt.subplots(len({h for _, h in panels}), len(SCHEMES), figsize=(4 * len(SCHEMES), 3.4 * len({h for _, h in panels})),
                                squeeze=False, sharey=True)
    widths = sorted({h for _, h in panels})
    for scheme, hidden in panels:
        axis = axes[widths.index(hidden)][SCHEMES.index(scheme)]
        for layers in sorted({r["layers"] for r in records if r["hidden"] == hidden}):
            points = sorted((r["learning_rate"], r["validation_loss"]) for r in records
                            if r["scheme"] == scheme and r["hidden"] == hidden and r["layers"] == layers)
            if points:
                axis.plot(*zip(*points), marker="o", label=f"{layers} layers")
        axis.set(xscale="log", title=f"{scheme}, width {hidden}", xlabel="base learning rate",
                 ylabel="held-out loss (nats/char)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def parse_arguments(argv=None):
    parser = common.add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                                         "benchmarks/results/depth_transfer.json")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--widths", nargs="+", type=int, default=list(GRID), choices=list(GRID))
    parser.add_argument("--depths", nargs="+", type=int, default=sorted({l for d in GRID.values() for l in d}))
    parser.add_argument("--learning-rates", nargs="+", type=float, default=list(LEARNING_RATES))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--validation-blocks", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1, help="parallel training processes (one thread each)")
    parser.add_argument("--budget-s", type=float, default=4500, help="wall-time budget: no new run starts after it")
    args = parser.parse_args(argv)
    if args.smoke:
        args.widths, args.depths, args.learning_rates = [64], [4, 16], args.learning_rates[:2]
        args.steps, args.batch, args.context, args.warmup, args.validation_blocks = 2, 2, 16, 1, 4
    return args


def main(argv=None):
    args = parse_arguments(argv)
    started = time.perf_counter()
    todo = tasks(args)
    args_dict = {k: getattr(args, k) for k in ("text", "context", "steps", "batch", "warmup", "validation_blocks")}
    if args.smoke:
        args_dict["smoke"] = True
    records, skipped = [], []

    def save():
        return common.write_results(args.out, {
            "settings": vars(args), "base_layers": BASE_LAYERS, "runs": records, "optimum": optimum(records),
            "skipped": [list(t) for t in skipped], "wall_s": time.perf_counter() - started})

    def report(record):
        records.append(record)
        print(f"{record['scheme']:12s} {record['layers']:4d}x{record['hidden']:<4d} lr={record['learning_rate']:.1e} "
              f"val={record['validation_loss']:.4f} diverged={record['diverged']} ({record['wall_s']:.0f}s, "
              f"{time.perf_counter() - started:.0f}s elapsed)", flush=True)
        save()

    skipped.extend(common.run_tasks(run_one, todo, args_dict, args.workers, args.budget_s, report))
    path = save()
    plot(records, path.with_suffix(".png"))
    print(f"wrote {path}; {len(records)} runs, {len(skipped)} skipped")


if __name__ == "__main__":
    main()
