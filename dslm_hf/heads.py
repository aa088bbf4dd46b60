"""The DeepScaleLM heads a checkpoint can hold and what each is for: one table that publishing, export, the
baselines and the checkpoint checks read.

`HEADS` maps the architecture a config names (`config.architectures[0]`) to the Auto class users load it with, its
Hub pipeline tag, and the task name the evaluation file and the model card use; `OBJECTIVE_OF_TASK` maps that task
to the pretraining objective (`dslm_hf.data.make_collator`) whose held-out loss measures it.
"""

import torch

from . import modeling_deepscalelm
from .configuration_deepscalelm import DeepScaleLMConfig

# architecture -> (Auto class users load it with, Hub pipeline tag, task name in the eval file and model-index)
HEADS = {
    "DeepScaleLMForCausalLM": ("AutoModelForCausalLM", "text-generation", "causal-lm"),
    "DeepScaleLMForMaskedLM": ("AutoModelForMaskedLM", "fill-mask", "masked-lm"),
    "DeepScaleLMForSeq2SeqLM": ("AutoModelForSeq2SeqLM", "text2text-generation", "seq2seq-lm"),
}
OBJECTIVE_OF_TASK = {"causal-lm": "clm", "masked-lm": "mlm", "seq2seq-lm": "seq2seq"}


def task_of(config: DeepScaleLMConfig) -> str:
    """The task ("causal-lm", "masked-lm", "seq2seq-lm") of the head `config.architectures` names."""
    return HEADS[config.architectures[0]][2]


def architecture_class(config: DeepScaleLMConfig):
    """The package's model class for the head `config.architectures` names."""
    return getattr(modeling_deepscalelm, config.architectures[0])


def parameter_count(config: DeepScaleLMConfig) -> int:
    """Distinct parameters (a tied LM head counts once), counted on the meta device."""
    with torch.device("meta"):
        model = architecture_class(config)(config)
    return sum(parameter.numel() for parameter in model.parameters())  # parameters() yields a tied tensor once


__all__ = ["HEADS", "OBJECTIVE_OF_TASK", "architecture_class", "parameter_count", "task_of"]
