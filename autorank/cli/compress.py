"""`autorank compress` (apply one plan, optionally fine-tune, measure) and `autorank ranks` (EVBMF table)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from autorank.cli.allocate import add_allocate_args, allocated_plan, check_allocate_args
from autorank.cli.engine import add_model_data_args, add_recipe_args, load_model_and_data
from autorank.compression import Plan, compress, find_layers, make_plan, mixed_plan, resolve_plan
from autorank.compression.ranks import vbmf_method_ranks
from autorank.compression.fit import FIT_MODES
from autorank.compression.plan import ACTIVATIONS, PRECISIONS
from autorank.compression.ranks import parse_vbmf
from autorank.engine import TrainConfig, measure, train
from autorank.errors import AutorankError

CLI_METHODS = ("tucker2", "cp", "tt", "mixed", "none")


def parse_rank(text: str) -> int | float | str | list[int]:
    """'vbmf', 'vbmf:0.5', a ratio '0.5', an integer '8' or integers '8,16'."""
    text = text.strip()
    if text.startswith("vbmf"):
        if parse_vbmf(text) is None:
            raise AutorankError(f"--rank {text!r}: use vbmf or vbmf:W with W in [0, 1]")
        return text
    try:
        if "," in text:
            return [int(part) for part in text.split(",")]
        if "." in text:
            return float(text)
        return int(text)
    except ValueError:
        raise AutorankError(f"--rank {text!r}: expected vbmf, vbmf:W, a ratio like 0.5, N or N,M[,K]") from None


def _add_layer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--include", action="append", help="glob of layer names to compress (repeatable)")
    parser.add_argument("--exclude", action="append", help="glob of layer names to leave alone (repeatable)")
    parser.add_argument("--with-first", action="store_true", help="also compress the first conv")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compress", help="apply one decomposition/quantization plan and measure it",
        description="Compress MODEL's convs (Tucker-2, CP, TT, or per-layer best = mixed; linear layers SVD) "
                    "at the given ranks and weight precision, optionally fine-tune, and report accuracy, "
                    "params, size and MACs before and after.",
    )
    add_model_data_args(parser)
    parser.add_argument("--method", choices=CLI_METHODS, default="tucker2")
    parser.add_argument("--rank", default="vbmf", help="vbmf | vbmf:W (MUSCO weakening) | ratio in (0,1] | N | N,M")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="weight precision")
    parser.add_argument("--activations", choices=ACTIVATIONS, default="fp32",
                        help="int8: calibrated activation fake-quant at the inputs of int8/int4 layers")
    parser.add_argument("--plan", type=Path, help="a plan JSON (overrides --method/--rank/--precision)")
    add_allocate_args(parser)
    _add_layer_args(parser)
    parser.add_argument("--no-fit", action="store_true",
                        help="keep the weight-space factors and round to nearest (default: fit every decomposed "
                             "chain to the original layer's outputs on --calibration-images training images and "
                             "round every int8/int4 weight with its errors compensated on them)")
    parser.add_argument("--fit-mode", choices=FIT_MODES, default="als",
                        help="als: alternating least squares over every factor of the chain (default); pair: the last two "
                             "factors (reduced-rank regression), then the last; last: the last only")
    parser.add_argument("--finetune-steps", type=int, default=0, help="SGD steps of (quantization-aware) fine-tuning")
    add_recipe_args(parser)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--limit", type=int,
                        help="evaluate on N images of the split: a stratified sample (every class in proportion, --seed)")
    parser.add_argument("--calibration-images", type=int, default=512,
                        help="seeded training images for the fit and int8 activation ranges")
    parser.add_argument("--iters", type=int, default=100, help="CP-ALS / HOOI iterations per layer")
    parser.add_argument("--out", type=Path, help="folder for plan.json (resolved), model.pt, metrics.json")
    parser.set_defaults(handler=run_compress)

    ranks = subparsers.add_parser(
        "ranks", help="each layer's shape, EVBMF ranks and parameter share",
        description="EVBMF rank estimates (Tucker-2 R1,R2; CP; TT; SVD) of every candidate layer.",
    )
    add_model_data_args(ranks)
    _add_layer_args(ranks)
    ranks.add_argument("--weakening", type=float, default=1.0, help="MUSCO weakening w in [0, 1]")
    ranks.set_defaults(handler=run_ranks)


def _build_plan(args: argparse.Namespace, model: nn.Module) -> Plan:
    if args.plan is not None:
        return Plan.from_json(args.plan.read_text())
    rank = parse_rank(args.rank)
    kwargs = dict(activations=args.activations, include=args.include, exclude=args.exclude,
                  skip_first=not args.with_first)
    if args.method == "mixed":
        return mixed_plan(model, rank, args.precision, n_iter_max=args.iters, seed=args.seed, **kwargs)
    return make_plan(model, args.method, rank, args.precision, **kwargs)


def _check_args(args: argparse.Namespace) -> None:
    if args.plan is not None and not args.plan.is_file():
        raise AutorankError(f"plan file not found: {args.plan}")
    if args.plan is None:
        parse_rank(args.rank)
    if args.finetune_steps < 0 or min(args.batch_size, args.calibration_images, args.iters) < 1:
        raise AutorankError("--finetune-steps must be >= 0; --batch-size, --calibration-images, --iters >= 1")
    if args.limit is not None and args.limit < 1:
        raise AutorankError("--limit must be >= 1")
    check_allocate_args(args)
    TrainConfig(steps=1, warmup=args.warmup, distill=args.distill, temperature=args.temperature,
                guard=args.guard).validate()


def _measure(model: nn.Module, data, args: argparse.Namespace) -> dict[str, float]:
    return measure(model, data, args.split, device=args.device, limit=args.limit, seed=args.seed, latency=False)


def run_compress(args: argparse.Namespace) -> int:
    _check_args(args)
    model, data = load_model_and_data(args)
    plan, allocation = allocated_plan(args, model, data) if args.target_ratio else (_build_plan(args, model), None)
    plan = resolve_plan(model, plan)
    images = data.calibration_images(args.calibration_images, min(args.batch_size, args.calibration_images),
                                     seed=args.seed)  # int8 activation ranges and the data-aware fit
    compressed = compress(model, plan, calibration=images if plan.activations == "int8" else None,
                          n_iter_max=args.iters, seed=args.seed, fit=None if args.no_fit else images,
                          fit_mode=args.fit_mode)
    before = _measure(model, data, args)
    after = _measure(compressed, data, args)
    result = {"model": args.model, "data": args.data, "split": args.split, "before": before, "compressed": after}
    if args.finetune_steps > 0:
        train(compressed, data, TrainConfig(steps=args.finetune_steps, batch_size=args.batch_size, lr=args.lr,
                                            warmup=args.warmup, distill=args.distill, temperature=args.temperature,
                                            guard=args.guard, device=args.device, seed=args.seed, progress=not args.json),
              teacher=model)
        result["finetuned"] = _measure(compressed, data, args)
    final = result.get("finetuned", after)
    result["compression"] = {"params": before["params"] / final["params"],
                             "size": before["size_bytes"] / final["size_bytes"],
                             "macs": before["macs"] / max(final["macs"], 1)}
    result["plan"] = json.loads(plan.to_json())
    if allocation is not None:
        result["allocation"] = allocation  # --target-ratio: budget and the sensitivity table's prediction
    result["undecomposed"] = plan.notes  # layers the plan asked to decompose, left whole: not smaller
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "plan.json").write_text(plan.to_json())
        torch.save({k: v.cpu() for k, v in compressed.state_dict().items()}, args.out / "model.pt")
        (args.out / "metrics.json").write_text(json.dumps({k: v for k, v in result.items() if k != "plan"}, indent=2))
        result["out"] = str(args.out)
    if args.json:
        print(json.dumps(result))
        return 0
    for name, lp in plan.layers.items():
        print(f"{name:<28} {lp.method:<8} {str(lp.rank or ''):<14} {lp.precision}")
    for name, why in plan.notes.items():
        print(f"left undecomposed: {name} ({why})")
    if allocation is not None:
        print(f"allocated for x{args.target_ratio:g} ({allocation['budget_bytes']:,} bytes): predicted drop "
              f"{allocation['predicted_drop_points']:.2f} points (sum of the per-layer drops on "
              f"{allocation['sensitivity_images']:,} val images), {allocation['predicted_size_bytes']:,} bytes")
    print(f"{'':<12}{'accuracy':>10}{'params':>12}{'size_bytes':>13}{'MACs':>14}")
    for stage in ("before", "compressed", "finetuned"):
        if stage in result:
            m = result[stage]
            print(f"{stage:<12}{m['accuracy']:>10.4f}{m['params']:>12,}{m['size_bytes']:>13,}{m['macs']:>14,}")
    ratios = result["compression"]
    print(f"compression: params x{ratios['params']:.2f}, size x{ratios['size']:.2f}, MACs x{ratios['macs']:.2f}")
    return 0


def run_ranks(args: argparse.Namespace) -> int:
    if not 0.0 <= args.weakening <= 1.0:
        raise AutorankError(f"--weakening {args.weakening} must be in [0, 1]")
    model, _ = load_model_and_data(args)
    total = sum(p.numel() for p in model.parameters())
    rows = []
    for name, layer in find_layers(model, args.include, args.exclude, skip_first=not args.with_first).items():
        weight = layer.weight.detach()
        methods = ("tucker2", "cp", "tt") if isinstance(layer, nn.Conv2d) else ("svd",)
        rows.append({"layer": name, "shape": list(weight.shape), "params": weight.numel(),
                     "share": weight.numel() / total,
                     "ranks": {m: list(vbmf_method_ranks(m, weight, args.weakening)) for m in methods}})
    if args.json:
        print(json.dumps({"model": args.model, "total_params": total, "weakening": args.weakening, "layers": rows}))
        return 0
    print(f"{'layer':<24}{'shape':<18}{'params':>9}{'share':>8}  EVBMF ranks (w={args.weakening:g})")
    for row in rows:
        ranks = "  ".join(f"{m} {','.join(map(str, r))}" for m, r in row["ranks"].items())
        print(f"{row['layer']:<24}{'x'.join(map(str, row['shape'])):<18}{row['params']:>9,}"
              f"{100 * row['share']:>7.1f}%  {ranks}")
    covered = sum(r["params"] for r in rows)
    print(f"{len(rows)} layers, {covered:,} of {total:,} parameters ({100 * covered / max(total, 1):.1f}%)")
    return 0
