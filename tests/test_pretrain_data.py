"""Pretraining data: the embedded corpus, tokenizer training, packing, and the CLM / MLM / span-corruption collators."""

import re

import pytest
import torch
from datasets import DatasetDict

from dslm_hf import data
from shakespeare_data import EXCERPT, FULL_TEXT, FULL_TEXT_PARAGRAPHS


@pytest.fixture(scope="module")
def corpus():
    return data.load_corpus("default", default_corpus_megabytes=0.3)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return data.train_byte_level_bpe(corpus["train"]["text"], 512)


@pytest.fixture(scope="module")
def blocks(corpus, tokenizer):
    return data.pack_into_blocks(corpus["train"], tokenizer, 64)


def test_default_corpus_is_sorted_stdlib_source_within_budget():
    splits, manifest = data.load_default_corpus(0.5)
    paths = list(splits["train"]["path"]) + list(splits["validation"]["path"])
    assert all(path.endswith(".py") for path in paths)
    assert list(splits["train"]["path"]) == sorted(splits["train"]["path"])
    sizes = {path: len(text.encode()) for split in splits.values() for path, text in zip(split["path"], split["text"])}
    last = max(paths)  # the budget is crossed by the last file only
    assert manifest["bytes_kept"] == sum(sizes.values()) >= 0.5e6 > sum(sizes.values()) - sizes[last]


def test_default_corpus_loads_through_datasets_with_a_text_column(corpus):
    assert list(corpus) == ["train", "validation"]
    assert corpus["train"].column_names == corpus["validation"].column_names == ["text"]


def test_trained_tokenizer_has_the_special_tokens_and_round_trips_text(tokenizer):
    assert len(tokenizer) == 512
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    text = "def f(x):\n    return x ** 2  # é"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_packed_blocks_are_full_and_separate_documents_with_eos(corpus, tokenizer, blocks):
    assert blocks[0]["input_ids"].shape[0] == 64
    stream = blocks[:]["input_ids"].flatten()
    documents = (stream == tokenizer.eos_token_id).sum().item()
    assert documents >= len(corpus["train"]) - 2  # one EOS per document (up to the dropped tail)


def test_held_out_documents_are_evenly_spaced_and_disjoint_from_training():
    splits = data.hold_out_documents(data.load_corpus(str(EXCERPT)), 0.1)
    documents = data.load_corpus(str(EXCERPT))["train"]["text"]
    held_out = [documents.index(text) for text in splits["validation"]["text"]]
    assert len(held_out) == round(0.1 * len(documents))
    assert held_out == [int((j + 0.5) * len(documents) / len(held_out)) for j in range(len(held_out))]
    assert len(splits["train"]) + len(held_out) == len(documents)
    assert not set(splits["validation"]["text"]) & set(splits["train"]["text"])


def test_own_validation_split_is_kept_and_too_small_corpus_is_an_error(corpus):
    assert data.hold_out_documents(corpus, 0.05) is corpus
    with pytest.raises(ValueError, match="has 1 document"):
        data.hold_out_documents(DatasetDict(train=corpus["train"].select([0])), 0.05)


def test_text_files_load_one_row_per_paragraph():
    splits = data.load_corpus(str(EXCERPT))
    assert len(splits["train"]) == 2095
    assert splits["train"][0]["text"].startswith("First Citizen:\nBefore we proceed any further")
    assert splits["train"][-1]["text"] == "DERBY:\nWhat men of name resort to him?"


@pytest.mark.skipif(not FULL_TEXT.is_file(), reason=f"{FULL_TEXT} is not beside the repository")
def test_shipped_excerpt_is_the_full_texts_first_paragraphs():
    full = data.load_corpus(str(FULL_TEXT))["train"]["text"]
    excerpt = data.load_corpus(str(EXCERPT))["train"]["text"]
    assert len(full) == FULL_TEXT_PARAGRAPHS
    assert full[: len(excerpt)] == excerpt


def test_missing_dataset_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--dataset .*nothere.txt does not exist"):
        data.load_corpus(str(tmp_path / "nothere.txt"))


def test_mlm_collator_masks_15_percent_with_80_10_10(tokenizer, blocks):
    collator = data.MaskedLMCollator(tokenizer, 0.15)
    original = blocks[:]["input_ids"]  # ~20k selected tokens: shares within +-0.01 are > 4 sigma
    batch = collator(original, torch.Generator().manual_seed(0))
    selected = batch["labels"] != -100
    maskable = ~torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    share = selected.sum().item() / maskable.sum().item()
    assert abs(share - 0.15) < 0.005
    assert torch.equal(batch["labels"][selected], original[selected])
    assert not selected[~maskable].any()
    masked = (batch["input_ids"] == tokenizer.mask_token_id) & selected
    kept = (batch["input_ids"] == original) & selected
    replaced = selected & ~masked & ~kept
    n = selected.sum().item()
    # A random replacement can draw the original token (kept) with probability 1/512.
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    assert abs(kept.sum().item() / n - 0.1) < 0.01
    assert abs(replaced.sum().item() / n - 0.1) < 0.01
    assert torch.equal(batch["input_ids"][~selected], original[~selected])


def test_mlm_collator_is_a_function_of_its_generator(tokenizer, blocks):
    collator = data.MaskedLMCollator(tokenizer)
    first = collator(blocks[:8]["input_ids"], torch.Generator().manual_seed(3))
    second = collator(blocks[:8]["input_ids"], torch.Generator().manual_seed(3))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_words_are_runs_of_tokens_joined_letter_to_letter(tokenizer):
    text = "def encode(self, input_bytes):\n    return codecs.charmap_encode(x)"
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    starts = data.word_starts(ids, data.word_joints(tokenizer))
    pieces = [tokenizer.decode([i]) for i in ids[0].tolist()]
    words = "".join(("|" if start else "") + piece for start, piece in zip(starts[0].tolist(), pieces)).split("|")
    # a word is a maximal run of letters and digits, or a punctuation token on its own; tokens are never split
    assert "".join(words) == text
    assert [word.strip() for word in words[1:] if word.strip().isalnum()] == re.findall(r"[A-Za-z0-9]+", text)
    assert all(word.strip().isalnum() or not any(c.isalnum() for c in word) for word in words)
    assert len(pieces) > len(words) - 1  # some words are several tokens
    special = torch.tensor([[tokenizer.eos_token_id, ids[0, 0].item()]])
    assert data.word_starts(special, data.word_joints(tokenizer)).all()


def words_of(tokenizer, text: str) -> list[str]:
    """`text` cut into words as whole-word masking reads them (tokens joined by `word_starts`)."""
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    starts = data.word_starts(ids, data.word_joints(tokenizer))[0].tolist()
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    words = []
    for start, token in zip(starts, tokens):
        words.append([token]) if start else words[-1].append(token)
    return [" ".join(word) for word in words]


def test_words_are_read_from_sentencepiece_and_wordpiece_markers_too():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {"unk_token": "<unk>", "mask_token": "<mask>", "pad_token": "<pad>"}
    pieces = ["<unk>", "<mask>", "<pad>", "\u2581the", "\u2581cat", "s", ",", "\u2581sat", "\u2581", "t", "h", "e", "a"]
    unigram = Tokenizer(models.Unigram([(piece, -1.0 if piece.startswith("\u2581") else -2.0) for piece in pieces], 0))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.decoder = decoders.Metaspace()  # decodes a lone "\u2581cat" as "cat": the marker is read from the token
    sentencepiece = PreTrainedTokenizerFast(tokenizer_object=unigram, **special)
    assert words_of(sentencepiece, "the cats, sat") == ["\u2581the", "\u2581cat s", ",", "\u2581sat"]

    vocab = {token: i for i, token in enumerate(["[UNK]", "[MASK]", "[PAD]", "the", "cat", "##s", ",", "sat", "##at"])}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    bert = PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", mask_token="[MASK]", pad_token="[PAD]")
    assert words_of(bert, "the cats, sat") == ["the", "cat ##s", ",", "sat"]


def test_whole_word_masking_labels_every_token_of_a_chosen_word_and_no_other(tokenizer, blocks):
    collator = data.MaskedLMCollator(tokenizer, 0.15, whole_word_mask=True)
    original = blocks[:]["input_ids"]
    batch = collator(original, torch.Generator().manual_seed(0))
    selected = batch["labels"] != -100
    starts = data.word_starts(original, data.word_joints(tokenizer))
    words = starts.long().cumsum(1)
    row_words = words + torch.arange(len(words))[:, None] * (words.max() + 1)
    chosen_words = row_words[selected].unique()
    maskable = ~torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    assert torch.equal(torch.isin(row_words, chosen_words) & maskable, selected)  # whole words, nothing else
    share_of_words = len(chosen_words) / row_words[maskable].unique().numel()
    assert abs(share_of_words - 0.15) < 0.01  # tens of thousands of words: +-0.01 is > 5 sigma
    assert abs(selected.sum().item() / maskable.sum().item() - 0.15) < 0.015  # each token's word: 15% on average
    assert (selected & ~starts).any()  # multi-token words are masked whole, continuations included
    masked = (batch["input_ids"] == tokenizer.mask_token_id) & selected
    assert abs(masked.sum().item() / selected.sum().item() - 0.8) < 0.015
    assert torch.equal(batch["input_ids"][~selected], original[~selected])
    again = collator(original[:8], torch.Generator().manual_seed(3))
    assert all(torch.equal(again[k], collator(original[:8], torch.Generator().manual_seed(3))[k]) for k in again)


def test_span_corruption_restores_the_original_block(corpus):
    tokenizer = data.train_byte_level_bpe(corpus["train"]["text"], 512)
    count = data.span_corruption_sentinel_count(64, 0.15, 3.0)
    assert count == 3  # round(64 * 0.15) = 10 noise tokens in round(10 / 3) = 3 spans
    sentinels = data.add_sentinel_tokens(tokenizer, count)
    assert sentinels == [512, 513, 514]
    collator = data.SpanCorruptionCollator(tokenizer, 64)
    original = data.pack_into_blocks(corpus["train"], tokenizer, 64)["input_ids"][:32]
    batch = collator(original, torch.Generator().manual_seed(0))
    assert batch["input_ids"].shape == (32, 64 - 10 + 3 + 1)  # kept tokens + one sentinel per span + EOS
    assert batch["labels"].shape == (32, 10 + 3 + 1)  # hidden tokens + sentinels + EOS
    for inputs, labels, block in zip(batch["input_ids"], batch["labels"], original):
        assert torch.equal(collator.restore(inputs, labels), block)
        assert torch.isin(torch.tensor(sentinels), inputs).all() and torch.isin(torch.tensor(sentinels), labels).all()


def test_span_corruption_without_sentinels_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="needs sentinel tokens <extra_id_0>"):
        data.SpanCorruptionCollator(tokenizer, 64)


def test_causal_collator_counts_shifted_label_tokens(blocks):
    batch = data.CausalLMCollator()(blocks[:4]["input_ids"])
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert data.CausalLMCollator.count_label_tokens(batch).item() == 4 * 63
