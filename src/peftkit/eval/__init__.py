"""Evaluation: batch generation, task metrics, predictions on held-out records."""
