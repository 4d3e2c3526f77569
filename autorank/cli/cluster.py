"""`autorank submit` (a search as a Ray job on a cluster's head), `jobs`, `logs`, `stop` and `fetch`.

Thin over autorank.tracking.jobs; see docs/CLUSTER.md for bringing a cluster up."""

from __future__ import annotations

import argparse
import json
import posixpath
import time
from pathlib import Path

from autorank.errors import AutorankError

ADDRESS_HELP = "the head's job server, e.g. http://HEAD:8265 (default: RAY_ADDRESS)"


def register(subparsers: argparse._SubParsersAction) -> None:
    submit = subparsers.add_parser(
        "submit", help="run a search as a Ray job on a cluster's head (tracked in a shared MLflow server)",
        description="Submit `autorank search --executor ray` as a Ray job (Job Submission API): the search space "
                    "YAML and a local --weights file travel in the job's working directory (the job copies the "
                    "weights into --out, which keeps them); trials run on the "
                    "cluster's workers, the study and the search folder (--out) stay on the head or shared "
                    "storage, MLflow records in --mlflow-uri. At its end the job archives the search folder in "
                    "MLflow, for `autorank fetch`. Prints the job id.")
    submit.add_argument("--address", help=ADDRESS_HELP)
    submit.add_argument("--mlflow-uri", required=True, help="a tracking server every node reaches (autorank server)")
    submit.add_argument("--config", required=True, metavar="NAME|YAML", help="search space: shipped name or a YAML file")
    submit.add_argument("--model", required=True, help="zoo name or module:pkg.mod:factory (importable on the head)")
    submit.add_argument("--weights", help="pretrained checkpoint: a local file (sent with the job), a URL, or a "
                                          "path on the head")
    submit.add_argument("--data", required=True, help="digits | cifar10[:ROOT] | imagefolder:PATH (paths on the head)")
    submit.add_argument("--out", help="the search folder on the head or shared storage: an absolute path or "
                                      "$HOME/... there (default $HOME/autorank-jobs/JOB)")
    submit.add_argument("--trials", type=int, help="number of finished trials (overrides the YAML)")
    submit.add_argument("--time-budget", help="wall-clock budget such as 30m, 2h (overrides the YAML)")
    submit.add_argument("--trial-resources", help="Ray resources per trial, e.g. cpu=2,gpu=0.5")
    submit.add_argument("--max-concurrent", type=int, help="Ray trials running at once")
    submit.add_argument("--ray-storage", metavar="PATH|URI", help="Ray Tune's storage, reached by every node")
    submit.add_argument("--experiment", help="MLflow experiment name (default autorank)")
    submit.add_argument("--device", help="auto | cpu | cuda")
    submit.add_argument("--job-id", help="the job's id (default autorank-<random>)")
    submit.set_defaults(handler=run_submit_command)

    jobs = subparsers.add_parser("jobs", help="the cluster's Ray jobs, or one job's status",
                                 description="List the jobs of the cluster (id, status, start), or show one job.")
    jobs.add_argument("job", nargs="?", help="one job's id")
    jobs.add_argument("--address", help=ADDRESS_HELP)
    jobs.add_argument("--json", action="store_true", help="print JSON")
    jobs.set_defaults(handler=run_jobs_command)

    logs = subparsers.add_parser("logs", help="a Ray job's output so far", description="Print a job's output so far.")
    logs.add_argument("job", help="the job's id")
    logs.add_argument("--address", help=ADDRESS_HELP)
    logs.set_defaults(handler=run_logs_command)

    stop = subparsers.add_parser(
        "stop", help="stop a Ray job",
        description="Stop a running job: SIGTERM to its search (and its archive step: nothing reaches `autorank "
                    "fetch`). The search resumes on the head with `autorank search --resume --out OUT --executor "
                    "ray --ray-address auto` plus the --trials, --time-budget, --trial-resources, --max-concurrent, "
                    "--ray-storage and --device it was submitted with (search.json does not keep them); "
                    "docs/CLUSTER.md.")
    stop.add_argument("job", help="the job's id")
    stop.add_argument("--address", help=ADDRESS_HELP)
    stop.set_defaults(handler=run_stop_command)

    fetch = subparsers.add_parser(
        "fetch", help="bring a finished job's search folder back from the MLflow server",
        description="Download the search folder a job archived in MLflow into --to, ready for `autorank best`, "
                    "`autorank export` and `autorank search --resume` here.")
    fetch.add_argument("job", help="the job's id")
    fetch.add_argument("--mlflow-uri", required=True, help="the tracking server the job recorded in")
    fetch.add_argument("--to", type=Path, required=True, help="a new folder for the search")
    fetch.add_argument("--experiment", default="autorank", help="MLflow experiment name (default %(default)s)")
    fetch.set_defaults(handler=run_fetch_command)


def run_submit_command(args: argparse.Namespace) -> int:
    from autorank.tracking.jobs import submit_search

    if args.trials is not None and args.trials < 1:
        raise AutorankError(f"--trials must be >= 1, got {args.trials}")
    files: dict[str, Path] = {}
    config = args.config
    if Path(config).expanduser().is_file():
        files["space.yaml"] = Path(config).expanduser()
        config = "space.yaml"
    elif config.endswith((".yaml", ".yml")):
        raise AutorankError(f"search space file not found: {config}")
    from uuid import uuid4

    job_id = args.job_id or f"autorank-{uuid4().hex[:12]}"
    out = args.out or f"$HOME/autorank-jobs/{job_id}"
    search = ["--config", config, "--model", args.model, "--data", args.data]
    into_out: list[str] = []
    if args.weights is not None:
        weights = Path(args.weights).expanduser()
        if weights.is_file():
            # the job copies it into the search folder: search.json names that copy, which outlives Ray's
            # working directory and travels with the folder to `autorank fetch`
            name = f"weights{''.join(weights.suffixes)}"
            files[name], into_out = weights, [name]
            search += ["--weights", posixpath.join(out, name)]
        else:
            search += ["--weights", args.weights]
    for flag in ("trials", "time_budget", "trial_resources", "max_concurrent", "ray_storage", "experiment", "device"):
        value = getattr(args, flag)
        if value is not None:
            search += [f"--{flag.replace('_', '-')}", str(value)]
    print(submit_search(args.address, search, files, out=out, mlflow_uri=args.mlflow_uri, job_id=job_id,
                        into_out=into_out))
    return 0


def run_jobs_command(args: argparse.Namespace) -> int:
    from autorank.tracking.jobs import job_status, list_jobs

    rows = [job_status(args.address, args.job)] if args.job else list_jobs(args.address)
    if args.json:
        print(json.dumps(rows[0] if args.job else rows, indent=2))
        return 0
    for row in rows:
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["start"] / 1000)) if row["start"] else "-"
        out = row["metadata"].get("autorank.out", "")
        print(f"{row['job']}  {row['status']:<9}  {start}  {out}")
        if args.job and row["message"]:
            print(row["message"])
    return 0


def run_logs_command(args: argparse.Namespace) -> int:
    from autorank.tracking.jobs import job_logs

    print(job_logs(args.address, args.job), end="")
    return 0


def run_stop_command(args: argparse.Namespace) -> int:
    from autorank.tracking.jobs import stop_job

    print(f"{args.job}: {'stopping' if stop_job(args.address, args.job) else 'already finished'}")
    return 0


def run_fetch_command(args: argparse.Namespace) -> int:
    from autorank.tracking.jobs import fetch_search

    folder = fetch_search(args.mlflow_uri, args.job, args.to, experiment=args.experiment)
    print(f"{folder}: autorank best --search {folder}; autorank export --search {folder} ...")
    return 0
