"""Provenance of an export: the ONNX model on the trial's MLflow run, a registry version, a model card."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autorank.compression import Plan
from autorank.errors import AutorankError

if TYPE_CHECKING:
    from autorank.export.result import ExportResult
    from autorank.records import TrialRecord
    from autorank.search.results import SearchRecord

log = logging.getLogger(__name__)


def default_registered_name(model: str) -> str:
    """`autorank-<zoo name or factory>`: a model spec such as module:pkg.mod:factory holds ':', which MLflow
    forbids in registered names."""
    return f"autorank-{model.rpartition(':')[2]}"


def check_registered_name(name: str) -> None:
    """MLflow's rule for registered model names, checked before an export starts rather than after it."""
    if not name.strip() or "/" in name or ":" in name or name == "." or name.startswith(".."):
        raise AutorankError(f"registered model name {name!r}: MLflow needs a non-empty name without '/' or ':' "
                            "that does not start with '..'")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_tags(result: ExportResult) -> dict[str, str]:
    """The verified figures as flat string tags (what a registry version carries)."""
    v = result.verification
    tags = {
        "precision": result.precision, "file_bytes": str(result.file_bytes), "size_bytes": str(result.size_bytes),
        "size_ratio": f"{result.size_ratio:.4f}", f"{v.split}_accuracy_onnx": f"{v.onnx_accuracy:.4f}",
        f"{v.split}_accuracy_torch": f"{v.torch_accuracy:.4f}", "top1_agreement": f"{v.top1_agreement:.4f}",
        "max_abs_error": f"{v.max_abs_error:.4g}", "verified_images": str(v.images),
        "sha256": _sha256(result.path),
    }
    if result.accuracy_gap is not None:
        tags.update(val_accuracy_onnx=f"{result.onnx_val_accuracy:.4f}",
                    val_accuracy_recorded=f"{result.recorded_accuracy:.4f}",
                    accuracy_gap_points=f"{result.accuracy_gap:+.3f}")
    for name, speed in result.speed.items():
        tags[f"{name}_latency_ms_b1"] = f"{speed.latency_ms:.3f}"
        tags[f"{name}_throughput_b{speed.batch_size}"] = f"{speed.throughput:.1f}"
    if result.trial is not None:
        tags["trial"] = str(result.trial)
    return tags


def _trial_run(client, search: SearchRecord, record: TrialRecord) -> str:
    """The trial's nested run (found by the tracker's tags); created if the search never logged it."""
    from autorank.tracking.tracker import KIND_TAG, SEARCH_TAG, TRIAL_TAG, experiment_id_for

    experiment_id = experiment_id_for(client, search.info.get("experiment") or "autorank")
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SEARCH_TAG}` = '{search.info['search_id']}' and tags.`{TRIAL_TAG}` = '{record.number}'",
        max_results=1)
    if runs:
        return runs[0].info.run_id
    log.warning("trial %d has no MLflow run; logging the export to a new one", record.number)
    run = client.create_run(experiment_id, run_name=f"trial-{record.number}-export",
                            tags={SEARCH_TAG: search.info["search_id"], TRIAL_TAG: str(record.number),
                                  KIND_TAG: "trial"})
    return run.info.run_id


def register_model(result: ExportResult, search: SearchRecord, record: TrialRecord, *,
                   registered_name: str | None = None, uri: str | None = None) -> dict[str, Any]:
    """Log the ONNX file to the trial's run (mlflow.onnx) and register it with the figures as tags.

    `uri`: a tracking server to use instead of the search's own store."""
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient

    from autorank.tracking.tracker import MLFLOW_HTTP_DEFAULTS

    for key, value in MLFLOW_HTTP_DEFAULTS.items():  # an unreachable server fails in seconds, not minutes
        os.environ.setdefault(key, value)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # its retries are no news to a user
    uri = uri or search.info["mlflow_uri"]
    name = registered_name or default_registered_name(search.info["model"])
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, registry_uri=uri)
    run_id = _trial_run(client, search, record)
    tags = export_tags(result)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(onnx.load_model(result.path), name=f"onnx-{result.precision}",
                                     registered_model_name=name, save_as_external_data=False)
        mlflow.log_metrics({f"export_{result.precision}_{k}": float(v) for k, v in tags.items()
                            if k not in ("precision", "sha256", "trial")})
    version = info.registered_model_version
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    return {"tracking_uri": uri, "run_id": run_id, "model_uri": info.model_uri, "name": name,
            "version": int(version)}


def write_card(result: ExportResult, search: SearchRecord | None, record: TrialRecord | None,
               plan: Plan) -> Path:
    """`<out>.card.md` beside the file: what it is, how it measured, where it came from."""
    import onnxruntime
    import torch

    v = result.verification
    card = result.path.with_suffix(".card.md")
    lines = [f"# Model card: {result.path.name}", ""]
    if search is not None and record is not None:
        lines += [f"Trial {record.number} of the autorank search in `{search.out_dir}` "
                  f"(model `{search.info['model']}`, data `{search.info['data']}`), exported to ONNX at "
                  f"**{result.precision}**. Trial summary: {record.summary or '-'}.", ""]
    lines += ["## Verified figures", "", "| figure | value |", "|---|---|",
              f"| file size | {result.file_bytes:,} B (computed size_bytes {result.size_bytes:,} B, "
              f"ratio {result.size_ratio:.3f}) |",
              f"| {v.split} accuracy, ONNX Runtime | {v.onnx_accuracy:.4f} ({v.images:,} images) |",
              f"| {v.split} accuracy, PyTorch (quantization-aware) | {v.torch_accuracy:.4f} |",
              f"| top-1 agreement ONNX vs PyTorch | {v.top1_agreement:.4f} |",
              f"| max abs logit difference | {v.max_abs_error:.4g} |"]
    if result.accuracy_gap is not None:
        lines += [f"| val accuracy, ONNX Runtime | {result.onnx_val_accuracy:.4f} |",
                  f"| val accuracy, recorded by the search{' (final fine-tune)' if record and record.finalized else ''}"
                  f" | {result.recorded_accuracy:.4f} |",
                  f"| gap | {result.accuracy_gap:+.2f} points |"]
    for name, speed in result.speed.items():
        lines.append(f"| {name}: latency batch 1 / throughput batch {speed.batch_size} ({speed.threads} threads) | "
                     f"{speed.latency_ms:.2f} ms / {speed.throughput:,.0f} img/s |")
    host = result.host
    found = ", ".join(name for name, present in host["cpu_features"].items() if present) or "none of interest"
    lines += ["", "## Verifying host", "",
              f"Verified on {host['machine']} (CPU features: {found}); ONNX Runtime's int8 kernel here: "
              f"{host['int8_kernel']}. int8 weights lie on {host['int8_weight_grid']}, so that no pair of "
              "uint8 x int8 products exceeds int16: the file computes the same on CPUs with and without VNNI "
              "(docs/EXPORT.md).",
              "", "## Plan", "", "| layer | method | ranks | weights |", "|---|---|---|---|"]
    for name, lp in plan.layers.items():
        ranks = "-" if lp.rank is None else "×".join(map(str, lp.rank)) if isinstance(lp.rank, list) else str(lp.rank)
        lines.append(f"| {name} | {lp.method} | {ranks} | {lp.precision} |")
    lines += ["", f"Activations: {plan.activations}. Layers not listed stay fp32.", "", "## Provenance", ""]
    if search is not None and record is not None:
        weights = record.weights
        lines += [f"- search: `{search.out_dir}` (id {search.info['search_id']}, study {search.info['study_name']})",
                  f"- pretrained weights: `{search.info['weights']}`",
                  f"- trial weights: `{weights}` (sha256 {_sha256(weights)[:16]}…)"
                  + (f", after the search's final fine-tune ({search.space.final.steps} steps, "
                     f"from the trial's {'fitted start' if search.space.final.start == 'fitted' else 'weights'})"
                     if record.finalized else "")]
    if result.mlflow:
        lines += [f"- MLflow: run {result.mlflow['run_id']} at {result.mlflow['tracking_uri']}, registered as "
                  f"{result.mlflow['name']} version {result.mlflow['version']}"]
    lines += [f"- file sha256: {_sha256(result.path)}",
              f"- exported {time.strftime('%Y-%m-%d %H:%M:%S')} with torch {torch.__version__}, "
              f"onnxruntime {onnxruntime.__version__}",
              "", "<details><summary>plan.json</summary>", "", "```json", plan.to_json(), "```", "", "</details>", ""]
    card.write_text("\n".join(lines))
    return card

