"""`autorank export`: a trial of a search → a verified ONNX file (fp32 / fp16 / int8) in the registry."""

from __future__ import annotations

import argparse
from pathlib import Path

from autorank.errors import AutorankError


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export", help="export a searched model to ONNX (fp32/fp16/int8), verified in ONNX Runtime",
        description="Rebuild a trial from its saved weights (no retraining), export one self-contained ONNX "
                    "file with a dynamic batch axis, quantize it with ONNX Runtime as asked (int8: static QDQ, "
                    "per-channel weights, calibrated on training images, layers the plan keeps fp32/fp16 "
                    "unquantized), verify it against PyTorch, time it next to the uncompressed model, log and "
                    "register it in the search's MLflow and write a model card beside it.",
    )
    export.add_argument("--search", type=Path, required=True, help="a search output folder")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--trial", type=int, help="trial number (default: the best trial meeting the limits)")
    which.add_argument("--max-size", help="pick the best trial no larger than this, e.g. 0.5MB or 200KiB")
    which.add_argument("--min-ratio", type=float, help="pick the best trial at least this many times smaller")
    export.add_argument("--max-drop", type=float, help="pick the best trial losing at most this many points")
    export.add_argument("--max-latency", help="pick the best trial whose ONNX Runtime batch-1 latency (the search's "
                        "ort_latency_ms) is at most this, e.g. 0.3ms")
    export.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="int8",
                        help="ONNX precision (default %(default)s)")
    export.add_argument("--out", type=Path, required=True, help="output .onnx file; the card goes beside it")
    export.add_argument("--calibration-batches", type=int, default=8,
                        help="int8: batches of 64 training images for activation ranges (default %(default)s)")
    export.add_argument("--calibration-method", choices=("minmax", "percentile", "entropy"), default="minmax",
                        help="int8: ONNX Runtime calibrator (default %(default)s)")
    export.add_argument("--int8-scope", choices=("plan", "full"), default="plan",
                        help="int8: quantize exactly what the search simulated (plan, default) or ONNX Runtime's "
                             "full static QDQ with integer kernels (full: faster, drifts from the search)")
    export.add_argument("--verify-limit", type=int,
                        help="verify on a seeded stratified sample of this many test images (every class in "
                             "proportion; default: all)")
    export.add_argument("--threads", type=int, help="ONNX Runtime threads for verification and timing")
    export.add_argument("--no-bench", action="store_true", help="skip the latency/throughput measurement")
    export.add_argument("--no-register", action="store_true", help="do not log to MLflow or register a version")
    export.add_argument("--registered-name",
                        help="MLflow registered model name (default autorank-<model>, the factory of module: specs)")
    export.add_argument("--mlflow-uri", help="register in this tracking server instead of the search's MLflow store")
    export.add_argument("--json", action="store_true", help="print one JSON object")
    export.set_defaults(handler=run_export_command)


def run_export_command(args: argparse.Namespace) -> int:
    from autorank.export import export_onnx
    from autorank.export.api import figures, result_json
    from autorank.search.space import parse_latency, parse_size

    if args.trial is not None and (args.max_drop is not None or args.max_latency is not None):
        raise AutorankError("give either --trial or limits (--max-size/--min-ratio/--max-drop/--max-latency), not both")
    max_latency = parse_latency(args.max_latency, "--max-latency") if args.max_latency else None
    if args.verify_limit is not None and args.verify_limit < 1:
        raise AutorankError(f"--verify-limit must be >= 1, got {args.verify_limit}")
    if args.no_register and (args.registered_name is not None or args.mlflow_uri is not None):
        raise AutorankError("--registered-name and --mlflow-uri are for registering: drop --no-register")
    result = export_onnx(
        args.search, args.out, args.precision, trial=args.trial,
        max_size=parse_size(args.max_size, "--max-size") if args.max_size else None,
        min_ratio=args.min_ratio, max_drop=args.max_drop, max_latency_ms=max_latency, calibration_batches=args.calibration_batches,
        calibration_method=args.calibration_method, int8_scope=args.int8_scope, verify_limit=args.verify_limit,
        threads=args.threads,
        bench=not args.no_bench, register=not args.no_register, registered_name=args.registered_name,
        mlflow_uri=args.mlflow_uri,
    )
    if args.json:
        print(result_json(result))
        return 0
    print(f"exported trial {result.trial} of {result.search_dir}")
    width = max(len(label) for label, _ in figures(result))
    for label, value in figures(result):
        print(f"  {label:<{width}}  {value}")
    return 0
