"""phitune: fine-tune Microsoft's Phi family (Phi-3, 3.5, 4, 4-mini, 4-multimodal) with LoRA and QLoRA."""

__version__ = "0.1.0"
