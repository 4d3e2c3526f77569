"""autorank: automated compression search for CNNs, as a few verbs over config objects.

    import autorank
    data = autorank.load_data("digits")
    model = autorank.create_model("small_cnn", data)
    autorank.train(model, data, autorank.TrainConfig(steps=150, lr=0.05, schedule="onecycle"))
    small = autorank.compress(model, autorank.make_plan(model, "tucker2", "vbmf", "int8"))
    autorank.evaluate(small, data), autorank.profile(small, data.input_shape).size_bytes

Each name is loaded from its stage on first use, so `import autorank` (and the CLI) imports
neither torch nor Ray nor MLflow until a verb needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the stage module that defines it (docs/ARCHITECTURE.md)
_STAGES = {
    "Dataset": "autorank.data", "load_data": "autorank.data",
    "create_model": "autorank.models", "load_weights": "autorank.models",
    "TrainConfig": "autorank.engine", "train": "autorank.engine", "evaluate": "autorank.engine",
    "measure": "autorank.engine",
    "Plan": "autorank.compression", "LayerPlan": "autorank.compression", "make_plan": "autorank.compression",
    "compress": "autorank.compression", "profile": "autorank.compression",
    "sensitivity_table": "autorank.engine", "allocate": "autorank.compression",
    "SearchSpace": "autorank.search", "load_space": "autorank.search", "run_search": "autorank.search",
    "load_search": "autorank.search", "best_trial": "autorank.search", "run_demo": "autorank.search",
    "rebuild_trial": "autorank.search", "MlflowCallback": "autorank.tracking",
    "export_onnx": "autorank.export", "export_model": "autorank.export",
    "AutorankError": "autorank.errors",
}

__all__ = sorted(_STAGES)


def __getattr__(name: str) -> Any:
    if name not in _STAGES:
        raise AttributeError(f"module 'autorank' has no attribute {name!r}")
    value = getattr(importlib.import_module(_STAGES[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_STAGES))
