"""Width and depth: one learning rate for every shape, and which layers count (sweep, study, deep vs shallow).

    python benchmarks/width_depth.py --device cuda --workers 14 --budget-s 330   # the GPU run (one H200, ~8 minutes)
    python benchmarks/width_depth.py --smoke                                     # seconds on a CPU: the script runs

Three experiments share one process pool (one torch thread per worker, one CUDA context each) and one task queue,
most important first; every result file is rewritten after each run, so a run cut by `--budget-s` keeps what
finished, and a run that passes `--run-deadline-s` stops early and is marked `cut` (never in a table).

1. `sweep` (width_depth_sweep.json): DeepScaleLM with the depth rule (depth_mup, base 4 layers) and the width rule
   (muP for AdamW, base width 64) over base learning rate x width {32, 64, 128, 256} x depth {4, 16, 64}, on
   tinyshakespeare characters; the same grid at depth 16 without the width rule shows what the rule changes.
2. `study` (curse_of_depth.json): at 48 and 192 layers, width 64, on tinyshakespeare characters and on the embedded
   standard-library corpus (byte-level BPE), equal tokens: standard Pre-LN, LayerNorm Scaling, Mix-LN, DeepNorm and
   DeepScaleLM (depth_mup + width rule), each at its best learning rate from a sweep at 48 layers (seed 0), then
   seeds 1 and 2 at that rate, and 192 layers at the 48-layer best and half of it. Per-layer usefulness (ablation
   cost, angular distance, gradient share) after training of every seed-0 run at the best rate.
3. `deep_vs_shallow` (deep_vs_shallow_transfer.json): equal parameters (4x128, 16x64, 64x32; 6x192, 24x96), one
   transferred base learning rate for every shape (each of two rates reported as its own table), 3 seeds, >= 1.5M
   tokens, with the Kneser-Ney n-gram and unigram losses on the same held-out blocks.
"""

import argparse
import concurrent.futures as futures
import heapq
import itertools
import math
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import common
from deep_vs_shallow import TokenCorpus

HEAD_SIZE = 16
SWEEP_WIDTHS, SWEEP_DEPTHS = (32, 64, 128, 256), (4, 16, 64)
SWEEP_RATES = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2)
STUDY_SCHEMES = {  # config fields of each scheme; learning rates swept at 48 layers
    "standard": (dict(init_scheme="standard"), (5e-4, 1e-3, 2e-3, 4e-3, 8e-3)),
    "layernorm_scaling": (dict(init_scheme="standard", layernorm_scaling=True), (5e-4, 1e-3, 2e-3, 4e-3, 8e-3)),
    "mix_ln": (dict(init_scheme="standard", norm_placement="mix"), (5e-4, 1e-3, 2e-3, 4e-3, 8e-3)),
    "deepnorm": (dict(init_scheme="deepnet", norm_placement="post"), (5e-4, 1e-3, 2e-3, 4e-3, 8e-3)),
    "deepscalelm": (dict(depth_parameterization="depth_mup", depth_base_layers=4, width_parameterization="mup",
                         width_base=64), (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2)),
}
DVS_SHAPES = ("4x128", "16x64", "64x32", "6x192", "24x96")
DVS_RATES = (8e-3, 1.6e-2)
RULES = dict(depth_parameterization="depth_mup", depth_base_layers=4, width_parameterization="mup", width_base=64)


# ----------------------------------------------------------------------------------------------------------------
# Corpora: built once in the main process, token ids handed to the workers as files
# ----------------------------------------------------------------------------------------------------------------
def save_corpus(name: str, corpus, folder: Path) -> dict:
    import torch

    path = folder / f"{name}.pt"
    torch.save({"train": corpus.train_ids, "validation": corpus.validation_ids, "vocab": len(corpus.tokenizer),
                "pad": corpus.tokenizer.pad_token_id, "eos": corpus.tokenizer.eos_token_id}, path)
    return {"path": str(path), "train_tokens": len(corpus.train_ids), "validation_tokens": len(corpus.validation_ids),
            "vocab_size": len(corpus.tokenizer),
            "manifest": {k: v for k, v in getattr(corpus, "manifest", {}).items() if isinstance(v, (str, int, float))}}


def build_corpora(args, folder: Path, corpora: dict) -> None:
    """Characters at once; the BPE corpus (minutes of tokenizer training) in a thread while the char runs start:
    its runs wait in the queue until `corpora["bpe"]` exists."""
    import threading

    corpora["char"] = save_corpus("char", common.CharCorpus(args.text), folder)
    if "bpe" in args.corpora_needed:
        threading.Thread(target=lambda: corpora.__setitem__(
            "bpe", save_corpus("bpe", TokenCorpus(args.corpus_megabytes, args.vocab_size), folder)), daemon=True).start()


class LoadedCorpus:
    def __init__(self, path: str):
        import torch

        data = torch.load(path, weights_only=True)  # our own file, written above
        self.train_ids, self.validation_ids, self.vocab = data["train"], data["validation"], data["vocab"]
        self.pad, self.eos = data["pad"], data["eos"]

    tokenizer = None  # ids only: common.train's causal-LM collator needs no tokenizer
    random_blocks = common.CharCorpus.random_blocks
    validation_blocks = common.CharCorpus.validation_blocks


_LOADED = {}


def corpus_of(shared: dict, name: str) -> LoadedCorpus:
    if name not in _LOADED:
        _LOADED[name] = LoadedCorpus(shared["corpora"][name]["path"])
    return _LOADED[name]


# ----------------------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------------------
def make_config(corpus: LoadedCorpus, layers: int, hidden: int, context: int, fields: dict):
    import torch
    import dslm_hf

    config = dslm_hf.DeepScaleLMConfig(
        vocab_size=corpus.vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // HEAD_SIZE),
        max_position_embeddings=context, init_sequence_length=context, is_decoder=True, pad_token_id=corpus.pad,
        eos_token_id=corpus.eos, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **fields)
    config.embedding_correlation = config.estimate_embedding_correlation(
        corpus.random_blocks(256, context, torch.Generator().manual_seed(1234)))
    return config


def run_one(task: dict, shared: dict) -> dict:
    """Train one causal LM on `task`'s corpus through `common.train` (cosine schedule, warmup 5% of the steps, no
    dropout); held-out loss on fixed blocks (64 a batch), curve, optional per-layer usefulness."""
    import torch

    if task["kind"] == "ngram":
        return ngram_baselines(task, shared)
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = True
    corpus = corpus_of(shared, task["corpus"])
    steps, batch, context = task["steps"], task["batch"], shared["context"]
    config = make_config(corpus, task["layers"], task["hidden"], context, task["fields"])
    model = common.build_deepscalelm(config, seed=task["seed"]).to(shared["device"])
    settings = common.TrainingSettings(
        steps=steps, batch=batch, context=context, learning_rate=task["learning_rate"],
        warmup_steps=max(1, steps // 20), schedule="cosine", validation_blocks=shared["validation_blocks"],
        seed=task["seed"], log_every=max(1, steps // 10),
        eval_every=max(1, steps // shared["evaluations"]) if task.get("curve") else None, eval_batch=64,
        deadline_s=shared["run_deadline_s"])
    result = common.train(model, corpus, "clm", settings)
    record = {**{k: v for k, v in task.items() if k != "fields"}, "fields": task["fields"],
              "validation_loss": result.validation_loss, "diverged_at": result.diverged_at, "cut_at": result.cut_at,
              "tokens": steps * batch * context, "parameters": common.parameter_count(model),
              "curve": result.held_out_curve, "wall_s": result.wall_s}
    if task.get("usefulness") and result.diverged_at is None and result.cut_at is None:
        blocks = corpus.validation_blocks(context, shared["validation_blocks"])[:shared["usefulness_blocks"]]
        record["usefulness"] = layer_usefulness(model, blocks.to(shared["device"]))
    return record


def layer_usefulness(model, blocks) -> dict:
    """Per layer after training: ablation cost, angular distance and gradient share (dslm_hf.layer_usefulness)."""
    from dslm_hf.layer_usefulness import measure_layer_usefulness

    labels = blocks.roll(-1, dims=1)
    labels[:, -1] = -100  # the last position has no next token in its block
    batches = [{"input_ids": i, "labels": l} for i, l in zip(blocks.split(16), labels.split(16))]
    result = measure_layer_usefulness(model, batches)
    return {"loss": result["loss"], "tokens": result["tokens"],
            **{key: [layer[key] for layer in result["layers"]]
               for key in ("ablation_cost", "angular_distance", "gradient_share")}}


def ngram_baselines(task: dict, shared: dict) -> dict:
    """Interpolated Kneser-Ney at orders 2..6 and the unigram, fitted on the training ids, on the held-out blocks."""
    from dslm_hf.baselines import KneserNeyLM, UnigramLM

    started = time.perf_counter()
    corpus = corpus_of(shared, task["corpus"])
    blocks = corpus.validation_blocks(shared["context"], shared["validation_blocks"])
    losses = {}
    for order in [n for n in range(2, 7) if corpus.vocab ** n < 2 ** 62]:  # codes must fit 62 bits (BPE: up to 5)
        losses[f"kn{order}"] = KneserNeyLM(corpus.vocab, order).fit(corpus.train_ids.numpy()).causal_lm_metrics(
            blocks.numpy())["loss"]
    losses["unigram"] = UnigramLM(corpus.vocab).fit(corpus.train_ids).metrics(blocks[:, 1:])["loss"]
    best = min((k for k in losses if k.startswith("kn")), key=losses.get)
    return {**task, "losses": losses, "best_ngram": best, "wall_s": time.perf_counter() - started}


# ----------------------------------------------------------------------------------------------------------------
# The task plan
# ----------------------------------------------------------------------------------------------------------------
def shape(text: str) -> tuple[int, int]:
    layers, hidden = text.lower().split("x")
    return int(layers), int(hidden)


def initial_tasks(args) -> list[tuple[int, dict]]:
    """(priority, task): lower runs first."""
    tasks = [(0, {"kind": "ngram", "corpus": name, "experiment": "baseline"}) for name in args.corpora_needed]
    for hidden, layers, rate in itertools.product(args.widths, args.depths, args.rates if "sweep" in args.experiments else ()):
        tasks.append((1, dict(kind="train", experiment="sweep", scheme="mup", corpus="char", layers=layers,
                              hidden=hidden, learning_rate=rate, seed=0, steps=args.sweep_steps, batch=args.batch,
                              fields=RULES)))
    for corpus, (scheme, (fields, rates)) in itertools.product(args.study_corpora, STUDY_SCHEMES.items()):
        if "study" not in args.experiments or scheme not in args.study_schemes:
            continue
        for rate in args.study_rate_override.get(scheme, rates[:args.study_rates]):
            tasks.append((2, dict(kind="train", experiment="study", scheme=scheme, corpus=corpus, layers=args.study_depths[0],
                                  hidden=64, learning_rate=rate, seed=0, steps=args.study_steps, batch=args.batch,
                                  fields=fields, usefulness=True)))
    for text, rate, seed in itertools.product(args.dvs_shapes, args.dvs_rates if "deep_vs_shallow" in args.experiments else (),
                                              args.seeds):
        layers, hidden = shape(text)
        tasks.append((3, dict(kind="train", experiment="deep_vs_shallow", scheme="deepscalelm", corpus="char",
                              layers=layers, hidden=hidden, shape=text, learning_rate=rate, seed=seed,
                              steps=args.dvs_steps, batch=args.batch, fields=RULES, curve=True)))
    for hidden, rate in itertools.product(args.widths, args.rates if "sweep" in args.experiments else ()):
        tasks.append((6, dict(kind="train", experiment="sweep", scheme="no_width_rule", corpus="char", layers=16,
                              hidden=hidden, learning_rate=rate, seed=0, steps=args.sweep_steps, batch=args.batch,
                              fields={k: v for k, v in RULES.items() if not k.startswith("width")})))
    return tasks


def best_rate(records: list[dict], **match) -> float | None:
    runs = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    finite = [r for r in runs if math.isfinite(r["validation_loss"])]
    return min(finite, key=lambda r: r["validation_loss"])["learning_rate"] if finite else None


def follow_ups(record: dict, records: list[dict], args) -> list[tuple[int, dict]]:
    """When a scheme's 48-layer rate sweep (seed 0, with usefulness) is complete: the other seeds at its best rate, and
    192 layers at the best rate and half of it (seed 0, with usefulness)."""
    if record.get("experiment") != "study" or record["layers"] != args.study_depths[0] or record["seed"] != 0:
        return []
    key = dict(experiment="study", scheme=record["scheme"], corpus=record["corpus"], layers=args.study_depths[0], seed=0)
    rates = STUDY_SCHEMES[record["scheme"]][1][:args.study_rates]
    if len([r for r in records if all(r.get(k) == v for k, v in key.items())]) < len(rates):
        return []
    rate = best_rate(records, **key)
    if rate is None:
        return []
    base = {k: record[k] for k in ("kind", "experiment", "scheme", "corpus", "hidden", "steps", "batch", "fields")}
    out = [(4, {**base, "layers": args.study_depths[0], "learning_rate": rate, "seed": seed})
           for seed in args.seeds if seed != 0]
    for depth in args.study_depths[1:]:
        out += [(5, {**base, "layers": depth, "learning_rate": r, "seed": 0, "usefulness": True}) for r in (rate, rate / 2)]
    return out


def run_plan(args, shared: dict, on_result) -> list[dict]:
    """Run the queue on `args.workers` spawned processes; no task starts after `args.budget_s`. Returns skipped."""
    queue = []
    counter = itertools.count()
    for priority, task in initial_tasks(args):
        heapq.heappush(queue, (priority, next(counter), task))
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as pool:
        pending, waiting = {}, []
        while queue or pending or waiting:
            for item in waiting:  # runs on a corpus that was not ready yet
                heapq.heappush(queue, item)
            waiting = []
            while queue and len(pending) < args.workers and time.perf_counter() - started <= args.budget_s:
                item = heapq.heappop(queue)
                if item[2]["corpus"] not in shared["corpora"]:
                    waiting.append(item)
                    continue
                pending[pool.submit(run_one, item[2], shared)] = item[2]
            if time.perf_counter() - started > args.budget_s:
                queue += waiting
                waiting = []
            if not pending:
                if waiting:
                    time.sleep(1)
                    continue
                break
            done, _ = futures.wait(pending, timeout=5, return_when=futures.FIRST_COMPLETED)
            for future in done:
                task = pending.pop(future)
                try:
                    record = future.result()
                except Exception as error:  # a failed run is recorded, not fatal to the others
                    record = {**task, "error": f"{type(error).__name__}: {error}", "validation_loss": math.nan}
                for priority, follow in on_result(record):
                    heapq.heappush(queue, (priority, next(counter), follow))
    return [task for _, _, task in queue]


# ----------------------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------------------
def table(records: list[dict], group_keys: tuple[str, ...]) -> dict:
    """Mean, spread and seeds of finished runs, grouped by `group_keys`."""
    groups = {}
    for r in records:
        if r.get("kind") == "train" and math.isfinite(r.get("validation_loss", math.nan)):
            groups.setdefault(tuple(r[k] for k in group_keys), []).append(r["validation_loss"])
    return {"/".join(map(str, key)): {"mean": statistics.fmean(v), "min": min(v), "max": max(v), "seeds": len(v),
                                      "stdev": statistics.stdev(v) if len(v) > 1 else 0.0}
            for key, v in sorted(groups.items(), key=lambda item: str(item[0]))}


def sweep_summary(records: list[dict]) -> dict:
    optima = {}
    for scheme in ("mup", "no_width_rule"):
        for hidden, layers in sorted({(r["hidden"], r["layers"]) for r in records if r.get("scheme") == scheme}):
            rate = best_rate(records, experiment="sweep", scheme=scheme, hidden=hidden, layers=layers)
            runs = [r for r in records if r.get("experiment") == "sweep" and r.get("scheme") == scheme
                    and r["hidden"] == hidden and r["layers"] == layers]
            optima[f"{scheme}/{hidden}x/{layers}L"] = {
                "best_learning_rate": rate, "runs": len(runs),
                "validation_loss": min((r["validation_loss"] for r in runs if math.isfinite(r["validation_loss"])),
                                       default=math.nan)}
    spread = {}
    for scheme in ("mup", "no_width_rule"):
        rates = [v["best_learning_rate"] for k, v in optima.items() if k.startswith(scheme + "/") and v["best_learning_rate"]]
        if rates:
            spread[scheme] = {"shapes": len(rates), "min": min(rates), "max": max(rates),
                              "factor2_steps": round(math.log2(max(rates) / min(rates)), 2)}
    return {"optima": optima, "optimum_spread": spread}


def write_all(args, records: list[dict], shared: dict, started: float, skipped: list) -> None:
    baselines = {r["corpus"]: r for r in records if r.get("kind") == "ngram"}
    common_fields = {"code": common.RUN_CODE, "settings": vars(args), "corpora": shared["corpora"],
                     "device": shared["device_name"], "ngram_baselines": baselines,
                     "wall_s": time.perf_counter() - started, "skipped": skipped}
    out = Path(args.out_dir)
    sweep = [r for r in records if r.get("experiment") == "sweep"]
    common.write_results(out / "width_depth_sweep.json", {**common_fields, "runs": sweep, **sweep_summary(sweep)})
    study = [r for r in records if r.get("experiment") == "study"]
    shallow = args.study_depths[0]
    best = {(r["corpus"], r["scheme"]): best_rate(study, experiment="study", corpus=r["corpus"], scheme=r["scheme"],
                                                  layers=shallow, seed=0) for r in study}
    at_best = [r for r in study if r["layers"] != shallow or r["learning_rate"] == best[(r["corpus"], r["scheme"])]]
    common.write_results(out / "curse_of_depth.json", {
        **common_fields, "runs": study,
        "rate_sweep": table([r for r in study if r["seed"] == 0 and r["layers"] == shallow],
                            ("corpus", "scheme", "learning_rate")),
        "at_best_rate": table(at_best, ("corpus", "scheme", "layers", "learning_rate"))})
    dvs = [r for r in records if r.get("experiment") == "deep_vs_shallow"]
    common.write_results(out / "deep_vs_shallow_transfer.json", {
        **common_fields, "runs": dvs, "table": table(dvs, ("learning_rate", "shape"))})


# ----------------------------------------------------------------------------------------------------------------
# Plots and the markdown tables of RESULTS.md, from the three result files
# ----------------------------------------------------------------------------------------------------------------
def provenance(record: dict, path: Path) -> str:
    machine = record["machine"]
    return (f"`{path.name}`: commit {str(machine['git_commit'])[:7]} (uncommitted paths: "
            f"{len(machine.get('git_dirty_paths') or [])}), {record['device']}, {machine['date_utc']}, "
            f"wall {record['wall_s']:.0f} s.")


def report(sweep_path: Path, study_paths: list[Path], dvs_path: Path) -> str:
    """Write the plots next to the result files and return the markdown tables (`--report`). Each table comes from
    one result file (one code version) and says which."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = json.loads(sweep_path.read_text())
    dvs = json.loads(dvs_path.read_text())
    lines = [provenance(sweep, sweep_path), ""]
    out = sweep_path.parent
    # 1. the sweep: held-out loss against base rate, one panel per depth, one curve per width
    runs = [r for r in sweep["runs"] if r.get("kind") == "train"]
    depths = sorted({r["layers"] for r in runs if r["scheme"] == "mup"})
    panels = [("mup", d) for d in depths] + [("no_width_rule", 16)] * any(r["scheme"] == "no_width_rule" for r in runs)
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for axis, (scheme, depth) in zip(axes[0], panels):
        for hidden in sorted({r["hidden"] for r in runs}):
            points = sorted((r["learning_rate"], r["validation_loss"]) for r in runs if r["scheme"] == scheme
                            and r["layers"] == depth and r["hidden"] == hidden and math.isfinite(r["validation_loss"]))
            if points:
                axis.plot(*zip(*points), marker="o", label=f"width {hidden}")
        axis.set(xscale="log", xlabel="base learning rate", ylabel="held-out loss (nats/char)",
                 title=f"{'width+depth rules' if scheme == 'mup' else 'depth rule only'}, {depth} layers")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(sweep_path.with_suffix(".png"), dpi=80)
    plt.close(figure)
    lines += ["| rules | " + " | ".join(f"{w} wide" for w in sorted({r['hidden'] for r in runs})) + " |",
              "|---|" + "---|" * len({r['hidden'] for r in runs})]
    for scheme, depth in panels:
        cells = []
        for hidden in sorted({r["hidden"] for r in runs}):
            best = sweep["optima"].get(f"{scheme}/{hidden}x/{depth}L")
            cells.append(f"{best['best_learning_rate']:g} ({best['validation_loss']:.3f})" if best and best["best_learning_rate"] else "-")
        lines.append(f"| {'width+depth' if scheme == 'mup' else 'depth only'}, {depth} layers | " + " | ".join(cells) + " |")
    lines += ["", "Optimum spread: " + "; ".join(f"{k}: {v['min']:g} to {v['max']:g} over {v['shapes']} shapes "
                                                  f"({v['factor2_steps']} factor-2 steps)" for k, v in sweep["optimum_spread"].items()), ""]

    # 2. the study: loss at the best rate, and per-layer ablation cost after training (one block per result file)
    for study_path in study_paths:
        lines += study_section(json.loads(study_path.read_text()), study_path, plt)
    return lines_after_study(lines, dvs, dvs_path, plt)


def study_section(study: dict, study_path: Path, plt) -> list[str]:
    lines = [provenance(study, study_path), ""]
    lines += ["| corpus | scheme | layers | best lr | held-out loss (mean, min-max, seeds) |", "|---|---|---|---|---|"]
    for key, row in study["at_best_rate"].items():
        corpus, scheme, layers, rate = key.split("/")
        lines.append(f"| {corpus} | {scheme} | {layers} | {float(rate):g} | {row['mean']:.4f} ({row['min']:.4f}-{row['max']:.4f}, {row['seeds']}) |")
    lines += ["", "n-gram baselines on the same held-out blocks: " + "; ".join(
        f"{corpus}: best {b['best_ngram']} {b['losses'][b['best_ngram']]:.4f}, unigram {b['losses']['unigram']:.4f}"
        for corpus, b in study["ngram_baselines"].items() if "best_ngram" in b), ""]
    useful = [r for r in study["runs"] if r.get("usefulness")]
    best_rates, best_means = {}, {}
    for key, row in study["at_best_rate"].items():  # at each depth, the better of the rates run there
        corpus, scheme, layers, rate = key.split("/")
        group = (corpus, scheme, int(layers))
        if row["mean"] < best_means.get(group, math.inf):
            best_rates[group], best_means[group] = float(rate), row["mean"]
    chosen = [r for r in useful if best_rates.get((r["corpus"], r["scheme"], r["layers"])) == r["learning_rate"]]
    combos = sorted({(r["corpus"], r["layers"]) for r in chosen})
    if combos:
        figure, axes = plt.subplots(1, len(combos), figsize=(5 * len(combos), 3.6), squeeze=False)
        lines += ["| corpus | layers | scheme | share of ablation cost in the last half | mean angular distance, last half / first half |",
                  "|---|---|---|---|---|"]
        for axis, (corpus, layers) in zip(axes[0], combos):
            for r in sorted(chosen, key=lambda r: r["scheme"]):
                if r["corpus"] != corpus or r["layers"] != layers:
                    continue
                cost = r["usefulness"]["ablation_cost"]
                axis.plot(range(1, len(cost) + 1), cost, label=r["scheme"])
                half = len(cost) // 2
                total = sum(max(c, 0.0) for c in cost)
                angles = r["usefulness"]["angular_distance"]
                lines.append(f"| {corpus} | {layers} | {r['scheme']} | "
                             f"{100 * sum(max(c, 0.0) for c in cost[half:]) / total if total else math.nan:.1f}% | "
                             f"{statistics.fmean(angles[half:]):.3f} / {statistics.fmean(angles[:half]):.3f} |")
            axis.set_yscale("symlog", linthresh=1e-3)
            axis.set(xlabel="layer", ylabel="loss increase when skipped (nats)",
                     title=f"{corpus}, {layers} layers, after training")
            axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(study_path.with_name(study_path.stem + "_usefulness.png"), dpi=80)
        plt.close(figure)
        lines.append("")

    return lines


def lines_after_study(lines: list[str], dvs: dict, dvs_path: Path, plt) -> str:
    lines += [provenance(dvs, dvs_path), ""]
    # 3. deep vs shallow with one transferred rate
    baseline = dvs["ngram_baselines"].get("char")
    rates = sorted({r["learning_rate"] for r in dvs["runs"]})
    figure, axes = plt.subplots(1, len(rates), figsize=(6 * len(rates), 4), squeeze=False)
    for axis, rate in zip(axes[0], rates):
        for index, shape_name in enumerate(sorted({r["shape"] for r in dvs["runs"]}, key=lambda s: shape(s)[1])):
            for r in dvs["runs"]:
                if r["shape"] == shape_name and r["learning_rate"] == rate and r["curve"]:
                    tokens, losses = zip(*r["curve"])
                    axis.plot(tokens, losses, color=f"C{index}", alpha=0.6,
                              label=f"{shape_name} ({r['parameters'] / 1e6:.2f}M)" if r["seed"] == 0 else None)
        if baseline:
            axis.axhline(baseline["losses"][baseline["best_ngram"]], color="k", linestyle="--",
                         label=f"KN {baseline['best_ngram'][2:]}-gram")
        axis.set(xscale="log", ylim=(1.3, 3.0), xlabel="training tokens", ylabel="held-out loss (nats/char)",
                 title=f"one base rate {rate:g} for every shape")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(dvs_path.with_suffix(".png"), dpi=80)
    plt.close(figure)
    lines += ["| base lr | shape | held-out loss (mean, min-max, seeds) |", "|---|---|---|"]
    for key, row in dvs["table"].items():
        rate, shape_name = key.split("/")
        lines.append(f"| {float(rate):g} | {shape_name} | {row['mean']:.4f} ({row['min']:.4f}-{row['max']:.4f}, {row['seeds']}) |")
    return "\n".join(lines)


def parse_arguments(argv=None):
    parser = common.add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                                         "benchmarks/results/width_depth_sweep.json")
    parser.add_argument("--out-dir", default="benchmarks/results")
    parser.add_argument("--experiments", nargs="+", default=["sweep", "study", "deep_vs_shallow"],
                        choices=["sweep", "study", "deep_vs_shallow"])
    parser.add_argument("--study-schemes", nargs="+", default=list(STUDY_SCHEMES), choices=list(STUDY_SCHEMES))
    parser.add_argument("--study-rate", action="append", default=[], metavar="SCHEME=RATE",
                        help="run SCHEME only at these rates (repeatable) instead of its sweep")
    parser.add_argument("--dvs-rates", nargs="+", type=float, default=list(DVS_RATES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=330, help="no new run starts after this many seconds")
    parser.add_argument("--run-deadline-s", type=float, default=240, help="a run still training after this is cut")
    parser.add_argument("--widths", nargs="+", type=int, default=list(SWEEP_WIDTHS))
    parser.add_argument("--depths", nargs="+", type=int, default=list(SWEEP_DEPTHS))
    parser.add_argument("--rates", nargs="+", type=float, default=list(SWEEP_RATES))
    parser.add_argument("--study-depths", nargs="+", type=int, default=[48, 192])
    parser.add_argument("--study-rates", type=int, default=5, help="learning rates swept per scheme at 48 layers")
    parser.add_argument("--study-corpora", nargs="*", default=["char", "bpe"], choices=["char", "bpe"])
    parser.add_argument("--dvs-shapes", nargs="+", default=list(DVS_SHAPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--sweep-steps", type=int, default=400)
    parser.add_argument("--study-steps", type=int, default=600)
    parser.add_argument("--dvs-steps", type=int, default=750, help="750 x 32 x 64 = 1.54M tokens")
    parser.add_argument("--evaluations", type=int, default=15, help="held-out evaluations along a curve")
    parser.add_argument("--validation-blocks", type=int, default=256)
    parser.add_argument("--usefulness-blocks", type=int, default=64)
    parser.add_argument("--corpus-megabytes", type=float, default=8.0)
    parser.add_argument("--report", nargs="+", metavar="FILE",
                        help="plots and markdown tables from result files in --out-dir: SWEEP STUDY... DEEP_VS_SHALLOW")
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args(argv)
    if args.smoke:
        args.widths, args.depths, args.rates, args.study_depths = [32, 64], [2], [4e-3, 8e-3], [4, 8]
        args.dvs_shapes, args.seeds, args.batch, args.context = ["2x32", "4x16"], [0, 1], 2, 16
        args.sweep_steps = args.study_steps = args.dvs_steps = 3
        args.evaluations, args.validation_blocks, args.usefulness_blocks = 2, 4, 2
        args.corpus_megabytes, args.vocab_size, args.study_rates = 0.2, 300, 2
    args.corpora_needed = sorted({"char", *args.study_corpora})
    args.study_rate_override = {}
    for item in args.study_rate:
        scheme, rate = item.split("=")
        args.study_rate_override.setdefault(scheme, []).append(float(rate))
    return args


def main(argv=None):
    args = parse_arguments(argv)
    if args.report:
        out = Path(args.out_dir)
        print(report(out / args.report[0], [out / name for name in args.report[1:-1]], out / args.report[-1]))
        return
    started = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory() as folder:
        import torch

        shared = {"corpora": {}, "device": args.device, "context": args.context,
                  "validation_blocks": args.validation_blocks, "usefulness_blocks": args.usefulness_blocks,
                  "evaluations": args.evaluations, "run_deadline_s": args.run_deadline_s,
                  "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
        build_corpora(args, Path(folder), shared["corpora"])
        print(f"char corpus ready in {time.perf_counter() - started:.0f}s: {shared['corpora']}", flush=True)

        def on_result(record):
            records.append(record)
            label = record.get("error") or (f"val {record.get('validation_loss', math.nan):.4f}" if record["kind"] == "train"
                                            else f"{record['losses']}")
            print(f"{time.perf_counter() - started:5.0f}s {record['experiment']:15s} {record.get('scheme', ''):18s} "
                  f"{record.get('corpus')} {record.get('layers', '')}x{record.get('hidden', '')} "
                  f"lr {record.get('learning_rate', '')} seed {record.get('seed', '')} {label} "
                  f"({record.get('wall_s', 0):.0f}s)", flush=True)
            follow = follow_ups(record, records, args) if record["kind"] == "train" else []
            write_all(args, records, shared, started, [])
            return follow

        skipped = run_plan(args, shared, on_result)
        write_all(args, records, shared, started, skipped)
    print(f"done in {time.perf_counter() - started:.0f}s: {len(records)} runs, {len(skipped)} skipped", flush=True)


if __name__ == "__main__":
    main()
