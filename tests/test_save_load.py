"""Save/load: bit-identical tensors and logits for every head, heads share trunks, Auto classes, no re-init."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from dslm_hf import (
    DeepScaleLMConfig,
    DeepScaleLMForCausalLM,
    DeepScaleLMForMaskedLM,
    DeepScaleLMForQuestionAnswering,
    DeepScaleLMForSeq2SeqLM,
    DeepScaleLMForSequenceClassification,
    DeepScaleLMForTokenClassification,
    DeepScaleLMModel,
)
from tiny_models import tiny_config

BASE = dict(vocab_size=97, num_attention_heads=4, num_hidden_layers=3, max_position_embeddings=32,  # on the tiny shape
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
CASES = {
    "causal": (DeepScaleLMForCausalLM, AutoModelForCausalLM, {}),
    "masked": (DeepScaleLMForMaskedLM, AutoModelForMaskedLM, {"is_decoder": False, "type_vocab_size": 2}),
    "seq2seq": (DeepScaleLMForSeq2SeqLM, AutoModelForSeq2SeqLM, {"is_encoder_decoder": True, "decoder_layers": 4}),
    "sequence-classification": (DeepScaleLMForSequenceClassification, AutoModelForSequenceClassification, {"num_labels": 3}),
    "token-classification": (DeepScaleLMForTokenClassification, AutoModelForTokenClassification, {"is_decoder": False}),
    "question-answering": (DeepScaleLMForQuestionAnswering, AutoModelForQuestionAnswering, {"is_decoder": False}),
    "base": (DeepScaleLMModel, AutoModel, {"norm_placement": "post"}),
}


def outputs_of(model, ids):
    kwargs = {"decoder_input_ids": ids[:, :5]} if model.config.is_encoder_decoder else {}
    out = model(ids, **kwargs)
    return torch.cat([t.flatten() for t in out.values() if isinstance(t, torch.Tensor)])


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_is_bit_identical_through_the_auto_class(case, tmp_path):
    model_class, auto_class, overrides = CASES[case]
    torch.manual_seed(0)
    model = model_class(tiny_config(**BASE, **overrides)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))

    torch.manual_seed(123)  # a re-initialisation would now draw different numbers
    loaded = auto_class.from_pretrained(tmp_path).eval()
    assert type(loaded) is model_class
    saved = dict(model.state_dict())
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), saved[name]), name
    ids = torch.randint(3, BASE["vocab_size"], (2, 12))
    assert torch.equal(outputs_of(loaded, ids), outputs_of(model, ids))


def test_config_json_carries_auto_map_for_every_head_and_code_files(tmp_path):
    DeepScaleLMForCausalLM(tiny_config(**BASE)).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_deepscalelm.DeepScaleLMConfig"
    assert auto_map["AutoModelForCausalLM"] == "modeling_deepscalelm.DeepScaleLMForCausalLM"
    assert auto_map["AutoModelForSequenceClassification"].endswith("DeepScaleLMForSequenceClassification")
    for code in ("configuration_deepscalelm.py", "input_checks_deepscalelm.py", "modeling_deepscalelm.py",
                 "recipe_deepscalelm.py"):
        assert (tmp_path / code).exists(), code
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DeepScaleLMConfig)


@pytest.mark.parametrize(
    "source,target,overrides",
    [
        (DeepScaleLMForCausalLM, DeepScaleLMForSequenceClassification, {}),
        (DeepScaleLMForCausalLM, DeepScaleLMModel, {}),
        (DeepScaleLMForMaskedLM, DeepScaleLMForTokenClassification, {"is_decoder": False}),
        (DeepScaleLMForMaskedLM, DeepScaleLMForQuestionAnswering, {"is_decoder": False}),
    ],
)
def test_heads_load_each_others_trunk(source, target, overrides, tmp_path):
    torch.manual_seed(0)
    trained = source(tiny_config(**BASE, **overrides))
    trained.save_pretrained(tmp_path)
    loaded = target.from_pretrained(tmp_path)
    trunk = loaded.model if hasattr(loaded, "model") else loaded
    for name, tensor in trunk.state_dict().items():
        assert torch.equal(tensor, trained.model.state_dict()[name]), name


def test_a_masked_lm_checkpoint_refuses_the_causal_head(tmp_path):
    DeepScaleLMForMaskedLM(tiny_config(**BASE, is_decoder=False)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is_decoder=False"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_tied_output_embedding_stays_tied_after_loading(tmp_path):
    DeepScaleLMForSeq2SeqLM(tiny_config(**BASE, is_encoder_decoder=True)).save_pretrained(tmp_path)
    loaded = DeepScaleLMForSeq2SeqLM.from_pretrained(tmp_path)
    shared = loaded.model.encoder.embed_tokens.weight
    assert loaded.lm_head.weight is shared and loaded.model.decoder.embed_tokens.weight is shared
