"""The MLflow tracking server (mlflow_server/, `autorank server`, `autorank ui`) on real processes.

Each test starts a real `mlflow server` on a free loopback port and talks to it over HTTP.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from autorank.cli import main
from autorank.tracking.server import LocalPostgres, ServerConfig, health, load_server_config, start_server, stop_server
from autorank.errors import AutorankError

REPO = Path(__file__).resolve().parents[2]
SERVE = REPO / "mlflow_server" / "serve.sh"


def listening_hosts(port: int) -> set[str]:
    """The local addresses with a LISTEN socket on `port` (from /proc/net/tcp{,6})."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    hosts.add(".".join(str(b) for b in raw[::-1]))
                else:
                    hosts.add(raw.hex())
    return hosts


def api(url: str, path: str, payload: dict | None = None, auth: tuple[str, str] | None = None) -> dict:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}",
                                     data=json.dumps(payload).encode() if payload is not None else None,
                                     headers={"Content-Type": "application/json"})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def log_run(url: str, tmp_path: Path, env: dict[str, str] | None = None) -> str:
    """Log a run with a metric and an artifact through the MLflow client in a fresh process."""
    script = (
        "import mlflow, sys\n"
        "mlflow.set_tracking_uri(sys.argv[1])\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.log_metric('accuracy', 0.5)\n"
        "    mlflow.log_text('front', 'pareto.txt')\n"
        "print(run.info.run_id)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, url], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_serve_script_with_auth_binds_loopback_proxies_artifacts_and_stops(tmp_path):
    data_dir = tmp_path / "srv"
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_PASSWORD": "autorank-test-Passw0rd"}
    started = subprocess.run([str(SERVE), "start", "--port", "0", "--data-dir", str(data_dir), "--auth"],
                             capture_output=True, text=True, env=env, timeout=180)
    assert started.returncode == 0, started.stderr
    state = json.loads((data_dir / "server.json").read_text())
    url, port = state["url"], int(state["url"].rsplit(":", 1)[1])
    try:
        assert listening_hosts(port) == {"127.0.0.1"}
        with pytest.raises(urllib.error.HTTPError) as denied:
            api(url, "experiments/search", {"max_results": 1})
        assert denied.value.code == 401
        auth = ("admin", env["MLFLOW_AUTH_ADMIN_PASSWORD"])
        run_id = log_run(url, tmp_path, {"MLFLOW_TRACKING_USERNAME": auth[0],
                                         "MLFLOW_TRACKING_PASSWORD": auth[1]})
        run = api(url, f"runs/get?run_id={run_id}", auth=auth)["run"]
        assert run["data"]["metrics"][0]["value"] == 0.5
        assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:")  # proxied, not a local path
        assert list((data_dir / "mlartifacts").rglob("pareto.txt"))
        health_cmd = subprocess.run([str(SERVE), "health", "--port", str(port), "--data-dir", str(data_dir)],
                                    capture_output=True, text=True, timeout=60)
        assert health_cmd.returncode == 0 and "healthy" in health_cmd.stdout
    finally:
        stopped = subprocess.run([str(SERVE), "stop", "--data-dir", str(data_dir)], capture_output=True,
                                 text=True, timeout=120)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not health(url)
    assert not listening_hosts(port)
    with pytest.raises(ProcessLookupError):
        os.killpg(state["pid"], 0)


def test_auth_without_admin_password_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    assert main(["server", "start", "--auth", "--port", "0", "--data-dir", str(tmp_path / "srv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "MLFLOW_AUTH_ADMIN_PASSWORD" in err


@pytest.mark.parametrize("text, problem", [
    ("hots: 0.0.0.0\n", "unknown key 'hots'"),
    ("port: -3\n", "'port' must be an integer"),
    ("port: [1\n", "invalid YAML"),
    ("- a list\n", "expected a mapping"),
])
def test_bad_server_config_names_the_problem(tmp_path, text, problem):
    config = tmp_path / "server.yaml"
    config.write_text(text)
    with pytest.raises(AutorankError, match=problem.replace("[", r"\[")):
        load_server_config(config)


def test_shipped_config_is_loopback_sqlite_one_worker(tmp_path, monkeypatch):
    cfg = load_server_config(REPO / "mlflow_server" / "server.yaml")
    assert (cfg.host, cfg.backend, cfg.workers, cfg.auth) == ("127.0.0.1", "sqlite", 1, False)
    assert cfg.data_dir == REPO / "mlflow_server" / "data"
    # without --config: the same shipped file (package data once installed), its paths from the current folder
    monkeypatch.chdir(tmp_path)
    assert load_server_config(None) == dataclasses.replace(cfg, data_dir=Path.cwd() / "data")


def test_busy_port_is_reported_before_anything_starts(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        cfg = ServerConfig(port=sock.getsockname()[1], data_dir=tmp_path)
        with pytest.raises(AutorankError, match="cannot listen on 127.0.0.1"):
            start_server(cfg)
    assert not (tmp_path / "server.json").exists()


def _postgres_missing() -> str | None:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 not installed (pip install -e '.[dev]')"
    if not (shutil.which("pg_ctl") or list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))):
        return "PostgreSQL not installed (scripts/install_system_deps.sh installs Debian's postgresql)"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "running as root without runuser to start PostgreSQL as the postgres user"
    return None


@pytest.mark.postgres
@pytest.mark.skipif(_postgres_missing() is not None, reason=str(_postgres_missing()))
def test_postgres_backend_keeps_runs_across_restarts():
    base = Path(tempfile.mkdtemp(prefix="autorank-pg-"))
    base.chmod(0o755)  # the postgres system user must reach its cluster when we run as root
    cfg = ServerConfig(port=0, backend="postgres", data_dir=base / "srv", postgres_port=_free_port())
    try:
        state = start_server(cfg)
        assert state["backend"] == "postgres" and listening_hosts(cfg.postgres_port) == {"127.0.0.1"}
        run_id = log_run(state["url"], base)
        stop_server(cfg)
        assert not LocalPostgres(cfg.data_dir / "postgres", port=cfg.postgres_port).running()
        cfg.port = 0
        state = start_server(cfg)
        run = api(state["url"], f"runs/get?run_id={run_id}")["run"]
        assert run["data"]["metrics"][0]["value"] == 0.5
    finally:
        stop_server(cfg)
        LocalPostgres(cfg.data_dir / "postgres", port=cfg.postgres_port).stop()
        shutil.rmtree(base, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ui_serves_a_search_store_on_loopback_until_interrupted(tmp_path):
    """`autorank ui --search DIR` on a search folder's own sqlite store and artifacts."""
    out = tmp_path / "search"
    out.mkdir()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    (out / "search.json").write_text(json.dumps({"mlflow_uri": uri}))
    script = (
        "import mlflow, sys\n"
        "client = mlflow.MlflowClient(sys.argv[1])\n"
        "exp = client.create_experiment('autorank', artifact_location=sys.argv[2])\n"
        "run = client.create_run(exp, run_name='search')\n"
        "client.log_metric(run.info.run_id, 'front_size', 3)\n"
        "open('pareto.json', 'w').write('[]')\n"
        "client.log_artifact(run.info.run_id, 'pareto.json')\n"
        "print(run.info.run_id)\n"
    )
    made = subprocess.run([sys.executable, "-c", script, uri, (out / "mlartifacts").as_uri()], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    run_id = made.stdout.split()[-1]
    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "autorank", "ui", "--search", str(out), "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = ui.stdout.readline()
        assert listening_hosts(port) == {"127.0.0.1"}
        url = f"http://127.0.0.1:{port}"
        experiment = api(url, "experiments/get-by-name?experiment_name=autorank")["experiment"]["experiment_id"]
        # the page it prints opens the search's runs in MLflow's classic view, not the GenAI one
        assert f"{url}/#/experiments/{experiment}/runs?workflowType=machine_learning " in line
        runs = api(url, "runs/search", {"experiment_ids": [experiment]})
        assert [r["info"]["run_id"] for r in runs["runs"]] == [run_id]
        with urllib.request.urlopen(f"{url}/get-artifact?path=pareto.json&run_uuid={run_id}", timeout=30) as r:
            assert r.read() == b"[]"
    finally:
        ui.send_signal(signal.SIGINT)
        code = ui.wait(timeout=60)
    assert code == 130
    deadline = time.monotonic() + 30
    while listening_hosts(port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not listening_hosts(port)


def test_ui_on_a_folder_without_a_search_is_a_one_line_error(tmp_path, capsys):
    assert main(["ui", "--search", str(tmp_path)]) == 2
    assert "holds no search" in capsys.readouterr().err


def test_ui_on_a_broken_store_says_why_in_one_line(tmp_path, capfd):
    """The server's stack goes to the search's ui.log; the terminal (file descriptors included) gets one line."""
    out = tmp_path / "search"
    out.mkdir()
    (out / "mlflow.db").write_text("not a database")
    (out / "search.json").write_text(json.dumps({"mlflow_uri": f"sqlite:///{out / 'mlflow.db'}"}))
    assert main(["ui", "--search", str(out), "--port", "0"]) == 2
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "did not come up" in captured.err and "file is not a database" in captured.err
    assert "Traceback" in (out / "ui.log").read_text()


def _mlflow_children(pid: int) -> list[int]:
    """`pid`'s children running `mlflow server` (importing torch runs other children, e.g. `ldconfig -p`)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) == pid and any(part.endswith(b"mlflow") for part in command) and b"server" in command:
            kids.append(int(stat.parent.name))
    return kids


def test_ctrl_c_while_the_ui_starts_leaves_no_server_behind(tmp_path):
    out = tmp_path / "search"
    out.mkdir()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    subprocess.run([sys.executable, "-c", f"import mlflow; mlflow.MlflowClient('{uri}').search_experiments()"],
                   check=True, timeout=120, cwd=tmp_path)
    (out / "search.json").write_text(json.dumps({"mlflow_uri": uri}))
    ui = subprocess.Popen([sys.executable, "-m", "autorank", "ui", "--search", str(out), "--port", "0"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (server := _mlflow_children(ui.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server, "autorank ui never started the MLflow server"
    ui.send_signal(signal.SIGINT)  # before the server answers /health
    assert ui.wait(timeout=60) == 130
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(server[0], 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(server[0], signal.SIGKILL)
        pytest.fail("the MLflow server outlived `autorank ui`")
