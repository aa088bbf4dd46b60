"""dslm_hf: DeepScaleLM (Kedia et al., "Transformers Get Stable", ICML 2024) for Hugging Face transformers.

`import dslm_hf` registers the model with the Auto classes, so `AutoModelForCausalLM.from_pretrained(path)` and
friends work without `trust_remote_code`; saved checkpoints also carry the code for `trust_remote_code=True`
(`modeling_deepscalelm.AUTO_MAP`, from the same `AUTO_CLASSES` table). Importing the package loads what transformers
loads, not PEFT or datasets; PEFT's default LoRA targets for "deepscalelm" are registered when PEFT is imported
(`modeling_deepscalelm.DEFAULT_LORA_TARGET_MODULES`), so `get_peft_model(model, LoraConfig(task_type=...))` needs
no target_modules.
"""

import transformers

from .configuration_deepscalelm import DeepScaleLMConfig
from .modeling_deepscalelm import (
    AUTO_CLASSES,
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

# The one in-process registration; AutoModel's DeepScaleLMModel returns a DeepScaleLMSeq2SeqModel for an
# encoder-decoder config.
transformers.AutoConfig.register(DeepScaleLMConfig.model_type, DeepScaleLMConfig, exist_ok=True)
for _auto_name, _model_class in AUTO_CLASSES.items():
    getattr(transformers, _auto_name).register(DeepScaleLMConfig, _model_class, exist_ok=True)

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
