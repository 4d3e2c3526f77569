"""The final fine-tune: when the trials are done, the best front members train `final.steps` more.

A trial's brief fine-tune ranks plans; it does not finish them (100 steps cannot repair a deep rank
cut, docs/SEARCH.md). So a search ends by fine-tuning the `final.top` most accurate members of the
feasible front (the unconstrained front fills up when fewer are feasible) for `final.steps` steps at
`final.lr` (default the trials' LR), with the trials' recipe (distillation, QAT, LR schedule) but
without the guard, and measures them again on val. `final.start: trial` continues each from its
saved weights; `fitted` compresses its plan again (the same data-aware fit, so the same start as the
trial's) and fine-tunes that: a fresh schedule at a higher LR recovered more in a probe
(docs/SEARCH.md, "Final fine-tune"). The guard protects a brief fine-tune of a fitted start; against a
trial chosen for its val score it keeps that start even where the longer fine-tune gains on test.
The uncompressed reference gets the same budget once (`final_reference`: the trials' steps and then
the final ones, or with `fitted` the final ones from the pretrained weights), so drops and ratios
compare like with like.

Finished Optuna trials are frozen, so the figures live in the study's user attrs (`final:<n>`,
`final_reference`), beside `trials/<n>/final.pt` and `final.json`; `TrialRecord.figures` prefers
them, and with it the front, `autorank best`, `autorank export` and MLflow. Trials already finalized
keep their figures; a resumed search finalizes only the members that lack them. A final fine-tune
that fails (divergence included) is recorded with its reason and the trial keeps its own figures.
"""

from __future__ import annotations

import copy
import json
import time
import traceback
from collections.abc import Callable, Sequence

import optuna
import torch

from autorank import engine
from autorank.compression import Plan, load_compressed
from autorank.data import Dataset
from autorank.records import FINAL_WEIGHTS_FILE, WEIGHTS_FILE, TrialRecord, pareto_front
from autorank.search.results import FINAL_ATTR, FINAL_FILE, FINAL_REFERENCE_ATTR, PLAN_FILE
from autorank.search.trial import TrialContext, compress_trial, finetune_and_measure


def final_candidates(trials: Sequence[TrialRecord], objectives: Sequence[str], top: int) -> list[TrialRecord]:
    """The `top` most accurate members of the feasible front, then of the unconstrained front, by figures."""
    chosen: list[TrialRecord] = []
    for feasible_only in (True, False):
        front = sorted(pareto_front(trials, objectives, feasible_only=feasible_only),
                       key=lambda t: (-t.figures["accuracy"], t.figures["size_bytes"], t.number))
        chosen += [t for t in front if t.number not in {c.number for c in chosen}][:top - len(chosen)]
    return chosen


def final_reference(ctx: TrialContext, data: Dataset) -> dict[str, float]:
    """The uncompressed model given the finalists' budget (module docstring): what final figures face."""
    model = copy.deepcopy(ctx.model)
    final = ctx.space.final
    if final.start == "trial" and ctx.space.finetune.steps > 0:
        engine.train(model, data, ctx.train_config(), teacher=ctx.model)
    return finetune_and_measure(model, data, ctx, steps=final.steps, lr=final.lr, guard=False)


def finalize_trial(ctx: TrialContext, data: Dataset, record: TrialRecord, reference: dict[str, float]) -> dict:
    """Fine-tune one trial's model (`final.start`); its final figures and constraints, or the reason it failed."""
    start = time.perf_counter()
    folder = record.directory
    recipe = ctx.space.final
    try:
        plan = Plan.from_json((folder / PLAN_FILE).read_text())
        if recipe.start == "fitted":
            model = compress_trial(ctx, data, plan)
        else:
            state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
            model = load_compressed(ctx.model, plan, state)
        metrics = finetune_and_measure(model, data, ctx, steps=recipe.steps, lr=recipe.lr, plan=plan, guard=False)
        metrics["ratio"] = reference["size_bytes"] / metrics["size_bytes"]
        metrics["drop_points"] = (reference["accuracy"] - metrics["accuracy"]) * 100
        metrics["steps"] = float(recipe.steps)
        metrics["wall_s"] = time.perf_counter() - start
        torch.save(model.state_dict(), folder / FINAL_WEIGHTS_FILE)
        final = {"metrics": metrics, "constraints": ctx.space.constraints.violations(metrics, reference)}
    except Exception as exc:  # noqa: BLE001 - a failed final fine-tune is recorded; the trial keeps its figures
        final = {"reason": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
        (folder / "final-error.txt").write_text(traceback.format_exc())
    (folder / FINAL_FILE).write_text(json.dumps({"trial": record.number, **final}, indent=2))
    return final


def run_final(study: optuna.Study, ctx: TrialContext, data: Dataset, snapshot: Callable[[], list[TrialRecord]],
              on_done: Callable[[], None], say: Callable[[str], None]) -> None:
    """Final fine-tune of the front's best members that have no final figures yet (module docstring)."""
    final = ctx.space.final
    chosen = [t for t in final_candidates(snapshot(), ctx.space.objectives, final.top) if t.final is None]
    needed = PLAN_FILE if final.start == "fitted" else WEIGHTS_FILE
    chosen = [t for t in chosen if t.directory is not None and (t.directory / needed).is_file()]
    if not chosen:
        return
    reference = study.user_attrs.get(FINAL_REFERENCE_ATTR)
    lr = final.lr if final.lr is not None else ctx.space.finetune.lr
    if reference is None:
        budget = f"{final.steps}" if final.start == "fitted" else f"{ctx.space.finetune.steps} + {final.steps}"
        say(f"final fine-tune: the uncompressed reference, {budget} steps (lr {lr:g})")
        reference = final_reference(ctx, data)
        study.set_user_attr(FINAL_REFERENCE_ATTR, reference)
    for i, record in enumerate(chosen, 1):
        how = "from its fitted start" if final.start == "fitted" else "more"
        say(f"final fine-tune: trial {record.number} ({i}/{len(chosen)}), {final.steps} steps {how} (lr {lr:g})")
        study.set_user_attr(f"{FINAL_ATTR}{record.number}", finalize_trial(ctx, data, record, reference))
        on_done()
