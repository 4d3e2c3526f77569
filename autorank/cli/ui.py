"""`autorank ui` and `autorank server`: browse searches in the MLflow UI.

`autorank ui --search DIR` serves a finished search's own tracking store (DIR/mlflow.db and
DIR/mlartifacts) on loopback until Ctrl-C. `autorank server start|stop|health` runs a shared,
long-lived tracking server from a YAML config (see mlflow_server/README.md). The servers themselves
are managed by the tracking stage (`autorank.tracking.server`).
"""

from __future__ import annotations

import argparse
import webbrowser
from pathlib import Path

from autorank.errors import AutorankError
from autorank.tracking.server import (LOG_FILE, LOOPBACK, UI_LOG_FILE, ServerConfig, classic_runs_page, health, launch,
                                      load_server_config, start_server, stop_server, terminate)


def search_store(search_dir: Path) -> tuple[ServerConfig, str]:
    """A loopback server config and backend URI for a finished search's local MLflow store."""
    from autorank.search.results import read_info  # Optuna and SQLAlchemy: only when browsing

    uri = read_info(search_dir).get("mlflow_uri")
    if uri is None:
        raise AutorankError(f"the search in {search_dir} was not tracked in MLflow: nothing to browse")
    if not uri.startswith("sqlite:///"):
        raise AutorankError(f"the search in {search_dir} logged to {uri}: browse that server instead")
    if not Path(uri.removeprefix("sqlite:///")).is_file():
        raise AutorankError(f"the search's MLflow store {uri} is missing")
    search_dir = search_dir.resolve()
    return ServerConfig(data_dir=search_dir, artifacts=search_dir / "mlartifacts"), uri


def _ui(args: argparse.Namespace) -> int:
    from autorank.search.results import read_info

    cfg, uri = search_store(Path(args.search))
    cfg.host, cfg.port = args.host, args.port
    proc = launch(cfg, uri, cfg.data_dir / UI_LOG_FILE)
    page = classic_runs_page(cfg.url, read_info(args.search).get("experiment", "autorank"))
    print(f"MLflow UI for {args.search}: {page}  (Ctrl-C stops it; server log {cfg.data_dir / UI_LOG_FILE})",
          flush=True)
    if args.open:
        webbrowser.open(page)
    try:
        return proc.wait()
    finally:
        terminate(proc.pid)


def _server(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir).resolve() if args.data_dir else None  # relative to cwd
    cfg = load_server_config(args.config, host=args.host, port=args.port, backend=args.backend,
                             data_dir=data_dir, auth=True if args.auth else None)
    if args.action == "start":
        state = start_server(cfg)
        print(f"MLflow server {state['url']} (pid {state['pid']}, backend {cfg.backend}); "
              f"log {cfg.data_dir / LOG_FILE}")
        return 0
    if args.action == "stop":
        print("stopped" if stop_server(cfg) else f"no server recorded in {cfg.data_dir}")
        return 0
    ok = health(cfg.url)
    print(f"{cfg.url}: {'healthy' if ok else 'not answering'}")
    return 0 if ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    ui = subparsers.add_parser("ui", help="browse a finished search's local MLflow store")
    ui.add_argument("--search", required=True, metavar="DIR", help="the search's output folder")
    ui.add_argument("--host", default=LOOPBACK, help="interface to bind (default: loopback)")
    ui.add_argument("--port", type=int, default=5000, help="0 picks a free port")
    ui.add_argument("--open", action="store_true", help="open it in the default web browser")
    ui.set_defaults(handler=_ui)

    server = subparsers.add_parser("server", help="start/stop/check a shared MLflow server")
    server.add_argument("action", choices=("start", "stop", "health"))
    server.add_argument("--config", metavar="YAML", help="settings (default: the shipped mlflow_server/server.yaml: "
                                                         "loopback, sqlite, data in ./data)")
    server.add_argument("--host", help="interface to bind (default: loopback)")
    server.add_argument("--port", type=int, help="0 picks a free port")
    server.add_argument("--backend", help="sqlite | postgres | a database URL")
    server.add_argument("--data-dir", help="db, artifacts, pid and log folder")
    server.add_argument("--auth", action="store_true", help="MLflow basic authentication")
    server.set_defaults(handler=_server)
