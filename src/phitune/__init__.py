"""phitune: fine-tune Microsoft Phi-3 with LoRA and QLoRA."""

__version__ = "0.1.0"
