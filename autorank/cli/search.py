"""`autorank search` (run or resume a compression search) and `autorank best` (pick from one)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from autorank._shipped import search_spaces
from autorank.errors import AutorankError
from autorank.records import format_front, format_size, pareto_front
from autorank.search import TrialRecord, best_trial, load_search
from autorank.search.space import Constraints, parse_duration, parse_latency, parse_size, shipped_space


def register(subparsers: argparse._SubParsersAction) -> None:
    search = subparsers.add_parser(
        "search", help="search per-layer decomposition, ranks and precision (Optuna + MLflow)",
        description="Multi-objective search (accuracy vs size) over a YAML search space: a per-layer "
                    "sensitivity table first (cached in --out), then the fixed recipes (int8; CP/Tucker-2/TT "
                    "at fixed retention), then sampled trials (mode allocate: a target ratio and a few switches "
                    "the allocator turns into a per-layer plan; mode layers: per-layer choices); each trial "
                    "compresses the pretrained model, fine-tunes it briefly (quantization-aware) and is "
                    "recorded in the Optuna study and MLflow; the best front members end with a longer "
                    "fine-tune (final: in the YAML).",
    )
    search.add_argument("--config", metavar="NAME|YAML",
                        help="search space: a shipped one by name (autorank spaces: default, resnet_cifar) "
                             "or a YAML file")
    search.add_argument("--model", help="zoo name or module:pkg.mod:factory")
    search.add_argument("--weights", help="pretrained checkpoint (path or URL)")
    search.add_argument("--data", help="digits | cifar10[:ROOT] | imagefolder:PATH")
    search.add_argument("--out", type=Path, default=Path("autorank-search"), help="output folder (default %(default)s)")
    search.add_argument("--trials", type=int, help="number of finished trials to reach (overrides the YAML)")
    search.add_argument("--time-budget", help="wall-clock budget such as 30m, 2h, 1h30m (overrides the YAML)")
    search.add_argument("--resume", action="store_true", help="continue the search in --out (same study)")
    search.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: trials in this process (default); ray: Ray Tune trials")
    search.add_argument("--ray-address", help="join an existing Ray cluster (e.g. ray://host:10001 or auto)")
    search.add_argument("--ray-storage", metavar="PATH|URI",
                        help="Ray Tune's storage, a path or URI every node of the cluster reaches (NFS path, "
                             "s3://...); default OUT/ray, on this machine (docs/CLUSTER.md)")
    search.add_argument("--trial-resources", help="Ray resources per trial, e.g. cpu=2,gpu=0.5 (a trial runs on the "
                                                  "GPU Ray assigns it); other names are custom resources nodes "
                                                  "declare, e.g. cpu=1,trialnode=1 (default: all CPUs, one GPU if "
                                                  "present)")
    search.add_argument("--max-concurrent", type=int, default=1, help="Ray trials running at once (default 1)")
    search.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite store in --out)")
    search.add_argument("--experiment", default="autorank", help="MLflow experiment name (default %(default)s)")
    search.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUT/study.db)")
    search.add_argument("--study-name", help="Optuna study name (default: the space's name)")
    search.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | mps")
    search.add_argument("--no-progress", action="store_true", help="no progress bar")
    search.set_defaults(handler=run_search_command)

    best = subparsers.add_parser(
        "best", help="the most accurate feasible trial of a search",
        description="Print the most accurate trial meeting the limits (the search's own where not given); "
                    "trials the search fine-tuned again at its end (final:) count with those figures.",
    )
    best.add_argument("--search", type=Path, required=True, help="a search output folder")
    size = best.add_mutually_exclusive_group()
    size.add_argument("--max-size", help="largest model size, e.g. 0.5MB or 200KiB")
    size.add_argument("--min-ratio", type=float, help="smallest compression ratio vs the uncompressed model")
    best.add_argument("--max-drop", type=float, help="largest accuracy drop in points vs the reference")
    best.add_argument("--max-latency", help="largest ONNX Runtime batch-1 latency (ort_latency_ms), e.g. 0.3ms")
    best.add_argument("--json", action="store_true", help="print one JSON object")
    best.set_defaults(handler=run_best_command)

    spaces = subparsers.add_parser(
        "spaces", help="the shipped search spaces (names for search --config)",
        description="List the search spaces shipped with autorank, or print one (to copy and edit).",
    )
    spaces.add_argument("name", nargs="?", help="print this space's YAML")
    spaces.set_defaults(handler=run_spaces_command)


def run_search_command(args: argparse.Namespace) -> int:
    from autorank.search.executors import parse_resources
    from autorank.search.run import run_search
    from autorank.tracking import MlflowCallback
    if not args.resume and (args.config is None or args.model is None or args.data is None):
        raise AutorankError("search needs --config, --model and --data (or --resume with --out of a search)")
    if args.trials is not None and args.trials < 1:
        raise AutorankError(f"--trials must be >= 1, got {args.trials}")
    time_budget = parse_duration(args.time_budget, "--time-budget") if args.time_budget else None
    resources = parse_resources(args.trial_resources) if args.trial_resources else None
    result = run_search(
        args.config, args.model, args.weights, args.data, args.out, trials=args.trials, time_budget=time_budget,
        executor=args.executor, resume=args.resume, callbacks=[MlflowCallback(args.mlflow_uri, args.experiment)],
        storage=args.storage, study_name=args.study_name, device=args.device, ray_address=args.ray_address,
        ray_storage=args.ray_storage,
        trial_resources=resources, max_concurrent=args.max_concurrent, progress=not args.no_progress,
    )
    print(summary_text(result))
    return 0


def summary_text(result) -> str:
    """The end-of-search report: counts, the front table, the best feasible trial, where to browse.

    With no feasible trial it shows the unconstrained front instead, and the trial closest to the limits."""
    done = [t for t in result.trials if t.counted]
    failed = [t for t in done if t.state == "failed"]
    screened = sum(t.state == "screened" for t in done)
    head = (f"{len(done)} trials ({len(failed)} failed{f', {screened} screened out' if screened else ''}) in "
            f"{result.elapsed_s / 60:.1f} min; ")
    best = result.best
    search = load_search(result.out_dir)
    limits = search.space.constraints
    unconstrained = pareto_front(result.trials, search.space.objectives, feasible_only=False)
    if result.front or not unconstrained:
        lines = [head + f"Pareto front ({len(result.front)} feasible trials, accuracy on val):",
                 format_front(result.front, result.reference)]
    else:
        lines = [head + f"no trial meets {limits.describe()}; unconstrained Pareto front "
                        f"({len(unconstrained)} trials, accuracy on val):",
                 format_front(unconstrained, result.reference), closest_text(result.trials, limits, result.reference)]
    lines.append(f"best feasible: trial {best.number} ({best.figures['accuracy'] * 100:.2f}%, "
                 f"{best.figures['size_bytes'] / 1e3:.1f} KB{', after the final fine-tune' if best.finalized else ''})"
                 if best else "no feasible trial yet")
    lines.append(f"front: {result.out_dir / 'pareto.html'} (interactive), {result.out_dir / 'pareto.csv'}")
    uri = result.info.get("mlflow_uri")
    if uri is None:
        pass  # not tracked (a Python caller passed no MlflowCallback)
    elif uri.startswith("sqlite"):
        lines.append(f"browse: autorank ui --search {result.out_dir}   (or: mlflow ui --backend-store-uri {uri})")
    else:
        lines.append(f"browse: {uri} (run {result.info.get('parent_run_id')})")
    return "\n".join(lines)


def closest_text(trials: list[TrialRecord], limits: Constraints, reference: dict[str, float]) -> str:
    """'closest: trial 1, 7.3 pt drop, limit 3.0': the completed trial that misses the limits by the least
    (summed shortfall, each relative to its limit), with the figures it missed them by."""
    def shortfalls(t: TrialRecord) -> dict[str, float]:
        return {k: v for k, v in limits.violations(t.metrics, reference).items() if v > 0}

    scale = {"max_size": limits.max_size, "min_ratio": limits.min_ratio, "max_drop": max(limits.max_drop or 0, 1.0),
             "max_latency_ms": limits.max_latency_ms}
    done = [t for t in trials if t.finished_ok]
    closest = min(done, key=lambda t: (sum(v / scale[k] for k, v in shortfalls(t).items()), t.number))
    m = closest.metrics
    missed = []
    for key in shortfalls(closest):
        if key == "max_size":
            missed.append(f"{format_size(m['size_bytes'])}, limit {format_size(limits.max_size)}")
        elif key == "min_ratio":
            missed.append(f"{reference['size_bytes'] / m['size_bytes']:.1f}x smaller, limit {limits.min_ratio:g}x")
        elif key == "max_latency_ms":
            measured = f"{m['ort_latency_ms']:.3f} ms" if "ort_latency_ms" in m else "ORT latency not measured"
            missed.append(f"{measured}, limit {limits.max_latency_ms:g} ms")
        else:
            missed.append(f"{(reference['accuracy'] - m['accuracy']) * 100:.1f} pt drop, limit {limits.max_drop:.1f}")
    return f"closest: trial {closest.number}, " + "; ".join(missed)


def run_best_command(args: argparse.Namespace) -> int:
    if args.min_ratio is not None and not args.min_ratio > 0:
        raise AutorankError(f"--min-ratio must be > 0, got {args.min_ratio}")
    if args.max_drop is not None and not args.max_drop >= 0:
        raise AutorankError(f"--max-drop must be >= 0, got {args.max_drop}")
    search = load_search(args.search)
    record = best_trial(search, max_size=parse_size(args.max_size, "--max-size") if args.max_size else None,
                        min_ratio=args.min_ratio, max_drop=args.max_drop,
                        max_latency_ms=parse_latency(args.max_latency, "--max-latency") if args.max_latency else None)
    if args.json:
        print(json.dumps(record.as_dict()))
        return 0
    m = record.figures
    print(f"trial {record.number}: accuracy {m['accuracy'] * 100:.2f}% (drop {m.get('drop_points', 0):+.2f} pt), "
          f"size {m['size_bytes'] / 1e3:.1f} KB ({m.get('ratio', 0):.1f}x smaller), {m['macs'] / 1e6:.2f} MMACs"
          + (f"; after the final fine-tune ({record.metrics['accuracy'] * 100:.2f}% after the trial's)"
             if record.finalized else ""))
    print(f"plan: {record.summary}")
    print(f"weights: {record.weights or '(not kept)'}")
    return 0


def run_spaces_command(args: argparse.Namespace) -> int:
    shipped = search_spaces()
    if args.name is not None:
        print(shipped_space(args.name).read_text(), end="")
        return 0
    width = max(map(len, shipped))
    for name, path in shipped.items():
        print(f"{name:<{width}}  {_first_comment(path)}")
    print(f"(in {next(iter(shipped.values())).parent}; `autorank search --config NAME`, "
          "`autorank spaces NAME > my.yaml` to start your own)")
    return 0


def _first_comment(path: Path) -> str:
    """A space's description: the first line of its leading comment."""
    lines = path.read_text().splitlines()
    return lines[0].lstrip("#").strip() if lines and lines[0].startswith("#") else ""
