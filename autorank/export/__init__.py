"""Export stage: a compressed model → one ONNX file (fp32 / fp16 / int8) that ONNX Runtime runs,
verified against PyTorch, benchmarked next to the uncompressed model, registered in MLflow.

Public verb: `export_onnx(search_dir, out, precision, trial=... | max_size=..., max_drop=...)`;
`export_model(model, data, out, precision)` does the same for a model in memory.
"""

from autorank.export.api import EXPORT_PRECISIONS, export_model, export_onnx
from autorank.export.result import ExportResult
from autorank.export.verify import Verification

__all__ = ["EXPORT_PRECISIONS", "ExportResult", "Verification", "export_model", "export_onnx"]
