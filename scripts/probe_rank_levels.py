"""Does one more rank level in a search's sensitivity table let the allocator find better plans?

    .venv/bin/python scripts/probe_rank_levels.py [--table runs/benchmark/resnet20-full/search/sensitivity.json]
        [--level 8] [--ratio 10] [--weights 1,2] [--out runs/probe-levels]

Measures the extra level (`vbmf*LEVEL`) for the table's layers that allow int4 (ResNet-20's layer2 and
layer3 in the shipped space), with the table's own images, seed and decomposition iterations and a
128-image data-aware fit (the shipped `sensitivity.fit_images`); merges it into the table; then, for the
table with and without it and each decomposed-drop weight (allocate mode's `decomposed_weight`),
allocates a plan at `--ratio` and gives it a trial's treatment (512-image fit, 100 distilled QAT steps
at lr 0.003 with the guard), reporting zero-shot and fine-tuned test accuracy. Results are cached per
plan under --out, so a stopped run resumes. Adapted ResNet-20 and CIFAR-10 from ../shared.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from autorank.compression import Plan, SensitivityTable, allocate, compress
from autorank.data import load_data
from autorank.engine import TrainConfig, evaluate, train
from autorank.engine.sensitivity import measure_layer, plan_table
from autorank.models import create_model

SHARED = Path(os.environ.get("AUTORANK_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def with_level(table: SensitivityTable, model, data, level: float) -> SensitivityTable:
    """`table` plus the candidates of `vbmf*level` on its int4 layers (ranks it already has are skipped)."""
    names = [n for n, cands in table.layers.items() if any(c.precision == "int4" for c in cands)]
    settings = table.settings
    job = plan_table(model, data, layers={n: (["tucker2", "cp"], ["fp32"], ["int8", "int4"]) for n in names},
                     levels=[f"vbmf*{level:g}"], limit=table.images, seed=table.seed,
                     n_iter_max=settings["n_iter_max"],
                     compress_options={"fit": data.calibration_images(128, 128, seed=table.seed)})
    layers = dict(table.layers)
    for name in names:
        have = {(c.method, tuple(c.rank or ()), c.precision) for c in layers[name]}
        layers[name] = list(layers[name]) + [c for c in measure_layer(job, name)[1:]
                                             if (c.method, tuple(c.rank or ()), c.precision) not in have]
    return replace(table, layers=layers)


def weighted(table: SensitivityTable, weight: float) -> SensitivityTable:
    """Decomposed candidates' drops times `weight`, as allocate mode's `decomposed_weight` does."""
    return replace(table, layers={n: [cands[0]] + [replace(c, drop=max(c.drop, 0.0) * (1.0 if c.method == "none" else weight))
                                                   for c in cands[1:]] for n, cands in table.layers.items()})


def summary(plan: Plan) -> str:
    return " ".join(f"{n}:{lp.method}{'' if lp.method == 'none' else lp.rank}/{lp.precision}"
                    for n, lp in plan.layers.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, default=Path("runs/benchmark/resnet20-full/search/sensitivity.json"))
    parser.add_argument("--level", type=float, default=8.0)
    parser.add_argument("--ratio", type=float, default=10.0)
    parser.add_argument("--weights", default="1,2")
    parser.add_argument("--out", type=Path, default=Path("runs/probe-levels"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    data = load_data(f"imagefolder:{SHARED / 'data' / 'cifar10-jpeg.tar.gz'}", seed=0)
    model = create_model("resnet20", data, SHARED / "models" / "cifar10" / "resnet20-12fca82f-jpeg-adapted.pt").eval()
    table = SensitivityTable.from_json(args.table.read_text())
    merged_path = args.out / f"table-level{args.level:g}.json"
    if not merged_path.exists():
        started = time.perf_counter()
        merged_path.write_text(with_level(table, model, data, args.level).to_json())
        print(f"level x{args.level:g} measured in {time.perf_counter() - started:.0f} s", flush=True)
    merged = SensitivityTable.from_json(merged_path.read_text())
    fit = data.calibration_images(512, 128, seed=0)
    print("| levels | weight | predicted drop | ratio | zero-shot test % | 100 steps test % |")
    for label, levels in (("as measured", table), (f"plus x{args.level:g}", merged)):
        for weight in (float(w) for w in args.weights.split(",")):
            path = args.out / f"r{args.ratio:g}-{'plus' if levels is merged else 'base'}-w{weight:g}.json"
            if not path.exists():
                plan = allocate(weighted(levels, weight), int(levels.model_bytes / args.ratio))
                predicted = levels.predict(plan)
                small = compress(model, plan, n_iter_max=table.settings["n_iter_max"], seed=0, fit=fit)
                zero_shot = evaluate(small, data, "test")
                train(small, data, TrainConfig(steps=100, batch_size=128, lr=0.003, distill=0.9, temperature=4.0,
                                               guard=1000, channels_last=True, seed=0), teacher=model)
                path.write_text(json.dumps({"drop": predicted.drop, "ratio": levels.model_bytes / predicted.size_bytes,
                                            "zero_shot": zero_shot, "test": evaluate(small, data, "test"),
                                            "plan": summary(plan)}, indent=1))
            r = json.loads(path.read_text())
            print(f"| {label} | {weight:g} | {r['drop']:.1f} | {r['ratio']:.2f}x | {100 * r['zero_shot']:.2f} | "
                  f"{100 * r['test']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
