"""Per-layer usefulness (`dslm_hf.layer_usefulness`, `dslm-diagnose --usefulness`) against hand computations on tiny
native (GPT-2, Llama) and DeepScaleLM models."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file, save_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from dslm_hf import DeepScaleLMForCausalLM, DeepScaleLMForMaskedLM, DeepScaleLMForSeq2SeqLM
from dslm_hf.checkpointing import write_manifest
from dslm_hf.cli import CommandExit
from dslm_hf.diagnostics import main as diagnose_main
from dslm_hf.layer_usefulness import (
    UsefulnessError,
    angular_distance,
    causal_lm_batches,
    find_layers,
    last_half_shares,
    masked_lm_batches,
    measure_layer_usefulness,
    summary_line,
)
from tiny_models import tiny_model

TEXT_FILE = Path(__file__).parent / "data" / "tinyshakespeare_excerpt.txt"
VOCAB = 64


def gpt2(layers: int = 4, vocab: int = VOCAB) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def llama(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, hidden_size=32, num_attention_heads=2,
                                        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64))


def deepscalelm(model_class=DeepScaleLMForCausalLM, **overrides):
    return tiny_model(model_class, **({"vocab_size": VOCAB, "num_hidden_layers": 4} | overrides)).train()


def batches(seed: int = 0):
    ids = torch.randint(0, VOCAB, (6 * 16,), generator=torch.Generator().manual_seed(seed)).tolist()
    return causal_lm_batches(ids, block_size=16, max_blocks=6, batch_size=4)  # two batches: 4 blocks, then 2


def zero_branches(model, index: int):
    """Make layer `index` the identity by zeroing the output projection of each of its branches."""
    layer = find_layers(model)[1][index]
    with torch.no_grad():
        for linear in (("attn", "c_proj"), ("mlp", "c_proj"), ("self_attn", "o_proj"), ("mlp", "down_proj")):
            module = getattr(getattr(layer, linear[0], None), linear[1], None)
            if module is not None:
                module.weight.zero_()
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()


def direct_loss(model, batch_list) -> float:
    """Token-mean next-token cross-entropy over all batches, written out by hand."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batch_list:
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits[:, :-1]
            targets = batch["input_ids"][:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
            count += targets.numel()
    return total / count


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_skipping_a_layer_with_zeroed_branches_costs_nothing_and_it_does_not_turn_the_stream(make):
    model = make()
    zero_branches(model, 1)
    result = measure_layer_usefulness(model, batches())
    entry = result["layers"][1]
    assert abs(entry["ablation_cost"]) < 1e-6 and entry["angular_distance"] < 1e-7
    assert all(abs(other["ablation_cost"]) > 1e-5 for i, other in enumerate(result["layers"]) if i != 1)
    assert result["loss"] == pytest.approx(direct_loss(model, batches()), abs=1e-6)


@pytest.mark.parametrize("make", [gpt2, llama, deepscalelm], ids=["gpt2", "llama", "deepscalelm"])
def test_ablation_cost_is_the_loss_of_the_model_with_the_layer_deleted(make):
    model = make().eval()
    result = measure_layer_usefulness(model, batches())
    full = direct_loss(model, batches())
    for index in (0, 2):
        pruned = copy.deepcopy(model)
        name, layers = find_layers(pruned)
        del layers[index]
        expected = direct_loss(pruned, batches()) - full
        assert abs(expected) > 1e-4  # the layer matters
        assert result["layers"][index]["ablation_cost"] == pytest.approx(expected, abs=1e-5)


def test_gradient_shares_sum_to_one_and_are_each_layers_squared_gradient_norm_over_the_total():
    model = llama().eval()
    result = measure_layer_usefulness(model, batches())
    shares = [entry["gradient_share"] for entry in result["layers"]]
    assert sum(shares) == pytest.approx(1.0, abs=1e-12)
    model.zero_grad()
    for batch in batches():  # the same token-mean loss, by hand: the sum over both batches / all targets
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, 1:].flatten(), reduction="sum")
        (loss / (6 * 15)).backward()
    squares = [sum(float(p.grad.double().pow(2).sum()) for p in layer.parameters()) for layer in model.model.layers]
    assert shares == pytest.approx([s / sum(squares) for s in squares], rel=1e-6)
    assert all(p.grad is None for p in model.parameters()) is False  # the hand pass above left its own gradients


def test_angular_distance_is_zero_for_the_same_direction_one_half_orthogonal_one_opposite():
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(angular_distance(x, x), torch.zeros(3, 5, dtype=torch.double))
    assert angular_distance(x, 2.5 * x).max() < 1e-7  # 2.5 x is rounded in float32
    torch.testing.assert_close(angular_distance(x, -x), torch.ones(3, 5, dtype=torch.double))
    e1, e2 = torch.eye(2)
    assert float(angular_distance(e1, e2)) == pytest.approx(0.5, abs=1e-15)


def test_masked_lm_encoder_is_measured_on_its_masked_positions_only():
    model = deepscalelm(DeepScaleLMForMaskedLM, is_decoder=False).eval()
    ids = torch.randint(1, VOCAB, (4 * 16,), generator=torch.Generator().manual_seed(0)).tolist()
    masked = masked_lm_batches(ids, block_size=16, max_blocks=4, mask_token_id=0, batch_size=4, seed=0)
    labelled = masked[0]["labels"] != -100
    assert labelled.any(-1).all() and torch.equal(masked[0]["input_ids"] == 0, labelled)
    result = measure_layer_usefulness(model, masked)
    assert result["tokens"] == int(labelled.sum())
    with torch.no_grad():
        logits = model(input_ids=masked[0]["input_ids"]).logits
    expected = torch.nn.functional.cross_entropy(logits[labelled], masked[0]["labels"][labelled])
    assert result["loss"] == pytest.approx(float(expected), abs=1e-6)
    assert sum(entry["gradient_share"] for entry in result["layers"]) == pytest.approx(1.0, abs=1e-12)


class ToyLayer(torch.nn.Module):
    """A layer in the old transformers style: it returns a tuple (hidden states, attention maps)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, hidden_states):
        return hidden_states + torch.tanh(self.linear(hidden_states)), "attention maps"


class ToyLM(torch.nn.Module):
    _no_split_modules = ["ToyLayer"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.layers = torch.nn.ModuleList([ToyLayer() for _ in range(3)])
        self.head = torch.nn.Linear(8, VOCAB)
        self.extras = []

    def forward(self, input_ids):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden, extra = layer(hidden)
            self.extras.append(extra)
        return type("Output", (), {"logits": self.head(hidden)})()


def test_a_skipped_layer_with_a_tuple_output_keeps_its_other_elements():
    model = ToyLM()
    result = measure_layer_usefulness(model, batches())
    assert set(model.extras) == {"attention maps"} and len(model.extras) == 3 * 2 * 4  # 2 batches, 1 + 3 passes
    without = copy.deepcopy(model)
    del without.layers[1]
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches():
            logits = without(batch["input_ids"]).logits[:, :-1]
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, 1:].flatten(),
                                                             reduction="sum"))
            count += logits.shape[0] * logits.shape[1]
    assert result["layers"][1]["ablation_cost"] == pytest.approx(total / count - result["loss"], abs=1e-6)


def test_an_encoder_decoder_is_refused_naming_its_two_stacks():
    model = deepscalelm(DeepScaleLMForSeq2SeqLM, is_encoder_decoder=True, decoder_layers=2, decoder_start_token_id=1,
                        pad_token_id=0)
    with pytest.raises(UsefulnessError, match=r"expected one stack of layers, found model.encoder.layers, "
                                              r"model.decoder.layers: per-layer usefulness measures decoder-only"):
        measure_layer_usefulness(model, batches())


# ---------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------
def run_cli(capsys, *argv) -> str:
    assert diagnose_main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


USEFULNESS = ("--usefulness", "--text_file", TEXT_FILE, "--tokenizer", "bytes", "--block_size", 32, "--max_blocks", 4,
              "--no-progress")


def test_cli_writes_json_and_png_and_prints_the_summary_of_the_json(tmp_path, capsys):
    model = gpt2(vocab=256)
    zero_branches(model, 3)
    model.save_pretrained(tmp_path / "model")
    out = run_cli(capsys, tmp_path / "model", *USEFULNESS, "--output-dir", tmp_path / "out")
    report = json.loads((tmp_path / "out" / "usefulness.json").read_text())
    (measured,) = report["measurements"]
    assert len(measured["layers"]) == 4 and abs(measured["layers"][3]["ablation_cost"]) < 1e-6
    assert report["blocks"] == 4 and report["block_size"] == 32 and measured["tokens"] == 4 * 31
    assert out.splitlines()[0] == measured["summary"] == summary_line(measured, str(tmp_path / "model"))
    assert (tmp_path / "out" / "usefulness.png").stat().st_size > 10_000


def test_summary_gives_the_last_half_share_of_the_ablation_cost_and_of_the_gradient():
    def result(costs, shares):
        layers = [{"index": i, "ablation_cost": c, "gradient_share": g} for i, (c, g) in enumerate(zip(costs, shares))]
        return {"num_layers": len(layers), "loss": 2.5, "tokens": 100, "layers": layers}

    assert summary_line(result([0.1, 0.3, 0.2, 0.4], [0.4, 0.3, 0.2, 0.1]), "step 5") == (
        "step 5: 4 layers, held-out loss 2.5000 (100 tokens); the last half of the layers carries 60.0% of the total "
        "ablation cost (1.0000 nats) and 30.0% of the gradient norm^2")
    assert last_half_shares(result([0.1, 0.3, 0.2, 0.4, 0.0], [0.2] * 5))["layers"] == [3, 4]  # odd: the last 2 of 5
    assert summary_line(result([0.1, -0.3], [0.5, 0.5])) == (
        "2 layers, held-out loss 2.5000 (100 tokens); the total ablation cost is -0.2000 nats (not positive, so no "
        "share); the last half of the layers carries 50.0% of the gradient norm^2")


def test_cli_measures_each_checkpoint_of_a_trainer_run_and_of_a_dslm_pretrain_run(tmp_path, capsys):
    trainer = tmp_path / "trainer"
    for step in (10, 2):
        model = gpt2(vocab=256)
        zero_branches(model, 0) if step == 2 else None
        model.save_pretrained(trainer / f"checkpoint-{step}")
    model.save_pretrained(trainer)  # the Trainer's final model sits beside its checkpoints
    out = run_cli(capsys, trainer, *USEFULNESS, "--output-dir", tmp_path / "out1")
    labels = [m["label"] for m in json.loads((tmp_path / "out1" / "usefulness.json").read_text())["measurements"]]
    assert labels == ["step 2", "step 10", "final"] and out.startswith("step 2: 4 layers")

    run = tmp_path / "pretrain"
    model = deepscalelm(vocab_size=256, init_scheme="standard")
    model.config.save_pretrained(run / "model_config")
    for step in (1, 3):
        folder = run / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        save_model(model, str(folder / "model.safetensors"))
        save_file({}, str(folder / "optimizer.safetensors"))
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
        if step == 1:
            write_manifest(folder, step)
    out = run_cli(capsys, run, *USEFULNESS, "--output-dir", tmp_path / "out2")
    report = json.loads((tmp_path / "out2" / "usefulness.json").read_text())
    assert [m["label"] for m in report["measurements"]] == ["step 1"]
    assert report["skipped_checkpoints"][0]["name"] == "step_00000003" and "skipped step_00000003" in out


@pytest.mark.parametrize("extra,message", [
    ((), "--usefulness needs held-out text: --text_file FILE (or --text TEXT)"),
    (("--text_file", TEXT_FILE, "--tokenizer", "bytes", "--sequence-length", 16),
     "--sequence-length sets the signal-propagation input; with --usefulness use --block_size"),
    (("--text_file", TEXT_FILE, "--tokenizer", "bytes", "--block_size", 100),
     "--block_size 100 exceeds the model's 64 positions"),
    (("--text", "too short", "--tokenizer", "bytes", "--block_size", 32),
     "the held-out text gives 9 tokens, fewer than one block of --block_size 32: give more text or a smaller block"),
])
def test_cli_refuses_bad_usefulness_input_in_one_line(extra, message, tmp_path, capsys):
    gpt2(vocab=256).save_pretrained(tmp_path / "model")
    with pytest.raises(CommandExit):
        diagnose_main([str(a) for a in (tmp_path / "model", "--usefulness", *extra, "--output-dir", tmp_path / "out")])
    assert capsys.readouterr().err.splitlines()[-1] == f"dslm-diagnose: error: {message}"
