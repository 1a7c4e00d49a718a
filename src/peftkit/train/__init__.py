"""Training: the PeftTrainer, its progress log, loss plots and the `peftkit train` path."""
