"""`autorank train` and `autorank eval`: fine-tune or measure a model on a dataset."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from autorank.data import load_data
from autorank.engine import OPTIMIZERS, SCHEDULES, TrainConfig, measure, train
from autorank.errors import AutorankError
from autorank.models import check_model_name, create_model
from autorank.models.checkpoints import check_weights_source

DEFAULT_DATA = "digits"
DEFAULT_MODEL = "small_cnn"


def register(subparsers: argparse._SubParsersAction) -> None:
    train_parser = subparsers.add_parser(
        "train", help="fine-tune or train a model and write a checkpoint",
        description="Train MODEL on the train split of DATA, report validation metrics, write a checkpoint.",
    )
    add_model_data_args(train_parser)
    length = train_parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the train split (default 10)")
    defaults = TrainConfig()
    train_parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train_parser.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    train_parser.add_argument("--lr", type=float, default=defaults.lr, help="learning rate, the peak for onecycle (default %(default)s)")
    train_parser.add_argument("--momentum", type=float, default=defaults.momentum)
    train_parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    train_parser.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule)
    add_recipe_args(train_parser)
    train_parser.add_argument("--amp", action="store_true", help="fp16 autocast with loss scaling on CUDA")
    train_parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train_parser.add_argument("--out", type=Path, help="checkpoint path (default MODEL-DATA.pt)")
    train_parser.set_defaults(handler=run_train)

    eval_parser = subparsers.add_parser(
        "eval", help="accuracy, params, size, MACs and latency of a model",
        description="Evaluate MODEL (with --weights) on a split of DATA.",
    )
    add_model_data_args(eval_parser)
    eval_parser.add_argument("--split", choices=("train", "val", "test"), default="val")
    eval_parser.add_argument("--batch-size", type=int, default=512)
    eval_parser.add_argument("--limit", type=int,
                             help="evaluate on N images of the split: a stratified sample (every class in proportion, "
                                  "--seed)")
    eval_parser.set_defaults(handler=run_eval)


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """Warm-up and distillation from the model as loaded (its --weights), shared by train and compress."""
    defaults = TrainConfig()
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="linear LR warm-up steps")
    parser.add_argument("--distill", type=float, default=defaults.distill, metavar="ALPHA",
                        help="weight of the KL to the logits of the model as loaded (the teacher); 0 = plain CE")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="distillation temperature")
    parser.add_argument("--guard", type=int, default=1000, metavar="N",
                        help="score the model on N stratified val images before and after training; keep the start "
                             "if the result is worse (0 = off; default 1000)")


def add_model_data_args(parser: argparse.ArgumentParser) -> None:
    """The options every command that loads a model and a dataset shares."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="zoo name or module:pkg.mod:factory")
    parser.add_argument("--weights", help="checkpoint path, URL, or a CIFAR ResNet name for its public checkpoint")
    parser.add_argument(
        "--data", default=DEFAULT_DATA, help="digits | cifar10[:ROOT] | imagefolder:PATH (folder or .tar.gz)"
    )
    parser.add_argument("--cache-dir", type=Path, help="decoded-data cache (default $AUTORANK_CACHE or ~/.cache/autorank)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | mps")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convs on CPU)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def load_model_and_data(args: argparse.Namespace):
    """Validate names and paths first, then load data and build the model."""
    check_model_name(args.model)
    if args.weights:
        check_weights_source(args.weights)
    data = load_data(args.data, cache_dir=args.cache_dir, seed=args.seed)
    torch.manual_seed(args.seed)
    return create_model(args.model, data, args.weights), data


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>12}: {value:.4f}" if isinstance(value, float) else f"{key:>12}: {value}")


def run_train(args: argparse.Namespace) -> int:
    config = TrainConfig(
        steps=args.steps,
        epochs=None if args.steps is not None else (10.0 if args.epochs is None else args.epochs),
        batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, schedule=args.schedule, warmup=args.warmup, distill=args.distill,
        temperature=args.temperature, guard=args.guard, device=args.device,
        channels_last=args.channels_last, bf16=args.bf16, amp=args.amp, seed=args.seed,
        progress=not args.no_progress and not args.json,
    )
    config.validate()
    if config.distill > 0 and not args.weights:
        raise AutorankError("--distill needs --weights: the teacher is the model as loaded")
    model, data = load_model_and_data(args)
    fitted = train(model, data, config, teacher=copy.deepcopy(model) if config.distill > 0 else None)
    metrics = measure(model, data, "val", device=args.device, channels_last=args.channels_last, bf16=args.bf16)
    out = args.out or Path(f"{args.model.replace(':', '_')}-{data.name}.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "model": args.model,
         "data": args.data, "metrics": metrics},
        out,
    )
    result = {
        "model": args.model, "data": args.data, "split": "val", **metrics, "steps": fitted.steps,
        "epochs": round(fitted.epochs, 3), "train_loss": fitted.final_loss,
        "train_images_per_s": round(fitted.images_per_second, 1), "checkpoint": str(out),
    }
    _print(result, args.json)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise AutorankError("--batch-size and --limit must be >= 1")
    model, data = load_model_and_data(args)
    metrics = measure(
        model, data, args.split, batch_size=args.batch_size, device=args.device, limit=args.limit, seed=args.seed,
        channels_last=args.channels_last, bf16=args.bf16,
    )
    _print({"model": args.model, "data": args.data, "split": args.split, **metrics}, args.json)
    return 0
