"""Count-based baselines (dslm_hf.baselines): Kneser-Ney and unigram numbers computed by hand on tiny corpora,
normalisation over the vocabulary, the model-vs-unigram scorer on real corrupted batches, and shape matching."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from dslm_hf import baselines, data
from dslm_hf.configuration_deepscalelm import DeepScaleLMConfig
from dslm_hf.modeling_deepscalelm import DeepScaleLMForMaskedLM, DeepScaleLMForSeq2SeqLM
from dslm_hf.heads import parameter_count
import tiny_models

# a b a b c b over the vocabulary {a, b, c, d} (d never seen)
TINY = [0, 1, 0, 1, 2, 1]


def hand_bigram_kneser_ney() -> tuple[dict, dict]:
    """P1 and P2 of the tiny corpus with discount 1/2, by the formulas.

    Bigrams: ab x2, ba, bc, cb. Continuation counts N1+(. w): a 1 (ba), b 2 (ab, cb), c 1 (bc), d 0; total 4, 3 types.
    P1(w) = max(N1+(. w) - 1/2, 0) / 4 + 1/2 * 3/4 * 1/4.
    Bigram contexts: a: 2 tokens, 1 type; b: 2 tokens, 2 types; c: 1 token, 1 type; d: unseen (P2 = P1).
    """
    half = Fraction(1, 2)
    continuation = [1, 2, 1, 0]
    p1 = [max(n - half, 0) / 4 + half * Fraction(3, 4) * Fraction(1, 4) for n in continuation]
    bigrams = {(0, 1): 2, (1, 0): 1, (1, 2): 1, (2, 1): 1}
    contexts = {0: (2, 1), 1: (2, 2), 2: (1, 1)}
    p2 = {}
    for h in range(4):
        for w in range(4):
            if h in contexts:
                total, types = contexts[h]
                p2[h, w] = max(bigrams.get((h, w), 0) - half, 0) / total + half * types / total * p1[w]
            else:
                p2[h, w] = p1[w]
    return p1, p2


def test_kneser_ney_bigram_probabilities_equal_the_hand_computed_ones():
    p1, p2 = hand_bigram_kneser_ney()
    assert p1 == [Fraction(7, 32), Fraction(15, 32), Fraction(7, 32), Fraction(3, 32)]
    assert p2[0, 1] == Fraction(111, 128)  # 3/4 + 1/4 * 15/32
    model = baselines.KneserNeyLM(vocab_size=4, order=2, discount=0.5).fit(TINY)
    for h in range(4):
        assert model.distribution([h]) == pytest.approx([float(p2[h, w]) for w in range(4)], abs=1e-15)
    assert model.distribution([]) == pytest.approx([float(p) for p in p1], abs=1e-15)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kneser_ney_probabilities_sum_to_one_in_every_context(order):
    stream = torch.randint(0, 12, (400,), generator=torch.Generator().manual_seed(0)).numpy()
    model = baselines.KneserNeyLM(vocab_size=13, order=order).fit(stream)  # token 12 never occurs
    for history in ([], [3], [3, 5], [5, 3, 7], [12, 12, 12], list(stream[:3])):
        distribution = model.distribution(history)
        assert distribution.sum() == pytest.approx(1.0, abs=1e-12)
        assert (distribution > 0).all()


def test_kneser_ney_perplexity_of_a_held_out_block_equals_the_hand_computed_one():
    p1, p2 = hand_bigram_kneser_ney()
    model = baselines.KneserNeyLM(vocab_size=4, order=2, discount=0.5).fit(TINY)
    # block "a b d": b | a, then the unseen d | b (= 1/2 * 2/2 * P1(d) = 3/64)
    metrics = model.causal_lm_metrics(np.array([[0, 1, 3]]))
    expected_loss = -(math.log(p2[0, 1]) + math.log(p2[1, 3])) / 2
    assert p2[1, 3] == Fraction(3, 64)
    assert metrics == {"loss": pytest.approx(expected_loss, rel=1e-12),
                       "perplexity": pytest.approx(math.sqrt(128 / 111 * 64 / 3), rel=1e-12), "tokens": 2}


def test_kneser_ney_discounts_are_ney_estimates_per_order():
    # bigram counts 2, 1, 1, 1: n1 = 3, n2 = 1 -> 3/5; continuation counts 1, 2, 1: n1 = 2, n2 = 1 -> 2/4
    model = baselines.KneserNeyLM(vocab_size=4, order=2).fit(TINY)
    assert model.discounts == [0.5, 0.6]


def test_kneser_ney_block_start_uses_the_history_it_has():
    stream = torch.randint(0, 20, (3000,), generator=torch.Generator().manual_seed(1)).numpy()
    model = baselines.KneserNeyLM(vocab_size=20, order=3).fit(stream)
    block = stream[:16]
    log_probs = model.block_log_probs(block[None])[0]
    assert log_probs[0] == pytest.approx(math.log(model.distribution(block[:1])[block[1]]), rel=1e-12)
    assert log_probs[5] == pytest.approx(math.log(model.distribution(block[4:6])[block[6]]), rel=1e-12)


def test_higher_order_kneser_ney_beats_unigram_on_repetitive_text():
    text = data.load_corpus("default", default_corpus_megabytes=0.3)["train"]["text"]
    tokenizer = data.train_byte_level_bpe(text, 300)
    blocks = data.pack_into_blocks(data.hold_out_documents(data.load_corpus("default", default_corpus_megabytes=0.3),
                                                           0.1)["train"], tokenizer, 64)[:]["input_ids"]
    train, held_out = blocks[:-40].flatten(), blocks[-40:]
    losses = [baselines.KneserNeyLM(len(tokenizer), order).fit(train).causal_lm_metrics(held_out)["loss"]
              for order in (1, 2, 4)]
    assert losses[0] > losses[1] > losses[2]
    unigram = baselines.UnigramLM(len(tokenizer)).fit(train).metrics(held_out[:, 1:])["loss"]
    assert losses[0] == pytest.approx(unigram, abs=0.05)  # both are frequencies; only the smoothing differs


def test_unigram_loss_and_top1_accuracy_equal_the_hand_computed_ones():
    # counts a 2, b 3, c 1, d 0 over 6 tokens: P = (c + 1) / 10 = .3, .4, .2, .1; top-1 is b
    unigram = baselines.UnigramLM(4).fit(torch.tensor(TINY))
    assert unigram.log_probs.exp().tolist() == pytest.approx([0.3, 0.4, 0.2, 0.1], abs=1e-15)
    assert unigram.top_token == 1
    metrics = unigram.metrics(torch.tensor([1, 1, 0, 3]))
    assert metrics == {"loss": pytest.approx(-(2 * math.log(0.4) + math.log(0.3) + math.log(0.1)) / 4, rel=1e-12),
                       "accuracy": 0.5}


@pytest.fixture(scope="module")
def tokenizer():
    text = data.load_corpus("default", default_corpus_megabytes=0.1)["train"]["text"]
    tokenizer = data.train_byte_level_bpe(text, 300)
    data.add_sentinel_tokens(tokenizer, data.span_corruption_sentinel_count(64, 0.15, 3.0))
    return tokenizer


def tiny_config(tokenizer, **kwargs) -> DeepScaleLMConfig:
    return tiny_models.tiny_config(**tiny_models.tokenizer_fields(tokenizer), max_position_embeddings=80, dropout=0.0,
                                   **kwargs)


def test_span_scoring_counts_the_hidden_tokens_and_matches_the_models_own_loss(tokenizer):
    torch.manual_seed(0)
    model = DeepScaleLMForSeq2SeqLM(tiny_config(tokenizer, is_decoder=False, is_encoder_decoder=True, decoder_layers=2,
                                                decoder_start_token_id=tokenizer.bos_token_id))
    collator = data.SpanCorruptionCollator(tokenizer, 64)
    blocks = torch.randint(5, 250, (6, 64), generator=torch.Generator().manual_seed(0))
    batches = baselines.held_out_batches(blocks, collator, batch_size=4, seed=0)
    unigram = baselines.UnigramLM(len(tokenizer)).fit(blocks)
    spans = baselines.masked_position_metrics(model, batches, collator.span_token_mask, unigram)
    assert spans["tokens"] == 6 * 10  # 10 hidden tokens per 64-token block
    everything = baselines.masked_position_metrics(model, batches, lambda b: b["labels"] != -100, unigram)
    assert everything["tokens"] == 6 * (10 + 3 + 1)  # plus 3 sentinels and EOS
    with torch.no_grad():
        losses = [model(**b).loss * (b["labels"] != -100).sum() for b in batches]
    assert everything["model"]["loss"] == pytest.approx(float(sum(losses)) / everything["tokens"], rel=1e-6)
    assert spans["unigram"] == unigram.metrics(torch.cat([b["labels"][collator.span_token_mask(b)] for b in batches]))


def test_fill_mask_scoring_uses_the_mask_token_positions_only(tokenizer):
    torch.manual_seed(0)
    model = DeepScaleLMForMaskedLM(tiny_config(tokenizer, is_decoder=False))
    collator = data.MaskedLMCollator(tokenizer, 0.3)
    blocks = torch.randint(5, 250, (8, 64), generator=torch.Generator().manual_seed(0))
    batches = baselines.held_out_batches(blocks, collator, batch_size=8, seed=0)
    queries = baselines.fill_mask_positions(tokenizer.mask_token_id)
    result = baselines.masked_position_metrics(model, batches, queries, baselines.UnigramLM(len(tokenizer)).fit(blocks))
    labelled = int((batches[0]["labels"] != -100).sum())
    assert result["tokens"] == int((batches[0]["input_ids"] == tokenizer.mask_token_id).sum())
    assert 0.7 * labelled < result["tokens"] < 0.9 * labelled  # 80% of the selected tokens become the mask token
    with torch.no_grad():
        logits = model(**batches[0]).logits[queries(batches[0])]
    correct = int((logits.argmax(-1) == batches[0]["labels"][queries(batches[0])]).sum())
    assert result["model"]["accuracy"] == correct / result["tokens"]


def test_shallow_shape_has_the_parameter_count_of_the_deep_one(tokenizer):
    def count(layers: int, width: int) -> int:
        config = tiny_config(tokenizer, is_decoder=True)
        config.num_hidden_layers, config.hidden_size, config.intermediate_size = layers, width, 4 * width
        config.architectures = ["DeepScaleLMForCausalLM"]
        return parameter_count(config)

    deep = count(48, 64)
    width, parameters = baselines.same_parameter_shape(count, deep, layers=4, width_multiple=4)
    assert width % 4 == 0 and abs(parameters - deep) / deep < 0.02
    assert abs(parameters - deep) <= min(abs(count(4, w) - deep) for w in (width - 4, width + 4))
