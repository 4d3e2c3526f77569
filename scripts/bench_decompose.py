"""Decomposition time per method for every conv of ResNet-56, and EVBMF time for every layer.

    .venv/bin/python scripts/bench_decompose.py [--rank vbmf|0.5] [--device cpu] [--iters 100]

Uses the adapted ResNet-56 checkpoint from ../shared. Figures go to docs/BENCHMARKS.md
("Decomposition time") with the command that produced them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from autorank.cli.compress import parse_rank
from autorank.compression import find_layers
from autorank.compression.methods import decompose_layer
from autorank.compression.ranks import method_params, resolve_rank, vbmf_method_ranks
from autorank.models import load_weights
from autorank.models.cifar_resnet import cifar_resnet

SHARED = Path(os.environ.get("AUTORANK_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
WEIGHTS = SHARED / "models" / "cifar10" / "resnet56-4bfd9763-jpeg-adapted.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", default="vbmf", help="rank spec for every layer (vbmf, vbmf:W, ratio)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=100, help="CP-ALS / HOOI iterations")
    parser.add_argument("--methods", default="tucker2,cp,tt")
    args = parser.parse_args()

    model = load_weights(cifar_resnet("resnet56", 10, 3), WEIGHTS).to(args.device).eval()
    convs = {n: m for n, m in find_layers(model, skip_first=False).items() if isinstance(m, nn.Conv2d)}
    layers = find_layers(model, skip_first=False)
    print(f"ResNet-56: {len(convs)} convs, {len(layers)} layers; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, device {args.device}, "
          f"load average {os.getloadavg()[0]:.1f}")
    rank = parse_rank(args.rank)

    # EVBMF for every layer: all unfoldings every method needs (Tucker-2 two, TT three, CP via Tucker-2)
    # (wall and process CPU time: on a shared machine the CPU seconds are the steadier figure)
    start, cpu = time.perf_counter(), time.process_time()
    for layer in layers.values():
        for method in (("tucker2", "tt", "cp") if isinstance(layer, nn.Conv2d) else ("svd",)):
            vbmf_method_ranks(method, layer.weight.detach())
    print(f"EVBMF ranks (tucker2+tt+cp, svd for the linear) for all {len(layers)} layers: "
          f"{time.perf_counter() - start:.2f} s wall, {time.process_time() - cpu:.2f} s CPU")

    print(f"{'method':<9}{'rank':>9}{'wall s':>9}{'CPU s':>9}{'mean ms':>9}{'max ms':>9}{'kept params':>13}")
    for method in args.methods.split(","):
        times, kept, total = [], 0, 0
        cpu = time.process_time()
        for layer in convs.values():
            ranks = resolve_rank(method, layer, rank)
            t0 = time.perf_counter()
            decompose_layer(layer, method, ranks, n_iter_max=args.iters)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            kept += method_params(method, tuple(layer.weight.shape), ranks)
            total += layer.weight.numel()
        print(f"{method:<9}{args.rank:>9}{sum(times):>9.2f}{time.process_time() - cpu:>9.2f}"
              f"{1000 * statistics.mean(times):>9.1f}{1000 * max(times):>9.1f}{100 * kept / total:>12.1f}%")


if __name__ == "__main__":
    main()
