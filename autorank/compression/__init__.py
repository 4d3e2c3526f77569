"""Compression stage: decompositions into plain conv chains, EVBMF ranks, fake quantization, accounting.

Public API (see docs/ARCHITECTURE.md and docs/COMPRESSION.md):
find_layers, LayerPlan, Plan, make_plan, mixed_plan, resolve_plan, compress, profile, evbmf,
vbmf_ranks, strip_fake_quant, calibrate, layer_precisions, sensitivity_table (SensitivityTable), allocate.
"""

from .accounting import LayerProfile, Profile, profile
from .allocator import allocate
from .apply import compress, mixed_plan, resolve_plan
from .decompose import CPFactors, balance_cp, build_chain, decompose_cp, decompose_layer, epc_correct
from .layers import find_layers
from .plan import METHODS, LayerPlan, Plan, make_plan
from .quantize import (
    PRECISIONS,
    ActivationFakeQuant,
    WeightFakeQuant,
    calibrate,
    layer_precisions,
    quantize_weight,
    strip_fake_quant,
    weight_precision,
)
from .ranks import EVBMFResult, evbmf, full_ranks, method_params, resolve_rank, vbmf_method_ranks, vbmf_ranks
from .sensitivity import Candidate, Prediction, SensitivityTable, sensitivity_table

__all__ = [
    "METHODS", "PRECISIONS", "ActivationFakeQuant", "CPFactors", "Candidate", "EVBMFResult", "LayerPlan",
    "LayerProfile", "Plan", "Prediction", "Profile", "SensitivityTable", "WeightFakeQuant", "allocate",
    "balance_cp", "build_chain", "calibrate", "compress", "decompose_cp", "decompose_layer", "epc_correct",
    "evbmf", "find_layers", "full_ranks", "layer_precisions", "make_plan", "method_params", "mixed_plan",
    "profile", "quantize_weight", "resolve_plan", "resolve_rank", "sensitivity_table", "strip_fake_quant",
    "vbmf_method_ranks", "vbmf_ranks", "weight_precision",
]
