"""The fit and evaluate loops every later stage uses.

One place decides the device, memory format and mixed precision, and detects divergence, so a
search trial, `autorank train` and a benchmark all run the same loop.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from autorank.compression import profile
from autorank.data import Dataset
from autorank.errors import AutorankError, TrialDiverged

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")


@dataclass
class TrainConfig:
    """How long and how to fit: give `steps` or `epochs` (a float: 0.5 is half a pass)."""

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd (Nesterov when momentum > 0) | adamw
    lr: float = 0.01  # the peak LR for onecycle
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | onecycle | constant
    warmup: int = 0  # steps of linear LR warm-up (cosine/constant): a good start is not thrown away
    distill: float = 0.0  # weight of the teacher's KL term (needs `teacher` in `train`); 0 = plain CE
    temperature: float = 4.0  # distillation temperature T (the KL term is scaled by T^2)
    guard: int = 0  # val images (stratified) the result must not score below the start on; 0 = off
    device: str = "auto"
    channels_last: bool = False
    bf16: bool = False  # bf16 autocast (CPU or GPU)
    amp: bool = False  # fp16 autocast + gradient scaling on CUDA; bf16 autocast elsewhere
    seed: int = 0
    progress: bool = False

    def validate(self) -> None:
        """Raise AutorankError for settings that cannot train, before anything runs."""
        if (self.steps is None) == (self.epochs is None):
            raise AutorankError("give exactly one of steps or epochs")
        if self.steps is not None and self.steps < 1:
            raise AutorankError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise AutorankError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise AutorankError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise AutorankError(f"learning rate must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise AutorankError(f"unknown optimizer {self.optimizer!r}: choose from {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise AutorankError(f"unknown schedule {self.schedule!r}: choose from {', '.join(SCHEDULES)}")
        if self.warmup < 0:
            raise AutorankError(f"warm-up steps must be >= 0, got {self.warmup}")
        if not 0.0 <= self.distill <= 1.0:
            raise AutorankError(f"distillation weight must be in [0, 1], got {self.distill}")
        if not self.temperature > 0:
            raise AutorankError(f"distillation temperature must be > 0, got {self.temperature}")
        if self.guard < 0:
            raise AutorankError(f"guard images must be >= 0, got {self.guard}")


@dataclass
class TrainResult:
    steps: int
    epochs: float
    images: int
    seconds: float
    final_loss: float  # mean training loss over the last steps (up to 50)
    losses: list[float] = field(repr=False, default_factory=list)  # per-step training loss
    guard: tuple[float, float] | None = None  # (start, end) val accuracy on the guard images
    kept_start: bool = False  # the fine-tune scored below its start there, so the start was restored

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU; an unavailable device is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AutorankError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AutorankError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise AutorankError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA devices exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise AutorankError(f"device {name!r} requested but MPS is not available")
    return device


def autocast(device: torch.device, *, bf16: bool = False, amp: bool = False) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass: fp16 for AMP on CUDA, bf16 otherwise; a no-op when off."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if bf16 or amp:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise AutorankError("the model has no trainable parameters")
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
        nesterov=config.momentum > 0,
    )


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps: int):
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps)
    warm = min(config.warmup, steps - 1)

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the logits softened at `temperature`, times T^2 (Hinton et al. 2015),
    so that its gradients keep their scale whatever T; exactly 0 when the logits agree."""
    t = temperature
    return nn.functional.kl_div(nn.functional.log_softmax(student.float() / t, dim=1),
                                nn.functional.log_softmax(teacher.float() / t, dim=1),
                                reduction="batchmean", log_target=True) * t * t


def train(model: nn.Module, data: Dataset, config: TrainConfig, teacher: nn.Module | None = None) -> TrainResult:
    """Fit `model` in place on the train split (augmented when the data suits it).

    With `config.distill > 0` the loss is (1 - distill) * CE + distill * `distillation_loss` against
    `teacher` (e.g. the uncompressed model; a copy runs in eval mode, the original is left alone).
    With `config.guard` > 0 the model is scored on that many stratified val images before and after;
    if it ends lower, its starting weights are put back: a brief fine-tune of a well-fitted start
    (a data-aware CP chain) can lose more than it repairs (docs/COMPRESSION.md, "Fine-tune recipe").
    Raises TrialDiverged as soon as the loss is NaN or infinite.
    """
    config.validate()
    if config.distill > 0 and teacher is None:
        raise AutorankError("distillation (distill > 0) needs a teacher model")
    device = resolve_device(config.device)
    n_train = len(data.split("train")[1])
    batch_size = min(config.batch_size, n_train)
    batches_per_epoch = max(1, n_train // batch_size)  # incomplete last batches are dropped
    steps = config.steps if config.steps is not None else max(1, round(config.epochs * batches_per_epoch))

    guard_start = None
    if config.guard:
        start_state = copy.deepcopy(model.state_dict())
        guard_start = evaluate(model, data, "val", limit=config.guard, seed=config.seed, device=config.device,
                               channels_last=config.channels_last)
    torch.manual_seed(config.seed)  # dropout and other in-model randomness
    generator = torch.Generator().manual_seed(config.seed)
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = _optimizer(model, config)
    scheduler = _scheduler(optimizer, config, steps)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    loss_fn = nn.CrossEntropyLoss()
    if config.distill > 0:
        teacher = copy.deepcopy(teacher).to(device).eval()
        if config.channels_last:
            teacher.to(memory_format=torch.channels_last)
    check_every = 1 if device.type == "cpu" else 20  # a finiteness check syncs the GPU
    progress = _progress_bar(steps, config.progress)

    losses: list[torch.Tensor] = []
    step, start = 0, time.perf_counter()
    while step < steps:
        for x, y in data.batches(
            "train", batch_size, shuffle=True, augment=data.augment, device=device,
            generator=generator, channels_last=config.channels_last,
        ):
            if len(y) < batch_size:
                break
            with autocast(device, bf16=config.bf16, amp=config.amp):
                logits = model(x)
                loss = loss_fn(logits, y)
                if config.distill > 0:
                    with torch.no_grad():
                        target = teacher(x)
                    loss = (1 - config.distill) * loss + config.distill * distillation_loss(
                        logits, target, config.temperature)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(loss.detach())
            step += 1
            if step % check_every == 0 or step == steps:
                _check_finite(losses[-check_every:], step)
            if progress is not None and (step % 10 == 0 or step == steps):
                progress.update(step - progress.n)
                progress.set_postfix(loss=f"{losses[-1].item():.4f}")
            if step == steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if progress is not None:
        progress.close()
    history = torch.stack(losses).float().cpu().tolist()
    result = TrainResult(
        steps=steps, epochs=steps * batch_size / n_train, images=steps * batch_size, seconds=seconds,
        final_loss=statistics.fmean(history[-50:]), losses=history,
    )
    if guard_start is not None:
        guard_end = evaluate(model, data, "val", limit=config.guard, seed=config.seed, device=config.device,
                             channels_last=config.channels_last)
        result.guard, result.kept_start = (guard_start, guard_end), guard_end < guard_start
        if result.kept_start:
            model.load_state_dict(start_state)
    return result


def _check_finite(recent: list[torch.Tensor], step: int) -> None:
    values = torch.stack(recent)
    if not bool(torch.isfinite(values).all()):
        raise TrialDiverged(f"training diverged: non-finite loss by step {step}")


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)


def evaluate(
    model: nn.Module,
    data: Dataset,
    split: str = "val",
    *,
    batch_size: int = 512,
    device: str = "auto",
    limit: int | None = None,
    seed: int = 0,
    channels_last: bool = False,
    bf16: bool = False,
) -> float:
    """Top-1 accuracy on `split`, or on a seeded sample of `limit` of its images with every class in
    proportion (`Dataset.sample`); BatchNorm in eval mode."""
    target = resolve_device(device)
    data = data.sample(split, limit, seed=seed)  # also a clear error for an unknown split before moving the model
    was_training = model.training
    # moved outside inference mode: parameters re-created inside it could not be trained afterwards
    model.to(target).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    try:
        correct, seen = _count_correct(model, data, split, batch_size, target, channels_last, bf16)
    finally:
        model.train(was_training)
    if seen == 0:
        raise AutorankError(f"split {split!r} of {data.name} is empty")
    return correct / seen


@torch.inference_mode()
def _count_correct(model: nn.Module, data: Dataset, split: str, batch_size: int, target: torch.device,
                   channels_last: bool, bf16: bool) -> tuple[int, int]:
    correct = torch.zeros((), dtype=torch.int64, device=target)
    seen = 0
    for x, y in data.batches(split, batch_size, device=target, channels_last=channels_last):
        with autocast(target, bf16=bf16):
            logits = model(x)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    return correct.item(), seen


@torch.inference_mode()
def latency_ms(model: nn.Module, input_shape: tuple[int, ...], *, device: str = "auto", runs: int = 30) -> float:
    """Median wall time of one single-image forward pass (batch 1), after warm-up."""
    target = resolve_device(device)
    was_training = model.training
    model.to(target).eval()
    x = torch.randn(1, *input_shape, device=target)
    times = []
    try:
        for i in range(runs + 5):
            start = time.perf_counter()
            model(x)
            if target.type == "cuda":
                torch.cuda.synchronize(target)
            if i >= 5:
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return 1000.0 * statistics.median(times)


def measure(
    model: nn.Module,
    data: Dataset,
    split: str = "val",
    *,
    batch_size: int = 512,
    device: str = "auto",
    limit: int | None = None,
    seed: int = 0,
    channels_last: bool = False,
    bf16: bool = False,
    latency: bool = True,
) -> dict[str, float | int]:
    """Accuracy (on a stratified sample of `limit` images when given) plus the deployment figures: params,
    size_bytes, MACs at the data's input size, latency (skipped with `latency=False` where only the
    accounting matters)."""
    accuracy = evaluate(
        model, data, split, batch_size=batch_size, device=device, limit=limit, seed=seed,
        channels_last=channels_last, bf16=bf16,
    )
    stats = profile(model, data.input_shape)
    figures: dict[str, float | int] = {
        "accuracy": accuracy,
        "params": int(stats.params),
        "size_bytes": int(stats.size_bytes),
        "macs": int(stats.macs),
    }
    if latency:
        figures["latency_ms"] = latency_ms(model, data.input_shape, device=device)
    return figures
