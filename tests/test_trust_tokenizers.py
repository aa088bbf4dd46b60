"""A checkpoint's tokenizer never runs its own code, and the tokenizers the package writes fit their model
(issue 20, items 1 and 6).

The hostile folder is the tiny checkpoint of tests/publish_support.py with a tokenizer_config.json whose auto_map
points into a module of the folder; importing that module writes a marker file. Each command's `main` runs with "y"
on stdin, the answer transformers' "run the custom code? [y/N]" prompt reads (before the fix, export, publish and
pretraining all ran the module: `echo y | dslm-export ...`).
"""

import importlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import metadata_load
from transformers import AutoTokenizer

import dslm_hf
from dslm_hf import DeepScaleLMConfig, DeepScaleLMForCausalLM, DeepScaleLMForMaskedLM, DeepScaleLMForSequenceClassification
from dslm_hf import export
from dslm_hf.checkpointing import ForeignCodeError, check_no_foreign_code, fit_tokenizer_to_model
from fresh_process import run_without_dslm_hf
from publish_support import build_tiny_checkpoint, write_text_sample
from tiny_models import tiny_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(path for path in (REPO / "checkpoints").iterdir() if (path / "config.json").is_file())
HOSTILE_MODULE = """from pathlib import Path
Path({marker!r}).write_text("the folder's code ran")
from transformers import PreTrainedTokenizerFast
class HostileTokenizer(PreTrainedTokenizerFast):
    pass
"""
PROGRAMS = {"export": "dslm-export", "publishing": "dslm-publish", "pretraining": "dslm-pretrain"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    text = write_text_sample(root / "text.txt")
    return {"root": root, "text": text, "checkpoint": build_tiny_checkpoint(root / "checkpoint", text)}


def hostile_copy(tiny, name: str) -> tuple[Path, Path]:
    """(folder, marker): the tiny checkpoint whose tokenizer_config.json maps AutoTokenizer into hostile_tokenizer.py
    and names no tokenizer class of transformers' own (so transformers asks before running it)."""
    folder = Path(shutil.copytree(tiny["checkpoint"], tiny["root"] / name))
    marker = tiny["root"] / f"{name}.marker"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class")
    config["auto_map"] = {"AutoTokenizer": [None, "hostile_tokenizer.HostileTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "hostile_tokenizer.py").write_text(HOSTILE_MODULE.format(marker=str(marker)))
    return folder, marker


def command(module: str, folder: Path, out: Path, tiny) -> list[str]:
    return {
        "export": [str(folder), "--output-dir", str(out)],
        "publishing": [str(folder), "--repo-id", "org/model", "--dry-run", "--staging-dir", str(out)],
        "pretraining": ["--output_dir", str(out), "--dataset", str(tiny["text"]), "--tokenizer_name", str(folder),
                        "--max_steps", "1", "--block_size", "32", "--report_to", "none"],
    }[module]


@pytest.mark.parametrize("module", sorted(PROGRAMS))
def test_each_command_refuses_a_tokenizer_with_its_own_code_and_never_runs_it(tiny, module, monkeypatch, capfd):
    folder, marker = hostile_copy(tiny, f"hostile-{module}")
    out = tiny["root"] / f"hostile-{module}-out"
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\n"))
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"dslm_hf.{module}").main(command(module, folder, out, tiny))
    stderr = capfd.readouterr().err
    assert exit_info.value.code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith(f"{PROGRAMS[module]}: error: ")]
    assert f"{folder / 'tokenizer_config.json'} has an auto_map into code that is not DeepScaleLM's" in line
    assert "hostile_tokenizer.HostileTokenizer" in line
    assert not marker.exists()
    assert not (out / "hostile_tokenizer.py").exists() and not (out / "tokenizer" / "hostile_tokenizer.py").exists()


def test_a_stray_python_file_or_a_foreign_config_auto_map_is_refused_naming_it(tiny):
    folder = Path(shutil.copytree(tiny["checkpoint"], tiny["root"] / "stray"))
    check_no_foreign_code(folder)  # the package's own three files and auto_map
    (folder / "helpers.py").write_text("raise SystemExit('never imported')\n")
    with pytest.raises(ForeignCodeError, match=r"stray holds helpers.py, Python code that is not DeepScaleLM's"):
        check_no_foreign_code(folder)
    (folder / "helpers.py").unlink()
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "helpers.Model"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ForeignCodeError, match=r"config.json has an auto_map into code that is not DeepScaleLM's "
                                               r"\(AutoModelForCausalLM: helpers.Model\)"):
        check_no_foreign_code(folder)


@pytest.mark.parametrize("checkpoint", SHIPPED, ids=lambda path: path.name)
def test_shipped_checkpoints_pass_the_code_check_and_their_tokenizers_truncate_at_the_position_table(checkpoint):
    check_no_foreign_code(checkpoint)
    saved = json.loads((checkpoint / "tokenizer_config.json").read_text())
    positions = json.loads((checkpoint / "config.json").read_text())["max_position_embeddings"]
    assert saved["model_max_length"] == positions == 256
    assert not {"is_local", "local_files_only"} & set(saved)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
    assert len(tokenizer("ROMEO: " * 400, truncation=True)["input_ids"]) == 256


# ----------------------------------------------------------------------------------------------------------------
# What the package writes: exported and staged tokenizers, cards and permissions
# ----------------------------------------------------------------------------------------------------------------
def test_export_keeps_the_license_names_its_hub_source_and_writes_normal_permissions(tiny, monkeypatch):
    folder = Path(shutil.copytree(tiny["checkpoint"], tiny["root"] / "licensed"))
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    monkeypatch.setattr(export, "snapshot_download", lambda repo_id, revision=None: str(folder))
    old_umask = os.umask(0o022)
    try:
        export.export_native("org/tiny", tiny["root"] / "licensed-native")
    finally:
        os.umask(old_umask)
    out = tiny["root"] / "licensed-native"
    card = metadata_load(out / "README.md")
    assert (card["license"], card["base_model"], card["library_name"]) == ("mit", "org/tiny", "transformers")
    modes = {path.name: path.stat().st_mode & 0o777 for path in [out, *out.iterdir()]}
    assert modes == {"licensed-native": 0o755} | {name: 0o644 for name in modes if name != "licensed-native"}
    assert "model.safetensors" in modes  # transformers writes it 0600 through a private temporary file
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == 64 and not {"is_local", "local_files_only"} & set(saved)


def test_staged_hub_repository_tokenizer_carries_the_position_table(tiny):
    from dslm_hf.publishing import LICENSE, stage_repository
    from publish_support import write_tiny_eval_file

    folder = Path(shutil.copytree(tiny["checkpoint"], tiny["root"] / "to-stage"))
    eval_file = write_tiny_eval_file(folder, tiny["text"])
    staging = stage_repository(folder, tiny["root"] / "staged", "org/tiny", eval_file)
    saved = json.loads((staging / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == 64 and not {"is_local", "local_files_only"} & set(saved)
    assert metadata_load(staging / "README.md")["license"] == LICENSE
    assert {path.stat().st_mode & 0o777 for path in staging.iterdir()} == {0o644}


def test_sequence_pairs_get_segment_ids_the_encoder_has(tiny):
    encoder = REPO / "checkpoints" / "deepscalelm-48l-encoder"
    tokenizer = AutoTokenizer.from_pretrained(encoder, trust_remote_code=False)
    model = DeepScaleLMForMaskedLM.from_pretrained(encoder).eval()
    pair = tokenizer("ROMEO: speak.", "JULIET: I will.", return_token_type_ids=True, return_tensors="pt")
    assert model.config.type_vocab_size == 0 and pair["token_type_ids"].max() == 0
    with torch.no_grad():
        assert model(**pair).logits.shape == (1, pair["input_ids"].shape[1], model.config.vocab_size)
    # a model with two segment rows keeps transformers' 0 / 1 segments
    two_segments = AutoTokenizer.from_pretrained(tiny["checkpoint"], trust_remote_code=False)
    fit_tokenizer_to_model(two_segments, 64, type_vocab_size=2)
    assert two_segments("a", "b", return_token_type_ids=True)["token_type_ids"] == [0, 1]
    fit_tokenizer_to_model(two_segments, 64, type_vocab_size=0)
    assert two_segments("a", "b", return_token_type_ids=True)["token_type_ids"] == [0, 0]


def test_seq2seq_card_uses_generate_not_the_removed_pipeline():
    from dslm_hf.publishing import USAGE_EXAMPLES

    readme = (REPO / "checkpoints" / "deepscalelm-48x48l-encoder-decoder" / "README.md").read_text()
    for text in (USAGE_EXAMPLES["seq2seq-lm"], readme):
        assert "model.generate(**inputs" in text
        assert "removed the text2text-generation pipeline" in text
        assert 'pipeline("text2text-generation"' not in text


# ----------------------------------------------------------------------------------------------------------------
# The model: PEFT defaults, padding in the causal classifier, the position table
# ----------------------------------------------------------------------------------------------------------------
def tiny_decoder_config(**fields) -> DeepScaleLMConfig:
    return tiny_config(vocab_size=50, num_attention_heads=4, max_position_embeddings=16, is_decoder=True, dropout=0.0,
                       **fields)


LORA_CHECK = """
import sys
{imports}
model = {model}
peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=2))
print(sorted(peft_model.peft_config["default"].target_modules))
"""


def test_lora_needs_no_target_modules_after_a_plain_import_dslm_hf(tmp_path):
    """PEFT imported after the package (the package imports no PEFT): registered as PEFT loads its table."""
    code = LORA_CHECK.format(imports="import dslm_hf\nfrom peft import LoraConfig, get_peft_model",
                             model="dslm_hf.DeepScaleLMForCausalLM(dslm_hf.DeepScaleLMConfig(vocab_size=50, "
                                   "hidden_size=32, num_hidden_layers=2, num_attention_heads=4, is_decoder=True))")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                               env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split("\n")[-2] == str(sorted(dslm_hf.modeling_deepscalelm.DEFAULT_LORA_TARGET_MODULES))


def test_lora_needs_no_target_modules_with_remote_code(tmp_path):
    """PEFT imported before the checkpoint's own modeling file, in a process without the package."""
    DeepScaleLMForCausalLM(tiny_decoder_config()).save_pretrained(tmp_path / "model")
    code = LORA_CHECK.format(
        imports="from peft import LoraConfig, get_peft_model\nfrom transformers import AutoModelForCausalLM",
        model="AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)")
    out = run_without_dslm_hf(code, str(tmp_path / "model"), cwd=tmp_path)
    assert out.split("\n")[-2] == "['fc1', 'fc2', 'k_proj', 'o_proj', 'q_proj', 'v_proj']"


def test_causal_classifier_without_a_mask_pools_the_last_token_that_is_not_padding():
    torch.manual_seed(0)
    model = DeepScaleLMForSequenceClassification(tiny_decoder_config(pad_token_id=0, num_labels=3)).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])  # the second row right-padded
    with torch.no_grad():
        unmasked = model(input_ids=ids).logits
        masked = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
        alone = model(input_ids=ids[1:, :3]).logits
    torch.testing.assert_close(unmasked, masked, rtol=0, atol=0)
    torch.testing.assert_close(unmasked[1:], alone, rtol=1e-6, atol=1e-6)  # float32: the same sums, other order


def test_generating_past_the_position_table_says_so():
    model = DeepScaleLMForCausalLM(tiny_decoder_config(pad_token_id=0)).eval()
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    with pytest.raises(ValueError, match=r"the position table holds max_position_embeddings=16 positions; generation "
                                         r"has reached its end \(16 cached tokens\): ask for fewer new tokens"):
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    with pytest.raises(ValueError, match=r"the sequence reaches position 20, but the position table holds "
                                         r"max_position_embeddings=16 positions \(counted from 0\): truncate the inputs"):
        model(torch.ones(1, 20, dtype=torch.long))
