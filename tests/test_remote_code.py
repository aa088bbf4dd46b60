"""Remote code: a fresh process that cannot import dslm_hf loads a checkpoint with trust_remote_code=True."""

import json
import subprocess
import sys
import textwrap

import torch

from dslm_hf import DeepScaleLMForSeq2SeqLM
from tiny_models import tiny_model

BLOCK_DSLM = textwrap.dedent(
    """
    import sys
    class _BlockDslm:
        def find_spec(self, name, path=None, target=None):
            if name == "dslm_hf" or name.startswith("dslm_hf."):
                raise ImportError("dslm_hf is deliberately not importable in this process")
    sys.meta_path.insert(0, _BlockDslm())
    try:
        import dslm_hf  # noqa: F401
        raise SystemExit("dslm_hf was importable")
    except ImportError:
        pass
    """
)


def run_without_dslm(code: str, tmp_path) -> dict:
    script = tmp_path / "load_remote.py"
    script.write_text(BLOCK_DSLM + textwrap.dedent(code))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_causal_checkpoint_generates_the_same_tokens_in_a_process_without_dslm(tmp_path):
    model = tiny_model(vocab_size=101, num_attention_heads=4, num_hidden_layers=6, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)
    model.save_pretrained(tmp_path / "ckpt")
    prompt = [[1, 17, 42, 5, 77]]
    expected = model.generate(torch.tensor(prompt), max_new_tokens=12, do_sample=False).tolist()
    result = run_without_dslm(
        f"""
        import json, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("{tmp_path / 'ckpt'}", trust_remote_code=True).eval()
        tokens = model.generate(torch.tensor({prompt}), max_new_tokens=12, do_sample=False).tolist()
        print(json.dumps({{"tokens": tokens, "module": type(model).__module__}}))
        """,
        tmp_path,
    )
    assert result["tokens"] == expected
    assert "dslm_hf" not in result["module"]


def test_seq2seq_checkpoint_loads_with_remote_code_and_matches(tmp_path):
    model = tiny_model(DeepScaleLMForSeq2SeqLM, vocab_size=101, num_attention_heads=4, decoder_layers=5,
                       is_encoder_decoder=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       decoder_start_token_id=1)
    model.save_pretrained(tmp_path / "ckpt")
    source = [[8, 9, 10, 11, 12, 13]]
    expected = model.generate(torch.tensor(source), max_new_tokens=8, do_sample=False).tolist()
    result = run_without_dslm(
        f"""
        import json, torch
        from transformers import AutoModelForSeq2SeqLM
        model = AutoModelForSeq2SeqLM.from_pretrained("{tmp_path / 'ckpt'}", trust_remote_code=True).eval()
        print(json.dumps({{"tokens": model.generate(torch.tensor({source}), max_new_tokens=8, do_sample=False).tolist()}}))
        """,
        tmp_path,
    )
    assert result["tokens"] == expected
