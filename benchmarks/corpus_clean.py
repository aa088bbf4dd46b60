"""The cleaned default corpus against the old one: count-based held-out losses and how much held-out text also occurs
in training.

    python benchmarks/corpus_clean.py --out benchmarks/results/corpus_clean.json

Both corpora at the README main command's settings (`--default_corpus_megabytes 4`, 5% held out, a 4096-token
byte-level BPE trained on the training split, 64-token blocks):

- old: the standard library's .py files outside the test folders, sorted by path, cut when the raw bytes reach the
  budget, every 20th file (evenly spaced, `hold_out_documents`) held out: what dslm-pretrain used before;
- clean: `dslm_hf.data.load_default_corpus` (generated tables, duplicate files and repeated paragraphs dropped,
  held out by a hash of the file's path; `dslm_hf.stdlib_corpus`).

For each: the unigram (`UnigramLM`) and interpolated Kneser-Ney 2..5-gram (`KneserNeyLM`) losses, fitted on all
training blocks, on all held-out blocks and on the first 256 (the blocks dslm-pretrain evaluates and prints its
4-gram on); the share of held-out 40-character windows (every position, within a file)
whose text occurs anywhere in the training text, and of held-out lines longer than 20 characters (stripped) that
occur as a training line. A 6-gram does not fit `KneserNeyLM`'s 62-bit n-gram codes at a 4096-token vocabulary.
One core, about a minute.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from dslm_hf import stdlib_corpus  # noqa: E402
from dslm_hf.baselines import KneserNeyLM, UnigramLM  # noqa: E402
from dslm_hf.data import hold_out_documents, load_default_corpus, pack_into_blocks, train_byte_level_bpe  # noqa: E402

WINDOW_CHARS = 40
LINE_CHARS = 20
EVAL_BLOCKS = 256  # the held-out blocks dslm-pretrain evaluates (and scores its printed 4-gram on) by default


def parse_arguments(argv=None):
    parser = common.add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]),
                                         "benchmarks/results/corpus_clean.json", trains_on_text=False)
    parser.add_argument("--megabytes", type=float, default=4.0, help="corpus budget (dslm-pretrain's default: 4)")
    parser.add_argument("--validation-fraction", type=float, default=0.05)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--max-order", type=int, default=5)
    return parser.parse_args(argv)


def old_corpus(megabytes: float, validation_fraction: float) -> DatasetDict:
    """The default corpus as dslm-pretrain read it before cleaning: raw files up to the budget, evenly spaced ones
    held out."""
    files, budget = [], megabytes * 1e6
    for relative, path in stdlib_corpus.candidate_files()[0]:
        if budget <= 0:
            break
        files.append((relative, path.read_text(encoding="utf-8", errors="replace")))
        budget -= path.stat().st_size
    corpus = DatasetDict(train=Dataset.from_dict({"text": [t for _, t in files], "path": [p for p, _ in files]}))
    return hold_out_documents(corpus, validation_fraction)


def text_overlap(train_texts: list[str], held_out_texts: list[str]) -> dict:
    """Shares of held-out 40-character windows and of held-out lines (> 20 characters) found in the training text."""
    windows = [text[i:i + WINDOW_CHARS] for text in held_out_texts for i in range(len(text) - WINDOW_CHARS + 1)]
    wanted, found = set(windows), set()
    for text in train_texts:
        for i in range(len(text) - WINDOW_CHARS + 1):
            window = text[i:i + WINDOW_CHARS]
            if window in wanted:
                found.add(window)
    train_lines = {line.strip() for text in train_texts for line in text.splitlines()}
    lines = [line.strip() for text in held_out_texts for line in text.splitlines() if len(line.strip()) > LINE_CHARS]
    return {"held_out_windows": len(windows), "windows_in_training": round(sum(w in found for w in windows) / len(windows), 4),
            "held_out_lines": len(lines), "lines_in_training": round(sum(l in train_lines for l in lines) / len(lines), 4)}


def count_baselines(splits: DatasetDict, vocab_size: int, block_size: int, max_order: int) -> dict:
    tokenizer = train_byte_level_bpe(splits["train"]["text"], vocab_size)
    train = pack_into_blocks(splits["train"].select_columns(["text"]), tokenizer, block_size)[:]["input_ids"]
    held_out = pack_into_blocks(splits["validation"].select_columns(["text"]), tokenizer, block_size)[:]["input_ids"]
    stream, first = train.flatten().numpy(), held_out[:EVAL_BLOCKS]
    unigram = UnigramLM(len(tokenizer)).fit(torch.as_tensor(stream))
    losses = {"unigram": (unigram.metrics(held_out[:, 1:])["loss"], unigram.metrics(first[:, 1:])["loss"])}
    for order in range(2, max_order + 1):
        model = KneserNeyLM(len(tokenizer), order).fit(stream)
        losses[f"kn_{order}"] = tuple(model.causal_lm_metrics(np.asarray(blocks))["loss"] for blocks in (held_out, first))
    return {"train_blocks": len(train), "held_out_blocks": len(held_out),
            "held_out_loss_nats": {name: round(loss, 4) for name, (loss, _) in losses.items()},
            f"first_{EVAL_BLOCKS}_held_out_blocks_loss_nats": {name: round(loss, 4) for name, (_, loss) in losses.items()}}


def measure(name: str, splits: DatasetDict, args) -> dict:
    started = time.perf_counter()
    texts = {split: list(splits[split]["text"]) for split in ("train", "validation")}
    record = {"files": {split: len(t) for split, t in texts.items()},
              "bytes": {split: sum(len(x.encode()) for x in t) for split, t in texts.items()},
              "sha256": {split: stdlib_corpus.texts_sha256(t) for split, t in texts.items()},
              "overlap": text_overlap(texts["train"], texts["validation"]),
              **count_baselines(splits, args.vocab_size, args.block_size, args.max_order)}
    record["seconds"] = round(time.perf_counter() - started, 1)
    print(name, record["overlap"], record["held_out_loss_nats"], flush=True)
    return record


def main(argv=None):
    args = parse_arguments(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.megabytes, args.vocab_size, args.max_order = 0.2, 300, 2
    clean, manifest = load_default_corpus(args.megabytes, args.validation_fraction)
    results = {
        "settings": {"megabytes": args.megabytes, "validation_fraction": args.validation_fraction,
                     "vocab_size": args.vocab_size, "block_size": args.block_size, "smoke": args.smoke,
                     "window_chars": WINDOW_CHARS, "line_chars": LINE_CHARS},
        "old": measure("old", old_corpus(args.megabytes, args.validation_fraction), args),
        "clean": measure("clean", clean, args),
        "clean_manifest": {key: value for key, value in manifest.items() if key not in ("dropped_files", "train", "validation")},
    }
    path = common.write_results(args.out, results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
