"""T5 span corruption (dslm_hf.data.SpanCorruptionCollator): T5's counts, the measured noise density and span length,
exact reconstruction of real text, determinism, and padded batches that DeepScaleLMForSeq2SeqLM trains on."""

import pytest
import torch
import torch.nn.functional as F

from dslm_hf import data
from dslm_hf.modeling_deepscalelm import DeepScaleLMForSeq2SeqLM
from tiny_models import tiny_model, tokenizer_fields

BLOCK = 128


@pytest.fixture(scope="module")
def corpus():
    return data.load_corpus("default", default_corpus_megabytes=0.2)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    tokenizer = data.train_byte_level_bpe(corpus["train"]["text"], 400)
    data.add_sentinel_tokens(tokenizer, data.span_corruption_sentinel_count(BLOCK, 0.15, 3.0))
    return tokenizer


@pytest.fixture(scope="module")
def collator(tokenizer):
    return data.SpanCorruptionCollator(tokenizer, BLOCK)


@pytest.fixture(scope="module")
def blocks(corpus, tokenizer):
    return data.pack_into_blocks(corpus["train"], tokenizer, BLOCK)["input_ids"][:64]


@pytest.mark.parametrize("length, expected", [
    (2, (1, 1)),      # at least one noise token and one kept token
    (10, (2, 1)),     # 1.5 rounds half to even: 2
    (64, (10, 3)),    # 9.6 -> 10 noise tokens, 10 / 3 -> 3 spans
    (128, (19, 6)),   # 19.2 -> 19, 6.33 -> 6
    (190, (29, 10)),  # 190 * 0.15 is 28.500002 in T5's float32 (28.5 in float64 would round to 28)
    (512, (77, 26)),  # 76.8 -> 77, 25.67 -> 26
])
def test_noise_tokens_and_spans_are_counted_as_t5_counts_them(length, expected):
    mask = data.random_spans_noise_mask(length, 0.15, 3.0, torch.Generator().manual_seed(0))
    runs = int((mask & ~torch.cat([torch.tensor([False]), mask[:-1]])).sum())
    assert (int(mask.sum()), runs) == expected
    assert mask.shape == (length,) and not mask[0] and mask[-1]  # T5's layout: kept span first, noise span last


def test_measured_noise_density_and_mean_span_length_match_t5_targets():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(100, 513, (2000,), generator=generator).tolist()
    noise = spans = total = 0
    span_lengths = []
    for length in lengths:
        mask = data.random_spans_noise_mask(length, 0.15, 3.0, generator)
        starts = torch.nonzero(mask & ~torch.cat([torch.tensor([False]), mask[:-1]])).flatten()
        ends = torch.nonzero(mask & ~torch.cat([mask[1:], torch.tensor([False])])).flatten()
        span_lengths += (ends - starts + 1).tolist()
        noise, spans, total = noise + int(mask.sum()), spans + len(starts), total + length
    # Rounding to whole tokens and spans moves a block's density by <= 0.5/length and its mean span length by
    # <= 1.5/spans; over 2000 lengths of 100..512 they average out to well inside these bounds.
    assert noise / total == pytest.approx(0.15, abs=0.002)
    assert noise / spans == pytest.approx(3.0, abs=0.05)
    assert sum(span_lengths) / len(span_lengths) == noise / spans and min(span_lengths) >= 1
    # Uniform segmentation: span lengths are spread (geometric-like), not all 3.
    assert 0.25 < sum(1 for s in span_lengths if s == 1) / len(span_lengths) < 0.45


def test_inputs_and_targets_reconstruct_the_original_text_exactly(tokenizer, collator, blocks):
    batch = collator(blocks, torch.Generator().manual_seed(0))
    sentinel_ids = collator.sentinel_ids.tolist()
    for block, inputs, labels in zip(blocks, batch["input_ids"], batch["labels"]):
        # Undo the corruption on the text itself: each sentinel in the input is replaced by the text after it in
        # the targets.
        target_pieces = {}
        current = None
        for token in labels.tolist()[:-1]:
            if token in sentinel_ids:
                current = token
                target_pieces[current] = []
            else:
                target_pieces[current].append(token)
        text = "".join(tokenizer.decode(target_pieces[t]) if t in sentinel_ids else tokenizer.decode([t])
                       for t in inputs.tolist()[:-1])
        assert text.encode() == tokenizer.decode(block).encode()
        assert torch.equal(collator.restore(inputs, labels), block)
    targets = tokenizer.decode(batch["labels"][0])
    assert targets.startswith("<extra_id_0>") and targets.endswith("</s>")
    assert [t for t in batch["labels"][0].tolist() if t in sentinel_ids] == sentinel_ids  # <X0> .. <X5> in order
    assert [t for t in batch["input_ids"][0].tolist() if t in sentinel_ids] == sentinel_ids


def test_sentinels_are_consecutive_ids(collator):
    ids = collator.sentinel_ids
    assert torch.equal(ids, torch.arange(int(ids[0]), int(ids[0]) + 6))


def test_collator_output_is_a_function_of_the_generator_seed(collator, blocks):
    first = collator(blocks, torch.Generator().manual_seed(7))
    again = collator(blocks, torch.Generator().manual_seed(7))
    other = collator(blocks, torch.Generator().manual_seed(8))
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["input_ids"], other["input_ids"])


def test_ragged_batch_pads_inputs_and_labels_and_the_model_loss_ignores_the_padding(tokenizer, collator, blocks):
    model = tiny_model(DeepScaleLMForSeq2SeqLM, **tokenizer_fields(tokenizer), decoder_layers=2, is_decoder=False,
                       is_encoder_decoder=True, max_position_embeddings=BLOCK + 1,
                       decoder_start_token_id=tokenizer.bos_token_id, dropout=0.0)
    examples = [{"input_ids": blocks[0][:40]}, {"input_ids": blocks[1]}]
    batch = collator(examples, torch.Generator().manual_seed(0))
    # 40 tokens: 6 noise tokens in 2 spans -> 40 - 6 + 2 + 1 inputs, 6 + 2 + 1 labels; 128 tokens: 19 in 6 spans.
    assert batch["attention_mask"].sum(1).tolist() == [37, 128 - 19 + 6 + 1]
    assert (batch["labels"] != -100).sum(1).tolist() == [9, 19 + 6 + 1]
    assert (batch["input_ids"][0, 37:] == tokenizer.pad_token_id).all()
    with torch.no_grad():
        padded_loss = model(**batch).loss
        token_losses, tokens = [], 0
        for row in range(2):
            length = int(batch["attention_mask"][row].sum())
            labels = batch["labels"][row][batch["labels"][row] != -100]
            # The decoder reads the start token, then the labels shifted right.
            decoder_inputs = torch.cat([torch.tensor([tokenizer.bos_token_id]), labels[:-1]])
            logits = model(input_ids=batch["input_ids"][row, :length][None],
                           decoder_input_ids=decoder_inputs[None]).logits[0]
            token_losses.append(F.cross_entropy(logits, labels, reduction="sum"))
            tokens += len(labels)
    assert padded_loss.item() == pytest.approx((sum(token_losses) / tokens).item(), rel=1e-5)


def test_blocks_longer_than_configured_are_refused(collator):
    with pytest.raises(ValueError, match="blocks of 2 to 128 tokens, got 129"):
        collator.corrupt(torch.arange(129))


def test_span_token_mask_scores_every_hidden_token_even_a_document_separator(tokenizer, collator, blocks):
    eos = tokenizer.eos_token_id
    with_separators = blocks[:16].clone()
    with_separators[:, ::4] = eos  # a document boundary every 4 tokens: many fall inside hidden spans
    batch = collator(with_separators, torch.Generator().manual_seed(0))
    scored = collator.span_token_mask(batch)
    assert scored.sum(1).tolist() == [19] * 16  # exactly the hidden tokens, never a sentinel or the closing EOS
    assert (batch["labels"][scored] == eos).any()
    assert not torch.isin(batch["labels"][scored], collator.sentinel_ids).any()
