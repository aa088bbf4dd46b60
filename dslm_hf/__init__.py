"""dslm_hf: DeepScaleLM (Kedia et al., "Transformers Get Stable", ICML 2024) for Hugging Face transformers.

`import dslm_hf` registers the model with the Auto classes, so `AutoModelForCausalLM.from_pretrained(path)` and
friends work without `trust_remote_code`; saved checkpoints also carry the code for `trust_remote_code=True`.
"""

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

from .configuration_deepscalelm import DeepScaleLMConfig
from .modeling_deepscalelm import (
    DeepScaleLMForCausalLM,
    DeepScaleLMForMaskedLM,
    DeepScaleLMForQuestionAnswering,
    DeepScaleLMForSeq2SeqLM,
    DeepScaleLMForSequenceClassification,
    DeepScaleLMForTokenClassification,
    DeepScaleLMLayer,
    DeepScaleLMModel,
    DeepScaleLMPreTrainedModel,
    DeepScaleLMSeq2SeqModel,
)

AutoConfig.register("deepscalelm", DeepScaleLMConfig, exist_ok=True)
for _auto, _model in (
    (AutoModel, DeepScaleLMModel),
    (AutoModelForCausalLM, DeepScaleLMForCausalLM),
    (AutoModelForMaskedLM, DeepScaleLMForMaskedLM),
    (AutoModelForSeq2SeqLM, DeepScaleLMForSeq2SeqLM),
    (AutoModelForSequenceClassification, DeepScaleLMForSequenceClassification),
    (AutoModelForTokenClassification, DeepScaleLMForTokenClassification),
    (AutoModelForQuestionAnswering, DeepScaleLMForQuestionAnswering),
):
    _auto.register(DeepScaleLMConfig, _model, exist_ok=True)

__all__ = [
    "DeepScaleLMConfig",
    "DeepScaleLMPreTrainedModel",
    "DeepScaleLMModel",
    "DeepScaleLMSeq2SeqModel",
    "DeepScaleLMLayer",
    "DeepScaleLMForCausalLM",
    "DeepScaleLMForMaskedLM",
    "DeepScaleLMForSeq2SeqLM",
    "DeepScaleLMForSequenceClassification",
    "DeepScaleLMForTokenClassification",
    "DeepScaleLMForQuestionAnswering",
]
from . import peft_support  # noqa: F401,E402  registers LoRA defaults
