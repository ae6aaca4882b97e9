"""LoRA for any torch model: ``import phitune.lora as lora`` serves wherever ``import loralib as lora`` did.

Same layers, arguments, parameter names and checkpoints as loralib 0.1.2, with its known defects
fixed, plus ``inject`` (LoRA into an existing model, Phi-3's fused projections included) and
``export_peft_adapter`` (a standard PEFT adapter). See docs/lora.md.
"""

from .export import export_peft_adapter
from .inject import inject
from .layers import Conv1d, Conv2d, Conv3d, ConvLoRA, Embedding, Linear, LoRALayer, MergedLinear
from .utils import load_lora_state_dict, lora_state_dict, mark_only_lora_as_trainable

__all__ = [
    "LoRALayer", "Linear", "Embedding", "MergedLinear", "ConvLoRA", "Conv1d", "Conv2d", "Conv3d",
    "mark_only_lora_as_trainable", "lora_state_dict", "load_lora_state_dict", "inject",
    "export_peft_adapter",
]
