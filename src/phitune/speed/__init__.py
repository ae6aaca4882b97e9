"""Speed switches: what makes training fast without changing the math.

- padding-free batching: the rows of a batch are concatenated into one row with restarting position ids, so no
  padding is computed; transformers turns those position ids into a block-diagonal mask (no attention across
  examples) when there is no attention mask and no KV cache.
- Liger kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) on CUDA when `liger-kernel` is installed.

Each switch is `auto | true | false` in the `speed` section; `auto` turns it on where the hardware allows it.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

from phitune.config import SpeedConfig
from phitune.errors import PhituneError

log = logging.getLogger("phitune")


@dataclass
class SpeedPlan:
    """The resolved switches for one run."""

    padding_free: bool
    liger: bool

    def sft_kwargs(self) -> dict:
        """The SFTConfig keys these switches set."""
        return {"padding_free": self.padding_free, "use_liger_kernel": self.liger}


def resolve_speed(cfg: SpeedConfig, quantized: bool = False) -> SpeedPlan:
    """Turn `auto` into on or off for this machine; refuse a switch forced on where it cannot work."""
    import torch

    liger_available = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
    if cfg.liger == "true" and not liger_available:
        raise PhituneError("speed.liger is true but Liger kernels need CUDA and `pip install liger-kernel`")
    liger = cfg.liger == "true" or (cfg.liger == "auto" and liger_available and not quantized)
    padding_free = cfg.padding_free != "false"
    return SpeedPlan(padding_free=padding_free, liger=liger)
