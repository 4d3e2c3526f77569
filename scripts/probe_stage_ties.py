"""Does tying each stage's layers to one choice (`allocate(..., tied=...)`) give the allocator better plans?

    .venv/bin/python scripts/probe_stage_ties.py [--search runs/benchmark/resnet20-full/search] [--ratio 10]
        [--sharpness 1] [--weight 1] [--spec NAME=layer1=int8,layer2=int4,layer3=cp@0.5/int4,linear=fp32 ...]
        [--table TABLE.json] [--out runs/probe-ties]

Reads a finished allocate-mode search (its sensitivity table and its trials), fits the search's drop costs
to all of its finished trials (`fit_drop_costs`), allocates a plan at `--ratio` per layer and with each
stage tied (`SearchSpace.stage`: a layer's top-level module), and gives each plan, and each `--spec`, a
trial's treatment: a 512-image data-aware fit, 100 distilled QAT steps at lr 0.003 with the guard
(the ResNet space's `finetune` block). Prints ratio, zero-shot and fine-tuned test accuracy and the
fine-tuned val accuracy. A spec names per stage `int8` / `int4` / `fp32` (kept whole) or
`METHOD@LEVEL/PRECISION`: a table level (`cp@vbmf*8/int4`, each layer at its own table ranks, a layer
without that level kept whole at that precision) or a parameter-retention ratio (`cp@0.5/int4`).
`--table` replaces the search's table with one measured since (`scripts/bench_sensitivity.py --space
resnet_cifar --table`; the costs are fitted to the search's trials on it). Results are cached per plan
under --out, so a stopped run resumes. Adapted ResNet-20 and CIFAR-10
from ../shared.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import optuna

from autorank.compression import LayerPlan, Plan, SensitivityTable, allocate, compress, profile, resolve_plan
from autorank.data import load_data
from autorank.engine import TrainConfig, evaluate, train
from autorank.models import create_model
from autorank.search import load_search
from autorank.search.allocation import fit_drop_costs, stage_groups
from autorank.search.space import SearchSpace, space_from_dict

SHARED = Path(os.environ.get("AUTORANK_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def spec_plan(spec: str, table: SensitivityTable, model, space: SearchSpace) -> Plan:
    """The plan a spec names (module docstring), every table layer by its stage (`SearchSpace.stage`)."""
    stages = dict(part.split("=", 1) for part in spec.split(","))
    layers = {}
    for name, cands in table.layers.items():
        choice = stages[space.stage(name)]
        if "@" not in choice:
            layers[name] = LayerPlan("none", None, choice)
            continue
        method, rest = choice.split("@", 1)
        level, precision = rest.rsplit("/", 1)
        if level.replace(".", "", 1).isdigit():  # a retention ratio
            layers[name] = resolve_plan(model, Plan({name: LayerPlan(method, float(level), precision)})).layers[name]
        else:  # a table level
            found = next((c for c in cands if c.kind == choice), None)
            layers[name] = found.layer_plan() if found else LayerPlan("none", None, precision)
    return Plan(layers, table.activations)


def stages_of(plan: Plan, space: SearchSpace) -> str:
    """Per layer `method[ranks]/precision`, grouped by stage."""
    out: dict[str, list[str]] = {}
    for name, lp in plan.layers.items():
        out.setdefault(space.stage(name), []).append(
            lp.precision if lp.method == "none" else f"{lp.method}{list(lp.rank)}/{lp.precision}")
    return "; ".join(f"{stage}: {', '.join(choices)}" for stage, choices in out.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search", type=Path, default=Path("runs/benchmark/resnet20-full/search"))
    parser.add_argument("--ratio", type=float, default=10.0)
    parser.add_argument("--sharpness", type=float, default=1.0)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--spec", action="append", default=[], help="NAME=stage choices (module docstring)")
    parser.add_argument("--table", type=Path, help="a sensitivity table to use instead of the search's")
    parser.add_argument("--out", type=Path, default=Path("runs/probe-ties"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    search = load_search(args.search)
    space = space_from_dict(search.info["space"])
    table = SensitivityTable.from_json((args.table or args.search / "sensitivity.json").read_text())
    study = optuna.load_study(study_name=search.info["study_name"], storage=search.info["storage"])
    finished = [(t.user_attrs["plan"], t.user_attrs["metrics"]["drop_points"])
                for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if "plan" in t.user_attrs and "drop_points" in t.user_attrs.get("metrics", {})]
    costs = fit_drop_costs(table, finished)
    print(f"costs fitted to {costs.trials} trials: a {costs.quantized:.3f}, b {costs.decomposed:.3f}, "
          f"c {costs.per_decomposition:.3f}", flush=True)
    seen = replace(table, layers={n: [cands[0]] + [replace(c, drop=costs.of(c, args.sharpness) *
                                                           (1.0 if c.method == "none" else args.weight))
                                                   for c in cands[1:]] for n, cands in table.layers.items()})

    data = load_data(f"imagefolder:{SHARED / 'data' / 'cifar10-jpeg.tar.gz'}", seed=0)
    model = create_model("resnet20", data, SHARED / "models" / "cifar10" / "resnet20-12fca82f-jpeg-adapted.pt").eval()
    budget = int(table.model_bytes / args.ratio)
    plans = {f"per-layer-{args.ratio:g}x": allocate(seen, budget),
             f"tied-{args.ratio:g}x": allocate(seen, budget, tied=stage_groups(table, space))}
    plans.update({name: spec_plan(spec, table, model, space) for name, spec in (s.split("=", 1) for s in args.spec)})
    fit = data.calibration_images(512, 128, seed=0)
    config = TrainConfig(steps=100, batch_size=128, lr=0.003, distill=0.9, temperature=4.0, guard=1000,
                         channels_last=True, seed=0)
    print("| plan | ratio | zero-shot test % | 100 steps test % | 100 steps val % |")
    for name, plan in plans.items():
        path = args.out / f"{name}-s{args.sharpness:g}-w{args.weight:g}.json"
        if not path.exists():
            started = time.perf_counter()
            small = compress(model, plan, n_iter_max=table.settings["n_iter_max"], seed=0, fit=fit)
            zero_shot = evaluate(small, data, "test")
            train(small, data, config, teacher=model)
            path.write_text(json.dumps({
                "ratio": table.model_bytes / profile(small, data.input_shape).size_bytes, "zero_shot": zero_shot,
                "test": evaluate(small, data, "test"), "val": evaluate(small, data, "val"),
                "seconds": time.perf_counter() - started, "plan": stages_of(plan, space)}, indent=1))
        r = json.loads(path.read_text())
        print(f"| {name} | {r['ratio']:.2f}x | {100 * r['zero_shot']:.2f} | {100 * r['test']:.2f} | "
              f"{100 * r['val']:.2f} |  {r['plan']}", flush=True)


if __name__ == "__main__":
    main()
