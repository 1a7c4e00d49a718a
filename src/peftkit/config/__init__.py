"""Config: typed sections, strict loading, every problem reported at once."""

from peftkit.config.load import (
    build_training_arguments,
    dump_config,
    load_config,
    to_dict,
)
from peftkit.config.schema import (
    DataArgs,
    EvalArgs,
    FinetuningArgs,
    GenerateArgs,
    ModelArgs,
    RunConfig,
)

__all__ = [
    "DataArgs",
    "EvalArgs",
    "FinetuningArgs",
    "GenerateArgs",
    "ModelArgs",
    "RunConfig",
    "build_training_arguments",
    "dump_config",
    "load_config",
    "to_dict",
]
