"""dslm_hf.evaluation: `held_out_loss` (one process, a tensor of blocks; what the benchmarks report) gives the number
`evaluate` (what dslm-pretrain and the model card report) gives for the same blocks, seed and batch size."""

import math

import pytest
import torch
from accelerate import Accelerator

from dslm_hf import DeepScaleLMConfig, DeepScaleLMForCausalLM, DeepScaleLMForMaskedLM
from dslm_hf.data import CausalLMCollator, MaskedLMCollator
from dslm_hf.evaluation import evaluate, held_out_loss


class CharTokenizer:
    """The special tokens the masked-LM collator needs, after the corpus' characters."""

    def __init__(self, symbols: int):
        self.pad_token, self.eos_token, self.mask_token = "<pad>", "<eos>", "<mask>"
        self.pad_token_id, self.eos_token_id, self.mask_token_id = symbols, symbols + 1, symbols + 2
        self.all_special_ids = [symbols, symbols + 1, symbols + 2]
        self.size = symbols + 3

    def __len__(self) -> int:
        return self.size


def model_and_collator(objective: str, vocab: int):
    tokenizer = CharTokenizer(vocab)
    config = DeepScaleLMConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               max_position_embeddings=24, init_sequence_length=24, is_decoder=objective == "clm",
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    head = DeepScaleLMForCausalLM if objective == "clm" else DeepScaleLMForMaskedLM
    collator = CausalLMCollator() if objective == "clm" else MaskedLMCollator(tokenizer)
    return head(config), collator


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_held_out_loss_is_evaluate_on_one_process(text_batch, char_vocab, objective):
    model, collator = model_and_collator(objective, len(char_vocab))
    blocks = text_batch(11, 24)  # batches of 4, 4 and 3 blocks: the short last one weighs what it holds
    model.train()
    ours = held_out_loss(model, blocks, collator, seed=7, batch_size=4)
    assert model.training  # the caller's mode comes back
    loader = torch.utils.data.DataLoader(blocks, batch_size=4)  # rows in order, stacked
    theirs = evaluate(Accelerator(cpu=True), model, loader, collator, seed=7)["eval_loss"]
    assert ours == pytest.approx(theirs, rel=1e-12) and math.isfinite(ours)
    assert held_out_loss(model, blocks, collator, seed=7, batch_size=4) == ours  # the same masks every time
    if objective == "mlm":  # other masks, another number
        assert held_out_loss(model, blocks, collator, seed=8, batch_size=4) != ours


def test_held_out_loss_of_a_causal_lm_is_the_mean_over_its_predicted_tokens(text_batch, char_vocab):
    model, collator = model_and_collator("clm", len(char_vocab))
    blocks = text_batch(5, 24)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=blocks).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 blocks[:, 1:].reshape(-1)).item()
    assert held_out_loss(model, blocks, collator, seed=0, batch_size=2) == pytest.approx(expected, rel=1e-5)
    assert held_out_loss(model, blocks, collator, seed=0, batch_size=5) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="at least one block"):
        held_out_loss(model, blocks[:0], collator, seed=0)
