"""dslm-export: the native twin of a DeepScaleLM checkpoint computes the same logits and generates the same tokens.

Each exported folder is loaded in a subprocess that cannot import dslm_hf (tests/native_export_check.py), with
trust_remote_code=False, and its logits, greedy generations and onnxruntime logits are compared with the
DeepScaleLM model's here. Tolerances: Post-LN folds exactly (float32 rounding only: 1e-5 of the largest logit);
Pre-LN is exact up to LayerNorm's epsilon, which one native eps cannot match at every depth (measured below with
the per-LayerNorm eps restored: the same fold then agrees to float32 rounding).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dslm_hf import DeepScaleLMConfig, DeepScaleLMForCausalLM, DeepScaleLMForMaskedLM, DeepScaleLMForSeq2SeqLM
from dslm_hf import DeepScaleLMForSequenceClassification
from dslm_hf.export import branches, export_native, main, native_twin, probe_inputs, relative_difference
from fresh_process import run_without_dslm_hf
from tiny_models import tiny_config

REPO = Path(__file__).resolve().parents[1]
CHECKER = Path(__file__).parent / "native_export_check.py"
SHIPPED_ALL = sorted(path.name for path in (REPO / "checkpoints").iterdir() if (path / "config.json").is_file())
# Shipped checkpoints with no exactly equivalent native architecture, and the reason the refusal gives.
NOT_EXPORTABLE = {"deepscalelm-48l-encoder": "rotary positions with DeepScaleLMForMaskedLM",
                  "deepscalelm-48x48l-encoder-decoder": "rotary positions with DeepScaleLMForSeq2SeqLM"}
SHIPPED = [name for name in SHIPPED_ALL if name not in NOT_EXPORTABLE]

EXACT_TOLERANCE = 1e-5  # Post-LN: the fold is exact, float32 rounding is ~1e-6 of the largest logit
EPS_TOLERANCE = 5e-5  # Pre-LN: LayerNorm eps mismatch, measured 1.2e-5 .. 2.4e-5 on the tiny random models
DEEP_TOLERANCE = 1e-4  # 192 and 1000 layers: depth must not accumulate error past this
ONNX_TOLERANCE = 1e-4

HEADS = {"causal": DeepScaleLMForCausalLM, "masked": DeepScaleLMForMaskedLM, "seq2seq": DeepScaleLMForSeq2SeqLM}
# name -> (head, config overrides, native class)
TINY = {
    "gpt2-relu": ("causal", {}, "GPT2LMHeadModel"),
    "gpt2-gelu-untied": ("causal", {"hidden_act": "gelu", "tie_word_embeddings": False}, "GPT2LMHeadModel"),
    "gpt2-residual-beta2": ("causal", {"residual_beta2": 0.3}, "GPT2LMHeadModel"),
    "gpt2-xavier": ("causal", {"init_scheme": "xavier"}, "GPT2LMHeadModel"),
    "gpt-neox-rotary": ("causal", {"position_embedding_type": "rotary", "hidden_act": "gelu"}, "GPTNeoXForCausalLM"),
    "megatron-bert": ("masked", {"type_vocab_size": 2}, "MegatronBertForMaskedLM"),
    "bert-post-ln": ("masked", {"norm_placement": "post", "hidden_act": "gelu", "type_vocab_size": 2}, "BertForMaskedLM"),
    "bert-deepnet": ("masked", {"norm_placement": "post", "init_scheme": "deepnet"}, "BertForMaskedLM"),
    "blenderbot": ("seq2seq", {"decoder_layers": 3}, "BlenderbotForConditionalGeneration"),
    "bart-post-ln": ("seq2seq", {"norm_placement": "post", "decoder_layers": 3, "hidden_act": "gelu"},
                     "BartForConditionalGeneration"),
    "bart-residual-beta2": ("seq2seq", {"norm_placement": "post", "residual_beta2": 0.2}, "BartForConditionalGeneration"),
}
FAMILIES = {
    "gpt2": ("causal", {}, "GPT2LMHeadModel"),
    "gpt-neox": ("causal", {"position_embedding_type": "rotary"}, "GPTNeoXForCausalLM"),
    "megatron-bert": ("masked", {}, "MegatronBertForMaskedLM"),
    "bert": ("masked", {"norm_placement": "post"}, "BertForMaskedLM"),
    "blenderbot": ("seq2seq", {}, "BlenderbotForConditionalGeneration"),
    "bart": ("seq2seq", {"norm_placement": "post"}, "BartForConditionalGeneration"),
}


def deep_cases(layers: int, families) -> dict:
    """Tiny width (16; at width 8 a Pre-LN token's variance can be small enough for eps to cost 4e-4), deep stacks."""
    return {f"{name}-{layers}": (FAMILIES[name][0], {"num_hidden_layers": layers, "hidden_size": 16, "intermediate_size": 32}
                                 | ({"decoder_layers": layers} if FAMILIES[name][0] == "seq2seq" else {})
                                 | FAMILIES[name][1], FAMILIES[name][2])
            for name in families}


def tiny_model(head: str, seed: int = 0, **overrides):
    """A random DeepScaleLM model whose LayerNorm weights and all biases are random too (so every fold is used)."""
    settings = dict(vocab_size=61, hidden_size=16, num_hidden_layers=3, dropout=0.1, is_decoder=head == "causal",
                    is_encoder_decoder=head == "seq2seq")  # on tiny_models' shape
    if head == "seq2seq":
        settings |= dict(decoder_start_token_id=0, pad_token_id=1)
    config = tiny_config(**(settings | overrides))
    torch.manual_seed(seed)
    model = HEADS[head](config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
            elif parameter.dim() == 1:  # LayerNorm weights
                parameter.copy_(1.0 + 0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def reference_inputs(config: DeepScaleLMConfig) -> dict:
    """Forward inputs (a padded batch for encoders) and a generation prompt (seq2seq: padded, with its mask)."""
    inputs = probe_inputs(config, seed=1)
    generator = torch.Generator().manual_seed(2)
    if config.is_encoder_decoder:
        prompt = torch.randint(2, config.vocab_size, (2, 8), generator=generator)
        mask = torch.ones_like(prompt)
        mask[1, 5:] = 0
        inputs |= {"prompt_ids": prompt.masked_fill(mask == 0, config.pad_token_id), "prompt_mask": mask}
    elif config.is_decoder:
        inputs["prompt_ids"] = torch.randint(0, config.vocab_size, (1, 5), generator=generator)
    return inputs


@torch.no_grad()
def reference_outputs(model, inputs: dict) -> dict:
    forward = {k: v for k, v in inputs.items() if not k.startswith("prompt")}
    outputs = {"logits": model(**forward).logits}
    if "prompt_ids" in inputs:
        outputs["generated"] = model.generate(input_ids=inputs["prompt_ids"], attention_mask=inputs.get("prompt_mask"),
                                              max_new_tokens=32, do_sample=False)
    return outputs


def run_native_checks(jobs: list[dict], tmp: Path) -> None:
    """Run the checker once for all jobs, in a fresh process where dslm_hf cannot be imported."""
    jobs_file = tmp / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    run_without_dslm_hf(CHECKER.read_text(), str(jobs_file), cwd=tmp, timeout=1800)


def export_and_check(cases: dict, tmp: Path, onnx: bool, through_files: bool = True) -> dict:
    """name -> (DeepScaleLM outputs, native outputs, ExportReport or None) for random models built from `cases`:
    saved and exported with `export_native`, or (`through_files=False`, deep stacks: transformers' loader spends
    seconds per hundred layers) turned into their twin in memory and saved."""
    runs, jobs = {}, []
    for name, (head, overrides, _) in cases.items():
        model = tiny_model(head, **overrides)
        source, target = tmp / f"src-{name}", tmp / f"native-{name}"
        if through_files:
            model.save_pretrained(source)
            report = export_native(source, target)
        else:
            report = native_twin(model).save_pretrained(target)
        inputs = reference_inputs(model.config)
        save_file(inputs, tmp / f"inputs-{name}.safetensors")
        runs[name] = (reference_outputs(model, inputs), report)
        jobs.append({"folder": str(target), "inputs": str(tmp / f"inputs-{name}.safetensors"),
                     "results": str(tmp / f"results-{name}.safetensors"), "onnx": onnx})
    run_native_checks(jobs, tmp)
    return {name: (reference, load_file(tmp / f"results-{name}.safetensors"), report)
            for name, (reference, report) in runs.items()}


def tolerance(config) -> float:
    return EXACT_TOLERANCE if config.norm_placement == "post" else EPS_TOLERANCE


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    return export_and_check(TINY, tmp_path_factory.mktemp("tiny"), onnx=True)


def load_shipped(folder: Path):
    config = DeepScaleLMConfig.from_pretrained(folder)
    return {cls.__name__: cls for cls in HEADS.values()}[config.architectures[0]].from_pretrained(folder).eval()


@pytest.mark.parametrize("name", TINY)
def test_tiny_export_has_deepscalelm_logits_generations_and_onnx(tiny_runs, name):
    reference, native, report = tiny_runs[name]
    config = DeepScaleLMConfig.from_pretrained(report.output_dir.parent / f"src-{name}")
    assert report.target == TINY[name][2]
    assert relative_difference(native["logits"], reference["logits"]) <= tolerance(config)
    assert report.max_relative_difference <= tolerance(config)
    if "generated" in reference:
        assert native["generated"].tolist() == reference["generated"].tolist()
    assert relative_difference(native["onnx_logits"], native["logits"]) <= ONNX_TOLERANCE


@pytest.mark.parametrize("name", sorted(NOT_EXPORTABLE))
def test_a_shipped_checkpoint_without_a_native_twin_is_refused_in_one_line(tmp_path, capsys, name):
    """The rebuilt encoder and encoder-decoder use rotary positions (the lever off the masked-LM plateau); every
    native masked LM and encoder-decoder with their layouts uses learned positions, so the export is refused before
    anything is written."""
    assert name in SHIPPED_ALL
    with pytest.raises(SystemExit) as exit_info:
        main([str(REPO / "checkpoints" / name), "--output-dir", str(tmp_path / "native")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "Traceback" not in error and len(error.splitlines()) == 1 and NOT_EXPORTABLE[name] in error, error
    assert not (tmp_path / "native").exists()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_export_matches_and_carries_tokenizer(tmp_path, name):
    source = REPO / "checkpoints" / name
    report = export_native(source, tmp_path / "native")
    model = load_shipped(source)
    inputs = reference_inputs(model.config)
    save_file(inputs, tmp_path / "inputs.safetensors")
    reference = reference_outputs(model, inputs)
    run_native_checks([{"folder": str(report.output_dir), "inputs": str(tmp_path / "inputs.safetensors"),
                        "results": str(tmp_path / "results.safetensors"), "onnx": True}], tmp_path)
    native = load_file(tmp_path / "results.safetensors")
    config = DeepScaleLMConfig.from_pretrained(REPO / "checkpoints" / name)
    assert relative_difference(native["logits"], reference["logits"]) <= tolerance(config)
    if "generated" in reference:
        assert native["generated"].tolist() == reference["generated"].tolist()
    assert relative_difference(native["onnx_logits"], native["logits"]) <= ONNX_TOLERANCE
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(REPO / "checkpoints" / name)("ROMEO: I will")["input_ids"]
    assert native["tokenized"].tolist() == expected
    card = (report.output_dir / "README.md").read_text()
    assert f"checkpoints/{name}" in card and f"{report.max_abs_difference:.3g}" in card
    if (REPO / "checkpoints" / name / "generation_config.json").is_file():
        exported = json.loads((report.output_dir / "generation_config.json").read_text())
        original = json.loads((REPO / "checkpoints" / name / "generation_config.json").read_text())
        assert {k: exported.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")} == \
               {k: original.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")}


def assert_deep_exports_match(runs: dict) -> None:
    for name, (reference, native, _) in runs.items():
        assert relative_difference(native["logits"], reference["logits"]) <= DEEP_TOLERANCE, name
        if "generated" in reference:
            assert native["generated"].tolist() == reference["generated"].tolist(), name


@pytest.mark.slow
def test_192_layer_exports_of_every_family_keep_error_below_1e_4(tmp_path):
    assert_deep_exports_match(export_and_check(deep_cases(192, FAMILIES), tmp_path, onnx=False, through_files=False))


@pytest.mark.slow
def test_1000_layer_exports_keep_error_below_1e_4(tmp_path):
    """Pre-LN decoder (the eps error could accumulate over 2000 LayerNorms) and Post-LN encoder."""
    cases = deep_cases(1000, ["gpt2", "bert"])
    assert_deep_exports_match(export_and_check(cases, tmp_path, onnx=False, through_files=False))


def test_pre_ln_fold_is_exact_once_each_layernorm_gets_its_own_eps():
    """The Pre-LN residual error is LayerNorm's epsilon alone: the LayerNorm reading x / c with eps / c^2 (set per
    module, which no native config can express) brings the export to float32 rounding."""
    model = tiny_model("causal", num_hidden_layers=12)
    native = native_twin(model)
    inputs = probe_inputs(model.config, seed=3)
    eps, scale = model.config.layer_norm_eps, 1.0
    norms = [norm for block in native.transformer.h for norm in (block.ln_1, block.ln_2)]
    for norm, branch in zip(norms, branches(model.model)):
        norm.eps = eps / scale**2
        scale *= branch.skip
    native.transformer.ln_f.eps = eps / scale**2
    with torch.no_grad():
        assert relative_difference(native(**inputs).logits, model(**inputs).logits) <= 5e-6


REFUSALS = {
    "post-ln causal LM": (DeepScaleLMForCausalLM, dict(is_decoder=True, norm_placement="post"), "Post-LN causal LM"),
    "rotary encoder": (DeepScaleLMForMaskedLM, dict(is_decoder=False, position_embedding_type="rotary"), "rotary"),
    "rotary encoder-decoder": (DeepScaleLMForSeq2SeqLM, dict(is_encoder_decoder=True, position_embedding_type="rotary"),
                               "rotary"),
    "decoder with token types": (DeepScaleLMForCausalLM, dict(is_decoder=True, type_vocab_size=2), "token types"),
    "encoder-decoder eps": (DeepScaleLMForSeq2SeqLM, dict(is_encoder_decoder=True, layer_norm_eps=1e-6), "eps"),
    "classification head": (DeepScaleLMForSequenceClassification, dict(is_decoder=False), "task heads"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_export_refuses_what_no_native_class_computes(tmp_path, case, capsys):
    cls, overrides, reason = REFUSALS[case]
    config = tiny_config(vocab_size=32, hidden_size=8, max_position_embeddings=16, **overrides)
    cls(config).save_pretrained(tmp_path / "src")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "src"), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dslm-export: error: cannot export exactly") and reason in err
    assert "GPT2LMHeadModel" in err and "BartForConditionalGeneration" in err  # names the supported combinations
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_output_folder_and_a_foreign_checkpoint(tmp_path, capsys):
    model = tiny_model("causal", num_hidden_layers=2)
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "src"), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "foreign"), "--output-dir", str(tmp_path / "out2")])
    assert "not a DeepScaleLM config" in capsys.readouterr().err


def test_export_of_residual_scaled_model_changes_weights_not_architecture(tmp_path):
    """The fold really rescales: beta / prod(lambda) on GPT-2's output projections, untouched attention inputs."""
    model = tiny_model("causal", num_hidden_layers=2, residual_beta2=0.36)  # lambda = 0.8, beta = 0.6
    native = native_twin(model)
    layer, block = model.model.layers[0], native.transformer.h[0]
    assert torch.allclose(block.attn.c_proj.weight.t(), layer.self_attn.o_proj.weight * 0.6 / 0.8, atol=1e-7)
    assert torch.allclose(block.mlp.c_proj.bias, layer.mlp.fc2.bias * 0.6 / 0.8**2, atol=1e-7)
    assert torch.allclose(block.attn.c_attn.weight[:, :8].t(), layer.self_attn.q_proj.weight[:8], atol=0)


def test_publish_native_stages_the_twin_next_to_or_instead_of_the_remote_code(tmp_path):
    from publish_support import build_tiny_checkpoint, write_text_sample, write_tiny_eval_file

    from dslm_hf.publishing import main as publish_main

    text_file = write_text_sample(tmp_path / "sample.txt")
    checkpoint = build_tiny_checkpoint(tmp_path / "decoder", text_file)
    write_tiny_eval_file(checkpoint, text_file)
    for mode in ("also", "only"):
        staging = tmp_path / f"staged-{mode}"
        assert publish_main([str(checkpoint), "--repo-id", "org/tiny", "--dry-run", "--staging-dir", str(staging),
                             "--native", mode, "--verify-eval", str(text_file)]) == 0
        twin = staging / "native" if mode == "also" else staging
        assert json.loads((twin / "config.json").read_text())["model_type"] == "gpt2"
        assert (twin / "tokenizer.json").is_file() and (twin / "generation_config.json").is_file()
        assert (staging / "modeling_deepscalelm.py").is_file() == (mode == "also")
        card = (twin / "README.md").read_text()
        assert 'from_pretrained("org/tiny"' in card and ("subfolder='native'" in card) == (mode == "also")


def test_dslm_export_help_names_the_native_families(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dslm-export") and "GPT-2" in out and "Bart" in out and "--output-dir" in out


def test_export_refuses_a_checkpoint_with_missing_weights_and_an_unknown_repo_id(tmp_path, capsys, monkeypatch):
    tiny_model("causal", num_hidden_layers=2).save_pretrained(tmp_path / "src")
    weights = load_file(tmp_path / "src" / "model.safetensors")
    del weights["model.layers.1.mlp.fc1.weight"]
    save_file(weights, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "src"), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "lacks weights ['model.layers.1.mlp.fc1.weight']" in capsys.readouterr().err
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit):
        main(["dslm-test/no-such-model", "--output-dir", str(tmp_path / "out")])
    assert "neither a local folder nor a downloadable Hub repository" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
