"""peftkit: fine-tune language models with LoRA, freeze or full tuning, from one YAML file."""

__version__ = "0.1.0"
