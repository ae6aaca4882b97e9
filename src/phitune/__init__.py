"""phitune: fine-tune Microsoft's Phi family (Phi-3, Phi-3.5, Phi-4, Phi-4-mini, Phi-4-multimodal) with LoRA and QLoRA."""

__version__ = "0.1.0"
