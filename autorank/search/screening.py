"""Multi-fidelity screening: every sampled candidate is screened zero-shot, only the best are fine-tuned.

Two fidelities and MO-ASHA's rule (Schmucker et al. 2021: successive halving that ranks candidates by
non-dominated sorting instead of a scalar; written here because Optuna's pruners are single-objective):

- **Screen** (fidelity 0): the candidate's plan is compressed with the trials' data-aware fit and
  evaluated *without fine-tuning* on `screening.images` stratified val images; its size, params and
  MACs are already final, and so are its `ort_*` figures (predicted from the latency table) when the
  search has one. Figures: the trial's user attr `screen` (and `screen_*` in MLflow).
- **Promote** (to fidelity 1, the normal trial's fine-tune): after each batch of `screening.batch`
  screens, every candidate screened so far is ranked by non-dominated sorting on the space's
  objectives at the screening fidelity (ties within a front: larger crowding distance first, then
  trial number). A batch member is promoted when it is among the best ceil(`screening.keep` x n) or
  dominates a candidate already promoted, unless a candidate screened out before dominates it.
  The others are told PRUNED (state `screened`); promoted ones run in that order.

So no candidate is fine-tuned while one that dominates it at the screening fidelity was screened
out (a dominating candidate ranks lower; one screened later than a promoted candidate it dominates
is promoted too; tested by simulation), with one exception: when `search.steps_budget` runs out in
a batch, its remaining promotable members are screened out. Warm starts skip the screen: they are
the baselines to beat.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from torch import nn

from autorank import engine
from autorank.compression import Plan, profile
from autorank.data import Dataset
from autorank.records import TrialRecord, dominates
from autorank.search.allocation import DropCosts
from autorank.search.study import drop_costs
from autorank.search.trial import (TrialContext, compress_trial, failed_record, latency_figures, run_trial, summarize,
                                   trial_plan)

SCREEN_ATTR = "screen"


def nondominated_ranks(figures: Mapping[int, Mapping[str, float]], objectives: Sequence[str]) -> dict[int, int]:
    """Non-dominated sorting: rank 0 for the candidates nobody dominates, 1 for those only rank-0 ones
    dominate, and so on."""
    remaining, ranks, rank = dict(figures), {}, 0
    while remaining:
        front = [n for n, f in remaining.items()
                 if not any(dominates(g, f, objectives) for m, g in remaining.items() if m != n)]
        for n in front:
            ranks[n] = rank
            del remaining[n]
        rank += 1
    return ranks


def crowding(figures: Mapping[int, Mapping[str, float]], members: Sequence[int],
             objectives: Sequence[str]) -> dict[int, float]:
    """NSGA-II's crowding distance of each member within its front (boundary members: infinite)."""
    distance = dict.fromkeys(members, 0.0)
    for name in objectives:
        ordered = sorted(members, key=lambda n: figures[n][name])
        span = figures[ordered[-1]][name] - figures[ordered[0]][name]
        distance[ordered[0]] = distance[ordered[-1]] = math.inf
        for before, n, after in zip(ordered, ordered[1:], ordered[2:]):
            if span > 0:
                distance[n] += (figures[after][name] - figures[before][name]) / span
    return distance


def promotion_order(figures: Mapping[int, Mapping[str, float]], objectives: Sequence[str]) -> list[int]:
    """Candidates from most to least promotable: non-dominated rank, then crowding distance, then number."""
    ranks = nondominated_ranks(figures, objectives)
    crowd: dict[int, float] = {}
    for rank in set(ranks.values()):
        crowd.update(crowding(figures, [n for n, r in ranks.items() if r == rank], objectives))
    return sorted(figures, key=lambda n: (ranks[n], -crowd[n], n))


def promotions(figures: Mapping[int, Mapping[str, float]], batch: Sequence[int], promoted: Sequence[int],
               screened_out: Sequence[int], objectives: Sequence[str], keep: float) -> list[int]:
    """The batch members to fine-tune, most promotable first (module docstring). `figures`: the screen
    figures of every candidate screened so far, the batch's included."""
    order = promotion_order(figures, objectives)
    top = set(order[:math.ceil(keep * len(figures))])
    chosen = []
    for n in order:
        if n not in batch or any(dominates(figures[m], figures[n], objectives) for m in screened_out):
            continue
        if n in top or any(dominates(figures[n], figures[p], objectives) for p in promoted):
            chosen.append(n)
    return chosen


def screen(ctx: TrialContext, data: Dataset, subset: Dataset, params: Mapping[str, Any],
           costs: DropCosts = DropCosts()) -> tuple[Plan, dict[str, float], nn.Module, dict[str, float]]:
    """(plan, table prediction, compressed model, screen figures) of a candidate: zero-shot, no fine-tune."""
    start = time.perf_counter()
    plan, predicted = trial_plan(ctx, params, costs=costs)
    model = compress_trial(ctx, data, plan)
    compressed = time.perf_counter()
    accuracy = engine.evaluate(model, subset, "val", device=ctx.device,
                               channels_last=ctx.space.finetune.channels_last)
    stats = profile(model, data.input_shape)
    figures = {"accuracy": accuracy, "size_bytes": float(stats.size_bytes), "params": float(stats.params),
               "macs": float(stats.macs), "images": float(len(subset.split("val")[1])),
               "compress_s": compressed - start, "eval_s": time.perf_counter() - compressed}
    if "latency_ms" in ctx.space.objectives:
        figures["latency_ms"] = engine.latency_ms(model, data.input_shape, device=ctx.device)
    figures.update(latency_figures(ctx, plan))  # ort_* objectives rank screens too (screening runs in the driver)
    return plan, predicted, model, figures


Tell = Callable[[optuna.trial.Trial, TrialRecord], None]


def run_screened(study: optuna.Study, ctx: TrialContext, data: Dataset, budget_left: Callable[[int], bool],
                 can_finetune: Callable[[], bool], tell: Tell) -> None:
    """The local executor with screening (module docstring): batches of screens, then promotions."""
    options = ctx.space.screening
    subset = data.sample("val", options.images, seed=ctx.space.seed)
    started = 0
    while budget_left(started):
        batch: dict[int, tuple[optuna.trial.Trial, dict[str, Any], tuple]] = {}
        while len(batch) < options.batch and budget_left(started):
            trial = study.ask()
            started += 1
            params = ctx.space.suggest(trial, ctx.groups)
            seed = trial.user_attrs.get("seed")
            if seed is not None:  # warm starts: the full trial
                tell(trial, run_trial(ctx, data, params, trial.number, seed=seed))
                continue
            try:
                plan, predicted, model, figures = screen(ctx, data, subset, params,
                                                         drop_costs(study, trial, ctx.space, ctx.table))
            except Exception as exc:  # noqa: BLE001 - a failing candidate is recorded, the search goes on
                tell(trial, failed_record(trial.number, params, exc, ctx.out_dir))
                continue
            trial.set_user_attr(SCREEN_ATTR, figures)
            batch[trial.number] = (trial, params, (plan, predicted, model, figures["compress_s"]))
        if batch:
            _decide(study, ctx, data, batch, can_finetune, tell)


def _decide(study: optuna.Study, ctx: TrialContext, data: Dataset, batch: dict, can_finetune: Callable[[], bool],
            tell: Tell) -> None:
    """Fine-tune the batch's promoted candidates (in promotion order), screen out the others."""
    trials = [t for t in study.get_trials(deepcopy=False) if SCREEN_ATTR in t.user_attrs
              and not t.user_attrs.get("interrupted")]
    figures = {t.number: t.user_attrs[SCREEN_ATTR] for t in trials}
    promoted = [t.number for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
    screened_out = [t.number for t in trials if t.state == TrialState.PRUNED]
    chosen = promotions(figures, list(batch), promoted, screened_out, ctx.space.objectives, ctx.space.screening.keep)
    for number in chosen + [n for n in batch if n not in chosen]:
        trial, params, (plan, predicted, model, compress_s) = batch[number]
        if number in chosen and can_finetune():
            outcome = run_trial(ctx, data, params, number, screened=(plan, predicted, model, compress_s))
        else:
            outcome = TrialRecord(number=number, state="screened", params=dict(params), plan=json.loads(plan.to_json()),
                                  summary=summarize(plan))
        tell(trial, outcome)
