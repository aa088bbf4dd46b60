"""Data loading and tokenisation of dslm-finetune: file formats, split handling, label alignment, prompt masking."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dslm_hf.finetuning import (
    IGNORE_INDEX,
    FinetuneArguments,
    FinetuneInputError,
    label_names_of,
    load_raw_datasets,
    tokenize_sft,
    tokenize_token_classification,
)


def arguments(**fields):
    return FinetuneArguments(**{"task": "sequence-classification", "model_name_or_path": "unused", **fields})


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per known word (others are [UNK]) and no special-token template, so ids are easy to spell out."""
    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", "[EOS]", "map", "red", "blue", ":", "Red", "cat"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def test_csv_without_validation_split_holds_out_the_validation_fraction(tmp_path):
    rows = "text,label\n" + "".join(f"sentence {i},{i % 3}\n" for i in range(40))
    (tmp_path / "train.csv").write_text(rows)
    raw = load_raw_datasets(arguments(train_file=str(tmp_path / "train.csv"), validation_fraction=0.25), seed=0)
    assert (raw["train"].num_rows, raw["validation"].num_rows) == (30, 10)
    assert label_names_of(raw, arguments(train_file="unused")) == ["0", "1", "2"]


def test_dataset_name_loads_a_dataset_folder_with_its_own_splits(tmp_path):
    for split, count in (("train", 6), ("validation", 2)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"text": "a", "label": "pos"}) + "\n"
                                                         for _ in range(count)))
    raw = load_raw_datasets(arguments(dataset_name=str(tmp_path)), seed=0)
    assert (raw["train"].num_rows, raw["validation"].num_rows) == (6, 2)


def test_mixed_file_formats_are_refused(tmp_path):
    args = arguments(train_file=str(tmp_path / "train.csv"), validation_file=str(tmp_path / "dev.jsonl"))
    with pytest.raises(FinetuneInputError, match="one format"):
        load_raw_datasets(args, seed=0)


def test_exactly_one_data_source_is_required():
    with pytest.raises(FinetuneInputError, match="exactly one data source"):
        arguments()


def test_unknown_task_is_refused_in_python_too():
    with pytest.raises(FinetuneInputError, match="unknown task 'ner'; valid tasks: sequence-classification"):
        FinetuneArguments(task="ner", model_name_or_path="unused", train_file="t.jsonl")


def test_causal_sft_masks_the_prompt_and_ends_with_eos():
    tokenizer = word_tokenizer()
    args = arguments(task="causal-sft", train_file="unused")
    encoded = tokenize_sft(tokenizer, args, max_length=16, encoder_decoder=False)(
        {"prompt": ["map red :"], "response": ["blue"]})
    eos, blue = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("blue")
    assert encoded["input_ids"] == [tokenizer.convert_tokens_to_ids(["map", "red", ":", "blue"]) + [eos]]
    assert encoded["labels"] == [[IGNORE_INDEX] * 3 + [blue, eos]]


def test_causal_sft_without_prompt_column_trains_on_the_whole_text():
    tokenizer = word_tokenizer()
    args = arguments(task="causal-sft", train_file="unused", prompt_column="", response_column="text")
    encoded = tokenize_sft(tokenizer, args, max_length=16, encoder_decoder=False)({"text": ["red cat"]})
    assert encoded["labels"] == encoded["input_ids"] == [tokenizer.convert_tokens_to_ids(["red", "cat", "[EOS]"])]


def test_seq2seq_sft_puts_the_prompt_in_the_encoder_and_the_response_in_labels():
    tokenizer = word_tokenizer()
    args = arguments(task="seq2seq-sft", train_file="unused")
    encoded = tokenize_sft(tokenizer, args, max_length=16, encoder_decoder=True)(
        {"prompt": ["map red :"], "response": ["blue"]})
    assert encoded["input_ids"] == [tokenizer.convert_tokens_to_ids(["map", "red", ":"])]
    assert encoded["labels"] == [tokenizer.convert_tokens_to_ids(["blue", "[EOS]"])]


def test_token_tags_go_to_the_first_piece_of_each_word():
    tokenizer = word_tokenizer()
    args = arguments(task="token-classification", train_file="unused", label_column="tags")
    # "Red-cat" is one word to the caller but three tokens (Red, [UNK] for "-", cat) to the pre-tokenizer
    encoded = tokenize_token_classification(tokenizer, args, {"CAP": 0, "low": 1}, max_length=16)(
        {"tokens": [["Red-cat", "red"]], "tags": [["CAP", "low"]]})
    assert encoded["labels"] == [[0, IGNORE_INDEX, IGNORE_INDEX, 1]]
