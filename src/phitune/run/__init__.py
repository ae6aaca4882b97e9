"""The lifecycle every method shares: the plan, the output directory, model + LoRA, fit and finish (lifecycle), with
complete checkpoints, graceful stop on signals, the NaN guard, the Trainer hooks and the live console."""
