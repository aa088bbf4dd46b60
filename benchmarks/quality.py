"""Quality per parameter, the paper's headline: deep-narrow DeepScaleLM vs shallow-wide at equal parameters and tokens.

    python benchmarks/quality.py --out benchmarks/results/quality.json

Causal character-level LM on tinyshakespeare, every model trained on the same batches for the same number of steps
(AdamW, warmup then linear decay, clipping 1.0, dropout 0.1). The first three variants are the comparison (about
0.8M parameters each: 4 x 128 with the standard init vs 16 x 64 and 32 x 48 DeepScaleLM); the others pull the
method's levers on the 16 x 64 model (learning rate, k in beta^2 = k/N, the default r0 = 0.221 instead of the
data's, GeLU); a 4 x 128 DeepScaleLM control separates the effect of depth from that of the init, and the 4 x 128
baseline at the higher learning rates keeps the tuning fair.
"""

import argparse
import time
from pathlib import Path

import torch

import common

BASE_LR = 1e-3
VARIANTS = {  # name: (layers, hidden, init_scheme, learning rate, r0, config overrides)
    "4x128-standard": (4, 128, "standard", BASE_LR, "data", {}),
    "16x64-deepscalelm": (16, 64, "deepscalelm", BASE_LR, "data", {}),
    "32x48-deepscalelm": (32, 48, "deepscalelm", BASE_LR, "data", {}),
    "4x128-deepscalelm": (4, 128, "deepscalelm", BASE_LR, "data", {}),
    "16x64-deepscalelm-lr2e-3": (16, 64, "deepscalelm", 2 * BASE_LR, "data", {}),
    "16x64-deepscalelm-k4": (16, 64, "deepscalelm", BASE_LR, "data", {"residual_k": 4.0}),
    "16x64-deepscalelm-r0default": (16, 64, "deepscalelm", BASE_LR, 0.221, {}),
    "16x64-deepscalelm-gelu": (16, 64, "deepscalelm", BASE_LR, "data", {"hidden_act": "gelu"}),
    "16x64-deepscalelm-lr4e-3": (16, 64, "deepscalelm", 4 * BASE_LR, "data", {}),
    "16x64-deepscalelm-k1": (16, 64, "deepscalelm", BASE_LR, "data", {"residual_k": 1.0}),
    "4x128-standard-lr2e-3": (4, 128, "standard", 2 * BASE_LR, "data", {}),
    "4x128-standard-lr4e-3": (4, 128, "standard", 4 * BASE_LR, "data", {}),
    "16x64-deepscalelm-lr8e-3": (16, 64, "deepscalelm", 8 * BASE_LR, "data", {}),
    "4x128-standard-lr8e-3": (4, 128, "standard", 8 * BASE_LR, "data", {}),
}
HEAD_SIZE = 16


def parse_arguments(argv=None):
    parser = common.add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                                         "benchmarks/results/quality.json")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--budget-s", type=float, default=2400, help="wall-time budget; later variants are skipped")
    args = parser.parse_args(argv)
    if args.smoke:
        args.variants, args.steps, args.batch, args.context, args.warmup = args.variants[:2], 3, 2, 16, 1
    return args


def plot(records: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for r in records:
        steps, losses = zip(*r["train_curve"]) if r["train_curve"] else ((), ())
        axis.plot(steps, losses, label=f"{r['variant']} ({r['parameters'] / 1e6:.2f}M): val {r['validation_loss']:.3f}")
    axis.set(xlabel="step", ylabel="train loss (nats/char)", title="Equal tokens, ~equal parameters", ylim=(1.3, 3.5))
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv=None):
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    corpus = common.CharCorpus(args.text)
    started = time.perf_counter()
    records, skipped = [], []
    for name in args.variants:
        if time.perf_counter() - started > args.budget_s:
            skipped.append(name)
            continue
        layers, hidden, init_scheme, lr, r0, overrides = VARIANTS[name]
        if args.smoke:
            layers, hidden = 2, 16
        config = common.deepscalelm_config(corpus, "clm", layers=layers, hidden=hidden, heads=hidden // HEAD_SIZE,
                                           context=args.context, init_scheme=init_scheme, r0=r0, **overrides)
        model = common.build_deepscalelm(config)
        settings = common.TrainingSettings(steps=args.steps, batch=args.batch, context=args.context, learning_rate=lr,
                                           warmup_steps=args.warmup, validation_blocks=4 if args.smoke else 128)
        result = common.train(model, corpus, "clm", settings)
        record = {"variant": name, "layers": layers, "hidden": hidden, "init_scheme": init_scheme, "learning_rate": lr,
                  "r0": config.embedding_correlation, "overrides": overrides,
                  "parameters": common.parameter_count(model),
                  "non_embedding_parameters": common.parameter_count(model, exclude_embeddings=True),
                  "tokens": args.steps * args.batch * args.context, **vars(result)}
        records.append(record)
        print(f"{name:28s} params={record['parameters']:,} diverged={result.diverged} "
              f"train={result.final_train_loss:.4f} val={result.validation_loss:.4f} ({result.wall_s:.0f}s)", flush=True)
        common.write_results(args.out, {"settings": vars(args), "runs": records, "skipped": skipped})
    path = common.write_results(args.out, {"settings": vars(args), "runs": records, "skipped": skipped})
    plot(records, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}; skipped {skipped or 'nothing'}")


if __name__ == "__main__":
    main()
