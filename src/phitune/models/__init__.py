"""Models: loading bases and tokenizers (bf16, 4-bit, Phi specifics, target modules), Phi-4-multimodal's built-in
adapters per row, the LoRA backends, memory estimates."""
