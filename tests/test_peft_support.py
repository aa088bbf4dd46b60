"""PEFT LoRA on DeepScaleLM: default targets without naming them, adapter save/reload, merge equality."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

import dslm_hf
from dslm_hf.finetuning import FinetuneArguments, attach_lora
from dslm_hf.peft_support import DEFAULT_LORA_TARGET_MODULES
import tiny_models

VOCAB = 50


def tiny_config(**fields):
    """The tiny shape with 4 heads over VOCAB tokens, no dropout (LoRA on and off give the same forward pass)."""
    return tiny_models.tiny_config(vocab_size=VOCAB, num_attention_heads=4, max_position_embeddings=32, dropout=0.0,
                                   **fields)


def adapted_module_names(peft_model) -> list[str]:
    return sorted(name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer))


def train_adapter(peft_model, steps=5):
    """A few AdamW steps on random tokens so the LoRA B matrices leave their zero init (merging becomes real)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (4, 12), generator=generator)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    return input_ids


@pytest.fixture
def causal_base(tmp_path):
    torch.manual_seed(0)
    model = dslm_hf.DeepScaleLMForCausalLM(tiny_config())
    model.save_pretrained(tmp_path / "base")
    return model, tmp_path


def test_lora_default_targets_are_every_branch_linear(causal_base):
    model, _ = causal_base
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4))
    expected = sorted(f"base_model.model.model.layers.{layer}.{part}"
                      for layer in range(2)
                      for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                   "mlp.fc1", "mlp.fc2"))
    assert adapted_module_names(peft_model) == expected
    assert set(peft_model.peft_config["default"].target_modules) == set(DEFAULT_LORA_TARGET_MODULES)


def test_lora_default_targets_include_cross_attention_in_seq2seq():
    config = tiny_config(is_decoder=False, is_encoder_decoder=True, decoder_layers=1, decoder_start_token_id=1,
                         pad_token_id=0)
    peft_model = get_peft_model(dslm_hf.DeepScaleLMForSeq2SeqLM(config), LoraConfig(task_type="SEQ_2_SEQ_LM", r=4))
    names = adapted_module_names(peft_model)
    # encoder: 2 layers x 6 linears; decoder: 1 layer x (4 self + 4 cross + 2 FFN)
    assert len(names) == 2 * 6 + 10
    assert sum(".cross_attn." in name for name in names) == 4


def test_lora_trains_only_adapters_of_a_frozen_base(causal_base):
    model, _ = causal_base
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # r * (d_in + d_out) per adapted linear: attention 4 x 4*(32+32), FFN 4*(32+128) twice, per layer
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 2 * (4 * 4 * 64 + 2 * 4 * 160)


def test_lora_adapter_reloads_with_identical_outputs(causal_base):
    model, tmp_path = causal_base
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8))
    input_ids = train_adapter(peft_model)
    with torch.no_grad():
        expected = peft_model(input_ids=input_ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    fresh_base = dslm_hf.DeepScaleLMForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        actual = reloaded(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected, atol=0.0, rtol=0.0)


def test_lora_merge_and_unload_matches_adapter_outputs(causal_base):
    model, _ = causal_base
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8))
    input_ids = train_adapter(peft_model)
    with torch.no_grad():
        adapter_logits = peft_model(input_ids=input_ids).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=input_ids).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-2  # the adapter really changes the model
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, dslm_hf.DeepScaleLMForCausalLM)
    with torch.no_grad():
        merged_logits = merged(input_ids=input_ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=0.0)


def test_lora_classification_head_is_saved_with_the_adapter(tmp_path):
    torch.manual_seed(0)
    config = tiny_config(is_decoder=False, num_labels=3)
    model = dslm_hf.DeepScaleLMForSequenceClassification(config)
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4))
    input_ids = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 1])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        peft_model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=input_ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(".score." in name for name in saved)  # the fresh head travels with the adapter

    fresh_base = dslm_hf.DeepScaleLMForSequenceClassification.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, expected, atol=0.0, rtol=0.0)


@pytest.mark.parametrize("task, head_class, head", [
    ("sequence-classification", dslm_hf.DeepScaleLMForSequenceClassification, "score"),
    ("token-classification", dslm_hf.DeepScaleLMForTokenClassification, "score"),
    ("question-answering", dslm_hf.DeepScaleLMForQuestionAnswering, "qa_outputs"),
])
def test_finetune_lora_trains_fresh_task_heads_in_full(task, head_class, head):
    model = head_class(tiny_config(is_decoder=False, num_labels=3))
    args = FinetuneArguments(task=task, model_name_or_path="unused", train_file="unused.jsonl", lora=True, lora_r=4)
    peft_model = attach_lora(model, args)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    head_parameters = {name for name in trainable if f".{head}." in name}
    assert head_parameters and all("modules_to_save" in name for name in head_parameters)
    assert trainable - head_parameters and all("lora_" in name for name in trainable - head_parameters)


def test_finetune_lora_keeps_the_tied_lm_head_frozen():
    args = FinetuneArguments(task="causal-sft", model_name_or_path="unused", train_file="unused.jsonl", lora=True)
    peft_model = attach_lora(dslm_hf.DeepScaleLMForCausalLM(tiny_config()), args)
    assert all("lora_" in name for name, p in peft_model.named_parameters() if p.requires_grad)
