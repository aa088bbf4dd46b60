"""Post-LN in training: which remedy keeps the first/last layer gradient ratio within 10x after 500 steps.

    python benchmarks/postln_remedies.py --workers 2 --out benchmarks/results/postln_remedies.json

DeepScaleLM makes a Post-LN stack's gradients flat at initialisation; during training the skip/branch covariance
grows, each LayerNorm divides the token-specific signal by a little more than 1, and the first layers' gradients
decay geometrically with depth. Each remedy trains the same Post-LN causal char-LM (width 64, AdamW,
warmup then linear decay, clipping 1.0, dropout `--dropout`) at 48 and 192 layers on the same batches; after training,
`dslm_hf.monitoring.LayerSignalMonitor` measures the per-layer gradient norms, the variance of each pre-LN sum and
its shared-across-tokens fraction on one more training batch.
"""

import argparse
import time

import common

REMEDIES = {  # name: (base learning rate, warmup steps, config overrides)
    "lr 1e-3 (baseline)": (1e-3, 50, {}),
    "lr 2.5e-4": (2.5e-4, 50, {}),
    "depth-muP LR rule": (1e-3, 50, {"depth_parameterization": "depth_mup"}),
    "k = 0.5": (1e-3, 50, {"residual_k": 0.5}),
    "warmup 250": (1e-3, 250, {}),
    "depth-muP rule + k = 0.5": (1e-3, 50, {"depth_parameterization": "depth_mup", "residual_k": 0.5}),
}
HIDDEN, HEAD_SIZE = 64, 16


def run_one(task: tuple, args: dict) -> dict:
    import torch

    from dslm_hf.monitoring import LayerSignalMonitor

    torch.set_num_threads(1)
    name, layers = task
    lr, warmup, overrides = REMEDIES[name]
    corpus = common.CharCorpus(args["text"])
    config = common.deepscalelm_config(corpus, "clm", layers=layers, hidden=HIDDEN, heads=HIDDEN // HEAD_SIZE,
                                       context=args["context"], norm_placement="post",
                                       hidden_dropout_prob=args["dropout"], attention_probs_dropout_prob=args["dropout"],
                                       **overrides)
    model = common.build_deepscalelm(config)
    settings = common.TrainingSettings(steps=args["steps"], batch=args["batch"], context=args["context"],
                                       learning_rate=lr, warmup_steps=min(warmup, args["steps"] // 2),
                                       validation_blocks=args["validation_blocks"], log_every=max(1, args["steps"] // 10))
    result = common.train(model, corpus, "clm", settings)
    monitor = LayerSignalMonitor(model, every=1)
    batch = corpus.random_blocks(args["batch"], args["context"], torch.Generator().manual_seed(4321))
    monitor.arm(0)
    model.zero_grad()
    model(input_ids=batch, labels=batch).loss.backward()
    signals = monitor.measure(0)
    first_last_end = result.layer_grad_norms_end[0] / result.layer_grad_norms_end[-1] if result.layer_grad_norms_end else float("nan")
    return {"remedy": name, "layers": layers, "learning_rate": lr, "warmup": warmup, "overrides": overrides,
            "validation_loss": result.validation_loss, "final_train_loss": result.final_train_loss,
            "diverged": result.diverged, "grad_first_last_init": result.layer_grad_norms_init[0] / result.layer_grad_norms_init[-1],
            "grad_first_last_end": first_last_end, "grad_spread_end": result.grad_norm_spread_end,
            "after_training": signals, "wall_s": result.wall_s}


def parse_arguments(argv=None):
    parser = common.add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                                         "benchmarks/results/postln_remedies.json")
    parser.add_argument("--remedies", nargs="+", default=list(REMEDIES), choices=list(REMEDIES))
    parser.add_argument("--depths", nargs="+", type=int, default=[48, 192])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--validation-blocks", type=int, default=256)
    parser.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=2400, help="wall-time budget: no new run starts after it")
    args = parser.parse_args(argv)
    if args.smoke:
        args.remedies, args.depths, args.steps, args.batch, args.context, args.validation_blocks = (
            args.remedies[:2], [4], 4, 2, 16, 4)
    return args


def main(argv=None):
    args = parse_arguments(argv)
    started = time.perf_counter()
    shared = {k: getattr(args, k) for k in ("text", "steps", "batch", "context", "validation_blocks", "dropout")}
    todo = [(name, layers) for layers in sorted(args.depths) for name in args.remedies]
    records, skipped = [], []

    def save():
        return common.write_results(args.out, {"settings": vars(args), "runs": records,
                                               "skipped": skipped, "wall_s": time.perf_counter() - started})

    def report(record):
        records.append(record)
        print(f"{record['layers']:4d} layers  {record['remedy']:26s} val {record['validation_loss']:.4f}  first/last grad "
              f"{record['grad_first_last_init']:.3g} -> {record['grad_first_last_end']:.3g} ({record['wall_s']:.0f}s)", flush=True)
        save()

    skipped.extend(common.run_tasks(run_one, todo, shared, args.workers, args.budget_s, report))
    print(f"wrote {save()}")


if __name__ == "__main__":
    main()
