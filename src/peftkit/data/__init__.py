"""Data: read records, render them with a chat template, label responses, report what happened."""

from peftkit.data.dataset import DataReport, as_file_list, build_dataset, describe_example, load_messages
from peftkit.data.encode import encode_messages
from peftkit.data.template import SHIPPED_TEMPLATES, apply_template, stop_token_ids

__all__ = [
    "SHIPPED_TEMPLATES",
    "DataReport",
    "apply_template",
    "as_file_list",
    "build_dataset",
    "describe_example",
    "encode_messages",
    "load_messages",
    "stop_token_ids",
]
