"""Fine-tuning DeepScaleLM checkpoints with transformers `Trainer`, optionally through PEFT LoRA.

Tasks (`--task`): sequence-classification, token-classification, question-answering (extractive, SQuAD format),
causal-sft (prompt -> response on a decoder; prompt tokens are masked out of the loss) and seq2seq-sft
(prompt -> response on an encoder-decoder). Every `TrainingArguments` flag works as usual
(`--activation_checkpointing`, `--bf16`, `--resume_from_checkpoint`, `--eval_strategy`, ...).

    dslm-finetune --task sequence-classification --model_name_or_path path/or/repo-id \
        --train_file train.jsonl --validation_file dev.jsonl --output_dir out \
        --num_train_epochs 3 --learning_rate 1e-4 [--lora --lora_r 8 --lora_alpha 16]

See docs/finetuning.md for the data formats and metrics.
"""

import csv
import glob
import io
import json
import math
import os
import pickle
import re
import shutil
import string
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from datasets import DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .cli import (COUNT, NON_NEGATIVE, NON_NEGATIVE_COUNT, POSITIVE, SHARE, Range, UserError, check_output_dir,
                  check_ranges, range_problems, run_command, usage_errors_as_user_errors)
from .checkpointing import check_model_folder, loading
from .data import load_hub_dataset, read_text_file
from .modeling_deepscalelm import IGNORE_INDEX  # padding, prompt tokens, non-first sub-words: no loss
from .optimization import build_adamw, describe_groups, rule_settings

logger = logging.get_logger(__name__)


class FinetuneInputError(UserError):
    """Bad user input (task, data, labels, checkpoint) found before training; `main` prints it as one line."""


@dataclass(frozen=True)
class TaskSpec:
    auto_model_class: type
    peft_task_type: str
    needs: str  # which kind of checkpoint the task needs, for error messages


_ONE_STACK = "a decoder or an encoder checkpoint (config.is_encoder_decoder=False)"
TASKS = {
    "sequence-classification": TaskSpec(AutoModelForSequenceClassification, "SEQ_CLS", _ONE_STACK),
    "token-classification": TaskSpec(AutoModelForTokenClassification, "TOKEN_CLS", _ONE_STACK),
    "question-answering": TaskSpec(AutoModelForQuestionAnswering, "QUESTION_ANS", _ONE_STACK),
    "causal-sft": TaskSpec(AutoModelForCausalLM, "CAUSAL_LM", "a decoder checkpoint (config.is_decoder=True)"),
    "seq2seq-sft": TaskSpec(AutoModelForSeq2SeqLM, "SEQ_2_SEQ_LM",
                            "an encoder-decoder checkpoint (config.is_encoder_decoder=True)"),
}


@dataclass
class FinetuneArguments:
    task: str = field(metadata={"help": "What to fine-tune for.", "choices": list(TASKS)})
    model_name_or_path: str = field(metadata={"help": "DeepScaleLM checkpoint: a local folder or a Hub repo id."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the checkpoint's own."})
    revision: str = field(default="main", metadata={
        "help": "Hub revision (branch, tag or commit) of the checkpoint (and of its tokenizer)."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow code shipped with the checkpoint (DeepScaleLM itself runs from the installed dslm_hf)."})
    train_file: str | None = field(default=None, metadata={"help": "Local .csv/.json/.jsonl/.txt training data."})
    validation_file: str | None = field(default=None, metadata={"help": "Local evaluation data (same format)."})
    dataset_name: str | None = field(default=None, metadata={"help": "A `datasets` Hub dataset (instead of files)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    validation_fraction: float = field(default=0.1, metadata={
        "help": "Share of the training split held out for evaluation when the data has no validation split."})
    text_column: str = field(default="text", metadata={"help": "sequence-classification: the input text."})
    text_pair_column: str | None = field(default=None, metadata={
        "help": "sequence-classification: an optional second text (sentence pairs)."})
    label_column: str = field(default="label", metadata={
        "help": "sequence-classification: class (int or string); token-classification: per-word tags (list)."})
    class_names: str | None = field(default=None, metadata={
        "help": "Comma-separated list of every class (classification tasks). Without it the classes are those of "
                "the training data, integer ids must run 0..K-1, and a validation class absent from training is "
                "refused; with it, every label must be one of these names and unseen classes are allowed."})
    tokens_column: str = field(default="tokens", metadata={"help": "token-classification: the words (list)."})
    question_column: str = field(default="question", metadata={"help": "question-answering: the question."})
    context_column: str = field(default="context", metadata={"help": "question-answering: the passage."})
    answers_column: str = field(default="answers", metadata={
        "help": 'question-answering: SQuAD answers {"text": [...], "answer_start": [...]}.'})
    prompt_column: str = field(default="prompt", metadata={
        "help": "SFT: the prompt (not trained on). causal-sft with --prompt_column '' trains on whole texts."})
    response_column: str = field(default="response", metadata={"help": "SFT: the target text."})
    max_length: int | None = field(default=None, metadata={
        "help": "Longest tokenized input (and seq2seq target); default: the model's max_position_embeddings."})
    doc_stride: int | None = field(default=None, metadata={
        "help": "question-answering: tokens shared by consecutive windows of a long context; default max_length // 4."})
    max_answer_length: int = field(default=30, metadata={"help": "question-answering: longest predicted answer."})
    lora: bool = field(default=False, metadata={
        "help": "Train LoRA adapters (targets: dslm_hf.peft_support.DEFAULT_LORA_TARGET_MODULES) instead of all "
                "weights; fresh task heads are trained in full."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha (update scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start fresh in an --output_dir that holds a previous fine-tuning's outputs (model, adapter, "
                "checkpoint-N/, *_results.json, trainer_state.json): they are deleted. Without it such a folder is "
                "refused unless --resume_from_checkpoint is given."})

    def __post_init__(self):
        if self.task not in TASKS:
            raise FinetuneInputError(f"unknown task {self.task!r}; valid tasks: {', '.join(TASKS)}")
        if (self.dataset_name is None) == (self.train_file is None):
            raise FinetuneInputError("give exactly one data source: --train_file (local) or --dataset_name (Hub)")
        if self.task == "seq2seq-sft" and not self.prompt_column:
            raise FinetuneInputError("seq2seq-sft needs a --prompt_column: the prompt is the encoder input")
        for name, allowed in range_problems(self, FINETUNE_RANGES):
            raise FinetuneInputError(f"--{name}={getattr(self, name)!r} is invalid: {allowed}")


# The numeric arguments' allowed values (None: unset, the documented default applies), checked before any data,
# tokenizer or model is loaded; NaN and infinity are outside every range.
FINETUNE_RANGES = {
    "validation_fraction": SHARE,
    "max_length": COUNT,
    "doc_stride": NON_NEGATIVE_COUNT,
    "max_answer_length": COUNT,
    "lora_r": COUNT,
    "lora_alpha": POSITIVE,
    "lora_dropout": Range(0, 1, high_open=True),
}
# The Trainer settings dslm-finetune hands on; TrainingArguments itself accepts NaN or a beta of 1.5 silently.
TRAINING_RANGES = {
    "learning_rate": NON_NEGATIVE,  # 0: the weights stay as loaded (evaluation through training's data path)
    "weight_decay": NON_NEGATIVE,
    "adam_beta1": Range(0, 1, high_open=True),
    "adam_beta2": Range(0, 1, high_open=True),
    "adam_epsilon": POSITIVE,
    "max_grad_norm": NON_NEGATIVE,  # 0: no clipping
    "num_train_epochs": POSITIVE,
    "per_device_train_batch_size": COUNT,
    "per_device_eval_batch_size": COUNT,
    "gradient_accumulation_steps": COUNT,
}


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
_LOADERS_BY_SUFFIX = {".csv": "csv", ".json": "json", ".jsonl": "json", ".txt": "text"}


def check_data_file(path: str, split: str, texts: list[str] = ()) -> set[str]:
    """Refuse a missing, empty, binary or non-UTF-8 data file, a CSV with only a header or a line whose field count
    differs from the header's, a JSON Lines line that is not a JSON object, and a JSON value in one of the `texts`
    columns that is not a string (a number the JSON loader would silently turn into text), naming the file and the
    line. Returns the file's column names."""
    role = f"--{split}_file"
    text = read_text_file(path, role)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        header, rows = next(reader), 0
        for row in reader:
            if not row:
                continue  # blank line: the CSV loader skips it too
            if len(row) != len(header):
                raise FinetuneInputError(f"{role} {path}: line {reader.line_num} has {len(row)} fields but the header "
                                         f"has {len(header)} ({', '.join(header)}); fix or quote that line")
            rows += 1
        if rows == 0:
            raise FinetuneInputError(f"{role} {path} has a header but no rows: give at least one example")
        return set(header)
    if suffix not in (".json", ".jsonl"):
        return set()
    if suffix == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            document = None  # the JSON loader also reads .json files holding one object per line
        if document is not None:
            rows_ok = isinstance(document, list) and all(isinstance(row, dict) for row in document)
            columns_ok = isinstance(document, dict) and all(isinstance(c, list) for c in document.values())
            if not (rows_ok or columns_ok):
                raise FinetuneInputError(f"{role} {path} holds a JSON {type(document).__name__} that is neither a "
                                         "list of row objects nor an object of column lists")
            rows = document if rows_ok else [dict(zip(document, values)) for values in zip(*document.values())]
            for number, row in enumerate(rows, start=1):
                check_json_texts(row, texts, f"{role} {path}: row {number}")
            return set(document) if columns_ok else {column for row in document for column in row}
    columns = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise FinetuneInputError(f"{role} {path}: line {number} is not valid JSON ({error.msg} at column "
                                     f"{error.colno}); fix that line") from None
        if not isinstance(row, dict):
            raise FinetuneInputError(f"{role} {path}: line {number} is a JSON {type(row).__name__}, not an "
                                     "object of columns; write one {\"column\": value, ...} object per line")
        check_json_texts(row, texts, f"{role} {path}: line {number}")
        columns.update(row)
    return columns


def check_json_texts(row: dict, texts: list[str], where: str) -> None:
    """A text column's JSON value must be a string (or null, refused with the other rows' checks after loading)."""
    for column in texts:
        value = row.get(column)
        if value is not None and not isinstance(value, str):
            raise FinetuneInputError(f"{where}, column {column!r}: {json.dumps(value)[:60]} is a JSON "
                                     f"{type(value).__name__}, not text; quote it if it is text, or fix the row")


def check_same_columns(columns: dict[str, set[str]], data_files: dict[str, str]) -> None:
    """The JSON and CSV loaders build one table from both files and fail on a column that one of them lacks."""
    if len(columns) == 2 and columns["train"] != columns["validation"]:
        raise FinetuneInputError(
            f"--validation_file {data_files['validation']} has columns {sorted(columns['validation'])} but "
            f"--train_file {data_files['train']} has {sorted(columns['train'])}: give both files the same columns")


def text_columns(args: FinetuneArguments) -> list[str]:
    """The columns the tokenizer reads as strings (token classification reads lists of words, checked elsewhere)."""
    if args.task == "token-classification":
        return []
    if args.task == "question-answering":
        return [args.question_column, args.context_column]
    columns = required_columns(args)
    return columns[:-1] if args.task == "sequence-classification" else columns


def check_text_values(column: list, name: str, split: str) -> None:
    """Every row of a text column holds non-blank text: a null or a number fails inside the tokenizer, and an empty
    text trains on special tokens alone."""
    for row, value in enumerate(column, start=1):
        where = f"{split} row {row}, column {name!r}"
        if value is None:
            raise FinetuneInputError(f"{where}: the text is null (or the row lacks the column); fix or drop the row")
        if not isinstance(value, str):
            raise FinetuneInputError(f"{where}: {value!r} is a {type(value).__name__}, not text; fix the column")
        if not value.strip():
            raise FinetuneInputError(f"{where}: the text is empty; fix or drop the row")


def load_raw_datasets(args: FinetuneArguments, seed: int) -> DatasetDict:
    """`train` and `validation` splits from local files or a Hub dataset, with the task's columns and valid labels;
    a missing validation split is held out of the training data."""
    if args.dataset_name is not None:
        raw = load_hub_dataset(args.dataset_name, args.dataset_config_name, "--dataset_name")
    else:
        data_files = {"train": args.train_file}
        if args.validation_file is not None:
            data_files["validation"] = args.validation_file
        suffixes = {os.path.splitext(path)[1].lower() for path in data_files.values()}
        unknown = suffixes - set(_LOADERS_BY_SUFFIX)
        if unknown or len({_LOADERS_BY_SUFFIX[s] for s in suffixes}) != 1:
            raise FinetuneInputError(
                f"data files must share one format of {sorted(_LOADERS_BY_SUFFIX)}; got {data_files}")
        columns = {split: check_data_file(path, split, text_columns(args)) for split, path in data_files.items()}
        check_same_columns(columns, data_files)
        raw = load_dataset(_LOADERS_BY_SUFFIX[suffixes.pop()], data_files=data_files)
    if "train" not in raw:
        raise FinetuneInputError(f"the data has no 'train' split (splits: {list(raw)})")
    for split, dataset in raw.items():
        if len(dataset) == 0:
            raise FinetuneInputError(f"the {split} data has no rows: give at least one example")
    check_columns(raw, args)
    for split, dataset in raw.items():
        for column in text_columns(args):
            check_text_values(dataset[column], column, split)
    if args.task in CLASSIFICATION_TASKS:
        for split, dataset in raw.items():
            check_label_values(dataset[args.label_column], split, args)
    if "validation" not in raw:
        held_out = raw["train"].train_test_split(test_size=args.validation_fraction, seed=seed)
        raw = DatasetDict(train=held_out["train"], validation=held_out["test"])
    return DatasetDict(train=raw["train"], validation=raw["validation"])


def required_columns(args: FinetuneArguments) -> list[str]:
    """Columns the task reads, inputs first and the label column last."""
    if args.task == "sequence-classification":
        return [args.text_column] + ([args.text_pair_column] if args.text_pair_column else []) + [args.label_column]
    if args.task == "token-classification":
        return [args.tokens_column, args.label_column]
    if args.task == "question-answering":
        return [args.question_column, args.context_column, args.answers_column]
    return ([args.prompt_column] if args.prompt_column else []) + [args.response_column]


def check_columns(raw: DatasetDict, args: FinetuneArguments) -> None:
    for split, dataset in raw.items():
        for column in required_columns(args):
            if column not in dataset.column_names:
                raise FinetuneInputError(
                    f"{args.task}: column {column!r} is missing from the {split} data; columns present: "
                    f"{dataset.column_names} (name the right one with the matching --*_column flag)")


CLASSIFICATION_TASKS = ("sequence-classification", "token-classification")


def class_name(value, where: str) -> str:
    """The class a label value names: a string, or an integer id (an integral float such as 1.0 counts as 1)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise FinetuneInputError(f"{where}: the label is null; every example needs a class (fix or drop it)")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise FinetuneInputError(f"{where}: label {value!r} is a {type(value).__name__}; classes are strings or "
                                 "integer ids (0, 1, ...), and regression is not supported")
    if isinstance(value, int) and value < 0:
        raise FinetuneInputError(f"{where}: label {value} is negative; integer class ids run 0..K-1")
    if isinstance(value, str) and not value.strip():
        raise FinetuneInputError(f"{where}: the label is an empty string; every example needs a class")
    return str(value)


def check_label_values(column: list, split: str, args: FinetuneArguments) -> None:
    """Every label of one split names a class (per word for token classification); rows are counted from 1."""
    for row, value in enumerate(column, start=1):
        where = f"{split} row {row}, column {args.label_column!r}"
        if args.task == "token-classification":
            if not isinstance(value, list):
                raise FinetuneInputError(f"token-classification: {args.label_column!r} must hold a list of tags per "
                                         f"row (one per word of {args.tokens_column!r}); {split} row {row} has "
                                         f"{value!r}")
            for tag in value:
                class_name(tag, where)
        else:
            class_name(value, where)


def label_names_of(raw: DatasetDict, args: FinetuneArguments) -> list[str]:
    """The class names, index = class id: `--class_names` if given, else the training data's classes (integer ids
    must run 0..K-1 there, so a stray id cannot create a huge head). A label outside the classes is refused."""
    def classes(split: str) -> dict[str, int]:
        """{class: first row it occurs in}."""
        found = {}
        for row, value in enumerate(raw[split][args.label_column], start=1):
            for tag in value if args.task == "token-classification" else [value]:
                found.setdefault(class_name(tag, f"{split} row {row}"), row)
        return found

    train, validation = classes("train"), classes("validation")
    if args.class_names is not None:
        names = [name.strip() for name in args.class_names.split(",") if name.strip()]
        if len(set(names)) != len(names) or len(names) < 2:
            raise FinetuneInputError(f"--class_names {args.class_names!r} must list at least two distinct classes")
        for split, found in (("train", train), ("validation", validation)):
            undeclared = sorted(set(found) - set(names))
            if undeclared:
                raise FinetuneInputError(f"{split} row {found[undeclared[0]]} has label {undeclared[0]!r}, which "
                                         f"--class_names does not list ({', '.join(names)}): add it or fix the data")
        return names
    unseen = sorted(set(validation) - set(train))
    if unseen:
        raise FinetuneInputError(
            f"validation row {validation[unseen[0]]} has label {unseen[0]!r}, which never occurs in the training "
            "data, so the model could never predict it: fix the data, or declare every class with --class_names")
    if all(name.isdigit() for name in train):
        ids = sorted(int(name) for name in train)
        missing = sorted(set(range(ids[-1] + 1)) - set(ids))
        if missing:
            raise FinetuneInputError(
                f"integer labels in {args.label_column!r} must be the class ids 0..K-1, but the training data has "
                f"{len(ids)} classes up to id {ids[-1]} (ids {', '.join(map(str, missing[:5]))}"
                f"{', ...' if len(missing) > 5 else ''} never occur): a stray id would create a {ids[-1] + 1}-class "
                "head. Fix the data, or declare every class with --class_names")
        return [str(i) for i in ids]
    return sorted(train)


def tokenize_sequence_classification(tokenizer, args, label2id, max_length):
    def tokenize(batch):
        pair = batch[args.text_pair_column] if args.text_pair_column else None
        encoded = tokenizer(batch[args.text_column], pair, truncation=True, max_length=max_length)
        encoded["labels"] = [label2id[class_name(label, args.label_column)] for label in batch[args.label_column]]
        return encoded
    return tokenize


def tokenize_token_classification(tokenizer, args, label2id, max_length):
    """Each word's tag goes to its first sub-word token; further sub-words and special tokens get IGNORE_INDEX."""
    def tokenize(batch):
        encoded = tokenizer(batch[args.tokens_column], is_split_into_words=True, truncation=True, max_length=max_length)
        encoded["labels"] = []
        for row, (words, tags) in enumerate(zip(batch[args.tokens_column], batch[args.label_column])):
            if len(words) != len(tags):
                raise FinetuneInputError(f"token-classification: a row has {len(words)} words in "
                                         f"{args.tokens_column!r} but {len(tags)} tags in {args.label_column!r}: {words}")
            labels, previous_word = [], None
            for word in encoded.word_ids(row):
                first_piece = word is not None and word != previous_word
                labels.append(label2id[class_name(tags[word], args.label_column)] if first_piece else IGNORE_INDEX)
                previous_word = word
            encoded["labels"].append(labels)
        return encoded
    return tokenize


def tokenize_question_answering(tokenizer, args, max_length, doc_stride):
    """SQuAD-style features: long contexts split with overlap; each feature keeps its example index and the
    character offsets of its context tokens (None elsewhere) for post-processing, and start/end token labels
    (0, 0 where the answer is not inside the feature) so evaluation also reports a loss."""
    pad_on_right = tokenizer.padding_side == "right"

    def tokenize(batch, indices):
        questions = [q.lstrip() for q in batch[args.question_column]]
        contexts = batch[args.context_column]
        first, second = (questions, contexts) if pad_on_right else (contexts, questions)
        encoded = tokenizer(first, second, truncation="only_second" if pad_on_right else "only_first",
                            max_length=max_length, stride=doc_stride, return_overflowing_tokens=True,
                            return_offsets_mapping=True)
        context_index = 1 if pad_on_right else 0
        encoded["example_index"], encoded["start_positions"], encoded["end_positions"] = [], [], []
        for feature, example in enumerate(encoded.pop("overflow_to_sample_mapping")):
            sequence_ids = encoded.sequence_ids(feature)
            offsets = [offset if sequence_ids[k] == context_index else None
                       for k, offset in enumerate(encoded["offset_mapping"][feature])]
            encoded["offset_mapping"][feature] = offsets
            encoded["example_index"].append(indices[example])
            answers = batch[args.answers_column][example]
            if not answers["text"]:
                raise FinetuneInputError(f"question-answering: example {indices[example]} has no answer; only "
                                         "answerable (SQuAD v1-style) questions are supported")
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            context_tokens = [k for k, offset in enumerate(offsets) if offset is not None]
            start_token = end_token = 0
            answer_inside = (context_tokens and offsets[context_tokens[0]][0] <= start_char
                             and end_char <= offsets[context_tokens[-1]][1])
            if answer_inside:
                start_token = next(k for k in context_tokens if offsets[k][1] > start_char)
                end_token = next(k for k in reversed(context_tokens) if offsets[k][0] < end_char)
            encoded["start_positions"].append(start_token)
            encoded["end_positions"].append(end_token)
        return encoded
    return tokenize


def tokenize_sft(tokenizer, args, max_length, encoder_decoder: bool):
    """causal-sft: input = prompt + response + eos, labels = IGNORE_INDEX over the prompt, the ids over the
    response (the model shifts them). seq2seq-sft: encoder input = prompt, labels = response + eos."""
    eos = [tokenizer.eos_token_id]

    def tokenize(batch):
        responses = tokenizer(batch[args.response_column], add_special_tokens=False)["input_ids"]
        prompts = (tokenizer(batch[args.prompt_column], add_special_tokens=False)["input_ids"]
                   if args.prompt_column else [[] for _ in responses])
        if encoder_decoder:
            encoded = tokenizer(batch[args.prompt_column], truncation=True, max_length=max_length)
            encoded["labels"] = [(response + eos)[:max_length] for response in responses]
            return encoded
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        input_ids, labels = [], []
        for prompt, response in zip(prompts, responses):
            context = bos + prompt
            input_ids.append((context + response + eos)[:max_length])
            labels.append(([IGNORE_INDEX] * len(context) + response + eos)[:max_length])
        return {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids], "labels": labels}
    return tokenize


# ----------------------------------------------------------------------------------------------------------------
# Metrics (fractions in [0, 1])
# ----------------------------------------------------------------------------------------------------------------
def accuracy_and_macro_f1(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """Accuracy and F1 averaged over the classes that occur in the references or the predictions."""
    f1s = []
    for label in np.union1d(predictions, references):
        true_positive = np.sum((predictions == label) & (references == label))
        predicted, actual = np.sum(predictions == label), np.sum(references == label)
        f1s.append(2.0 * true_positive / (predicted + actual))
    return {"accuracy": float(np.mean(predictions == references)), "f1": float(np.mean(f1s))}


def _logits(eval_prediction) -> np.ndarray:
    """The logits among a head's outputs (hidden states or attentions follow them when requested)."""
    predictions = eval_prediction.predictions
    return predictions[0] if isinstance(predictions, tuple) else predictions


def sequence_classification_metrics(eval_prediction) -> dict[str, float]:
    return accuracy_and_macro_f1(_logits(eval_prediction).argmax(-1), eval_prediction.label_ids)


def token_classification_metrics(eval_prediction) -> dict[str, float]:
    labels = eval_prediction.label_ids
    scored = labels != IGNORE_INDEX
    return accuracy_and_macro_f1(_logits(eval_prediction).argmax(-1)[scored], labels[scored])


def language_model_token_scores(label_shift: int) -> Callable:
    """`preprocess_logits_for_metrics` for SFT: per label token, its log-probability and whether the argmax hits
    it, so evaluation keeps (batch, length) numbers instead of (batch, length, vocab) logits."""
    def scores(logits, labels):
        logits = logits[0] if isinstance(logits, tuple) else logits
        if label_shift:
            logits, labels = logits[:, :-label_shift], labels[:, label_shift:]
        safe_labels = labels.clamp(min=0).unsqueeze(-1)
        log_probability = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe_labels).squeeze(-1)
        hit = (logits.argmax(-1) == labels).float()
        scored = labels != IGNORE_INDEX
        return torch.where(scored, log_probability, 1.0), torch.where(scored, hit, -1.0)  # sentinels: unscored
    return scores


def sft_metrics(eval_prediction) -> dict[str, float]:
    """Token accuracy and perplexity = exp(mean negative log-likelihood per response token)."""
    log_probability, hit = eval_prediction.predictions
    scored = hit >= 0.0  # padding between batches is IGNORE_INDEX, unscored positions -1
    mean_nll = float(-log_probability[scored].mean())
    return {"token_accuracy": float(hit[scored].mean()), "perplexity": float(np.exp(mean_nll))}


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def answer_f1(prediction: str, truth: str) -> float:
    predicted_tokens, true_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = sum((Counter(predicted_tokens) & Counter(true_tokens)).values())
    if not predicted_tokens or not true_tokens:
        return float(predicted_tokens == true_tokens)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted_tokens), common / len(true_tokens)
    return 2.0 * precision * recall / (precision + recall)


def best_answers(start_logits, end_logits, features, examples, context_column, max_answer_length) -> list[str]:
    """Per example, the highest start+end logit span (start <= end, at most max_answer_length tokens, inside the
    context) over all of its features, as text cut from the context with the offset mapping."""
    best = {}  # example index -> (score, start char, end char)
    for feature_index, (offsets, example) in enumerate(zip(features["offset_mapping"], features["example_index"])):
        length = len(offsets)
        in_context = np.array([offset is not None for offset in offsets])
        scores = start_logits[feature_index, :length, None] + end_logits[feature_index, None, :length]  # (start, end)
        allowed = np.triu(np.tril(np.ones((length, length), dtype=bool), max_answer_length - 1))  # 0 <= end-start < max
        allowed &= in_context[:, None] & in_context[None, :]
        if not allowed.any():
            continue
        start, end = np.unravel_index(np.where(allowed, scores, -np.inf).argmax(), scores.shape)
        if example not in best or scores[start, end] > best[example][0]:
            best[example] = (scores[start, end], offsets[start][0], offsets[end][1])
    answers = []
    for example_index, example in enumerate(examples):
        _, start_char, end_char = best.get(example_index, (None, 0, 0))
        answers.append(example[context_column][start_char:end_char])
    return answers


def question_answering_metrics(features, examples, args: FinetuneArguments) -> Callable:
    """compute_metrics for QA: exact match and F1 (best over the gold answers) from start/end logits."""
    def metrics(eval_prediction) -> dict[str, float]:
        start_logits, end_logits = eval_prediction.predictions[:2]
        predicted = best_answers(start_logits, end_logits, features, examples, args.context_column,
                                 args.max_answer_length)
        exact, f1 = [], []
        for answer, example in zip(predicted, examples):
            truths = example[args.answers_column]["text"]
            exact.append(max(float(normalize_answer(answer) == normalize_answer(t)) for t in truths))
            f1.append(max(answer_f1(answer, t) for t in truths))
        return {"exact_match": float(np.mean(exact)), "f1": float(np.mean(f1))}
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
def load_model(args: FinetuneArguments, tokenizer, label_names: list[str] | None):
    """The task head on the checkpoint's weights; a checkpoint that cannot carry that head is a FinetuneInputError."""
    spec = TASKS[args.task]
    hub = {"revision": args.revision, "trust_remote_code": args.trust_remote_code}
    config_overrides = {}
    if label_names is not None:
        config_overrides = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                            "label2id": {name: i for i, name in enumerate(label_names)}}
    with loading("the model config", args.model_name_or_path):
        try:
            config = AutoConfig.from_pretrained(args.model_name_or_path, **hub, **config_overrides)
        except OSError as error:
            raise FinetuneInputError(f"cannot load a config from {args.model_name_or_path}: "
                                     f"{str(error).splitlines()[0]}") from None
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id  # sequence pooling and padding need to know the pad id
    if args.task == "seq2seq-sft" and getattr(config, "decoder_start_token_id", None) is None:
        raise FinetuneInputError(f"{args.model_name_or_path}: seq2seq-sft needs config.decoder_start_token_id "
                                 "(the token the decoder starts from); set it in the checkpoint's config.json")
    with loading("the weights", args.model_name_or_path):
        try:
            model = spec.auto_model_class.from_pretrained(args.model_name_or_path, config=config, **hub)
        except ValueError as error:
            raise FinetuneInputError(
                f"{args.model_name_or_path} cannot be fine-tuned for {args.task}: {error}. The task needs "
                f"{spec.needs}; pick another task for this checkpoint or another checkpoint for this task") from error
    if args.lora:
        model = attach_lora(model, args)
    return model


def fresh_head_modules(model) -> list[str]:
    """Top-level modules with weights outside the pretrained backbone (classifier, qa_outputs, ...)."""
    return [name for name, module in model.named_children()
            if name != model.base_model_prefix and any(True for _ in module.parameters())]


def attach_lora(model, args: FinetuneArguments):
    """LoRA on the default DeepScaleLM targets (dslm_hf.peft_support); fresh heads are trained in full and saved
    with the adapter. The causal and seq2seq heads are tied to the embeddings and stay frozen."""
    from peft import LoraConfig, get_peft_model  # the modeling file registers the default targets as PEFT loads

    spec = TASKS[args.task]
    heads = fresh_head_modules(model) if spec.peft_task_type in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS") else None
    lora_config = LoraConfig(task_type=spec.peft_task_type, r=args.lora_r, lora_alpha=args.lora_alpha,
                             lora_dropout=args.lora_dropout, modules_to_save=heads)
    return get_peft_model(model, lora_config)


# ----------------------------------------------------------------------------------------------------------------
# Wiring
# ----------------------------------------------------------------------------------------------------------------
def check_tokenizer(tokenizer, args: FinetuneArguments) -> None:
    if tokenizer.pad_token_id is None:
        raise FinetuneInputError(f"the tokenizer of {args.model_name_or_path} has no pad token; batches need one "
                                 "(save the tokenizer with pad_token set)")
    if args.task in ("token-classification", "question-answering") and not tokenizer.is_fast:
        raise FinetuneInputError(f"{args.task} needs a fast (tokenizers-backed) tokenizer for word ids / offsets")
    if args.task.endswith("-sft") and tokenizer.eos_token_id is None:
        raise FinetuneInputError(f"{args.task} ends every response with the eos token, and the tokenizer has none")


def build_trainer(args: FinetuneArguments, training_args: TrainingArguments) -> Trainer:
    """Data, tokenizer, model, collator and metrics for the task, all checked before any training step."""
    raw = load_raw_datasets(args, training_args.seed)
    tokenizer_source = {"pretrained_model_name_or_path": args.tokenizer_name} if args.tokenizer_name else {
        "pretrained_model_name_or_path": args.model_name_or_path, "revision": args.revision}
    with loading("a tokenizer", tokenizer_source["pretrained_model_name_or_path"]):  # other errors: the files
        try:
            tokenizer = AutoTokenizer.from_pretrained(**tokenizer_source, trust_remote_code=args.trust_remote_code)
        except OSError as error:  # not a folder with a tokenizer, not a reachable (or cached) Hub repo
            raise FinetuneInputError(f"cannot load a tokenizer from {tokenizer_source['pretrained_model_name_or_path']}: "
                                     f"{str(error).splitlines()[0]}") from None
    check_tokenizer(tokenizer, args)
    classification = args.task in CLASSIFICATION_TASKS
    label_names = label_names_of(raw, args) if classification else None
    set_seed(training_args.seed)  # fresh heads (and LoRA matrices) start the same in every run and every process
    model = load_model(args, tokenizer, label_names)
    config = model.config
    max_length = args.max_length or config.max_position_embeddings
    if max_length > config.max_position_embeddings:
        raise FinetuneInputError(f"--max_length={max_length} exceeds the model's max_position_embeddings="
                                 f"{config.max_position_embeddings}")
    if getattr(config, "type_vocab_size", None) == 0:  # no segment table: the model must not get token_type_ids
        tokenizer.model_input_names = [name for name in tokenizer.model_input_names if name != "token_type_ids"]

    preprocess_logits_for_metrics = None
    with training_args.main_process_first(desc="tokenizing"):
        if args.task == "question-answering":
            doc_stride = args.doc_stride if args.doc_stride is not None else max_length // 4
            if not 0 <= doc_stride < max_length // 2:
                raise FinetuneInputError(
                    f"--doc_stride={doc_stride} must be in [0, max_length / 2) = [0, {max_length // 2})")
            tokenize = tokenize_question_answering(tokenizer, args, max_length, doc_stride)
            features = {split: data.map(tokenize, batched=True, with_indices=True, remove_columns=data.column_names)
                        for split, data in raw.items()}
            compute_metrics = question_answering_metrics(features["validation"], raw["validation"], args)
            collator = DataCollatorWithPadding(tokenizer)
            tokenized = DatasetDict({split: data.remove_columns(["offset_mapping", "example_index"])
                                     for split, data in features.items()})
        else:
            if classification:
                label2id = {name: i for i, name in enumerate(label_names)}
                tokenize = (tokenize_sequence_classification if args.task == "sequence-classification"
                            else tokenize_token_classification)(tokenizer, args, label2id, max_length)
                compute_metrics = (sequence_classification_metrics if args.task == "sequence-classification"
                                   else token_classification_metrics)
                collator = (DataCollatorWithPadding(tokenizer) if args.task == "sequence-classification"
                            else DataCollatorForTokenClassification(tokenizer))
            else:
                encoder_decoder = args.task == "seq2seq-sft"
                tokenize = tokenize_sft(tokenizer, args, max_length, encoder_decoder)
                compute_metrics = sft_metrics
                preprocess_logits_for_metrics = language_model_token_scores(label_shift=0 if encoder_decoder else 1)
                collator = DataCollatorForSeq2Seq(tokenizer, model=model if encoder_decoder else None)
            tokenized = DatasetDict({split: data.map(tokenize, batched=True, remove_columns=data.column_names)
                                     for split, data in raw.items()})
            if args.task != "sequence-classification":
                tokenized = drop_rows_without_label_tokens(tokenized, 1 if args.task == "causal-sft" else 0, max_length)

    return Trainer(model=model, args=training_args, train_dataset=tokenized["train"],
                   eval_dataset=tokenized["validation"], processing_class=tokenizer, data_collator=collator,
                   compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                   optimizers=(depth_rule_optimizer(model, training_args), None))


def depth_rule_optimizer(model, training_args: TrainingArguments):
    """AdamW with the model's depth and width rules (dslm_hf.optimization), handed to Trainer through its `optimizers`
    hook.

    Trainer builds its scheduler around it. Sharded Trainer runs (FSDP, DeepSpeed) create their optimizer after
    wrapping and take no prebuilt one: there the default parameterization uses Trainer's own AdamW (the same groups:
    matrices decayed, biases and LayerNorms not), and a depth or width rule is refused rather than silently dropped (the
    width rule's readout multiplier lives in the model: without its learning rates it would be half a rule).
    """
    rules = ", ".join(f"{field}={value!r}" for field, value in rule_settings(model.config).items())
    if training_args.fsdp or training_args.deepspeed:
        if rules:
            raise FinetuneInputError(
                f"the model's optimizer rules ({rules}) need per-group learning rates, which dslm-finetune cannot hand "
                "to Trainer under FSDP/DeepSpeed: fine-tune without sharding, or set depth_parameterization='deepscalelm' and "
                "width_parameterization='standard' in its config")
        return None
    if training_args.optim not in ("adamw_torch", "adamw_torch_fused"):
        if rules:
            optim = getattr(training_args.optim, "value", training_args.optim)  # an OptimizerNames enum member
            raise FinetuneInputError(f"--optim {optim} cannot carry the model's optimizer rules "
                                     f"({rules}): use --optim adamw_torch")
        return None
    optimizer = build_adamw(model, training_args.learning_rate, training_args.weight_decay,
                            betas=(training_args.adam_beta1, training_args.adam_beta2), eps=training_args.adam_epsilon)
    logger.warning(f"dslm-finetune: AdamW with the model's rules ({rules or 'none'}): "
                   f"{describe_groups(optimizer.param_groups)}")
    return optimizer


def drop_rows_without_label_tokens(tokenized: DatasetDict, label_shift: int, max_length: int) -> DatasetDict:
    """Drop rows whose every label is IGNORE_INDEX (a prompt filling max_length, a sentence without words): a batch
    of them has no token to average the loss over (0/0 = NaN). Says how many; a split left empty is refused.
    `label_shift` skips the labels a causal model never predicts (position 0)."""
    kept = {}
    for split, dataset in tokenized.items():
        trained = dataset.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"][label_shift:]))
        if len(trained) == 0:
            raise FinetuneInputError(f"no {split} example has a token to train on within max_length={max_length} "
                                     "(empty rows, or prompts that fill the whole length): raise --max_length or "
                                     "shorten the prompts")
        if len(trained) < len(dataset):
            logger.warning(f"dslm-finetune: dropped {len(dataset) - len(trained)} of {len(dataset)} {split} rows "
                           f"with no token to train on within max_length={max_length}")
        kept[split] = trained
    return DatasetDict(kept)


# What `finetune` (Trainer.save_model, save_state, save_metrics, checkpointing) writes into --output_dir.
FINETUNE_OUTPUTS = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                    "adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "all_results.json",
                    "train_results.json", "eval_results.json")


def previous_outputs(output_dir: str) -> list[str]:
    """The previous fine-tuning's outputs in `output_dir`: files `finetune` writes, and Trainer checkpoint folders."""
    folder = os.path.abspath(output_dir)
    files = [name for name in FINETUNE_OUTPUTS if os.path.lexists(os.path.join(folder, name))]
    return files + sorted(os.path.basename(path) for path in glob.glob(os.path.join(folder, f"{PREFIX_CHECKPOINT_DIR}-*")))


def outputs_to_replace(args: FinetuneArguments, training_args: TrainingArguments) -> list[str]:
    """Refuse an --output_dir holding a previous fine-tuning (its model and metrics would be replaced silently)
    unless resuming from one of its checkpoints; under --overwrite_output_dir, return those outputs, which
    `remove_previous_outputs` deletes once the new run's data and model have loaded."""
    previous = previous_outputs(training_args.output_dir)
    if not previous or training_args.resume_from_checkpoint is not None:
        return []
    if not args.overwrite_output_dir:
        listed = ", ".join(previous[:6]) + (", ..." if len(previous) > 6 else "")
        raise FinetuneInputError(f"--output_dir {training_args.output_dir} holds a previous fine-tuning ({listed}): "
                                 "choose a new folder, pass --resume_from_checkpoint to continue, or "
                                 "--overwrite_output_dir to delete them and start over")
    return previous


def remove_previous_outputs(training_args: TrainingArguments, previous: list[str]) -> None:
    """Delete the previous fine-tuning's outputs (rank 0): a stale checkpoint-N or adapter must not mix with the
    new run's."""
    if previous and training_args.process_index == 0:
        for name in previous:
            path = os.path.join(training_args.output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        logger.warning(f"dslm-finetune: --overwrite_output_dir: removed {', '.join(previous)} from "
                       f"{training_args.output_dir}")


def check_paths(args: FinetuneArguments, training_args: TrainingArguments) -> None:
    """The cheap checks, before any data is read: a writable output folder, a local checkpoint folder that exists,
    a resume checkpoint that is a folder."""
    check_output_dir(training_args.output_dir)
    model = args.model_name_or_path
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or os.path.exists(model)
    if looks_local and not os.path.isdir(model):
        raise FinetuneInputError(f"--model_name_or_path {model} is not a folder: give a save_pretrained checkpoint "
                                 "folder or a Hub repo id (owner/name)")
    if os.path.isdir(model):
        check_model_folder(model)
    if args.tokenizer_name is not None and os.path.isdir(args.tokenizer_name):
        check_model_folder(args.tokenizer_name)
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is not None and not os.path.isdir(checkpoint):
        found = sorted(glob.glob(os.path.join(training_args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-*")))
        raise FinetuneInputError(f"--resume_from_checkpoint {checkpoint} is not a folder; Trainer checkpoints in "
                                 f"{training_args.output_dir}: {found or 'none'}")
    if checkpoint is not None:
        check_model_folder(checkpoint)
        check_trainer_state_files(checkpoint)


# The pickles Trainer reads back on resume, each with torch's weights-only loader (tensors and plain containers only)
TRAINER_STATE_PICKLES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth")


def check_trainer_state_files(checkpoint: str) -> None:
    """Load each pickle Trainer will read on resume the way it will (weights only, memory-mapped), so that a file the
    loader refuses (a foreign or tampered pickle) or cannot read (truncated) is named in one line, before training,
    instead of an UnpicklingError traceback from inside Trainer. Nothing is ever unpickled beyond tensors."""
    for path in sorted(p for pattern in TRAINER_STATE_PICKLES for p in Path(checkpoint).glob(pattern)):
        try:
            with safe_globals():  # the numpy arrays of Trainer's RNG state, allow-listed as Trainer does
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as error:
            reason = next((line.strip() for line in str(error).splitlines() if "WeightsUnpickler error" in line),
                          str(error).splitlines()[0]).split(". Please")[0]
            raise FinetuneInputError(
                f"--resume_from_checkpoint {checkpoint}: {path.name} cannot be loaded safely ({reason[:200]}): loading "
                "it could run code, so dslm-finetune does not; resume from a checkpoint this tool wrote, or start "
                "over without --resume_from_checkpoint") from None
        except (RuntimeError, EOFError, ValueError) as error:
            raise FinetuneInputError(f"--resume_from_checkpoint {checkpoint}: {path.name} cannot be read "
                                     f"({' '.join(str(error).split())[:200]}): the checkpoint is truncated or "
                                     "corrupt; resume from another checkpoint") from None


def finetune(args: FinetuneArguments, training_args: TrainingArguments) -> dict:
    """Train (resuming from `training_args.resume_from_checkpoint` if set), save, evaluate; returns the metrics
    and the Trainer's log history."""
    check_paths(args, training_args)
    previous = outputs_to_replace(args, training_args)
    trainer = build_trainer(args, training_args)
    remove_previous_outputs(training_args, previous)
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    trainer.save_state()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    eval_metrics = trainer.evaluate()
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    return {"train": train_result.metrics, "eval": eval_metrics, "log_history": trainer.state.log_history,
            "global_step": trainer.state.global_step}


def parse_args(argv: list[str] | None = None) -> tuple[FinetuneArguments, TrainingArguments]:
    parser = HfArgumentParser((FinetuneArguments, TrainingArguments), description=__doc__.split("\n\n")[0])
    parser.prog = "dslm-finetune"
    *parsed, unused = usage_errors_as_user_errors(parser).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True)
    if unused:
        raise FinetuneInputError(f"unrecognized arguments: {' '.join(unused)} (see dslm-finetune --help)")
    check_ranges(parsed[1], TRAINING_RANGES)
    return tuple(parsed)


def main(argv: list[str] | None = None) -> int:
    """Console entry point (`dslm-finetune`): 0 on success; a user error is one stderr line and status 2."""
    return run_command("dslm-finetune", lambda arguments: finetune(*parse_args(arguments)), argv)


if __name__ == "__main__":
    sys.exit(main())
