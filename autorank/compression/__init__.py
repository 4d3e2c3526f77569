"""Compression stage: decompositions into plain conv chains, EVBMF ranks, fake quantization, accounting.

Public API (see docs/ARCHITECTURE.md and docs/COMPRESSION.md):
find_layers, LayerPlan, Plan, make_plan, mixed_plan, resolve_plan, compress, load_compressed, profile, evbmf,
vbmf_ranks, strip_fake_quant, calibrate, layer_precisions, SensitivityTable (measured by
`autorank.engine.sensitivity_table`), allocate, smallest_size, fastest_latency.
The building blocks (decompose_layer, quantize_weight, resolve_rank, ...) stay in their modules.
"""

from .accounting import LayerProfile, Profile, profile
from .allocator import allocate, fastest_latency, smallest_size
from .apply import compress, load_compressed, mixed_plan, resolve_plan
from .layers import find_layers
from .plan import METHODS, LayerPlan, Plan, make_plan
from .quantize import PRECISIONS, calibrate, layer_precisions, strip_fake_quant
from .vbmf import EVBMFResult, evbmf, vbmf_ranks
from .sensitivity import Candidate, Prediction, SensitivityTable

__all__ = [
    "METHODS", "PRECISIONS", "Candidate", "EVBMFResult", "LayerPlan", "LayerProfile", "Plan", "Prediction", "Profile",
    "SensitivityTable", "allocate", "calibrate", "compress", "evbmf", "fastest_latency", "find_layers", "layer_precisions", "load_compressed",
    "make_plan", "mixed_plan", "profile", "resolve_plan", "smallest_size", "strip_fake_quant", "vbmf_ranks",
]
