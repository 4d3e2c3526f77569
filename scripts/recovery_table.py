"""Recovery of a compressed model without and with brief training: the table in docs/COMPRESSION.md.

    .venv/bin/python scripts/recovery_table.py [--model resnet20] [--methods cp,tucker2,tt]
        [--ratios 0.2,0.3,0.5] [--steps 100] [--out runs/recovery]

Per (method, retention ratio): every conv but the stem decomposed at that parameter ratio, int8 weights,
the classifier left whole (`--exclude linear`), accuracy on the full test split of ../shared CIFAR-10:
zero-shot from the weight-space factors; zero-shot after data-aware fitting (`compress(..., fit=...)`);
100 steps of cross-entropy; 100 distilled steps (teacher = the uncompressed model); data-aware fit plus
100 distilled steps. The fine-tunes use search_spaces/resnet_cifar.yaml's recipe (batch 128, SGD,
lr 0.003, cosine; distillation at T=4, weight 0.9). Each cell is cached as JSON under --out, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from autorank.compression import compress, make_plan, resolve_plan
from autorank.compression.fit import fit_chains
from autorank.data import load_data
from autorank.engine import TrainConfig, evaluate, train
from autorank.models import create_model

SHARED = Path(os.environ.get("AUTORANK_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
WEIGHTS = {"resnet20": "resnet20-12fca82f-jpeg-adapted.pt", "resnet56": "resnet56-4bfd9763-jpeg-adapted.pt"}
COLUMNS = ("weight", "fit", "ce", "distill", "fit+distill")


def cached_model(model: torch.nn.Module, plan, path: Path, cells: dict, timing: str, build) -> torch.nn.Module:
    """`build()` once (its seconds go to cells[timing]); later runs rebuild the structure and load it."""
    if path.exists():
        rebuilt = compress(model, plan, decompose=False)
        rebuilt.load_state_dict(torch.load(path, weights_only=True))
        return rebuilt.eval()
    start = time.perf_counter()
    built = build()
    cells[timing] = time.perf_counter() - start
    torch.save(built.state_dict(), path)
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20", choices=sorted(WEIGHTS))
    parser.add_argument("--methods", default="cp,tucker2,tt")
    parser.add_argument("--ratios", default="0.3")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--guard", type=int, default=0, help="val images the fine-tune must not score below its start on")
    parser.add_argument("--distill", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--fit-mode", default="als")
    parser.add_argument("--calibration-images", type=int, default=512)
    parser.add_argument("--iters", type=int, default=100, help="CP-ALS / HOOI iterations")
    parser.add_argument("--columns", default=",".join(COLUMNS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/recovery"))
    args = parser.parse_args()

    data = load_data(f"imagefolder:{SHARED / 'data' / 'cifar10-jpeg.tar.gz'}", seed=args.seed)
    model = create_model(args.model, data, SHARED / "models" / "cifar10" / WEIGHTS[args.model]).eval()
    calibration = data.calibration_images(args.calibration_images, 128, seed=args.seed)
    print(f"{args.model} original test accuracy {evaluate(model, data, 'test'):.4f}; load {os.getloadavg()[0]:.1f}")

    def tuned(start: torch.nn.Module, distill: float) -> torch.nn.Module:
        student = copy.deepcopy(start)
        train(student, data, TrainConfig(steps=args.steps, batch_size=128, lr=args.lr, warmup=args.warmup,
                                         guard=args.guard, distill=distill, temperature=args.temperature,
                                         channels_last=True, seed=args.seed), teacher=model)
        return student

    args.out.mkdir(parents=True, exist_ok=True)
    columns = args.columns.split(",")
    print("| method | retention | " + " | ".join(columns) + " |")
    for ratio in (float(r) for r in args.ratios.split(",")):
        for method in args.methods.split(","):
            key = (f"{args.model}-{method}-{ratio:g}-{args.precision}-{args.fit_mode}-n{args.calibration_images}"
                   f"-s{args.steps}-lr{args.lr:g}-w{args.warmup}-d{args.distill:g}-T{args.temperature:g}"
                   + (f"-g{args.guard}" if args.guard else ""))
            path = args.out / f"{key}.json"
            cells = json.loads(path.read_text()) if path.exists() else {}
            if all(c in cells for c in columns):
                print(f"| {method} | {ratio:.0%} | " + " | ".join(f"{100 * cells[c]:.1f}" for c in columns) + " |")
                continue
            plan = resolve_plan(model, make_plan(model, method, ratio, args.precision, exclude=["linear"]))
            stem = args.out / f"{args.model}-{method}-{ratio:g}-{args.precision}-it{args.iters}"
            weight = cached_model(model, plan, Path(f"{stem}.pt"), cells, "decompose_s",
                                  lambda: compress(model, plan, n_iter_max=args.iters, seed=args.seed))
            names = [n for n, lp in plan.layers.items() if lp.method != "none"]

            def fit() -> torch.nn.Module:
                fitted = copy.deepcopy(weight)
                fit_chains(fitted, model, names, calibration, mode=args.fit_mode)
                return fitted

            fitted = cached_model(model, plan, Path(f"{stem}-{args.fit_mode}-n{args.calibration_images}.pt"), cells,
                                  "fit_s", fit)
            builders = {"weight": lambda: weight, "fit": lambda: fitted, "ce": lambda: tuned(weight, 0.0),
                        "distill": lambda: tuned(weight, args.distill),
                        "fit+distill": lambda: tuned(fitted, args.distill)}
            for column in columns:
                if column not in cells:
                    cells[column] = evaluate(builders[column](), data, "test")
                    path.write_text(json.dumps(cells, indent=2))
            print(f"| {method} | {ratio:.0%} | " + " | ".join(f"{100 * cells[c]:.1f}" for c in columns)
                  + f" |   (decompose {cells.get('decompose_s', 0):.0f} s, fit {cells.get('fit_s', 0):.0f} s)", flush=True)


if __name__ == "__main__":
    main()
