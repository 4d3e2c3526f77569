"""Tracking servers: a shared, long-lived MLflow server from a YAML config, and a loopback one over a
search's own store.

`start_server(cfg)` / `stop_server(cfg)` run `mlflow server` (sqlite or PostgreSQL backend, proxied
artifacts, optional basic authentication; see mlflow_server/README.md) in its own process group and
record it in the data folder; `launch` starts one and waits for /health. Both bind to 127.0.0.1 unless
told otherwise and use one worker with job execution off, which keeps the server near 0.4 GB instead
of the 2.3 GB of MLflow's defaults. The CLI's `autorank ui` and `autorank server` are thin over these.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from autorank._shipped import server_config
from autorank.errors import AutorankError

LOOPBACK = "127.0.0.1"
PID_FILE = "server.json"
LOG_FILE = "server.log"
UI_LOG_FILE = "ui.log"   # `autorank ui`'s server output, in the search folder (never a stack on the terminal)
STARTUP_TIMEOUT_S = 90.0


@dataclass
class ServerConfig:
    """Where a tracking server listens and keeps its data (the keys of mlflow_server/server.yaml)."""

    host: str = LOOPBACK
    port: int = 5000
    backend: str = "sqlite"        # sqlite | postgres | any SQLAlchemy URL (postgresql://...)
    data_dir: Path = Path("data")  # sqlite db, artifacts, local postgres cluster, pid and log
    artifacts: Path | None = None  # proxied artifact root; default data_dir/mlartifacts
    workers: int = 1
    auth: bool = False             # MLflow's basic-auth app; admin password from the environment
    admin_username: str = "admin"
    postgres_port: int = 5433      # the local cluster started for backend "postgres"

    @property
    def url(self) -> str:
        host = LOOPBACK if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


def load_server_config(path: str | Path | None, **overrides) -> ServerConfig:
    """Read a server YAML and apply CLI overrides. Relative paths are relative to the file, except in the
    shipped config (`path` None: mlflow_server/server.yaml, inside the installed package), where they
    are relative to the current folder."""
    config = Path(path) if path is not None else server_config()
    if not config.is_file():
        raise AutorankError(f"server config not found: {config}")
    try:
        values = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as exc:
        raise AutorankError(f"server config {config}: invalid YAML ({str(exc).splitlines()[0]})")
    if not isinstance(values, dict):
        raise AutorankError(f"server config {config}: expected a mapping of keys")
    base = config.resolve().parent if path is not None else Path.cwd()
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name: f for f in dataclasses.fields(ServerConfig)}
    for key in values:
        if key not in known:
            raise AutorankError(f"server config: unknown key '{key}' (known: {', '.join(known)})")
    for key, minimum in (("port", 0), ("workers", 1), ("postgres_port", 1)):
        value = values.get(key, minimum)
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value < 65536:
            raise AutorankError(f"server config: '{key}' must be an integer >= {minimum}, got {value!r}")
    for key in ("data_dir", "artifacts"):
        if values.get(key) is not None:
            values[key] = (base / Path(values[key]).expanduser()).resolve()
    cfg = ServerConfig(**values)
    if cfg.data_dir == ServerConfig.data_dir:
        cfg.data_dir = (base / cfg.data_dir).resolve()
    return cfg


# ---------------------------------------------------------------- local PostgreSQL cluster


def _postgres_binary(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise AutorankError(f"PostgreSQL's {name} not found: install Debian's postgresql package")
    return found


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root; as root, run it as the `postgres` system user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class LocalPostgres:
    """A private PostgreSQL cluster in `directory`, listening on loopback only."""

    directory: Path
    port: int = 5433
    user: str = "autorank"
    database: str = "mlflow"

    @property
    def password_file(self) -> Path:
        return self.directory / "password"

    @property
    def cluster(self) -> Path:
        return self.directory / "cluster"

    @property
    def url(self) -> str:
        password = self.password_file.read_text().strip()
        return f"postgresql+psycopg2://{self.user}:{password}@{LOOPBACK}:{self.port}/{self.database}"

    def start(self) -> str:
        """Create the cluster on first use, start it, and return the SQLAlchemy URL."""
        try:
            import psycopg2  # noqa: F401  (MLflow's SQLAlchemy store needs the driver)
        except ImportError:
            raise AutorankError("the postgres backend needs psycopg2: pip install psycopg2-binary")
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.password_file.exists():
            self.password_file.write_text(secrets.token_urlsafe(18))
            self.password_file.chmod(0o600)
        fresh = not (self.cluster / "PG_VERSION").exists()
        if fresh:
            self._init_cluster()
        if not self.running():
            self._run(_postgres_binary("pg_ctl"), "-D", str(self.cluster), "-w", "-t", "60",
                      "-l", str(self.directory / "postgres.log"), "-o",
                      f"-c listen_addresses={LOOPBACK} -p {self.port} -k {self.cluster}", "start")
        if fresh:
            self._run(_postgres_binary("createdb"), "-h", str(self.cluster), "-p", str(self.port),
                      "-U", self.user, self.database)
        return self.url

    def running(self) -> bool:
        if not (self.cluster / "PG_VERSION").exists():
            return False
        return subprocess.run(_as_postgres_user([_postgres_binary("pg_ctl"), "-D",
                                                 str(self.cluster), "status"]),
                              capture_output=True).returncode == 0

    def stop(self) -> None:
        if self.running():
            self._run(_postgres_binary("pg_ctl"), "-D", str(self.cluster), "-m", "fast", "-w",
                      "stop")

    def _init_cluster(self) -> None:
        self.cluster.mkdir(exist_ok=True)
        pwfile = self.directory / "initdb.pw"
        pwfile.write_text(self.password_file.read_text())
        if os.geteuid() == 0:
            shutil.chown(self.cluster, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
            self._check_traversable()
        try:
            self._run(_postgres_binary("initdb"), "-D", str(self.cluster), "-U", self.user,
                      f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                      "-E", "UTF8")
        finally:
            pwfile.unlink()

    def _check_traversable(self) -> None:
        for parent in self.cluster.resolve().parents:
            if not os.stat(parent).st_mode & 0o001:
                raise AutorankError(f"the postgres user cannot enter {parent}: choose a data_dir "
                                    "whose parent folders are world-executable (chmod o+x)")

    def _run(self, *cmd: str) -> None:
        if os.geteuid() == 0:
            (self.directory / "postgres.log").touch()
            shutil.chown(self.directory / "postgres.log", "postgres", "postgres")
        done = subprocess.run(_as_postgres_user(list(cmd)), capture_output=True, text=True)
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise AutorankError(f"{Path(cmd[0]).name} failed: {detail[-1] if detail else '?'}")


# ---------------------------------------------------------------- MLflow server process


def server_command(cfg: ServerConfig, backend_uri: str) -> list[str]:
    """The `mlflow server` command line for `cfg` (one worker; proxied artifacts)."""
    artifacts = cfg.artifacts or cfg.data_dir / "mlartifacts"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
           "--serve-artifacts", "--artifacts-destination", str(artifacts),
           "--host", cfg.host, "--port", str(cfg.port), "--workers", str(cfg.workers)]
    if cfg.auth:
        cmd += ["--app-name", "basic-auth"]
    return cmd


def server_env(cfg: ServerConfig) -> dict[str, str]:
    """Environment for the server: job execution off; basic-auth settings when enabled."""
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    if not cfg.auth:
        return env
    if not env.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
        raise AutorankError("auth is on: set MLFLOW_AUTH_ADMIN_PASSWORD to the admin's password "
                            "(used to create the admin user on first start)")
    secret = cfg.data_dir / "flask_secret"
    if not secret.exists():
        secret.write_text(secrets.token_hex(32))
        secret.chmod(0o600)
    auth_ini = cfg.data_dir / "basic_auth.ini"
    auth_ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{cfg.data_dir / 'basic_auth.db'}\n"
        f"admin_username = {cfg.admin_username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(auth_ini),
               MLFLOW_FLASK_SERVER_SECRET_KEY=env.get("MLFLOW_FLASK_SERVER_SECRET_KEY")
               or secret.read_text().strip())
    return env


def health(url: str, timeout: float = 2.0) -> bool:
    """True when the server at `url` answers its unauthenticated /health endpoint."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _bind_port(host: str, port: int) -> int:
    """Check that `host:port` is free (port 0: pick a free one) and return the port."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise AutorankError(f"cannot listen on {host}:{port}: {exc.strerror}")
        return sock.getsockname()[1]


def launch(cfg: ServerConfig, backend_uri: str, log_path: Path | None = None) -> subprocess.Popen:
    """Start `mlflow server` in its own process group and wait until /health answers.

    Port 0 picks a free port (written back to `cfg.port`)."""
    cfg.port = _bind_port(cfg.host, cfg.port)
    (cfg.artifacts or cfg.data_dir / "mlartifacts").mkdir(parents=True, exist_ok=True)
    env = server_env(cfg)
    log_start = log_path.stat().st_size if log_path and log_path.exists() else 0
    log = open(log_path, "ab") if log_path else None
    try:  # the server's own output goes to the log file, or to our stderr
        proc = subprocess.Popen(server_command(cfg, backend_uri), env=env, cwd=cfg.data_dir,
                                stdout=log or sys.stderr.fileno(), stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        if log:
            log.close()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while not health(cfg.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                reason = _last_error(log_path, log_start) if log_path else None
                where = f" ({reason})" if reason else ""
                where += f"; see {log_path}" if log_path else ""
                raise AutorankError(f"MLflow server on {cfg.url} did not come up{where}")
            time.sleep(0.3)
    except BaseException:  # a failed start or Ctrl-C while waiting leaves no server behind
        terminate(proc.pid)
        raise
    return proc


def _last_error(log_path: Path, start: int) -> str | None:
    """The last ERROR line the server logged since `start` (e.g. a store that is not a database)."""
    with open(log_path, "rb") as log:
        log.seek(start)
        lines = log.read().decode(errors="replace").splitlines()
    errors = [line.split(" ERROR ", 1)[1] for line in lines if " ERROR " in line]
    return errors[-1][:300] if errors else None


def terminate(pid: int, timeout: float = 15.0) -> None:
    """Stop the process group led by `pid`: SIGTERM, then SIGKILL after `timeout` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            try:  # reap it when it is our child
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)


def start_server(cfg: ServerConfig) -> dict:
    """Start a background server for `cfg`; its pid, url and backend go to data_dir/server.json."""
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    state = _read_state(cfg)
    if state and _alive(state["pid"]):
        raise AutorankError(f"a server is already running for {cfg.data_dir} (pid {state['pid']},"
                            f" {state['url']})")
    postgres = None
    if cfg.backend == "sqlite":
        backend_uri = f"sqlite:///{cfg.data_dir / 'mlflow.db'}"
    elif cfg.backend == "postgres":
        postgres = LocalPostgres(cfg.data_dir / "postgres", port=cfg.postgres_port)
        backend_uri = postgres.start()
    elif "://" in cfg.backend:
        backend_uri = cfg.backend
    else:
        raise AutorankError(f"server config: backend must be sqlite, postgres or a database URL, "
                            f"not '{cfg.backend}'")
    try:
        proc = launch(cfg, backend_uri, cfg.data_dir / LOG_FILE)
    except AutorankError:
        if postgres:
            postgres.stop()
        raise
    state = {"pid": proc.pid, "url": cfg.url, "backend": cfg.backend,
             "postgres": str(postgres.directory) if postgres else None}
    (cfg.data_dir / PID_FILE).write_text(json.dumps(state))
    return state


def stop_server(cfg: ServerConfig) -> bool:
    """Stop the server (and its local PostgreSQL) started for `cfg`; False if none was running."""
    state = _read_state(cfg)
    if not state:
        return False
    terminate(state["pid"])
    if state.get("postgres"):
        LocalPostgres(Path(state["postgres"]), port=cfg.postgres_port).stop()
    (cfg.data_dir / PID_FILE).unlink()
    return True


def _read_state(cfg: ServerConfig) -> dict | None:
    path = cfg.data_dir / PID_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def classic_runs_page(url: str, experiment_name: str) -> str:
    """The experiment's runs table in MLflow's classic (machine-learning) view on the server at `url`.

    MLflow 3 UIs open experiments in their GenAI view unless told otherwise; recent ones choose the view
    from the page's `workflowType` rather than the experiment's kind tag. The server's root when the
    experiment cannot be looked up."""
    query = urllib.parse.urlencode({"experiment_name": experiment_name})
    try:
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout=10) as answer:
            experiment_id = json.load(answer)["experiment"]["experiment_id"]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return url
    return f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
