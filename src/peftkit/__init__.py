"""peftkit: fine-tune language models with LoRA, freeze or full tuning, from one YAML file."""

from peftkit.libraries import quiet_library_messages

__version__ = "0.1.0"

quiet_library_messages()
