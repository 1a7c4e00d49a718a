"""Objectives: the losses of the rm / dpo / kto stages and their metrics, for training and evaluation alike."""
