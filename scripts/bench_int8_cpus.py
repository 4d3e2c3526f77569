"""int8 on CPUs with and without VNNI: agreement and ONNX Runtime speed of the two int8 weight grids.

The adapted ResNet-20 from ../shared, every conv but the stem kept as it is ("int8 only") or
Tucker-2 at EVBMF ranks weakened with w = 0.2 (the export test's model), int8 weights and
activations calibrated on 512 training images, no fine-tuning, exported through `write_onnx` with
int8 weights on [-127, 127] (autorank before issue 18) and on [-64, 64] (now). For each file:
- agreement with the PyTorch quantization-aware model on a seeded sample of test images, on this
  host and on an emulated AVX2 CPU without VNNI (QEMU user mode, `-cpu Haswell`: VPMADDUBSW);
- ONNX Runtime latency (batch 1) and throughput (batch 128) on this host, next to the fp32 file,
  for the export's default `plan` scope and for ORT's `full` static QDQ (QLinearConv everywhere),
  the files timed in turn over several rounds (medians) so that load affects them alike.
Emulated timings mean nothing, so speed is measured on this host only.

    .venv/bin/python scripts/bench_int8_cpus.py --threads 2 [--images 2000] [--emulated-images 500] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GRIDS = (127, 64)


def _emulated_logits(path: Path, images: Path) -> np.ndarray:
    code = ("import json, numpy as np; from autorank.engine.deploy import INPUT_NAME, onnx_session; "
            f"x = np.load({str(images)!r}); "
            f"print(json.dumps(onnx_session({str(path)!r}, 1).run(None, {{INPUT_NAME: x}})[0].tolist()))")
    done = subprocess.run(["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-c", code], capture_output=True,
                          text=True, check=True, cwd=REPO)
    return np.asarray(json.loads(done.stdout.strip().splitlines()[-1]), np.float32)


def _agreement(path: Path, reference_model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
               threads: int, emulated_images: Path | None) -> str:
    """Accuracies and agreement with PyTorch here and on the emulated CPU, as table cells."""
    from autorank.engine.deploy import INPUT_NAME, onnx_session

    with torch.no_grad():
        reference = reference_model.eval()(images).numpy()
    here = onnx_session(path, threads).run(None, {INPUT_NAME: images.numpy()})[0]
    there = "-"
    if emulated_images is not None:
        emulated = _emulated_logits(path, emulated_images)
        there = f"{(emulated.argmax(1) == reference[: len(emulated)].argmax(1)).mean():.4f}"
    torch_accuracy, onnx_accuracy = ((logits.argmax(1) == labels.numpy()).mean() for logits in (reference, here))
    return (f"{torch_accuracy:.4f} | {onnx_accuracy:.4f} | {(here.argmax(1) == reference.argmax(1)).mean():.4f} "
            f"| {there}")


def _interleaved_speed(paths: dict[str, Path], input_shape: tuple[int, ...], threads: int,
                       rounds: int) -> dict[str, tuple[float, float]]:
    """Median latency (ms) and throughput (img/s) per file, timed in turn `rounds` times, so that a
    busy machine slows every file alike."""
    import statistics

    from autorank.export.bench import benchmark

    runs: dict[str, list] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            runs[name].append(benchmark(path, input_shape, threads=threads))
    return {name: (statistics.median(s.latency_ms for s in speeds), statistics.median(s.throughput for s in speeds))
            for name, speeds in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=2000, help="test images for agreement on this host")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per file")
    parser.add_argument("--emulated-images", type=int, default=500,
                        help="test images on the emulated CPU (0: skip the emulation)")
    args = parser.parse_args()

    from autorank.compression import compress, make_plan
    from autorank.compression.quantize import QMAX
    from autorank.data import load_data
    from autorank.export.api import write_onnx
    from autorank.engine.deploy import to_onnx
    from autorank.export.host import host_report
    from autorank.export.verify import sample_batches
    from autorank.models import create_model

    torch.manual_seed(0)
    data = load_data(f"imagefolder:{SHARED / 'data' / 'cifar10-jpeg.tar.gz'}")
    original = create_model("resnet20", data, SHARED / "models" / "cifar10" / "resnet20-12fca82f-jpeg-adapted.pt")
    generator = torch.Generator().manual_seed(1)
    calibration = [x for x, _ in data.batches("train", 128, shuffle=True, generator=generator, limit=512)]
    images, labels = map(torch.cat, zip(*sample_batches(data, "test", limit=args.images, seed=0)))
    emulate = shutil.which("qemu-x86_64") is not None and args.emulated_images > 0
    print(f"host: {json.dumps(host_report())}")
    print(f"threads {args.threads}; agreement on {len(labels)} test images here, "
          f"{min(args.emulated_images, len(labels)) if emulate else 0} on the emulated AVX2 CPU")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        to_onnx(original.eval(), data.input_shape, tmp / "fp32.onnx")
        with torch.no_grad():
            accuracy = (original.eval()(images).argmax(1) == labels).float().mean()
        print(f"fp32 PyTorch accuracy {accuracy:.4f}")
        np.save(tmp / "images.npy", images[: args.emulated_images].numpy())
        print("| model, int8 weights | scope | PyTorch accuracy | ONNX accuracy | agreement here "
              "| agreement, AVX2 without VNNI (emulated) |")
        print("|---|---|---|---|---|---|")
        default = QMAX["int8"]
        recipes = {"int8 only": ("none", None), "Tucker-2 vbmf:0.2 + int8": ("tucker2", "vbmf:0.2")}
        files: dict[tuple[str, str], dict[str, Path]] = {}
        for grid in GRIDS:
            QMAX["int8"] = grid  # the one knob both the quantization-aware model and the export read
            try:
                for label, (method, rank) in recipes.items():
                    plan = make_plan(original, method, rank, "int8", activations="int8")
                    model = compress(original, plan, calibration=calibration, n_iter_max=10).eval()
                    for scope in ("plan", "full"):
                        path = tmp / f"int8-{grid}-{method}-{scope}.onnx"
                        written = write_onnx(model, data, path, "int8", int8_scope=scope)
                        files.setdefault((label, scope), {})[f"[-{grid}, {grid}]"] = path
                        figures = _agreement(path, written.reference, images, labels, args.threads,
                                             tmp / "images.npy" if emulate else None)
                        print(f"| {label}, [-{grid}, {grid}] | {scope} | {figures} |", flush=True)
            finally:
                QMAX["int8"] = default
        print(f"\nspeed here, {args.threads} threads, median of {args.rounds} interleaved rounds "
              "(latency at batch 1 ms / img/s at batch 128):")
        grids = [f"[-{grid}, {grid}]" for grid in GRIDS]
        print("| model | scope | fp32 | " + " | ".join(f"int8 {g}" for g in grids) + " |")
        print("|---|---|---|" + "---|" * len(grids))
        for (label, scope), paths in files.items():
            speed = _interleaved_speed({"fp32": tmp / "fp32.onnx", **paths}, data.input_shape, args.threads,
                                       args.rounds)
            print(f"| {label} | {scope} | " + " | ".join(f"{ms:.3f} / {ips:,.0f}" for ms, ips in speed.values()) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
