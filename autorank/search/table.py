"""The search's sensitivity table: measured once per search, before the first trial, kept in its folder.

Each layer's row (its candidates, each measured with only that layer compressed: see
`autorank.engine.sensitivity`) is appended to `OUT/sensitivity.rows.jsonl` as soon as it is
measured, so a search killed while measuring resumes without measuring finished rows again; the
finished table is `OUT/sensitivity.json` (and the heatmap `OUT/sensitivity.png`), which a resumed
search reuses as it is. With the Ray executor the rows are Ray tasks, one per layer, spread over the
cluster like trials (same resources per task); otherwise they run here, one after another, sharing
the search's cache of weight-space factors with the trials that follow.

Candidates follow the search space: per layer its methods and precisions (rules included), rank
levels at multiples of the layer's EVBMF ranks (`sensitivity.levels`: EVBMF is the prior) and, where
`sensitivity.retention` names them, at fractions of each layer's parameters (one level keeps the
same fraction of every layer: what a stage-tied plan needs to be uniform, docs/SEARCH.md), measured
on `sensitivity.images` stratified val images, with the trials' decomposition iterations and seed and,
when the trials fit (`finetune.fit`), a data-aware fit to `sensitivity.fit_images` training images
(fewer than the trials' 512: the table needs the order of the candidates, not the trials' exact
figures).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from autorank.compression import Candidate, SensitivityTable
from autorank.data import Dataset
from autorank.engine.sensitivity import TableJob, measure_layer, plan_table
from autorank.errors import AutorankError
from autorank.search.allocation import table_choices
from autorank.search.executors import custom_resources, trial_device
from autorank.search.space import SearchSpace
from autorank.search.trial import TrialContext

TABLE_FILE = "sensitivity.json"
ROWS_FILE = "sensitivity.rows.jsonl"
HEATMAP_FILE = "sensitivity.png"

Record = Callable[[str, list[Candidate]], None]


def table_levels(space: SearchSpace) -> list[str | float]:
    """The table's rank levels: multiples of each layer's EVBMF ranks, then parameter-retention fractions."""
    return [f"vbmf*{m:g}" for m in space.sensitivity.levels] + list(space.sensitivity.retention)


def table_job(ctx: TrialContext, data: Dataset) -> TableJob:
    """The table of `ctx`'s search, validated and ready to measure (nothing measured per layer yet)."""
    space, ft = ctx.space, ctx.space.finetune
    calibration = None
    if space.activations[0] == "int8":
        calibration = data.calibration_images(ft.batch_size * ft.calibration_batches, ft.batch_size, seed=space.seed)
    fit = data.calibration_images(space.sensitivity.fit_images, ft.batch_size, seed=space.seed) if ft.fit else None
    return plan_table(ctx.model, data, layers=table_choices(space, ctx.groups),
                      levels=table_levels(space), activations=space.activations[0],
                      calibration=calibration, limit=space.sensitivity.images, seed=space.seed, device=ctx.device,
                      n_iter_max=ft.decompose_iters, compress_options=None if fit is None else {"fit": fit})


def _header(job: TableJob) -> dict:
    """What the rows file must have been measured with for its rows to count."""
    return {"settings": job.settings, "layers": list(job.planned), "images": len(job.subset.split(job.split)[1]),
            "split": job.split, "seed": job.seed, "activations": job.activations}


def _read_rows(path: Path, header: dict) -> tuple[dict[str, list[Candidate]], float]:
    """The rows a previous run finished (and the seconds they took). The file is rewritten with only
    complete lines, so that a line half-written by a kill never merges with the next one."""
    if not path.is_file():
        path.write_text(json.dumps(header) + "\n")
        return {}, 0.0
    lines = path.read_text().splitlines()
    try:
        stored = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        stored = None
    if stored != json.loads(json.dumps(header)):
        raise AutorankError(f"{path} holds sensitivity rows measured with other settings than this search's; "
                            "delete it to measure them again")
    rows: dict[str, list[Candidate]] = {}
    seconds = 0.0
    kept = [lines[0]]
    for line in lines[1:]:
        try:
            raw = json.loads(line)
            rows[raw["layer"]] = [Candidate(**c) for c in raw["candidates"]]
            seconds += raw["seconds"]
            kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # the line a kill interrupted
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(kept) + "\n")
    os.replace(tmp, path)
    return rows, seconds


def search_table(ctx: TrialContext, data: Dataset, *, executor: str, resources: dict[str, float],
                 say: Callable[[str], None]) -> SensitivityTable:
    """The search's table: reused from its folder, completed from the rows a killed run left, or measured."""
    done = ctx.out_dir / TABLE_FILE
    if done.is_file():
        return SensitivityTable.from_json(done.read_text())
    started = time.perf_counter()
    job = table_job(ctx, data)
    rows_path = ctx.out_dir / ROWS_FILE
    rows, seconds = _read_rows(rows_path, _header(job))
    missing = [name for name in job.planned if name not in rows]
    candidates = sum(len(job.planned[name]) for name in missing)
    say(f"sensitivity table: {len(missing)} of {len(job.planned)} layers to measure ({candidates} candidates on "
        f"{len(job.subset.split(job.split)[1]):,} val images)" + (f"; {len(rows)} kept from the last run" if rows else ""))
    last = started

    def record(name: str, row: list[Candidate]) -> None:
        nonlocal last, seconds
        now = time.perf_counter()
        with rows_path.open("a") as f:
            f.write(json.dumps({"layer": name, "seconds": now - last,
                                "candidates": [asdict(c) for c in row]}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        rows[name], seconds, last = row, seconds + (now - last), now
        say(f"sensitivity table: {name} ({len(rows)}/{len(job.planned)}), worst drop "
            f"{max(c.drop for c in row):.2f} points")

    if executor == "ray" and missing:
        _measure_ray(job, missing, record, resources)
    else:
        for name in missing:
            record(name, measure_layer(job, name, factors=ctx.factors))
    table = job.assemble(rows, seconds)
    tmp = done.with_name(f".{done.name}.tmp")
    tmp.write_text(table.to_json())
    os.replace(tmp, done)
    rows_path.unlink(missing_ok=True)
    return table


def write_heatmap(table: SensitivityTable, out_dir: Path) -> Path:
    path = out_dir / HEATMAP_FILE
    plot_sensitivity(path, table)
    return path


def plot_sensitivity(path: Path, table: SensitivityTable) -> None:
    """Heatmap of a sensitivity table: layers x candidate kinds, colour = accuracy drop in points
    (negative drops, the subset's noise, shown as 0; blank where a layer has no such candidate)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kinds = list(dict.fromkeys(c.kind for cands in table.layers.values() for c in cands))
    names = list(table.layers)
    drops = np.full((len(names), len(kinds)), np.nan)
    for i, cands in enumerate(table.layers.values()):
        for c in cands:
            drops[i, kinds.index(c.kind)] = max(c.drop, 0.0)
    fig = Figure(figsize=(2.5 + 0.6 * len(kinds), 1.5 + 0.3 * len(names)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(drops), cmap="magma_r", aspect="auto", vmin=0.0)
    fig.colorbar(image, ax=ax, label="accuracy drop (points)")
    if drops.size <= 600:
        top = np.nanmax(drops) if np.isfinite(drops).any() else 0.0
        for (i, j), value in np.ndenumerate(drops):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=6,
                        color="white" if value > 0.6 * top else "black")
    ax.set_xticks(range(len(kinds)), kinds, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title(f"one layer compressed at a time, no fine-tune: drop vs {100 * table.reference_accuracy:.2f}% "
                 f"on {table.images:,} {table.split} images", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _measure_task(job: TableJob, name: str) -> list[Candidate]:
    """One layer's row in a Ray worker (threads as Ray granted them), on the device a trial would use
    there: `auto` is the GPU Ray assigned the task, or the CPU, never a GPU another task holds."""
    import ray
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    warnings.filterwarnings("ignore", category=UserWarning, module="tensorly")
    return measure_layer(replace(job, device=trial_device(job.device, ray.get_gpu_ids())), name)


def _measure_ray(job: TableJob, names: list[str], record: Record, resources: dict[str, float]) -> None:
    """One Ray task per layer, with a trial's resources; rows are recorded here as they finish."""
    import ray

    shared = ray.put(job)
    task = ray.remote(_measure_task).options(num_cpus=resources["cpu"], num_gpus=resources.get("gpu", 0.0),
                                             resources=custom_resources(resources), max_retries=0)
    pending = {task.remote(shared, name): name for name in names}
    while pending:
        finished, _ = ray.wait(list(pending), num_returns=1)
        for ref in finished:
            name = pending.pop(ref)
            try:
                row = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - Ray wraps the worker's error; report it in one line
                cause = getattr(exc, "cause", None) or exc
                raise AutorankError(f"sensitivity table: measuring {name} failed: "
                                    f"{type(cause).__name__}: {cause}".splitlines()[0]) from None
            record(name, row)

