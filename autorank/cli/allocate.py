"""`autorank compress --target-ratio R`: a per-layer plan from the sensitivity table and the allocator."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from torch import nn

from autorank.compression import Candidate, Plan, SensitivityTable, allocate, find_layers
from autorank.data import Dataset
from autorank.engine import sensitivity_table
from autorank.errors import AutorankError

# --method -> the decompositions the table measures (linear layers: SVD); "none" = precisions only
TABLE_METHODS = {"tucker2": ("tucker2", "svd"), "cp": ("cp", "svd"), "tt": ("tt", "svd"),
                 "mixed": ("tucker2", "cp", "tt", "svd"), "none": ()}


def add_allocate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target-ratio", type=float, metavar="R",
                        help="allocate: measure each layer's sensitivity, then pick per layer the method "
                             "(--method; mixed = all), rank and precision with the least predicted accuracy "
                             "drop for a model R times smaller than fp32 (replaces --rank/--precision)")
    parser.add_argument("--sensitivity", type=Path, metavar="JSON",
                        help="with --target-ratio: reuse this sensitivity table, or save the new one there")
    parser.add_argument("--sensitivity-images", type=int, default=1000, metavar="N",
                        help="stratified val images the sensitivity table is measured on")


def check_allocate_args(args: argparse.Namespace) -> None:
    if args.target_ratio is None:
        return
    if args.plan is not None:
        raise AutorankError("--target-ratio and --plan: choose one")
    if not args.target_ratio > 0 or args.sensitivity_images < 1:
        raise AutorankError("--target-ratio must be > 0 and --sensitivity-images >= 1")


def _load_table(path: Path, model: nn.Module, args: argparse.Namespace) -> SensitivityTable:
    table = SensitivityTable.from_json(path.read_text())
    layers = list(find_layers(model, args.include, args.exclude, skip_first=not args.with_first))
    if list(table.layers) != layers or table.activations != args.activations:
        raise AutorankError(f"sensitivity table {path} was measured for other layers or activations; "
                            "remove it or pass another --sensitivity path")
    return table


def allocated_plan(args: argparse.Namespace, model: nn.Module, data: Dataset) -> tuple[Plan, dict[str, Any]]:
    """The allocated plan for --target-ratio and what the table predicts for it (for the report). Every
    decomposed candidate is fitted to the same calibration images as the final model (unless --no-fit)."""
    if args.sensitivity is not None and args.sensitivity.is_file():
        table = _load_table(args.sensitivity, model, args)
    else:
        images = data.calibration_images(args.calibration_images, min(args.batch_size, args.calibration_images),
                                         seed=args.seed)
        calibration = images if args.activations == "int8" else None
        fit = None if args.no_fit else images

        def progress(name: str, cand: Candidate) -> None:
            if not args.json:
                print(f"\rsensitivity {name:<24} {cand.label:<28} drop {cand.drop:6.2f}", end="", file=sys.stderr)

        table = sensitivity_table(
            model, data, methods=TABLE_METHODS[args.method], include=args.include, exclude=args.exclude,
            skip_first=not args.with_first, activations=args.activations, calibration=calibration,
            limit=args.sensitivity_images, seed=args.seed, device=args.device, n_iter_max=args.iters,
            compress_options=None if fit is None else {"fit": fit, "fit_mode": args.fit_mode}, progress=progress)
        if not args.json:
            print(file=sys.stderr)
        if args.sensitivity is not None:
            args.sensitivity.parent.mkdir(parents=True, exist_ok=True)
            args.sensitivity.write_text(table.to_json())
    plan = allocate(table, ratio=args.target_ratio)
    predicted = table.predict(plan)
    return plan, {"target_ratio": args.target_ratio, "budget_bytes": int(table.model_bytes // args.target_ratio),
                  "predicted_drop_points": predicted.drop, "predicted_size_bytes": predicted.size_bytes,
                  "sensitivity_images": table.images, "sensitivity_seconds": table.seconds,
                  "sensitivity": None if args.sensitivity is None else str(args.sensitivity)}
