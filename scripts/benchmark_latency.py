"""ONNX Runtime latency of compressed CIFAR ResNets: the figures of docs/BENCHMARKS.md, "Latency".

For each model: the fp32 original exported and timed; a measured latency table (engine/latency.py)
at `--threads`; `--plans` seeded plans (per layer: kept or Tucker-2 at an EVBMF weakening, fp32 or
int8, a decomposed layer run as its chain or recomposed, int8 activations) and a few uniform ones,
each compressed (optionally QAT-fine-tuned for `--finetune-steps` with the original as teacher),
exported to int8 ONNX, timed end to end and scored on the test split. Prints and writes (`--out`, JSON):
- predicted vs measured batch-1 latency of every plan: Spearman rank correlation, median error;
- the accuracy-vs-latency front (non-dominated exported plans);
- `fp32_original` and `best_within_1pt` (the exported plan within 1.0 point of the original's test
  accuracy with the best batch-128 throughput), each {b1_ms, b128_img_s, test_accuracy}.

Run it on idle cores; the whole benchmark takes hours at the defaults. A smoke run:
    python scripts/benchmark_latency.py --models resnet20 --plans 1 --weakenings vbmf:0.2 --test-limit 200 \
        --seconds 0.2 --out /tmp/latency.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from autorank.compression import LayerPlan, Plan, compress, find_layers
from autorank.data import load_data
from autorank.engine import TrainConfig, train
from autorank.engine.deploy import to_onnx
from autorank.engine.latency import LatencyTable
from autorank.export.api import write_onnx
from autorank.export.bench import benchmark
from autorank.export.verify import onnx_accuracy
from autorank.models import create_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS = {name: SHARED / "models" / "cifar10" / f"{file}-jpeg-adapted.pt"
           for name, file in (("resnet20", "resnet20-12fca82f"), ("resnet56", "resnet56-4bfd9763"))}
WEAKENINGS = ("vbmf:0.1", "vbmf:0.2", "vbmf:0.4", "vbmf:0.7")


def _plans(model: torch.nn.Module, count: int, seed: int, weakenings: list[str]) -> list[tuple[str, Plan]]:
    """Uniform plans (all int8; Tucker-2 at each weakening, int8, as chains and recomposed) and `count`
    seeded random ones (per layer: kept or Tucker-2, fp32 or int8, a decomposed layer run as its chain
    or recomposed)."""
    layers = [name for name, m in find_layers(model).items() if isinstance(m, torch.nn.Conv2d)]
    plans = [("int8 (no decomposition)", Plan({n: LayerPlan("none", None, "int8") for n in layers}, "int8"))]
    plans += [(f"tucker2 {w} int8{' recomposed' if run == 'recomposed' else ''}",
               Plan({n: LayerPlan("tucker2", w, "int8", run=run) for n in layers}, "int8"))
              for w in weakenings for run in ("chain", "recomposed")]
    rng = random.Random(seed)
    for k in range(count):
        chosen = {}
        for name in layers:
            method = rng.choice(("none", "tucker2"))
            rank = rng.choice(weakenings) if method != "none" else None
            run = rng.choice(("chain", "recomposed")) if method != "none" else "chain"
            chosen[name] = LayerPlan(method, rank, rng.choice(("fp32", "int8", "int8")), run=run)
        plans.append((f"random {k}", Plan(chosen, "int8")))
    return plans


def _front(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both test accuracy (higher) and batch-1 latency (lower)."""
    def beaten(r: dict) -> bool:
        return any(o["test_accuracy"] >= r["test_accuracy"] and o["b1_ms"] <= r["b1_ms"]
                   and (o["test_accuracy"], o["b1_ms"]) != (r["test_accuracy"], r["b1_ms"]) for o in rows)
    return sorted((r for r in rows if not beaten(r)), key=lambda r: r["b1_ms"])


def run_model(name: str, data, args: argparse.Namespace) -> dict:
    pretrained = create_model(name, data, WEIGHTS[name]).eval()
    threads, started = args.threads, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        to_onnx(pretrained, data.input_shape, fp32_path)
        speed = benchmark(fp32_path, data.input_shape, threads=threads, seconds=args.seconds)
        original = {"b1_ms": speed.latency_ms, "b128_img_s": speed.throughput,
                    "test_accuracy": onnx_accuracy(fp32_path, data, "test", limit=args.test_limit, threads=threads)}
        table = LatencyTable(pretrained, data.input_shape, Path(args.table_dir) / f"{name}-t{threads}.json",
                             model_key=name, threads=threads, batch_size=128, seconds=args.seconds)
        calibration = list(data.calibration_images(512, 128, seed=1))
        rows = []
        for label, plan in _plans(pretrained, args.plans, args.seed, args.weakenings):
            model = compress(pretrained, plan, calibration=calibration, n_iter_max=20).eval()
            if args.finetune_steps:
                train(model, data, TrainConfig(steps=args.finetune_steps, batch_size=128, lr=0.01, distill=1.0,
                                               seed=args.seed), teacher=pretrained)
                model.eval()
            path = Path(tmp) / "plan.onnx"
            write_onnx(model, data, path, "int8", seed=args.seed)
            predicted = table.predict(plan)
            speed = benchmark(path, data.input_shape, threads=threads, seconds=args.seconds)
            rows.append({"plan": label, "predicted_b1_ms": predicted.b1_ms, "predicted_b128_img_s": predicted.throughput,
                         "b1_ms": speed.latency_ms, "b128_img_s": speed.throughput,
                         "test_accuracy": onnx_accuracy(path, data, "test", limit=args.test_limit, threads=threads),
                         "file_bytes": path.stat().st_size})
            print(f"{name} {label}: predicted {predicted.b1_ms:.3f} ms, measured {speed.latency_ms:.3f} ms, "
                  f"{speed.throughput:,.0f} img/s, test {rows[-1]['test_accuracy']:.4f}", flush=True)
    errors = [abs(r["predicted_b1_ms"] - r["b1_ms"]) / r["b1_ms"] for r in rows]
    within = [r for r in rows if r["test_accuracy"] >= original["test_accuracy"] - 0.01]
    best = max(within, key=lambda r: r["b128_img_s"]) if within else None
    figures = {
        "threads": threads, "test_images": args.test_limit or "all", "finetune_steps": args.finetune_steps,
        "fp32_original": original,
        "best_within_1pt": ({k: best[k] for k in ("plan", "b1_ms", "b128_img_s", "test_accuracy")} if best else None),
        "prediction": {"plans": len(rows),
                       "spearman_b1": float(spearmanr([r["predicted_b1_ms"] for r in rows],
                                                      [r["b1_ms"] for r in rows]).statistic) if len(rows) > 2 else None,
                       "median_error_b1": statistics.median(errors)},
        "front": _front(rows), "plans": rows, "table_timings": table.measured, "wall_s": time.time() - started,
    }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56"], choices=sorted(WEIGHTS))
    parser.add_argument("--data", default=f"imagefolder:{SHARED / 'data' / 'cifar10-jpeg.tar.gz'}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plans", type=int, default=20, help="random plans besides the uniform ones")
    parser.add_argument("--weakenings", nargs="+", default=list(WEAKENINGS),
                        help="EVBMF weakenings of the Tucker-2 layers (one uniform plan each)")
    parser.add_argument("--finetune-steps", type=int, default=0, help="QAT steps per plan (teacher: the original)")
    parser.add_argument("--test-limit", type=int, default=None, help="test images (default: all 10,000)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table-dir", default=str(Path(tempfile.gettempdir()) / "autorank-latency"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/latency.json"))
    args = parser.parse_args()
    if args.threads < 1 or args.plans < 0 or args.seconds <= 0:
        parser.error("--threads >= 1, --plans >= 0 and --seconds > 0")
    torch.set_num_threads(args.threads)
    data = load_data(args.data)
    results = {name: run_model(name, data, args) for name in args.models}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print("| model | fp32 b1 ms | fp32 img/s | fp32 test | best within 1 pt | b1 ms | img/s | test | "
          "Spearman | median error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        o, b, p = r["fp32_original"], r["best_within_1pt"] or {}, r["prediction"]
        print(f"| {name} | {o['b1_ms']:.3f} | {o['b128_img_s']:,.0f} | {o['test_accuracy']:.4f} | {b.get('plan', '-')} | "
              f"{b.get('b1_ms', float('nan')):.3f} | {b.get('b128_img_s', float('nan')):,.0f} | "
              f"{b.get('test_accuracy', float('nan')):.4f} | {p['spearman_b1']} | {p['median_error_b1']:.1%} |")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
