"""`autorank demo`: pretrain the digits CNN, search its compression, print the front."""

from __future__ import annotations

import argparse
from pathlib import Path

from autorank.cli.search import summary_text

DEFAULT_OUT = Path("autorank-demo")


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo", help="the whole pipeline on built-in data in a few minutes (small CNN on digits)",
        description="Train a small CNN on sklearn digits, then search its compression "
                    "(the shipped space `default`, ~20 trials) and print the Pareto front.",
    )
    demo.add_argument("--out", type=Path, help=f"output folder (default: {DEFAULT_OUT}, or -2, -3, ... if taken)")
    demo.add_argument("--trials", type=int, help="override the number of trials")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(handler=run_demo_command)


def free_folder(base: Path) -> Path:
    """`base`, or the first of base-2, base-3, ... that holds no search yet (never overwrite one)."""
    candidate, n = base, 1
    while (candidate / "search.json").exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def run_demo_command(args: argparse.Namespace) -> int:
    from autorank.search.demo import run_demo
    from autorank.tracking import MlflowCallback

    out = args.out if args.out is not None else free_folder(DEFAULT_OUT)
    result = run_demo(out, trials=args.trials, progress=not args.no_progress, callbacks=[MlflowCallback()])
    print(summary_text(result))
    if result.best is not None:  # issue 5: the deployable artefact of the best feasible trial
        from autorank.export import export_onnx
        from autorank.export.api import figures

        exported = export_onnx(out, out / "best-int8.onnx", "int8", trial=result.best.number)
        print(f"int8 ONNX export of trial {exported.trial}, verified in ONNX Runtime:")
        for label, value in figures(exported):
            print(f"  {label}: {value}")
    return 0
