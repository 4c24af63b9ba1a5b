"""Training engine: losses, the training loop, evaluation, checkpoints, hooks."""
