"""Models: loading bases and tokenizers (bf16, 4-bit, Phi specifics, target modules), the LoRA backends, memory
estimates."""
