"""The package's layering: what importing a module loads, where layers are found, how files are written."""

import ast
import io
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
from torch import nn
from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

from dslm_hf import DeepScaleLMConfig, DeepScaleLMForCausalLM, DeepScaleLMForSeq2SeqLM
from dslm_hf.files import write_text_atomically
from dslm_hf.layers import find_layer_stacks
from dslm_hf.optimization import depth_parameter_groups
from tiny_models import tiny_config

PACKAGE = Path(__file__).resolve().parents[1] / "dslm_hf"


def modules_loaded_by(statement: str) -> list[str]:
    """The `transformers.models.*` and `dslm_hf.*` modules a fresh interpreter holds after `statement`."""
    code = f"{statement}; import sys; print(sorted(m for m in sys.modules if m.startswith(('transformers.models.', 'dslm_hf.'))))"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                               cwd=PACKAGE.parent)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return ast.literal_eval(completed.stdout.strip().splitlines()[-1])


# The native architectures dslm-export converts to: publishing and export need them, a training run does not.
EXPORT_TARGETS = {"bart", "bert", "blenderbot", "gpt2", "gpt_neox", "megatron_bert"}


def architectures(modules: list[str]) -> set[str]:
    return {m.split(".")[2] for m in modules if m.startswith("transformers.models.")}


@pytest.mark.slow  # two fresh interpreters importing transformers, torch and accelerate
def test_importing_pretraining_loads_no_native_architecture_nor_the_publishing_commands():
    """`import dslm_hf.pretraining` loads only the architectures transformers' own Auto classes, scheduler and
    Trainer utilities load (auto, and what they import: encoder_decoder's config for AutoTokenizer; bloom when PEFT
    is installed, which transformers.trainer_utils imports); none of the export targets."""
    loaded = modules_loaded_by("import dslm_hf.pretraining")
    transformers_own = modules_loaded_by("from transformers import AutoModelForCausalLM, AutoTokenizer, "
                                         "GenerationConfig, HfArgumentParser, TrainerCallback, get_scheduler")
    assert "auto" in architectures(loaded)
    assert architectures(loaded) == architectures(transformers_own)
    assert not architectures(loaded) & EXPORT_TARGETS
    assert "dslm_hf.publishing" not in loaded and "dslm_hf.export" not in loaded


def test_the_training_monitor_does_not_import_the_diagnose_command():
    """diagnostics imports monitoring (it plots run logs); both take layers and measurements from modules of their
    own, so monitoring does not import diagnostics back."""
    assert "dslm_hf.diagnostics" not in modules_loaded_by("import dslm_hf.monitoring")


def tiny(**overrides) -> DeepScaleLMConfig:
    return tiny_config(**({"hidden_size": 16, "num_hidden_layers": 3, "max_position_embeddings": 16} | overrides))


def test_layer_stacks_come_from_no_split_modules_of_the_model_and_its_base_model():
    assert [(n, len(s)) for n, s in find_layer_stacks(DeepScaleLMForCausalLM(tiny()))] == [("model.layers", 3)]
    seq2seq = DeepScaleLMForSeq2SeqLM(tiny(is_encoder_decoder=True, decoder_layers=2))
    assert [(n, len(s)) for n, s in find_layer_stacks(seq2seq)] == [("model.encoder.layers", 3), ("model.decoder.layers", 2)]
    # BertForMaskedLM names no layer class itself; its base model names BertLayer.
    bert = BertForMaskedLM(BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                      vocab_size=64))
    assert BertForMaskedLM._no_split_modules is None
    assert [n for n, _ in find_layer_stacks(bert)] == ["bert.encoder.layer"]
    t5 = T5ForConditionalGeneration(T5Config(num_layers=1, num_decoder_layers=2, d_model=16, d_kv=8, num_heads=2, d_ff=32,
                                             vocab_size=64))
    assert [(n, len(s)) for n, s in find_layer_stacks(t5)] == [("encoder.block", 1), ("decoder.block", 2)]


def test_layer_stacks_follow_a_subclass_that_renames_the_layer_class():
    """fully_shard swaps each layer's class for a subclass (FSDPDeepScaleLMLayer): found by the names in its MRO,
    and the optimizer's depth rule still reaches every layer parameter."""
    model = DeepScaleLMForCausalLM(tiny(depth_parameterization="depth_mup", depth_base_layers=1))
    before = {g["name"]: (len(g["params"]), g["lr"]) for g in depth_parameter_groups(model, 1e-3, 0.0)}
    for layer in model.model.layers:
        layer.__class__ = type("FSDP" + type(layer).__name__, (type(layer),), {})
    assert [(n, len(s)) for n, s in find_layer_stacks(model)] == [("model.layers", 3)]
    assert {g["name"]: (len(g["params"]), g["lr"]) for g in depth_parameter_groups(model, 1e-3, 0.0)} == before
    assert any(name.startswith("layers[3]") for name in before)


class PlannedOnly(nn.Module):
    """No `_no_split_modules`, a pipeline plan naming its stack."""

    base_model_pp_plan = {"blocks": (["hidden_states"], ["hidden_states"])}

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))
        self.others = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))


def test_layer_stacks_fall_back_to_the_pipeline_plan_and_are_empty_without_either():
    assert [(n, len(s)) for n, s in find_layer_stacks(PlannedOnly())] == [("blocks", 5)]
    assert find_layer_stacks(nn.Sequential(nn.ModuleList([nn.Linear(2, 2)]))) == []


def test_write_text_atomically_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    path.write_text("old")
    assert write_text_atomically(path, '{"new": 1}') == path
    assert path.read_text() == '{"new": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_an_interrupted_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    path.write_text("old")

    def killed(*args):
        raise KeyboardInterrupt  # the process dies between writing the temporary file and the rename

    monkeypatch.setattr("os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomically(path, "new")
    assert path.read_text() == "old"


def test_the_ignored_label_is_written_once():
    """The number -100 appears in the package's code only where IGNORE_INDEX is defined: the remote-code input
    checks, which a Hub user loads without the package; every other module imports the constant (through the
    modeling file)."""
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
                  if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT)]
        for minus, number in zip(tokens, tokens[1:]):
            if minus.string == "-" and number.type == tokenize.NUMBER and number.string == "100":
                found.append(f"{path.name}:{minus.start[0]}")
    assert len(found) == 1 and found[0].startswith("input_checks_deepscalelm.py:")
