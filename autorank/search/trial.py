"""One trial: sampled choices -> Plan -> compressed pretrained model -> brief QAT fine-tune -> figures.

`TrialContext` is everything a trial needs besides the data; it pickles, so Ray workers receive
it once through the object store. A trial writes nothing: `compute_trial` returns its `TrialRecord`
and the bytes of its `trials/<n>/` files (`TrialOutput`), and the driver alone writes them
(`save_trial`), so a trial on another machine of a Ray cluster loses nothing. The study and the
tracker are written by the driver alone too. Nor does a trial time anything in ONNX Runtime: it runs
without the latency table, and the driver adds the `ort_*` figures from it (`with_latency`), for
either executor, so timings are never taken beside other trials and the cache file is the driver's.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import math
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autorank import engine
from autorank.compression import LayerPlan, Plan, SensitivityTable, compress, find_layers, profile, resolve_plan
from autorank.compression.quantize import quantize_weights_
from autorank.compression.ranks import full_ranks, resolve_rank, scaled_ranks
from autorank.data import Dataset
from autorank.engine.latency import LatencyTable
from autorank.errors import AutorankError
from autorank.records import WEIGHTS_FILE, TrialRecord
from autorank.search.allocation import DropCosts, LatencyCosts, allocated_plan
from autorank.search.results import METRICS_FILE, PLAN_FILE, TRIALS_DIR
from autorank.search.seeds import Recipe, recipe_plan
from autorank.search.space import Group, SearchSpace


@dataclass
class LayerInfo:
    """A searchable layer: its kind and, per allowed method, EVBMF and full ranks."""

    kind: str                                   # conv | linear
    shape: tuple[int, ...]
    evbmf: dict[str, tuple[int, ...]] = field(default_factory=dict)
    full: dict[str, tuple[int, ...]] = field(default_factory=dict)


def layer_table(model: nn.Module, space: SearchSpace) -> dict[str, LayerInfo]:
    """The searched layers with their EVBMF rank per method (computed once per search)."""
    found = find_layers(model, skip_first=space.skip_first)
    names = space.select_layers(list(found))
    if not names:
        raise AutorankError(f"search space {space.name}: layers.include/exclude select none of the model's "
                            f"layers ({', '.join(list(found)[:6])}{', ...' if len(found) > 6 else ''})")
    kinds = {name: "linear" if isinstance(found[name], nn.Linear) else "conv" for name in names}
    groups = space.groups(kinds)
    table: dict[str, LayerInfo] = {}
    for name in names:
        layer = found[name]
        info = LayerInfo(kind=kinds[name], shape=tuple(layer.weight.shape))
        methods = {m for g in groups if name in g.layers for m in g.methods if m != "none"}
        for method in sorted(methods):
            info.full[method] = full_ranks(method, info.shape)
            if space.rank_mode == "evbmf":
                info.evbmf[method] = tuple(resolve_rank(method, layer, "vbmf"))
        table[name] = info
    return table


def build_plan(space: SearchSpace, groups: Sequence[Group], layers: Mapping[str, LayerInfo],
               params: Mapping[str, Any]) -> Plan:
    """The compression Plan for a trial's params (before `resolve_plan`)."""
    plan_layers: dict[str, LayerPlan] = {}
    for name, (method, rank, precision) in space.layer_choices(params, groups).items():
        if method == "none":
            plan_layers[name] = LayerPlan(method="none", rank=None, precision=precision)
        elif space.rank_mode == "evbmf":
            info = layers[name]
            plan_layers[name] = LayerPlan(method=method, precision=precision,
                                          rank=scaled_ranks(info.evbmf[method], info.full[method], rank))
        else:
            plan_layers[name] = LayerPlan(method=method, rank=float(rank), precision=precision)
    return Plan(layers=plan_layers, activations=params.get("activations", space.activations[0]))


def trial_plan(ctx: TrialContext, params: Mapping[str, Any], seed: str | None = None,
               costs: DropCosts = DropCosts()) -> tuple[Plan, dict[str, float]]:
    """The trial's resolved plan, and in allocate mode what the table predicts for it. `seed`: the
    warm-start name of an enqueued trial; a recipe's trial runs the recipe (autorank.search.seeds).
    `costs`: how allocate mode reads the table (fitted by the driver, `study.drop_costs`)."""
    recipe = Recipe.parse(seed)
    if recipe is not None:
        activations = params.get("activations", ctx.space.activations[0])
        return resolve_plan(ctx.model, recipe_plan(recipe, ctx.groups, activations)), {}
    if ctx.space.mode == "allocate":
        plan, predicted = allocated_plan(ctx.table, ctx.space, ctx.groups, params, ctx.latency_costs, costs)
        return resolve_plan(ctx.model, plan), predicted
    return resolve_plan(ctx.model, build_plan(ctx.space, ctx.groups, ctx.layers, params)), {}


def summarize(plan: Plan) -> str:
    """E.g. 'tucker2 x5, cp x2, none x1 | int8 x6, fp32 x2' (the plan at a glance)."""
    methods = Counter(lp.method for lp in plan.layers.values())
    precisions = Counter(lp.precision for lp in plan.layers.values())
    text = ", ".join(f"{m} x{n}" for m, n in methods.most_common()) + " | " + \
        ", ".join(f"{p} x{n}" for p, n in precisions.most_common())
    return text + (" | act int8" if plan.activations == "int8" else "")


@dataclass
class TrialContext:
    """What every trial of a search shares (pickled once to Ray workers)."""

    space: SearchSpace
    groups: list[Group]
    layers: dict[str, LayerInfo]
    model: nn.Module                  # the pretrained model, never modified
    reference: dict[str, float]       # the uncompressed model after the same fine-tune
    out_dir: Path
    device: str = "auto"
    factors: dict = field(default_factory=dict, repr=False)  # weight-space chains reused across trials
    table: SensitivityTable | None = None  # the search's sensitivity table (allocate mode plans from it)
    latency: LatencyTable | None = None    # measured ONNX Runtime timings (ort_* objectives, max_latency_ms);
    #                                        the driver's only: trials run without it (`with_latency`)
    latency_costs: LatencyCosts | None = None  # the table's candidates' costs (allocate mode's latency budget)

    def train_config(self) -> engine.TrainConfig:
        ft = self.space.finetune
        return engine.TrainConfig(steps=ft.steps, batch_size=ft.batch_size, optimizer=ft.optimizer, lr=ft.lr,
                                  weight_decay=ft.weight_decay, schedule=ft.schedule, warmup=ft.warmup,
                                  guard=ft.guard, distill=ft.distill, temperature=ft.temperature, device=self.device,
                                  channels_last=ft.channels_last, seed=self.space.seed)


def finetune_and_measure(model: nn.Module, data: Dataset, ctx: TrialContext,
                         quantize: Plan | None = None, steps: int | None = None,
                         plan: Plan | None = None, guard: bool = True, lr: float | None = None) -> dict[str, float]:
    """The shared measurement of trials, the reference and the final fine-tune: fine-tune (`steps`,
    default the space's `finetune.steps`), evaluate on val, profile.

    `quantize`: weight precisions applied after fine-tuning (the `qat: false` path). The teacher of
    distillation is the pretrained model, for the trials and the reference alike. `guard=False` drops
    the space's `finetune.guard` (the final fine-tune, docs/SEARCH.md); `lr` replaces `finetune.lr` (`final.lr`)."""
    start = time.perf_counter()
    config = ctx.train_config()
    config = replace(config, steps=config.steps if steps is None else steps, guard=config.guard if guard else 0,
                     lr=config.lr if lr is None else lr)
    kept_start = False
    if config.steps > 0:
        kept_start = engine.train(model, data, config, teacher=ctx.model).kept_start
    if quantize is not None:
        for name, lp in quantize.layers.items():
            for module in model.get_submodule(name).modules():
                if isinstance(module, nn.Conv2d | nn.Linear):
                    quantize_weights_(module, lp.precision)
    trained = time.perf_counter()
    accuracy = engine.evaluate(model, data, "val", device=ctx.device, channels_last=ctx.space.finetune.channels_last)
    evaluated = time.perf_counter()
    stats = profile(model, data.input_shape)
    metrics = {"accuracy": accuracy, "size_bytes": float(stats.size_bytes), "params": float(stats.params),
               "macs": float(stats.macs), "train_s": trained - start, "eval_s": evaluated - trained}
    if config.guard:
        metrics["kept_start"] = float(kept_start)  # the guard put the start back: the fine-tune made it worse
    if "latency_ms" in ctx.space.objectives:
        metrics["latency_ms"] = engine.latency_ms(model, data.input_shape, device=ctx.device)
    metrics.update(latency_figures(ctx, plan))
    if not math.isfinite(accuracy):
        raise AutorankError("evaluation produced a non-finite accuracy")
    return metrics


def latency_figures(ctx: TrialContext, plan: Plan | None) -> dict[str, float]:
    """`ort_latency_ms` and `ort_throughput` of `plan` (None: the uncompressed model) predicted from the
    search's latency table, timing the blocks it lacks; none without a table. Called in the driver only."""
    if ctx.latency is None:
        return {}
    predicted = ctx.latency.predict(plan or Plan())
    return {"ort_latency_ms": predicted.b1_ms, "ort_throughput": predicted.throughput}


def reference_metrics(ctx: TrialContext, data: Dataset) -> dict[str, float]:
    """The uncompressed model, fine-tuned with the trials' budget: the baseline for 'accuracy drop'."""
    pretrained_accuracy = engine.evaluate(ctx.model, data, "val", device=ctx.device)
    metrics = finetune_and_measure(copy.deepcopy(ctx.model), data, ctx)
    return {**metrics, "pretrained_accuracy": pretrained_accuracy}


def compress_trial(ctx: TrialContext, data: Dataset, plan: Plan) -> nn.Module:
    """The trial's compressed model: decomposed, data-aware fitted, fake-quantized (calibrated int8
    activations where the plan has them); with `qat: false` still float, quantized after fine-tuning."""
    ft = ctx.space.finetune
    calibration = None
    if plan.activations == "int8":
        calibration = data.calibration_images(ft.batch_size * ft.calibration_batches, ft.batch_size,
                                              seed=ctx.space.seed)
    fit = data.calibration_images(ft.fit_images, ft.batch_size, seed=ctx.space.seed) if ft.fit else None
    if not ft.qat:  # fine-tune the float decomposition, then quantize its weights (post-training)
        plan = Plan({n: replace(lp, precision="fp32") for n, lp in plan.layers.items()})
    return compress(ctx.model, plan, calibration=calibration, n_iter_max=ft.decompose_iters, seed=ctx.space.seed,
                    fit=fit, factors=ctx.factors)


ERROR_FILE = "error.txt"


@dataclass
class TrialOutput:
    """A finished trial as it travels to the driver: its record and its `trials/<n>/` files (name -> bytes)."""

    record: TrialRecord
    files: dict[str, bytes] = field(default_factory=dict)


def save_trial(out_dir: Path, output: TrialOutput) -> TrialRecord:
    """Write a trial's files into `out_dir/trials/<n>/` (in the driver), replacing whatever an earlier
    attempt left there; returns the record, its directory pointing there."""
    folder = out_dir / TRIALS_DIR / str(output.record.number)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name, content in output.files.items():
        (folder / name).write_bytes(content)
    output.record.directory = folder
    return output.record


def failed_output(number: int, params: Mapping[str, Any], exc: Exception) -> TrialOutput:
    """A failed trial: its reason on one line in the record, its traceback as `error.txt`."""
    record = TrialRecord(number=number, state="failed", params=dict(params),
                         reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
    return TrialOutput(record, {ERROR_FILE: traceback.format_exc().encode()})


def failed_record(number: int, params: Mapping[str, Any], exc: Exception, out_dir: Path) -> TrialRecord:
    """A failed trial's record, its traceback written to trials/<n>/error.txt (in the driver)."""
    return save_trial(out_dir, failed_output(number, params, exc))


def compute_trial(ctx: TrialContext, data: Dataset, params: Mapping[str, Any], number: int,
                  seed: str | None = None, screened: tuple[Plan, dict[str, float], nn.Module, float] | None = None,
                  costs: DropCosts = DropCosts()) -> TrialOutput:
    """Run one trial and return what it produced, writing nothing (`seed`: its warm-start name, if any;
    `costs`: allocate mode's reading of the table; `screened`: the plan, prediction, compressed model and
    compression seconds of its screen, so that it is not compressed twice); any failure (divergence
    included) becomes a failed record with a reason."""
    start = time.perf_counter()
    warnings.filterwarnings("ignore", category=UserWarning, module="tensorly")  # rank clipping notes
    outcome = TrialRecord(number=number, state="complete", params=dict(params))
    try:
        # integer ranks, layers that would not shrink left whole: export rebuilds exactly this model
        plan, predicted = trial_plan(ctx, params, seed, costs) if screened is None else screened[:2]
        outcome.summary = summarize(plan)
        outcome.plan = json.loads(plan.to_json())  # recorded even if compressing it fails
        if screened is None:
            model = compress_trial(ctx, data, plan)
            compress_s = time.perf_counter() - start
        else:
            model, compress_s = screened[2:]
        metrics = finetune_and_measure(model, data, ctx, quantize=None if ctx.space.finetune.qat else plan, plan=plan)
        metrics["compress_s"] = compress_s
        metrics.update(predicted)
        metrics["ratio"] = ctx.reference["size_bytes"] / metrics["size_bytes"]
        metrics["drop_points"] = (ctx.reference["accuracy"] - metrics["accuracy"]) * 100
        weights = io.BytesIO()
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, weights)
        metrics["wall_s"] = time.perf_counter() - start
        outcome.metrics = metrics
        outcome.constraints = ctx.space.constraints.violations(metrics, ctx.reference)
        return TrialOutput(outcome, {WEIGHTS_FILE: weights.getvalue(), PLAN_FILE: plan.to_json().encode(),
                                     METRICS_FILE: _metrics_file(outcome)})
    except Exception as exc:  # noqa: BLE001 - a failing trial is recorded, the search goes on
        failed = failed_output(number, params, exc)
        outcome.state, outcome.metrics, outcome.constraints, outcome.reason = "failed", {}, {}, failed.record.reason
        return TrialOutput(outcome, failed.files)


def _metrics_file(record: TrialRecord) -> bytes:
    """A finished trial's `metrics.json`."""
    summary = {"trial": record.number, "summary": record.summary, "metrics": record.metrics,
               "constraints": record.constraints, "params": record.params}
    return json.dumps(summary, indent=2).encode()


def with_latency(ctx: TrialContext, output: TrialOutput) -> TrialOutput:
    """In the driver: a trial computed without the latency table gets its `ort_*` figures from the
    driver's table, its constraints again (`max_latency_ms`) and its metrics.json rewritten. Nothing to
    add without a table or to a trial that did not complete; a prediction that fails fails the trial."""
    record = output.record
    if ctx.latency is None or record.state != "complete" or record.plan is None:
        return output
    try:
        record.metrics.update(latency_figures(ctx, Plan.from_json(json.dumps(record.plan))))
    except Exception as exc:  # noqa: BLE001 - as in compute_trial: a failing trial is recorded, the search goes on
        failed = failed_output(record.number, record.params, exc)
        record.state, record.metrics, record.constraints, record.reason = "failed", {}, {}, failed.record.reason
        return TrialOutput(record, failed.files)
    record.constraints = ctx.space.constraints.violations(record.metrics, ctx.reference)
    return TrialOutput(record, {**output.files, METRICS_FILE: _metrics_file(record)})


def run_trial(ctx: TrialContext, data: Dataset, params: Mapping[str, Any], number: int,
              seed: str | None = None, screened: tuple[Plan, dict[str, float], nn.Module, float] | None = None,
              costs: DropCosts = DropCosts()) -> TrialRecord:
    """`compute_trial` in the driver's own process, its files saved at once (the local executor, screening);
    like a Ray trial it runs without the latency table, whose figures `with_latency` adds."""
    output = compute_trial(replace(ctx, latency=None), data, params, number, seed=seed, screened=screened,
                           costs=costs)
    return save_trial(ctx.out_dir, with_latency(ctx, output))
