"""Engine throughput vs a bare PyTorch loop: ResNet-20 on CIFAR-10, same tensors, same threads.

The bare loop is the floor of what a training step costs (index the in-memory uint8 tensors,
normalise, forward, backward, SGD step; no augmentation, schedule, or divergence checks); the
engine adds batch augmentation, the LR schedule and NaN detection. Runs alternate and the best of
`--repeats` is reported, which keeps other load on a shared machine from favouring either side.

    .venv/bin/python scripts/bench_engine.py            # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from autorank.data import Dataset, load_data
from autorank.engine import TrainConfig, autocast, evaluate, resolve_device, train
from autorank.models import create_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = f"imagefolder:{REPO.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'}"


def bare_train(model: nn.Module, data: Dataset, steps: int, batch_size: int, channels_last: bool, device) -> float:
    images, labels = data.splits["train"]
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)
    loss_fn = nn.CrossEntropyLoss()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        index = order[step * batch_size : (step + 1) * batch_size]
        x = (images[index].to(device).float() / 255 - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = loss_fn(model(x), labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


@torch.inference_mode()
def bare_infer(model: nn.Module, data: Dataset, count: int, batch_size: int, channels_last: bool, bf16: bool,
               device) -> float:
    images, labels = data.splits["val"]
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    start = time.perf_counter()
    for begin in range(0, count, batch_size):
        x = (images[begin : begin + batch_size].to(device).float() / 255 - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, bf16=bf16):
            correct += (model(x).argmax(1) == labels[begin : begin + batch_size].to(device)).sum()
    correct.item()
    return count / (time.perf_counter() - start)


def engine_train(model, data, steps, batch_size, channels_last, device) -> float:
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=0.01, channels_last=channels_last, device=str(device))
    return train(model, data, config).images_per_second


def engine_infer(model, data, count, batch_size, channels_last, bf16, device) -> float:
    start = time.perf_counter()
    evaluate(model, data, "val", batch_size=batch_size, device=str(device), limit=count,
             channels_last=channels_last, bf16=bf16)
    return count / (time.perf_counter() - start)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-images", type=int, default=4096)
    parser.add_argument("--eval-batch-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = load_data(args.data)
    model = create_model("resnet20", data).to(device).to(memory_format=torch.channels_last)
    print(f"ResNet-20, {data.name} {data.input_shape}, device {device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, channels_last, best of {args.repeats}")

    warm = dict(channels_last=True, device=device)
    bare_train(model, data, 3, args.batch_size, **warm)
    engine_train(model, data, 3, args.batch_size, **warm)
    rows = []
    cases = [
        ("train fp32", lambda: engine_train(model, data, args.train_steps, args.batch_size, **warm),
         lambda: bare_train(model, data, args.train_steps, args.batch_size, **warm)),
    ]
    for bf16 in (False, True):
        cases.append((
            f"inference {'bf16' if bf16 else 'fp32'}",
            lambda bf16=bf16: engine_infer(model, data, args.eval_images, args.eval_batch_size, bf16=bf16, **warm),
            lambda bf16=bf16: bare_infer(model, data, args.eval_images, args.eval_batch_size, bf16=bf16, **warm),
        ))
    for bf16 in (False, True):  # oneDNN picks and compiles kernels on first use: keep that out of the timings
        engine_infer(model, data, args.eval_batch_size, args.eval_batch_size, bf16=bf16, **warm)
        bare_infer(model, data, args.eval_batch_size, args.eval_batch_size, bf16=bf16, **warm)
    for name, engine_run, bare_run in cases:
        engine_best = bare_best = 0.0
        for _ in range(args.repeats):
            engine_best = max(engine_best, engine_run())
            bare_best = max(bare_best, bare_run())
        rows.append((name, engine_best, bare_best))

    print(f"{'':16} {'engine img/s':>13} {'bare img/s':>11} {'ratio':>6}")
    for name, engine_ips, bare_ips in rows:
        print(f"{name:16} {engine_ips:13.0f} {bare_ips:11.0f} {engine_ips / bare_ips:6.2f}")


if __name__ == "__main__":
    main()
