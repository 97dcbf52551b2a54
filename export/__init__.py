"""Export to stepwise recurrent ONNX graphs (decode_step.onnx, prefill.onnx) and the custom-op contract."""
from .exporter import ExportError, export_model
from .manifest import ManifestError, read_manifest

__all__ = ["ExportError", "ManifestError", "export_model", "read_manifest"]
