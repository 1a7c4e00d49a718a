"""The exception types peftkit raises for user errors; the CLI maps them to exit code 2."""

from __future__ import annotations

from typing import Any


class PeftkitError(Exception):
    """A user error: bad config, bad data, a model that cannot be found. Never a bug."""


class ConfigError(PeftkitError):
    """Every problem found in a config, reported at once."""

    def __init__(self, issues: list[str], source: str | None = None) -> None:
        self.issues = list(issues)
        self.source = source
        head = f"{source}: " if source else ""
        count = f"{len(self.issues)} problem{'s' if len(self.issues) != 1 else ''}"
        super().__init__(f"{head}invalid config ({count}):\n" + "\n".join(f"  - {i}" for i in self.issues))


class DataError(PeftkitError):
    """A bad record, named by file, record (an index, or a location such as "line 12") and field."""

    def __init__(self, file: str, record: int | str | None, field: str | None, reason: str) -> None:
        self.file, self.record, self.field, self.reason = file, record, field, reason
        where = file if record is None else f"{file}: {record}" if isinstance(record, str) else f"{file}: record {record}"
        if field:
            where += f", field {field!r}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # rebuild from the four parts in worker processes (datasets.map with num_proc)
        return (DataError, (self.file, self.record, self.field, self.reason))


class ModelError(PeftkitError):
    """A model or tokenizer that cannot be resolved or loaded."""


def kind_of(value: Any) -> str:
    """'a number', 'a list', ... for messages about a user's value (not Python's type names: "got a int")."""
    names = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object", str: "a string",
             type(None): "nothing"}
    return names.get(type(value), f"a {type(value).__name__}")
