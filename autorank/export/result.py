"""What an export wrote and how it measured: shared by the pipeline (`api`) and its provenance (`registry`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autorank.export.bench import Speed
from autorank.export.host import host_report
from autorank.export.verify import Verification


@dataclass
class ExportResult:
    """What was written and how it measured; `to_dict()` is the CLI's --json."""

    path: Path
    precision: str
    file_bytes: int
    size_bytes: int                    # the compression core's accounting of the same model
    payload_bytes: int                 # tensor data in the file (weights, scales, biases); the rest is graph
    verification: Verification         # ONNX Runtime vs the PyTorch (quantization-aware) model
    speed: dict[str, Speed] = field(default_factory=dict)   # "exported" and "baseline" (uncompressed fp32)
    layer_precisions: dict[str, str] = field(default_factory=dict)
    trial: int | None = None
    search_dir: Path | None = None
    recorded_accuracy: float | None = None   # what the search measured for the trial (val split)
    onnx_val_accuracy: float | None = None   # the ONNX model on the same split
    card: Path | None = None
    mlflow: dict[str, Any] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=host_report)   # the verifying CPU and its int8 kernel

    @property
    def size_ratio(self) -> float:
        """File size over the computed size: ~1 when the file holds what the plan promised."""
        return self.file_bytes / self.size_bytes

    @property
    def accuracy_gap(self) -> float | None:
        """ONNX minus recorded accuracy on the split the search used, in points."""
        if self.recorded_accuracy is None or self.onnx_val_accuracy is None:
            return None
        return (self.onnx_val_accuracy - self.recorded_accuracy) * 100

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("verification", "speed")}
        out.update(path=str(self.path), search_dir=str(self.search_dir) if self.search_dir else None,
                   card=str(self.card) if self.card else None, size_ratio=self.size_ratio,
                   accuracy_gap=self.accuracy_gap, verification=self.verification.to_dict(),
                   speed={k: s.to_dict() for k, s in self.speed.items()})
        return out
