"""PEFT integration: default LoRA target modules for model_type "deepscalelm".

PEFT picks LoRA targets from `peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING` when a
`LoraConfig` names no `target_modules`; an unknown model_type gets "Please specify `target_modules`". The modeling
file registers DeepScaleLM there when PEFT is imported (before or after `import dslm_hf`, and in remote code), so

    get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8))

adapts every linear layer of every residual branch: the attention projections (self- and, in a seq2seq decoder,
cross-attention: q_proj, k_proj, v_proj, o_proj) and both FFN layers (fc1, fc2). Heads (lm_head, classifiers) are
not LoRA targets; PEFT's task types train fresh classification heads in full through `modules_to_save`. This
module only names the targets for code that wants them explicitly.

The LoRA branch adds B A x to a frozen W x inside a residual branch, so it does not touch the residual scales
lambda, beta of the recipe: with B initialised to zero the adapted model starts exactly at the pretrained one.
"""

from .modeling_deepscalelm import DEFAULT_LORA_TARGET_MODULES

__all__ = ["DEFAULT_LORA_TARGET_MODULES"]
