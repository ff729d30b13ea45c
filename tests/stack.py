"""Start the real processes of the product on loopback for tests and benchmarks: an MLflow
server (SQLite backend, artifacts served by the server), a Prefect server, the receiver and the
flow worker, each as users start them (their own commands, in subprocesses)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports. All sockets stay bound until every port is picked:
    picked one at a time, the kernel may hand out the same port twice (seen in CI: the receiver
    got the MLflow server's port, failed to bind, and MLflow's /health answered for it)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None, expect: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                body = response.read().decode()
                if expect is None or expect in body:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


class Service:
    """One subprocess with its log file; stop() ends it and its children."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, health: str | None = None,
                 expect: str | None = None, startup: float = 90) -> None:
        self.name, self.args, self.env, self.health, self.expect, self.startup = name, args, env, health, expect, startup
        self.log_path = log_dir / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> Service:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        if self.health:
            try:
                wait_http(self.health, self.startup, self.process, self.expect)
            except Exception:
                self.stop()
                raise RuntimeError(f"{self.name} did not start; log tail:\n{self.log_tail()}") from None
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the service's process group, its reaped
        children included (Linux /proc; benchmarks read it before and after a phase)."""
        if self.process is None:
            return 0.0
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:  # the process ended meanwhile
                continue
            if int(fields[2]) == self.process.pid:  # fields[2] is the process group
                total += sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
        return total / os.sysconf("SC_CLK_TCK")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def base_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1",
                "PREFECT_HOME": str(home / "prefect-home"), "PREFECT_LOGGING_LEVEL": "INFO"})
    return env


def mlflow_server(root: Path, port: int, env: dict[str, str], backend_store_uri: str | None = None) -> Service:
    """`mlflow server` as environment.md recommends for tests (one worker, no job runner,
    webhooks to loopback allowed, an encryption key so webhooks survive a restart); its store is
    SQLite in `root` unless `backend_store_uri` names another (a PostgreSQL database, as in
    deploy/compose.yaml; needs psycopg2: `pip install -e .[postgres]`)."""
    env = env | {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",
        "MLFLOW_WEBHOOK_REQUEST_MAX_RETRIES": "8",  # deliveries outlast a receiver restart (about 3 min)
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": env.get("MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY")
        or "x0FbFGSM2gbtSnpZ8w4Yq4qkTnE0ZtK6a8cQj0b0Ydc=",
    }
    args = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_store_uri or f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
    return Service("mlflow", args, env, root, health=f"http://127.0.0.1:{port}/health", expect="OK")


def postgres_cluster(root: Path, port: int, databases: tuple[str, ...] = ("prefect",)) -> tuple[Service, dict[str, str]]:
    """A throwaway PostgreSQL cluster in root/postgres, started, with `databases` created;
    returns the service and each database's URL without a driver (`postgresql://...`: MLflow's
    form; Prefect's PREFECT_API_DATABASE_CONNECTION_URL wants `postgresql+asyncpg://`).
    Benchmarks use it to run Prefect and MLflow on the database of the compose stack.
    Postgres refuses to run as root: then it runs as the `postgres` user."""
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    bin_dir = binaries[-1] if binaries else Path(shutil.which("initdb") or "initdb").parent
    data = root / "postgres"
    data.mkdir()
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        root.chmod(0o755)  # mkdtemp folders are 0700: the postgres user must reach its data folder
        shutil.chown(data, "postgres")
    subprocess.run(as_user + [str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    args = as_user + [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1", "-k", str(data)]
    service = Service("postgres", args, dict(os.environ), root).start()
    deadline = time.monotonic() + 60
    while subprocess.run([str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]).returncode:
        if time.monotonic() > deadline or service.process.poll() is not None:
            service.stop()
            raise RuntimeError(f"postgres did not start; log tail:\n{service.log_tail()}")
        time.sleep(0.3)
    for database in databases:
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database],
                       check=True, capture_output=True)
    return service, {database: f"postgresql://postgres@127.0.0.1:{port}/{database}" for database in databases}


def prefect_server(root: Path, port: int, env: dict[str, str]) -> Service:
    args = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return Service("prefect", args, env, root, health=f"http://127.0.0.1:{port}/api/health")


def receiver(root: Path, port: int, env: dict[str, str]) -> Service:
    args = [str(BIN / "trojanscan"), "serve", "--port", str(port), "--replay-db", str(root / "deliveries.sqlite")]
    return Service("receiver", args, env, root, health=f"http://127.0.0.1:{port}/stats", expect='"settled"')


def worker(root: Path, env: dict[str, str]) -> Service:
    return Service("worker", [str(BIN / "trojanscan"), "worker"], env, root)




def local_store(root: Path) -> str:
    """A SQLite MLflow store in `root` with the `models` and `trojanscan` experiments keeping
    their artifacts there too (the default would be ./mlruns); returns its URI."""
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    for name in ("models", "trojanscan"):
        client.create_experiment(name, artifact_location=(root / "artifacts" / name).as_uri())
    mlflow.set_experiment("models")
    return uri


def register_onnx(onnx_path: Path, clean_samples: Path | None, name: str) -> str:
    """Log an ONNX file as an MLflow model in a new run (with the clean samples beside it) and
    register it under `name`; returns the version."""
    import mlflow
    import onnx

    with mlflow.start_run():
        if clean_samples is not None:
            mlflow.log_artifact(str(clean_samples))
        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="model", registered_model_name=name,
                                     pip_requirements=["onnxruntime"], onnx_execution_providers=["CPUExecutionProvider"])
    return str(info.registered_model_version)
