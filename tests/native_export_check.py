"""Load exported checkpoints the way a user without dslm_hf does, and record what they compute.

Run through `fresh_process.run_without_dslm_hf(CODE, JOBS.json)`, where `import dslm_hf` is blocked. JOBS.json lists
{"folder", "inputs", "results", "onnx"}: each folder is loaded with the Auto class its config names
(trust_remote_code=False); the logits on the inputs (a safetensors file), greedy generation (32 new tokens) and, if
asked, onnxruntime's logits of a torch.onnx export are written to the results file (safetensors).
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, AutoTokenizer

AUTO = {"GPT2LMHeadModel": AutoModelForCausalLM, "GPTNeoXForCausalLM": AutoModelForCausalLM,
        "MegatronBertForMaskedLM": AutoModelForMaskedLM, "BertForMaskedLM": AutoModelForMaskedLM,
        "BlenderbotForConditionalGeneration": AutoModelForSeq2SeqLM, "BartForConditionalGeneration": AutoModelForSeq2SeqLM}
FORWARD_KEYS = ("input_ids", "attention_mask", "decoder_input_ids")


class LogitsOnly(torch.nn.Module):
    """The model's forward with positional tensors in, logits out: what the ONNX graph computes."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors):
        return self.model(**dict(zip(self.names, tensors)), use_cache=False).logits


def onnx_logits(model, inputs: dict, path: Path) -> torch.Tensor:
    import onnxruntime

    # an explicit mask: without one, transformers probes position ids for packed sequences with aten::diff,
    # which the ONNX exporter does not support
    inputs = {"attention_mask": torch.ones_like(inputs["input_ids"])} | inputs
    names = [key for key in FORWARD_KEYS if key in inputs]
    tensors = tuple(inputs[key] for key in names)
    torch.onnx.export(LogitsOnly(model, names), tensors, str(path), input_names=names, output_names=["logits"],
                      dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {key: inputs[key].numpy() for key in names})[0])


@torch.no_grad()
def check(job: dict) -> None:
    folder = Path(job["folder"])
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    model = AUTO[config.architectures[0]].from_pretrained(folder, trust_remote_code=False, dtype=torch.float32).eval()
    inputs = load_file(job["inputs"])
    results = {"logits": model(**{k: inputs[k] for k in FORWARD_KEYS if k in inputs}).logits.contiguous()}
    if "prompt_ids" in inputs:
        generated = model.generate(input_ids=inputs["prompt_ids"], attention_mask=inputs.get("prompt_mask"),
                                   max_new_tokens=32, do_sample=False)
        results["generated"] = generated.contiguous()
    if job.get("onnx"):
        results["onnx_logits"] = onnx_logits(model, {k: inputs[k] for k in FORWARD_KEYS if k in inputs},
                                             folder.parent / f"{folder.name}.onnx")
    if (folder / "tokenizer_config.json").is_file():
        results["tokenized"] = torch.tensor(AutoTokenizer.from_pretrained(folder)("ROMEO: I will")["input_ids"])
    save_file(results, job["results"])


def main(jobs_file: str) -> None:
    try:
        import dslm_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("dslm_hf is importable: the check would not show that the export stands alone")
    for job in json.loads(Path(jobs_file).read_text()):
        check(job)


if __name__ == "__main__":
    main(sys.argv[1])
