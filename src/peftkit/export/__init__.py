"""Export: merge a LoRA run (or copy a freeze / full run) into one checked, self-contained folder."""

from peftkit.export.merge import ExportReport, export

__all__ = ["ExportReport", "export"]
