"""Speed switches: what makes training fast without changing the math.

- padding-free batching: the rows of a batch are concatenated into one row with restarting position ids, so no
  padding is computed; transformers turns those position ids into a block-diagonal mask (no attention across
  examples) when there is no attention mask and no KV cache (TRL's trainer passes `use_cache=False`).
- attention kernel: with padding-free on CUDA, `model.attn_implementation: auto` picks flash_attention_2 when
  flash-attn is installed, else flex_attention, which skips the masked blocks of the block-diagonal mask; sdpa is
  handed that mask as a dense tensor and computes every block, so it is slow there.
- Liger kernels (RMSNorm, RoPE, SwiGLU) on CUDA when `liger-kernel` is installed. They act per token (RoPE reads the
  cos/sin of each token's own position id), so they compose with padding-free. TRL keeps Liger's fused linear
  cross-entropy off, since it computes the loss itself with a chunked (fused) LM head.
- activation strategy (`speed.activation`), what is kept between forward and backward:
  `none` keeps everything (fastest, most memory); `full` recomputes each decoder layer in the backward pass (the
  reference recipe's gradient checkpointing); `selective` checkpoints each layer but keeps the attention output, so
  the attention forward is not recomputed (TRL's selective activation checkpointing); `offload` is `full` with the
  saved layer inputs held in pinned host memory (transformers' checkpoint offload, `torch.autograd.graph.save_on_cpu`;
  CUDA only): the least GPU memory, and slower than `full`; `fused-lora` keeps each layer's input like `full` but
  does not recompute down_proj in backward (its LoRA gradients come from fused formulas; speed/fused_lora.py).
  `auto` is `selective` on CUDA (about the reference's memory, less recomputation) and `none` on CPU.

Each switch is in the `speed` section; `auto` turns it on where the hardware allows it, `false`/`none` turns it off.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field

from phitune.config.schema import SpeedConfig
from phitune.errors import PhituneError

log = logging.getLogger("phitune")

CHECKPOINTED = ("full", "selective", "offload")  # activation strategies that recompute in the backward pass


@dataclass
class SpeedPlan:
    """The resolved switches for one run."""

    padding_free: bool
    liger: bool
    activation: str = "none"  # none | full | selective | offload | fused-lora
    checkpoint_kwargs: dict = field(default_factory=dict)  # the user's activation_checkpointing_kwargs, if any

    def sft_kwargs(self) -> dict:
        """The SFTConfig keys these switches set (transformers 5 names: activation_checkpointing*)."""
        kwargs = {
            "padding_free": self.padding_free,
            "use_liger_kernel": self.liger,
            "activation_checkpointing": self.activation in CHECKPOINTED,
        }
        if self.activation in CHECKPOINTED:
            checkpoint = {"use_reentrant": False, **self.checkpoint_kwargs}
            checkpoint.pop("selective", None)
            checkpoint.pop("offload", None)
            if self.activation == "selective":
                checkpoint["selective"] = True  # TRL's key; apply_activation_strategy makes it take effect
            if self.activation == "offload":
                checkpoint["offload"] = True  # transformers: saved layer inputs go to pinned host memory
            kwargs["activation_checkpointing_kwargs"] = checkpoint
        if self.activation == "fused-lora":  # no transformers checkpointing; the key tells apply_activation_strategy
            kwargs["activation_checkpointing_kwargs"] = {"fused_lora": True}
        return kwargs


def resolve_speed(cfg: SpeedConfig, quantized: bool = False, training_config: dict | None = None) -> SpeedPlan:
    """Turn `auto` into on or off for this machine; refuse a switch forced on where it cannot work.

    `training_config` is the user's SFTConfig section: an explicit `activation_checkpointing` (or its old name
    `gradient_checkpointing`) there decides what `speed.activation: auto` means, and contradicting it is an error.
    """
    import torch

    cuda = torch.cuda.is_available()
    liger_available = cuda and importlib.util.find_spec("liger_kernel") is not None
    if cfg.liger == "true" and not liger_available:
        raise PhituneError("speed.liger is true but Liger kernels need CUDA and `pip install liger-kernel`")
    liger = cfg.liger == "true" or (cfg.liger == "auto" and liger_available and not quantized)
    # On a CPU, sdpa computes the padding-free block-diagonal mask as one dense (total x total) block: slower than
    # padding (measured 0.53x on fixed rows, benchmarks/RESULTS.md). So `auto` means on with CUDA only.
    padding_free = cfg.padding_free == "true" or (cfg.padding_free == "auto" and cuda)
    user = dict(training_config or {})
    activation = resolve_activation(getattr(cfg, "activation", "auto"), user, cuda)
    if activation == "fused-lora" and quantized:
        raise PhituneError("speed.activation fused-lora needs 16/32-bit base weights, not 4-bit (QLoRA); use selective")
    return SpeedPlan(padding_free, liger, activation, checkpoint_kwargs=_user_kwargs(user))


def _user_kwargs(training_config: dict) -> dict:
    """The user's checkpointing kwargs under either name (old first, so the new name wins)."""
    old = training_config.get("gradient_checkpointing_kwargs") or {}
    return {**old, **(training_config.get("activation_checkpointing_kwargs") or {})}


def resolve_activation(choice: str, training_config: dict, cuda: bool) -> str:
    """`speed.activation` as none | full | selective | offload | fused-lora, honouring the user's SFTConfig keys."""
    checkpointing = training_config.get("activation_checkpointing", training_config.get("gradient_checkpointing"))
    reentrant = _user_kwargs(training_config).get("use_reentrant")
    if choice == "auto":
        if checkpointing is False:
            choice = "none"
        elif checkpointing or cuda:
            choice = "full" if reentrant else "selective"  # selective needs non-reentrant checkpointing
        else:
            choice = "none"  # CPU: memory is plentiful and recomputation costs time
    if checkpointing is not None and bool(checkpointing) != (choice in CHECKPOINTED):
        raise PhituneError(
            f"speed.activation {choice} contradicts training_config activation_checkpointing/gradient_checkpointing: "
            f"{checkpointing}; keep one of them"
        )
    if choice == "selective" and reentrant:
        raise PhituneError("speed.activation selective needs activation_checkpointing_kwargs.use_reentrant: false")
    if choice == "offload" and not cuda:
        raise PhituneError("speed.activation offload needs a CUDA GPU (on a CPU, activations already live in RAM)")
    return choice


def apply_activation_strategy(model, args) -> None:
    """Make `fused-lora` and `selective` real: install fused-lora's decoder-layer forward, or TRL's
    selective-checkpointing policy on the transformers model itself.

    TRL installs it on the model handed to SFTTrainer, which for a PEFT run is the PeftModel; but transformers 5
    enables checkpointing through `activation_checkpointing_enable` of the wrapped PreTrainedModel, which never calls
    that wrapper, so without this the policy is silently dropped and every op is recomputed (checked in
    tests/test_speed.py). Call it with the unwrapped model before the trainer is built.
    """
    from trl.models import enable_selective_activation_checkpointing

    if not args.activation_checkpointing and (args.activation_checkpointing_kwargs or {}).get("fused_lora"):
        from phitune.speed.fused_lora import install_fused_lora

        log.info("speed.activation fused-lora: %d decoder layers", install_fused_lora(model))
    if args.activation_checkpointing and (args.activation_checkpointing_kwargs or {}).get("selective"):
        enable_selective_activation_checkpointing(getattr(model, "get_base_model", lambda: model)())


def auto_attention(padding_free: bool) -> str:
    """What `model.attn_implementation: auto` means for a training run on this machine.

    flash_attention_2 on CUDA when flash-attn is installed (it reads the sequence boundaries directly); else, for
    padding-free batches on CUDA, flex_attention, whose block mask skips the blocks between examples; else sdpa.
    Set `model.attn_implementation: sdpa` to turn the choice off.
    """
    import torch

    if not torch.cuda.is_available():
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "flex_attention" if padding_free else "sdpa"
