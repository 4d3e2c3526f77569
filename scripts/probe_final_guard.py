"""Does the fine-tune guard help or hurt the search's final continuation?

    .venv/bin/python scripts/probe_final_guard.py [--retention 0.5,0.4] [--layer1 int8,int4]
        [--out runs/probe-final-guard]

For each plan of the hand-picked shape (CP at `retention` of each conv's parameters, int4, on layer3;
int4 layer2; `layer1` precision on layer1; the classifier int8): a trial's treatment (512-image data-aware
fit, 100 distilled QAT steps at lr 0.003 with the 1,000-image guard), then the final's 300 more steps at
lr 0.003 and at lr 0.001, each with the guard (its verdict is reported) and without it, and for
comparison 400 unguarded steps at lr 0.005 from the fitted start. Reports val and full-test accuracy.
Results are cached per plan under --out, so a stopped run resumes. Adapted ResNet-20 and CIFAR-10 from
../shared.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from autorank.compression import LayerPlan, Plan, compress, profile
from autorank.data import load_data
from autorank.engine import TrainConfig, evaluate, train
from autorank.models import create_model

SHARED = Path(os.environ.get("AUTORANK_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
TRIAL = TrainConfig(steps=100, batch_size=128, lr=0.003, distill=0.9, temperature=4.0, guard=1000,
                    channels_last=True, seed=0)


def hand_plan(model, retention: float, layer1: str) -> Plan:
    """CP int4 on layer3, int4 layer2, `layer1` on layer1, int8 elsewhere (the stem stays fp32)."""
    layers = {}
    for name, module in model.named_modules():
        if name.startswith("layer3") and name.endswith(("conv1", "conv2")):
            layers[name] = LayerPlan("cp", retention, "int4")
        elif name.startswith("layer2") and name.endswith(("conv1", "conv2")):
            layers[name] = LayerPlan("none", None, "int4")
        elif name.startswith("layer1") and name.endswith(("conv1", "conv2")):
            layers[name] = LayerPlan("none", None, layer1)
        elif name == "linear":
            layers[name] = LayerPlan("none", None, "int8")
    return Plan(layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retention", default="0.5,0.4")
    parser.add_argument("--layer1", default="int8,int4")
    parser.add_argument("--out", type=Path, default=Path("runs/probe-final-guard"))
    args = parser.parse_args()
    data = load_data(f"imagefolder:{SHARED / 'data' / 'cifar10-jpeg.tar.gz'}", seed=0)
    model = create_model("resnet20", data, SHARED / "models" / "cifar10" / "resnet20-12fca82f-jpeg-adapted.pt").eval()
    fp32_bytes = profile(model, data.input_shape).size_bytes
    fit = data.calibration_images(512, 128, seed=0)
    args.out.mkdir(parents=True, exist_ok=True)
    for retention in (float(r) for r in args.retention.split(",")):
        for layer1 in args.layer1.split(","):
            path = args.out / f"cp{retention:g}-layer1{layer1}.json"
            if path.exists():
                print(path.read_text())
                continue
            start = time.perf_counter()
            small = compress(model, hand_plan(model, retention, layer1), n_iter_max=30, seed=0, fit=fit)
            fitted = copy.deepcopy(small)
            result = {"retention": retention, "layer1": layer1,
                      "ratio": fp32_bytes / profile(small, data.input_shape).size_bytes,
                      "zero_shot_test": evaluate(small, data, "test")}
            result["trial_kept_start"] = train(small, data, TRIAL, teacher=model).kept_start
            result["trial_test"], result["trial_val"] = evaluate(small, data, "test"), evaluate(small, data, "val")
            for lr in (0.003, 0.001):
                guarded = copy.deepcopy(small)
                run = train(guarded, data, replace(TRIAL, steps=300, lr=lr), teacher=model)
                result[f"final_lr{lr}_guard"] = {"guard_start": run.guard[0], "guard_end": run.guard[1],
                                                 "kept_start": run.kept_start,
                                                 "test": evaluate(guarded, data, "test")}
                free = copy.deepcopy(small)
                train(free, data, replace(TRIAL, steps=300, lr=lr, guard=0), teacher=model)
                result[f"final_lr{lr}_unguarded"] = {"test": evaluate(free, data, "test"),
                                                     "val": evaluate(free, data, "val")}
            train(fitted, data, replace(TRIAL, steps=400, lr=0.005, guard=0), teacher=model)
            result["fresh400_lr0.005"] = {"test": evaluate(fitted, data, "test"), "val": evaluate(fitted, data, "val")}
            result["wall_s"] = time.perf_counter() - start
            path.write_text(json.dumps(result, indent=2))
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
