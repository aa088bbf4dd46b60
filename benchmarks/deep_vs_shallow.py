"""Deep-narrow vs shallow-wide at equal parameters and equal tokens, each at its learning rate from the depth rule.

    python benchmarks/deep_vs_shallow.py --corpus shakespeare --shapes 4x128 16x64 64x32 --seeds 0 1 2 \
        --steps 1000 --workers 2 --budget-s 2400 --out benchmarks/results/deep_vs_shallow_char.json
    python benchmarks/deep_vs_shallow.py --gpu      # the GPU-ready run: ~20-50M parameters, bf16, sdpa, regional compile
    python benchmarks/deep_vs_shallow.py --smoke    # seconds on a CPU: checks that the script runs, measures nothing

Every shape trains on the same batches (per seed) for the same number of tokens with `--parameterization`
(default: the package's) and base learning rate `--learning-rate` at `depth_base_layers`; the rule sets each layer's
learning rate from the shape's depth. The held-out loss is measured every `--eval-every` steps on the same blocks
for every shape: the loss-vs-tokens curves, the final table (mean and spread over seeds) and the crossover (the first
evaluation after which the deeper model stays below the shallower one) come from those measurements.
Corpora: `shakespeare` (characters; ../shared's tinyshakespeare when present, else the excerpt in tests/data) or
`stdlib` (the embedded default corpus: the Python standard library's source, byte-level BPE trained on its training
part; `--corpus-megabytes` of it, no network).
"""

import argparse
import math
import statistics
import time
from pathlib import Path

import common

HEAD_SIZE = 16
CPU_SHAPES = ("4x128", "16x64", "64x32")
GPU_SHAPES = ("6x768", "24x384", "96x192")


class TokenCorpus:
    """The cleaned standard-library corpus (`dslm_hf.data.load_default_corpus`: deduplicated, generated tables dropped,
    held out by file) as byte-level BPE ids trained on its training files; `manifest` says what was dropped."""

    def __init__(self, megabytes: float, vocab_size: int):
        import torch
        from dslm_hf.data import load_default_corpus, train_byte_level_bpe

        splits, self.manifest = load_default_corpus(megabytes)
        train_texts, held_out_texts = splits["train"]["text"], splits["validation"]["text"]
        tokenizer = train_byte_level_bpe(train_texts, vocab_size)
        encode = lambda parts: torch.tensor([i for t in parts for i in tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]])  # noqa: E731
        self.tokenizer = tokenizer
        self.train_ids, self.validation_ids = encode(train_texts), encode(held_out_texts)

    random_blocks = common.CharCorpus.random_blocks
    validation_blocks = common.CharCorpus.validation_blocks


_CORPORA = {}


def load_corpus(args):
    """One corpus per worker process (the BPE is trained once, not once per run)."""
    key = (args["corpus"], args["corpus_megabytes"], args["vocab_size"], args["text"])
    if key not in _CORPORA:
        _CORPORA[key] = (TokenCorpus(args["corpus_megabytes"], args["vocab_size"]) if args["corpus"] == "stdlib"
                         else common.CharCorpus(args["text"]))
    return _CORPORA[key]


def parse_shape(shape: str) -> tuple[int, int]:
    layers, hidden = shape.lower().split("x")
    return int(layers), int(hidden)


def run_one(task: tuple, args: dict) -> dict:
    """Train one shape at one base rate and seed through `common.train` (cosine schedule, no dropout); its held-out
    curve is measured every `eval_every` steps, 32 blocks a batch."""
    import torch

    torch.set_num_threads(args["threads"])
    shape, learning_rate, seed = task
    layers, hidden = parse_shape(shape)
    corpus = load_corpus(args)
    config = common.deepscalelm_config(
        corpus, "clm", layers=layers, hidden=hidden, heads=max(1, hidden // HEAD_SIZE), context=args["context"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, depth_parameterization=args["parameterization"],
        depth_base_layers=args["base_layers"])
    model = common.build_deepscalelm(config, seed=seed).to(args["device"])
    if args["compile"]:
        from dslm_hf.pretraining import compile_layers  # here: spawned workers of eager runs need not load it

        compile_layers(model, "inductor")  # regional compilation, as dslm-pretrain --torch_compile
    settings = common.TrainingSettings(
        steps=args["steps"], batch=args["batch"], context=args["context"], learning_rate=learning_rate,
        warmup_steps=args["warmup"], schedule="cosine", validation_blocks=args["validation_blocks"], seed=seed,
        log_every=max(1, args["steps"] // 10), eval_every=args["eval_every"], eval_batch=32, bf16=args["bf16"])
    result = common.train(model, corpus, "clm", settings)
    return {"shape": shape, "layers": layers, "hidden": hidden, "seed": seed, "learning_rate": learning_rate,
            "parameters": common.parameter_count(model),
            "non_embedding_parameters": common.parameter_count(model, exclude_embeddings=True),
            "validation_loss": result.validation_loss, "diverged_at": result.diverged_at,
            "curve": result.held_out_curve, "wall_s": result.wall_s}


def best_runs(records: list[dict], shapes: list[str]) -> dict[str, list[dict]]:
    """Each shape's runs at its best base learning rate (lowest mean held-out loss over seeds; diverged = +inf)."""
    chosen = {}
    for shape in shapes:
        by_rate = {}
        for r in records:
            if r["shape"] == shape:
                by_rate.setdefault(r["learning_rate"], []).append(r)
        if by_rate:
            score = lambda runs: statistics.fmean(r["validation_loss"] if math.isfinite(r["validation_loss"]) else math.inf for r in runs)  # noqa: E731
            chosen[shape] = min(by_rate.values(), key=score)
    return chosen


def summarise(records: list[dict], shapes: list[str]) -> dict:
    """Per shape at its best learning rate: mean and spread over seeds; each deeper shape's crossover against the
    shallowest (the first evaluation after which the seed-averaged gap stays negative)."""
    best = best_runs(records, shapes)
    table, all_rates = {}, {}
    for shape, runs in best.items():
        losses = [r["validation_loss"] for r in runs if math.isfinite(r["validation_loss"])]
        table[shape] = {"learning_rate": runs[0]["learning_rate"], "seeds": len(losses),
                        "mean": statistics.fmean(losses) if losses else math.nan,
                        "min": min(losses, default=math.nan), "max": max(losses, default=math.nan),
                        "stdev": statistics.stdev(losses) if len(losses) > 1 else 0.0}
        for r in records:
            if r["shape"] == shape:
                all_rates.setdefault(shape, {}).setdefault(f"{r['learning_rate']:g}", []).append(r["validation_loss"])
    crossover = {}
    shallow = shapes[0]
    for shape in shapes[1:]:
        if shape not in best or shallow not in best:
            continue
        pairs = [(a, b) for a in best[shape] for b in best[shallow] if a["seed"] == b["seed"]]
        if not pairs:
            continue
        tokens = [t for t, _ in pairs[0][0]["curve"]]
        mean_gap = [statistics.fmean(a["curve"][i][1] - b["curve"][i][1] for a, b in pairs) for i in range(len(tokens))]
        after = next((tokens[i] for i in range(len(tokens)) if all(g < 0 for g in mean_gap[i:])), None)
        crossover[f"{shape} vs {shallow}"] = {"tokens": after, "final_mean_gap": mean_gap[-1], "seeds": len(pairs)}
    return {"table": table, "losses_by_learning_rate": all_rates, "crossover": crossover}


def plot(records: list[dict], shapes: list[str], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    best = best_runs(records, shapes)
    for index, shape in enumerate(shapes):
        for r in best.get(shape, []):
            tokens, losses = zip(*r["curve"])
            axis.plot(tokens, losses, color=f"C{index}", alpha=0.7, label=f"{shape} ({r['parameters'] / 1e6:.2f}M, lr {r['learning_rate']:g})" if r is best[shape][0] else None)
    axis.set(xlabel="training tokens", ylabel="held-out loss", xscale="log", title="Deep vs shallow, equal tokens")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def parse_arguments(argv=None):
    parser = common.add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                                         "benchmarks/results/deep_vs_shallow.json")
    parser.add_argument("--corpus", choices=("shakespeare", "stdlib"), default="shakespeare")
    parser.add_argument("--corpus-megabytes", type=float, default=24.0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--shapes", nargs="+", default=list(CPU_SHAPES), help="LAYERSxWIDTH, shallowest first")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--parameterization", default="depth_mup", choices=("deepscalelm", "depth_mup", "completep"))
    parser.add_argument("--base-layers", type=int, default=4)
    parser.add_argument("--learning-rates", nargs="+", type=float, default=[8e-3, 1.6e-2],
                        help="base learning rates (at --base-layers) tried for every shape; each shape is reported at "
                             "its best (lowest mean held-out loss over seeds)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--validation-blocks", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each layer (regional compilation)")
    parser.add_argument("--gpu", action="store_true", help="the 10-minute GPU preset: stdlib corpus, ~20-50M parameters")
    parser.add_argument("--budget-s", type=float, default=2400, help="wall-time budget: no new run starts after it")
    args = parser.parse_args(argv)
    if args.gpu:
        args.corpus, args.shapes, args.device, args.bf16, args.compile = "stdlib", list(GPU_SHAPES), "cuda", True, True
        args.batch, args.context, args.steps, args.eval_every, args.budget_s = 32, 256, 1500, 150, 540
        args.seeds, args.workers, args.threads = [0], 1, 8
    if args.smoke:
        args.shapes, args.seeds, args.steps, args.batch, args.context = ["2x32", "8x16"], [0, 1], 4, 2, 16
        args.learning_rates = args.learning_rates[:2]
        args.warmup, args.eval_every, args.validation_blocks, args.corpus_megabytes, args.vocab_size = 1, 2, 4, 0.2, 300
    return args


def main(argv=None):
    args = parse_arguments(argv)
    started = time.perf_counter()
    shared = {k: getattr(args, k) for k in ("corpus", "corpus_megabytes", "vocab_size", "text", "parameterization",
                                             "base_layers", "steps", "batch", "context", "warmup",
                                             "eval_every", "validation_blocks", "device", "bf16", "compile", "threads")}
    todo = [(shape, lr, seed) for seed in args.seeds for lr in args.learning_rates for shape in args.shapes]
    records, skipped = [], []

    def save():
        return common.write_results(args.out, {"settings": vars(args), "runs": records,
                                               **summarise(records, args.shapes), "skipped": skipped,
                                               "wall_s": time.perf_counter() - started})

    def report(record):
        records.append(record)
        print(f"{record['shape']:>8s} lr {record['learning_rate']:g} seed {record['seed']} params {record['parameters']:,} "
              f"val {record['validation_loss']:.4f} ({record['wall_s']:.0f}s)", flush=True)
        save()

    skipped.extend(common.run_tasks(run_one, todo, shared, args.workers, args.budget_s, report))
    path = save()
    plot(records, args.shapes, path.with_suffix(".png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
