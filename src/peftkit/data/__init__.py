"""Data: read records, render them with a chat template, label responses, pack, cache, report what happened."""

from peftkit.data.collate import build_collator
from peftkit.data.dataset import (
    PreparedData,
    build_dataset,
    load_messages,
    prepare_data,
)
from peftkit.data.encode import encode_messages, encode_samples
from peftkit.data.report import DataReport, describe_example
from peftkit.data.template import SHIPPED_TEMPLATES, apply_template, stop_token_ids

__all__ = [
    "SHIPPED_TEMPLATES",
    "DataReport",
    "PreparedData",
    "apply_template",
    "build_collator",
    "build_dataset",
    "describe_example",
    "encode_messages",
    "encode_samples",
    "load_messages",
    "prepare_data",
    "stop_token_ids",
]
