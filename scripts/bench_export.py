"""ONNX Runtime latency (batch 1) and throughput (batch 128) of exported models vs the uncompressed fp32 model.

Two models, each in one process with the same thread count, one after the other:
- the demo: the best feasible trial of a search folder (`autorank demo --out DIR` made it), exported
  at fp32, fp16 and int8 through `export_onnx` (verification included, registry off);
- ResNet-20 (adapted checkpoint from ../shared) compressed with Tucker-2 at EVBMF ranks weakened
  with w = 0.2 (int8 weights and activations, calibrated, no fine-tuning), exported the same way.
The uncompressed model's fp32 export is timed in the same run as the baseline.

    .venv/bin/python scripts/bench_export.py --demo autorank-demo --threads 2 [--markdown]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def _rows(label: str, results: dict) -> list[list[str]]:
    rows = []
    baseline = next(iter(results.values())).speed["baseline"]
    rows.append([label, "uncompressed fp32", "-", f"{baseline.latency_ms:.3f}", f"{baseline.throughput:,.0f}",
                 "-", "-"])
    for precision, result in results.items():
        v, speed = result.verification, result.speed["exported"]
        rows.append([label, f"compressed {precision}", f"{result.file_bytes:,}", f"{speed.latency_ms:.3f}",
                     f"{speed.throughput:,.0f}", f"{v.onnx_accuracy:.4f} / {v.torch_accuracy:.4f}",
                     f"{v.top1_agreement:.4f}"])
    return rows


def bench_demo(search: Path, threads: int, out: Path) -> list[list[str]]:
    from autorank.export import export_onnx

    results = {p: export_onnx(search, out / f"demo-{p}.onnx", p, threads=threads, register=False)
               for p in ("fp32", "fp16", "int8")}
    return _rows(f"demo small_cnn (trial {results['int8'].trial})", results)


def bench_resnet20(threads: int, out: Path, verify_limit: int) -> list[list[str]]:
    from autorank.compression import compress, make_plan
    from autorank.data import load_data
    from autorank.export import export_model
    from autorank.models import create_model

    data = load_data(f"imagefolder:{SHARED / 'data' / 'cifar10-jpeg.tar.gz'}")
    base = create_model("resnet20", data, SHARED / "models" / "cifar10" / "resnet20-12fca82f-jpeg-adapted.pt").eval()
    generator = torch.Generator().manual_seed(1)
    calibration = [x for x, _ in data.batches("train", 128, shuffle=True, generator=generator, limit=512)]
    plan = make_plan(base, "tucker2", "vbmf:0.2", "int8", activations="int8")
    model = compress(base, plan, calibration=calibration, n_iter_max=30).eval()
    results = {p: export_model(model, data, out / f"resnet20-{p}.onnx", p, baseline=base, threads=threads,
                               verify_limit=verify_limit) for p in ("fp32", "fp16", "int8")}
    return _rows("ResNet-20 Tucker-2 vbmf:0.2", results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, help="a search folder (e.g. from `autorank demo`)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--verify-limit", type=int, default=2000, help="ResNet-20: test images verified")
    parser.add_argument("--skip-resnet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.demo:
            rows += bench_demo(args.demo, args.threads, Path(tmp))
        if not args.skip_resnet:
            rows += bench_resnet20(args.threads, Path(tmp), args.verify_limit)
    header = ["model", "ONNX", "file bytes", "latency b1 (ms)", "throughput b128 (img/s)",
              "test acc ONNX / PyTorch", "top-1 agreement"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{args.threads} ORT threads, {time.perf_counter() - started:.0f} s total", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
