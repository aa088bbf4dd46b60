"""What a rendered model card tells a Hub user beyond the numbers table: metadata a Hub page reads (license, library,
pipeline tag, tags, datasets, model-index with the measured results) and a Limitations list that states the model's
measured standing against the count baselines of its evaluation record."""

import json

import pytest
from huggingface_hub import ModelCard

from dslm_hf.configuration_deepscalelm import DeepScaleLMConfig
from dslm_hf.publishing import render_model_card
from publish_support import build_tiny_checkpoint, write_text_sample, write_tiny_eval_file


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, evaluation record) of a tiny masked LM: the record is real, the baselines below are set by hand."""
    folder = tmp_path_factory.mktemp("card")
    text = write_text_sample(folder / "text.txt")
    checkpoint = build_tiny_checkpoint(folder / "checkpoint", text, masked=True)
    record = json.loads(write_tiny_eval_file(checkpoint, text).read_text())
    return DeepScaleLMConfig.from_pretrained(checkpoint), record


def limitations(card: ModelCard) -> str:
    return card.text.split("## Limitations\n\n", 1)[1].split("\n\n## Citation", 1)[0]


def test_card_metadata_names_license_library_task_and_measured_results(tiny):
    config, record = tiny
    card = ModelCard(str(render_model_card(config, record, "me/tiny")))
    assert (card.data.license, card.data.library_name, card.data.pipeline_tag) == ("apache-2.0", "transformers", "fill-mask")
    assert {"deepscalelm", "custom_code"} <= set(card.data.tags) and card.data.datasets == ["karpathy/tiny_shakespeare"]
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        "loss": round(record["metrics"]["loss"], 4), "perplexity": round(record["metrics"]["perplexity"], 4)}
    assert "@inproceedings{kedia2024transformers" in card.text and "eprint    = {2403.09635}" in card.text


def test_masked_lm_accuracy_from_the_record_joins_the_model_index(tiny):
    config, record = tiny
    scored = {"tokens": 1000, "model": {"accuracy": 0.23456, "loss": 3.0}, "same_parameters": {"accuracy": 0.2, "loss": 3.1},
              "unigram": {"accuracy": 0.0571, "loss": 3.3}}
    card = ModelCard(str(render_model_card(config, record | {"baselines": {"fill_mask": scored}}, "me/tiny")))
    accuracy = [r for r in card.data.eval_results if r.metric_type == "accuracy"]
    assert [(r.metric_value, r.metric_name) for r in accuracy] == [(0.2346, "held-out top-1 accuracy (masked tokens)")]
    assert ("- At the same held-out positions its top-1 accuracy is 23.5%, 17.7 percentage points above always "
            "predicting the most frequent training token (5.7%).") in limitations(card)


def test_limitations_say_by_how_much_a_decoder_misses_its_ngram(tiny):
    config, record = tiny
    config = DeepScaleLMConfig.from_dict(config.to_dict() | {"is_decoder": True,
                                                             "architectures": ["DeepScaleLMForCausalLM"]})
    ngram = {"order": 4, "smoothing": "interpolated Kneser-Ney", "loss": 1.9724, "perplexity": 7.19}
    text = limitations(render_model_card(config, record | {"metrics": {"loss": 3.5410, "perplexity": 34.5},
                                                           "baselines": {"ngram": ngram}}, "me/tiny"))
    assert ("- On the same held-out blocks it does not beat the 4-gram (interpolated Kneser-Ney) fitted on the same "
            "training text: held-out loss 3.5410 against 1.9724, 1.5686 nats per token worse.") in text
    assert "- Its vocabulary has 300 tokens (a byte-level BPE this small is close to character level); it reads at " \
           "most 64 tokens at once" in text
    assert "10% of the paragraphs of the same text, evenly spaced: it shares scenes" in text
    assert "Loading runs this repository's Python files (`trust_remote_code=True`)" in text
