"""loralib's five steps with phitune.lora, on a tiny randomly initialised Phi-3 (CPU, a few seconds).

    PYTHONPATH=src python examples/loralib_quickstart.py

1. put LoRA layers in the model (``lora.inject``; or build it with ``lora.Linear`` etc. as with loralib)
2. ``lora.mark_only_lora_as_trainable``
3. train as usual
4. ``torch.save(lora.lora_state_dict(model), ...)``: only the small LoRA checkpoint
5. load the pretrained weights, then the LoRA checkpoint with ``strict=False``
"""

import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Phi3Config, Phi3ForCausalLM

import phitune.lora as lora  # where loralib code had: import loralib as lora

TARGETS = ["q_proj", "v_proj", "o_proj"]


def build_model() -> Phi3ForCausalLM:
    config = Phi3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Phi3ForCausalLM(config)


def train(model: torch.nn.Module, batch: torch.Tensor, steps: int = 40) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for step in range(steps):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:2d}  loss {loss.item():.3f}")


def main() -> None:
    torch.set_num_threads(1)  # the matrices are tiny: extra threads cost more than they save
    torch.manual_seed(0)
    workdir = Path(tempfile.mkdtemp())
    model = build_model()
    save_file(model.state_dict(), workdir / "pretrained.safetensors")  # stands in for a real checkpoint

    # Step 1: LoRA on q and v (slices of Phi-3's fused qkv_proj) and on o_proj, pretrained weights kept.
    for name, description in lora.inject(model, TARGETS, r=8, lora_alpha=16).items():
        print(f"{name}: {description}")
    # Step 2 (inject already did it; shown because loralib code calls it after building the model).
    lora.mark_only_lora_as_trainable(model, bias="none")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {trainable} of {total} ({100 * trainable / total:.1f}%)")

    # Step 3: learn to continue a fixed sequence; only the LoRA factors move.
    batch = torch.arange(3, 35).repeat(4, 1)
    train(model, batch)

    # Step 4: save only the LoRA weights.
    torch.save(lora.lora_state_dict(model), workdir / "lora.pt")

    # Step 5: a fresh model gets the pretrained weights, the same LoRA layers, then the LoRA checkpoint.
    restored = build_model()
    restored.load_state_dict(load_file(workdir / "pretrained.safetensors"))
    lora.inject(restored, TARGETS, r=8, lora_alpha=16)
    restored.load_state_dict(torch.load(workdir / "lora.pt", weights_only=True), strict=False)

    model.eval()
    restored.eval()
    with torch.no_grad():
        same = torch.allclose(model(batch).logits, restored(batch).logits, atol=1e-6)
    print(f"restored model reproduces the trained one: {same}")
    print(f"PEFT adapter written to {lora.export_peft_adapter(model, workdir / 'adapter', 'tiny-phi3')}")


if __name__ == "__main__":
    main()
