"""The worker side: the loop, the optimizer step, checkpoints and layer-importance measures (no MLflow)."""
