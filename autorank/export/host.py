"""The exporting machine's CPU, as far as ONNX Runtime's integer kernels are concerned.

ONNX Runtime picks its uint8 x int8 kernel by CPU feature. With VNNI (AVX512-VNNI, AVX-VNNI) or on
ARM (NEON, dot-product instructions) products accumulate exactly in int32. On x86 without VNNI
(AVX2, AVX-512BW) VPMADDUBSW first adds *pairs* of products into int16 and saturates at 32,767, so
the same file computes different logits on different machines unless every pair fits in int16.
autorank's int8 weights lie on [-64, 64] (`compression.quantize.QMAX`): a pair is at most
2 x 255 x 64 = 32,640, exact on every CPU. The export records which path the verifying host ran.
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

from autorank.compression.quantize import QMAX

UINT8_MAX = 255
INT16_MAX = 32767
FEATURES = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "neon", "neon_dot")
_NUMPY_NAMES = {"AVX2": "avx2", "AVX512BW": "avx512bw", "AVX512VNNI": "avx512_vnni", "ASIMD": "neon",
                "ASIMDDP": "neon_dot"}


def _avx_vnni(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """AVX-VNNI (VEX-encoded, Intel client CPUs), which numpy's probe lacks: the kernel's flag list."""
    try:
        return any(line.startswith("flags") and " avx_vnni" in line for line in cpuinfo.read_text().splitlines())
    except OSError:
        return False


def cpu_features() -> dict[str, bool]:
    """Which of the integer-kernel features (`FEATURES`) this process sees (CPUID, as ORT reads it)."""
    from numpy._core._multiarray_umath import __cpu_features__ as found

    features = {ours: bool(found.get(theirs)) for theirs, ours in _NUMPY_NAMES.items()}
    features["avx_vnni"] = _avx_vnni()
    return {name: features[name] for name in FEATURES}


def int8_kernel(features: dict[str, bool], saturates: bool) -> str:
    """The uint8 x int8 dot product ONNX Runtime runs here, named from the measured behaviour."""
    if saturates:
        return "VPMADDUBSW (x86 without VNNI): pairs of products summed in int16, saturating at 32,767"
    if features.get("avx512_vnni") or features.get("avx_vnni"):
        return "VNNI (VPDPBUSD): exact int32 accumulation"
    if features.get("neon"):
        return "NEON: widening multiply-accumulate, exact int32 accumulation"
    return "exact int32 accumulation"


def pair_bound(qmax: int = QMAX["int8"]) -> int:
    """The largest |a0 w0 + a1 w1| for uint8 activations and weights on [-qmax, qmax]."""
    return 2 * UINT8_MAX * qmax


def pair_probe(qmax: int) -> tuple[float, float]:
    """(ONNX Runtime's, the exact) output of one fused int8 conv whose only dot product is one pair.

    Two uint8 inputs of 255 times two weights of `qmax`, requantized at a step of 256: this CPU's
    kernel saturates pairs iff the first figure falls short of the second (qmax 127: 32,768 vs
    64,768). Milliseconds; it measures the kernel the verifying session itself runs.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from autorank.engine.deploy import onnx_session

    channels = 16  # a realistic output width, so ORT takes its packed integer conv path
    step = 256.0
    constants = {"w": np.full((channels, 1, 1, 2), qmax, np.int8), "w_scale": np.ones(channels, np.float32),
                 "w_zero": np.zeros(channels, np.int8), "x_scale": np.float32(1.0), "x_zero": np.uint8(0),
                 "y_scale": np.float32(step), "y_zero": np.uint8(0)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wf"], axis=0),
             helper.make_node("Conv", ["xf", "wf"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zero"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["out"])]
    graph = helper.make_graph(nodes, "pair_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save_model(model, path)
        out = onnx_session(path, 1).run(None, {"x": np.full((1, 1, 2, 2), UINT8_MAX, np.float32)})[0]
    exact = min(UINT8_MAX, round(pair_bound(qmax) / step)) * step
    return float(out.max()), exact


def host_report() -> dict:
    """What the model card and `--json` say about the machine that verified the file (measured)."""
    features = cpu_features()
    saturated, exact = pair_probe(127)
    return {
        "machine": platform.machine(),
        "cpu_features": features,
        "int8_kernel": int8_kernel(features, saturated != exact),
        "int8_kernel_saturates_8bit_weights": saturated != exact,  # measured here, not inferred
        "int8_weight_grid": f"[-{QMAX['int8']}, {QMAX['int8']}] per output channel, stored as int8",
        "int8_exact_on_every_cpu": pair_bound() <= INT16_MAX,
    }
