"""Serving: a trained model exported lookup-only (``export``,
``export_checkpoint``; ``recis export``), and scored from that export
(``Predictor``; ``recis predict``)."""

from recis.serving.export import ExportError, ServingExportHook, export, export_checkpoint, export_delta
from recis.serving.predictor import Predictor, verify_export

__all__ = [
    "ExportError",
    "Predictor",
    "ServingExportHook",
    "export",
    "export_checkpoint",
    "export_delta",
    "verify_export",
]
