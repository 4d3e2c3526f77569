"""Engine stage: the fit and evaluate loops every later stage uses, and what is measured with them.

`train(model, data, TrainConfig)`, `evaluate(model, data, split)`, `measure(...)` (`loops.py`), and
`sensitivity_table(model, data)` (`sensitivity.py`): each layer's accuracy drop when only it is
compressed, which the allocator (compression) and the search read.
"""

from autorank.engine.loops import (OPTIMIZERS, SCHEDULES, TrainConfig, TrainResult, autocast, distillation_loss,
                                   evaluate, latency_ms, measure, resolve_device, train)
from autorank.engine.sensitivity import sensitivity_table

__all__ = ["TrainConfig", "TrainResult", "evaluate", "measure", "sensitivity_table", "train"]
