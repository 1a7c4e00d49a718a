"""Inference: chat with a trained model."""
