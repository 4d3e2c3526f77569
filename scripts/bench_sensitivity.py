"""Sensitivity table time on the adapted ResNet-20, and the allocator's predicted vs measured drops.

    .venv/bin/python scripts/bench_sensitivity.py [--images 1000] [--levels 0.5,0.25] [--methods tucker2,svd]
        [--ratios 4,8,12] [--eval-split test] [--eval-images 2000] [--table table.json] [--fit 512]
    .venv/bin/python scripts/bench_sensitivity.py --space resnet_cifar [--model resnet56 --weights W] [--ratios ""]

Builds the per-layer sensitivity table (one layer compressed at a time, no fine-tuning, on a
stratified val subset), prints its wall and CPU time and the table, then for each target ratio
allocates a plan, compresses the model with it and measures its zero-shot accuracy on a stratified
subset of --eval-split (test by default: never the images the table was measured on). With
--table, a saved table is reused (and a new one saved there). With --space, the table is the one a
search with that space measures before its first trial (its layers, candidates, images, fit and
seed; the table options above are ignored), timed per layer; --ratios "" stops after the table. Figures go to docs/COMPRESSION.md
("Allocator") with the command that produced them.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from autorank.cli.compress import parse_rank
from autorank.compression import SensitivityTable, allocate, compress, profile
from autorank.data import Dataset, load_data
from autorank.engine import evaluate, sensitivity_table
from autorank.engine.sensitivity import measure_layer
from autorank.models import create_model
from autorank.search.space import load_space, space_path
from autorank.search.table import table_job
from autorank.search.trial import TrialContext, layer_table

SHARED = Path(os.environ.get("AUTORANK_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
ARCHIVE = SHARED / "data" / "cifar10-jpeg.tar.gz"
WEIGHTS = SHARED / "models" / "cifar10" / "resnet20-12fca82f-jpeg-adapted.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--images", type=int, default=1000, help="stratified val images of the table")
    parser.add_argument("--levels", default="0.5,0.25", help="rank levels (retention ratios, vbmf:W)")
    parser.add_argument("--methods", default="tucker2,svd")
    parser.add_argument("--decomposed-precisions", default="int8,int4")
    parser.add_argument("--iters", type=int, default=100, help="CP-ALS / HOOI iterations")
    parser.add_argument("--ratios", default="4,8,12")
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--eval-images", type=int, default=2000)
    parser.add_argument("--table", type=Path, help="reuse this table if it exists, else save the new one there")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fit", type=int, default=0, metavar="N",
                        help="data-aware fit of every decomposed chain to N seeded training images (0: off)")
    parser.add_argument("--space", help="measure the table a search with this space (name or YAML) measures")
    args = parser.parse_args()

    data = load_data(f"imagefolder:{ARCHIVE}")
    model = create_model(args.model, data, args.weights).eval()
    print(f"{args.model}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    options = {}
    if args.fit:
        options["fit"] = data.calibration_images(args.fit, min(args.fit, 128), seed=args.seed)
    if args.space:
        table = search_space_table(model, data, args.model, args.space)
        if args.table is not None:
            args.table.write_text(table.to_json())
    elif args.table is not None and args.table.is_file():
        table = SensitivityTable.from_json(args.table.read_text())
        print(f"reusing {args.table}")
    else:
        start, cpu = time.perf_counter(), time.process_time()
        table = sensitivity_table(
            model, data, methods=args.methods.split(","), levels=[parse_rank(t) for t in args.levels.split(",")],
            decomposed_precisions=args.decomposed_precisions.split(","), limit=args.images, seed=args.seed,
            device="cpu", n_iter_max=args.iters, compress_options=options)
        count = sum(len(c) - 1 for c in table.layers.values())
        print(f"sensitivity table: {len(table.layers)} layers, {count} candidates measured, "
              f"{time.perf_counter() - start:.1f} s wall, {time.process_time() - cpu:.1f} s CPU, "
              f"load average {os.getloadavg()[0]:.1f}")
        if args.table is not None:
            args.table.write_text(table.to_json())
    print(table.format())

    if not args.ratios:
        return
    held_out = data.sample(args.eval_split, args.eval_images, seed=args.seed)
    reference = evaluate(model, held_out, args.eval_split, device="cpu")
    print(f"\nuncompressed: {table.model_bytes:,} bytes, {args.eval_split} ({args.eval_images} stratified) "
          f"{100 * reference:.2f}%")
    print(f"{'ratio':>6}{'size B':>10}{'x':>7}{'predicted':>11}{'measured':>10}{'alloc ms':>10}  plan")
    for ratio in (float(r) for r in args.ratios.split(",")):
        start = time.perf_counter()
        plan = allocate(table, ratio=ratio)
        ms = 1000 * (time.perf_counter() - start)
        predicted = table.predict(plan)
        small = compress(model, plan, n_iter_max=args.iters, seed=args.seed, **options)
        size = profile(small, data.input_shape).size_bytes
        assert size == predicted.size_bytes, (size, predicted.size_bytes)
        measured = 100 * (reference - evaluate(small, held_out, args.eval_split, device="cpu"))
        counts: dict[str, int] = {}
        for lp in plan.layers.values():
            key = f"{lp.method}/{lp.precision}"
            counts[key] = counts.get(key, 0) + 1
        summary = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
        print(f"{ratio:>6g}{size:>10,}{table.model_bytes / size:>7.2f}{predicted.drop:>11.2f}{measured:>10.2f}"
              f"{ms:>10.1f}  {summary}")
        for name, lp in plan.layers.items():
            print(f"{'':>8}{name:<18}{lp.method:<8}{str(lp.rank or ''):<10}{lp.precision}")


def search_space_table(model: torch.nn.Module, data: Dataset, model_name: str, space_spec: str) -> SensitivityTable:
    """The table a search with `space_spec` measures (the search's own `table_job`), one layer after
    another in this process, with each layer's wall time."""
    space = load_space(space_path(space_spec))
    layers = layer_table(model, space)
    groups = space.groups({name: info.kind for name, info in layers.items()})
    ctx = TrialContext(space=space, groups=groups, layers=layers, model=model.cpu().eval(), reference={},
                       out_dir=Path.cwd(), device="cpu")
    start, cpu = time.perf_counter(), time.process_time()
    job = table_job(ctx, data)
    count = sum(len(c) for c in job.planned.values())
    print(f"{model_name} table of space {space.name}: {len(job.planned)} layers, {count} candidates, "
          f"{space.sensitivity.images} images, fit {space.sensitivity.fit_images if space.finetune.fit else 0}, "
          f"levels x{list(space.sensitivity.levels)}; planned in {time.perf_counter() - start:.1f} s")
    rows = {}
    for name in job.planned:
        began = time.perf_counter()
        rows[name] = measure_layer(job, name, factors=ctx.factors)
        print(f"  {name:<18}{len(job.planned[name]):>4} candidates {time.perf_counter() - began:>7.1f} s", flush=True)
    table = job.assemble(rows, time.perf_counter() - start)
    print(f"sensitivity table: {time.perf_counter() - start:.1f} s wall, {time.process_time() - cpu:.1f} s CPU, "
          f"load average {os.getloadavg()[0]:.1f}")
    return table


if __name__ == "__main__":
    main()
