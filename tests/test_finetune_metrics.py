"""The evaluation metrics of dslm-finetune against hand-computed numbers."""

import math

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from dslm_hf.finetuning import (
    IGNORE_INDEX,
    accuracy_and_macro_f1,
    answer_f1,
    best_answers,
    language_model_token_scores,
    normalize_answer,
    sft_metrics,
    token_classification_metrics,
)


def test_accuracy_and_macro_f1_match_hand_counts():
    metrics = accuracy_and_macro_f1(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
    # class 0: tp 1, predicted 2, actual 1 -> 2/3; class 1: tp 2, predicted 2, actual 3 -> 4/5
    assert metrics["accuracy"] == 0.75
    assert metrics["f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_token_classification_metrics_skip_ignored_positions():
    logits = np.array([[[2.0, 0.0], [0.0, 2.0], [0.0, 2.0]]])  # predicts 0, 1, 1
    labels = np.array([[0, IGNORE_INDEX, 0]])
    metrics = token_classification_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert metrics["accuracy"] == 0.5


def test_sft_perplexity_of_uniform_logits_is_the_vocabulary_size():
    vocab = 7
    logits = torch.zeros(2, 5, vocab)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], [IGNORE_INDEX, 1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    log_probability, hit = language_model_token_scores(label_shift=1)(logits, labels)
    assert log_probability.shape == (2, 4)
    metrics = sft_metrics(EvalPrediction(predictions=(log_probability.numpy(), hit.numpy()), label_ids=labels.numpy()))
    assert metrics["perplexity"] == pytest.approx(vocab, rel=1e-6)


def test_sft_token_accuracy_counts_shifted_hits_only_on_labels():
    logits = torch.full((1, 4, 5), -10.0)
    logits[0, 0, 2] = logits[0, 1, 0] = logits[0, 2, 4] = 10.0  # position t predicts token of t+1
    labels = torch.tensor([[IGNORE_INDEX, 2, 3, 4]])  # hits at 1 (2) and 3 (4), miss at 2 (predicts 0, label 3)
    log_probability, hit = language_model_token_scores(label_shift=1)(logits, labels)
    metrics = sft_metrics(EvalPrediction(predictions=(log_probability.numpy(), hit.numpy()), label_ids=labels.numpy()))
    assert metrics["token_accuracy"] == pytest.approx(2 / 3)
    expected_nll = (2 * -torch.log_softmax(logits[0, 0], -1)[2] - torch.log_softmax(logits[0, 1], -1)[3]) / 3
    assert metrics["perplexity"] == pytest.approx(math.exp(expected_nll), rel=1e-5)


def test_squad_normalisation_and_f1():
    assert normalize_answer("The  Red, fox!") == "red fox"
    assert answer_f1("the red fox", "Red fox.") == 1.0
    assert answer_f1("red fox jumps", "red fox") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert answer_f1("cat", "red fox") == 0.0


def test_best_answer_is_the_top_span_inside_the_context_and_length_limit():
    context = "aa bb cc dd"
    # tokens: 0 question token (outside the context), then aa bb cc dd at character offsets
    offsets = [None, (0, 2), (3, 5), (6, 8), (9, 11)]
    start_logits = np.array([[9.0, 1.0, 5.0, -1.0, 0.0]])  # the best start is the question token: not allowed
    end_logits = np.array([[9.0, 0.0, 0.0, 0.0, 6.0]])  # bb..dd is 3 tokens: too long for max_answer_length=2
    features = {"offset_mapping": [offsets], "example_index": [0]}
    examples = [{"context": context}]
    assert best_answers(start_logits, end_logits, features, examples, "context", max_answer_length=3) == ["bb cc dd"]
    assert best_answers(start_logits, end_logits, features, examples, "context", max_answer_length=2) == ["dd"]


def test_best_answer_picks_the_best_window_of_a_split_context():
    offsets = [None, (0, 2), (3, 5)]
    features = {"offset_mapping": [offsets, [None, (3, 5), (6, 8)]], "example_index": [0, 0]}
    start_logits = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 4.0]])
    end_logits = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 4.0]])
    assert best_answers(start_logits, end_logits, features, [{"context": "aa bb cc"}], "context", 5) == ["cc"]
