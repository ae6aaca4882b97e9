"""PhituneTrainer: TRL's SFTTrainer with phitune's guards and a token-weighted, sharded evaluation."""

from __future__ import annotations

import torch
from trl import SFTTrainer

from phitune.run.guard import GuardedTraining
from phitune.run.hooks import LoralibCheckpointing


class PhituneTrainer(GuardedTraining, LoralibCheckpointing, SFTTrainer):
    """SFTTrainer with phitune's guards (GuardedTraining) and a token-weighted sharded evaluation. `loralib=True`:
    checkpoints in the loralib backend's format (phitune.run.hooks)."""

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Token-weighted evaluation (phitune.after.metrics), sharded: each process scores its share of the batches and the
        per-sequence sums are gathered, with the duplicates that accelerate adds to even out the last batch dropped
        (gather_for_metrics). So N processes report exactly the loss of one."""
        from transformers.trainer_utils import EvalLoopOutput

        from phitune.after.metrics import sequence_token_stats, summarize

        model = self.model_wrapped  # the DDP / FSDP / DeepSpeed wrapper once training has started
        model.eval()
        totals, sequences = torch.zeros(3, dtype=torch.float64), 0
        for inputs in dataloader:
            inputs = {k: v.to(self.args.device) if hasattr(v, "to") else v for k, v in inputs.items()}
            labels = inputs.pop("labels")
            packed = "attention_mask" not in inputs and "position_ids" in inputs and labels.shape[0] == 1
            with torch.no_grad():
                logits = model(**inputs).logits
            stats = sequence_token_stats(logits, labels, inputs["position_ids"] if packed else None)
            stats = self.accelerator.gather_for_metrics(stats)
            totals += stats.sum(0).cpu()
            sequences += stats.shape[0]
            self.control = self.callback_handler.on_prediction_step(self.args, self.state, self.control)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in summarize(totals).items()}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=sequences)
