"""The local Prefect stack: the embedded default of ``factory run`` (Prefect's ephemeral server,
made to die with the run) and ``factory up`` / ``factory down``: the Prefect and MLflow servers
(and optionally an S3-compatible server) on 127.0.0.1 as background processes, for the UIs over
the factory's results.

The Prefect server uses the same database as ``factory run``'s ephemeral server
(``PREFECT_HOME``), and MLflow the same SQLite file and artifact folder as the embedded
default, so runs made before ``factory up`` show in the UIs. What was started is written to
``<artifact root>/local-stack.json``; ``factory down`` stops exactly that.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from store import artifact_root

STATE_FILE = "local-stack.json"


def prefect_environment() -> None:
    """Embedded defaults for running flows on a laptop: Prefect's ephemeral server with a start-up
    timeout that a 2-core machine meets (its first start can take over 20 s), and task results
    persisted beside the artifacts. Anything already set in the environment wins."""
    if home := os.environ.get("PREFECT_HOME"):
        # Prefect creates its home without parents; a fresh `PREFECT_HOME=/new/dir/prefect` would
        # otherwise fail as "unable to open database file" after minutes of start-up retries.
        Path(home).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines: no telemetry attempts
    # Automations cannot be set up on a server that lives for one run, and their trigger loop kept an
    # idle ephemeral server at ~8% of a core (~3-5% without it): the largest cost of orchestration on 2 cores.
    os.environ.setdefault("PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED", "false")
    root = artifact_root()
    if not root.startswith("s3://"):  # an s3:// root's task results go to the bucket: tasks/policies.py
        os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(Path(root).resolve() / "prefect-results"))


def start_ephemeral_prefect() -> str | None:
    """Start Prefect's ephemeral server now, from this (main) thread, as a process that dies with
    this one; returns its API URL, or None when a server is configured (PREFECT_API_URL).

    Prefect starts the ephemeral server lazily and stops it at exit, but a SIGKILL (the OOM killer,
    ``kill -9``) skips that and left the server running, at ~10% of a core and holding its port,
    until the next reboot. Linux's parent-death signal ends it with its parent instead. Prefect
    keeps one ephemeral server per process, so its own clients find this one already started."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    server = _ephemeral_server_class()()
    server.start()
    return server.api_url


def _ephemeral_server_class():
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class EphemeralServerDyingWithParent(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen:
            # Prefect 3's own command and environment (SubprocessASGIServer._run_uvicorn_command),
            # plus the parent-death signal, which only the child itself can ask for.
            return subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                 "flows.local_stack:ephemeral_server_app", "--host", "127.0.0.1", "--port", str(self.port),
                 "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                     "PREFECT__SERVER_FINAL": "1",
                     **get_current_settings().to_environment_variables(exclude_unset=True)},
                preexec_fn=functools.partial(_prepare_server_child, os.getpid()))

    return EphemeralServerDyingWithParent


def ephemeral_server_app():
    """The ephemeral server's ASGI app (uvicorn's ``--factory``): Prefect's own, wrapped in
    ``RetryLockedRequests``."""
    from prefect.server.api.server import create_app

    return RetryLockedRequests(create_app())


class RetryLockedRequests:
    """ASGI middleware: a request that Prefect's server answers with its retryable 503 is run again
    here, after 50 ms, 100 ms, ... 800 ms, before the 503 goes out.

    On SQLite, a write that meets another connection's write mid-transaction fails at once with
    "database is locked" and Prefect answers 503; its client then waits 2 s, 4 s, ... (it sends no
    Retry-After). Starting a task run with a tag (the training tasks' ``gpu``) asks for concurrency
    slots, whose write lost that race to the server's own event writers on most task runs: 2 s each
    (``python bench/orchestration_overhead.py``). A lock is released within milliseconds, so the
    retry here almost always succeeds; the failed attempt was rolled back, so running it again is
    exactly what the client's retry would do, only sooner. Any other answer goes out unchanged."""

    delays_s = (0.05, 0.1, 0.2, 0.4, 0.8)

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = []  # the request's messages, replayed on each attempt
        while True:
            message = await receive()
            request.append(message)
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        for delay in (*self.delays_s, None):
            if not await self._attempt(scope, request, receive, send, last=delay is None):
                return
            await asyncio.sleep(delay)

    async def _attempt(self, scope, request, receive, send, last: bool) -> bool:
        """Run the app once; True when it answered with the retryable 503 and that answer was held."""
        replay = iter(request)
        held: list[dict] = []

        async def replay_receive():
            return next(replay, None) or await receive()

        async def hold_retryable(message):
            if message["type"] == "http.response.start" and message["status"] == 503 and not last:
                held.append(message)
            elif held and message["type"] == "http.response.body":
                held.append(message)
                if not message.get("more_body"):  # the whole 503: Prefect's retryable one, or not?
                    body = b"".join(m.get("body", b"") for m in held[1:])
                    if b"Service Unavailable" not in body:
                        for m in held:
                            await send(m)
                        held.clear()
            else:
                await send(message)

        try:
            await self.app(dict(scope), replay_receive, hold_retryable)  # a copy: the app writes its state into scope
        except Exception:
            # Starlette re-raises the error after its handler sent the 503; held, it is retried here.
            if not held:
                raise
        return bool(held)


def _prepare_server_child(parent_pid: int) -> None:
    """In the server's process before exec (Linux): SIGTERM (uvicorn's clean shutdown) when the
    parent dies, and the ``SCHED_IDLE`` scheduling class, inherited by all its threads.

    ``SCHED_IDLE``: the server's idle loops (docket's scheduler and in-memory Redis polls, ~5% of a
    core) then run only on a core the training leaves, instead of preempting one of its threads,
    which stalls the other at the next parallel region on a 2-core machine. The flow's own requests
    still get answers: while the flow waits for one, its training threads sleep."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # the parent died before the prctl: no signal would come
            os._exit(1)
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:  # a sandbox that forbids it: the server runs as before
            pass


def _state_path() -> Path:
    root = artifact_root()
    base = Path(root) if not root.startswith("s3://") else Path(os.environ.get("FACTORY_WORK_DIR", Path.home() / ".cache/factory"))
    return base.expanduser().resolve() / STATE_FILE


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _wait(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}; see {log}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s; see {log}")


def up(prefect_port: int = 4200, mlflow_port: int = 5000, s3_port: int | None = None, timeout: float = 180) -> dict:
    """Start the servers (those not already running) and return what to export."""
    from registry.tracking import default_tracking_uri

    state_path = _state_path()
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if all(_alive(s["pid"]) for s in state["servers"].values()):
            return state
    logs = state_path.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    root = Path(artifact_root()).expanduser().resolve() if not artifact_root().startswith("s3://") else None
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    commands = {
        "prefect": ([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                     str(prefect_port)], f"http://127.0.0.1:{prefect_port}/api/health"),
    }
    mlflow = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
              "--backend-store-uri", os.environ.get("MLFLOW_TRACKING_URI", default_tracking_uri())]
    if s3_port is not None:
        commands["s3"] = ([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                          f"http://127.0.0.1:{s3_port}")
        env |= {"MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": "factory",
                "AWS_SECRET_ACCESS_KEY": "factory"}  # moto accepts any key; a real S3 keeps the caller's
        mlflow += ["--artifacts-destination", "s3://factory/mlflow"]
    elif root is not None:
        mlflow += ["--artifacts-destination", str(root / "mlartifacts")]
    commands["mlflow"] = (mlflow, f"http://127.0.0.1:{mlflow_port}/health")

    servers = {}
    try:
        for name, (command, health) in commands.items():
            log = logs / f"{name}.log"
            process = subprocess.Popen(command, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)  # its own process group: down stops children too
            servers[name] = {"pid": process.pid, "url": health.removesuffix("/api/health").removesuffix("/health"),
                             "log": str(log)}
            _wait(health, process, timeout, log)
            if name == "s3":
                import boto3

                boto3.client("s3", endpoint_url=servers["s3"]["url"], region_name="us-east-1",
                             aws_access_key_id="factory", aws_secret_access_key="factory").create_bucket(Bucket="factory")
    except BaseException:
        for server in servers.values():
            _stop(server["pid"])
        raise
    exports = {"PREFECT_API_URL": f"{servers['prefect']['url']}/api", "MLFLOW_TRACKING_URI": servers["mlflow"]["url"]}
    if "s3" in servers:
        exports |= {"AWS_ENDPOINT_URL": servers["s3"]["url"], "AWS_ACCESS_KEY_ID": "factory",
                    "AWS_SECRET_ACCESS_KEY": "factory", "FACTORY_ARTIFACT_ROOT": "s3://factory/artifacts"}
    state = {"servers": servers, "exports": exports}
    state_path.write_text(json.dumps(state, indent=1))
    return state


def _stop(pid: int, grace: float = 15) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def down() -> list[str]:
    """Stop what ``up`` started; returns the names of the servers stopped."""
    state_path = _state_path()
    if not state_path.is_file():
        return []
    state = json.loads(state_path.read_text())
    for server in state["servers"].values():
        _stop(server["pid"])
    state_path.unlink()
    return list(state["servers"])
