"""PEFT integration: default LoRA target modules for model_type "deepscalelm".

PEFT picks LoRA targets from `peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING` when a
`LoraConfig` names no `target_modules`; an unknown model_type gets "Please specify `target_modules`". Importing
this module registers DeepScaleLM there, so

    get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8))

adapts every linear layer of every residual branch: the attention projections (self- and, in a seq2seq decoder,
cross-attention: q_proj, k_proj, v_proj, o_proj) and both FFN layers (fc1, fc2). Heads (lm_head, classifiers) are
not LoRA targets; PEFT's task types train fresh classification heads in full through `modules_to_save`.
`import dslm_hf` does not import PEFT (a training library): import this module to register the targets.

The LoRA branch adds B A x to a frozen W x inside a residual branch, so it does not touch the residual scales
lambda, beta of the recipe: with B initialised to zero the adapted model starts exactly at the pretrained one.
"""

from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from .configuration_deepscalelm import DeepScaleLMConfig

DEFAULT_LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"]

# LoraModel.target_module_mapping is this very dict object, so registering here is what get_peft_model consults.
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(DeepScaleLMConfig.model_type, DEFAULT_LORA_TARGET_MODULES)

__all__ = ["DEFAULT_LORA_TARGET_MODULES"]
