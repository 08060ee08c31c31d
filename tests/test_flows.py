"""The factory as Prefect flows: registration with lineage, caching across runs, resume after a
kill (a re-run of ``factory run``, or the UI's "Retry" of a served deployment's flow run), the
ephemeral server's lifetime, and the deployment configuration."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, free_port, recipe_dict, wait_for_http, write_recipe

STAGE_TASKS = ("data", "pretrain", "importance", "prune", "distill", "evaluate")
FLOW_SECTIONS = dict(
    compress={"importance": {"samples": 8, "batch_size": 4, "layer_samples": 4},
              "target": {"hidden_size": 48, "intermediate_size": 64, "mamba_num_heads": 4}},
    distill={"train": {"steps": 30, "batch_size": 8, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 2,
                       "checkpoint_every": 10, "keep_checkpoints": 5, "eval_every": 30, "eval_batches": 2}},
    evaluate={"sections": ["quality", "efficiency"],
              "quality": {"validation_rows": 8, "generation_prompts": 2, "prompt_tokens": 8, "generation_tokens": 8},
              "efficiency": {"batch_sizes": [1], "context_lengths": [32], "decode_tokens": 4, "repeats": 1},
              "gate": {"max_val_loss_ratio": 1.5}},
)


@pytest.fixture(scope="module")
def flow_env(tmp_path_factory):
    """An artifact root, MLflow on SQLite and Prefect results for the in-process flows."""
    base = tmp_path_factory.mktemp("flows")
    env = {"FACTORY_ARTIFACT_ROOT": str(base / "artifacts"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}",
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(base / "artifacts" / "prefect-results")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield base, env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def harness(flow_env):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=240):
        yield


def _task_states(flow_run_id) -> dict[str, str]:
    """Task name (without the run suffix) -> state name, for one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}


def _run_factory_flow(recipe: Path):
    from flows.factory import factory

    state = factory(str(recipe), return_state=True)
    assert state.is_completed(), state
    return state.result(), state.state_details.flow_run_id


def _wait_until(condition, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(every)
    return value


def _versions(name: str) -> list:
    from registry.tracking import client

    return client().search_model_versions(f"name = '{name}'")


def test_factory_flow_registers_a_champion_whose_lineage_points_to_its_teacher(corpus_dir, flow_env, harness):
    base, _ = flow_env
    recipe = write_recipe(base / "micro.yaml", recipe_dict(corpus_dir, **FLOW_SECTIONS))
    refs, flow_run = _run_factory_flow(recipe)
    assert set(STAGE_TASKS) <= set(_task_states(flow_run))

    from registry.tracking import client

    students, teachers = _versions("micro"), _versions("micro-teacher")
    assert len(students) == 1 and len(teachers) == 1
    student = students[0]
    assert str(client().get_registered_model("micro").aliases.get("champion")) == str(student.version)
    assert student.tags["parent_model"] == "micro-teacher" and student.tags["parent_version"] == str(teachers[0].version)
    assert student.tags["checkpoint_digest"] == refs["distilled"].digest
    assert refs["student_version"].uri == f"models:/micro/{student.version}"
    # The version's source run is the distill stage's run (with its data); its logged model holds the evaluation.
    distill_run = client().get_run(student.run_id)
    assert distill_run.info.run_name == "distill"
    assert {d.dataset.digest for d in distill_run.inputs.dataset_inputs} == {refs["data"].digest[:32]}
    model = client().get_logged_model(student.source.removeprefix("models:/"))
    assert model.source_run_id == student.run_id
    assert {"val_loss", "checkpoint/val_loss"} <= {m.key for m in model.metrics}
    assert client().get_run(teachers[0].run_id).info.run_name == "pretrain"

    # The Prefect UI shows each stage's summary and the training progress.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        published = c.read_artifacts()
    assert {"micro-pretrain", "micro-distill", "micro-distill-progress", "micro-evaluate"} <= {a.key for a in published}
    # Progress is sent at most every 10 s, but a finished stage always reads 100%.
    assert [a.data for a in published if a.key.endswith("-progress")] == [100.0, 100.0]


def test_unchanged_rerun_is_cached_and_a_distill_change_recomputes_only_what_follows(corpus_dir, flow_env, harness):
    base, _ = flow_env
    recipe = write_recipe(base / "micro.yaml", recipe_dict(corpus_dir, **FLOW_SECTIONS))
    _run_factory_flow(recipe)  # (already run by the test above when run together)

    started = time.monotonic()
    _, flow_run = _run_factory_flow(recipe)
    elapsed = time.monotonic() - started
    states = _task_states(flow_run)
    assert all(states[t] == "Cached" for t in STAGE_TASKS), states
    assert elapsed < 60, elapsed
    assert len(_versions("micro")) == 1  # registration is idempotent on the digest

    changed = FLOW_SECTIONS | {"distill": {"train": FLOW_SECTIONS["distill"]["train"] | {"lr": 2e-3}}}
    recipe = write_recipe(base / "micro.yaml", recipe_dict(corpus_dir, **changed))
    _, flow_run = _run_factory_flow(recipe)
    states = _task_states(flow_run)
    assert all(states[t] == "Cached" for t in ("data", "pretrain", "importance", "prune")), states
    assert states["distill"] == "Completed" and states["evaluate"] == "Completed", states
    assert len(_versions("micro")) == 2  # a new student, a new version


def test_a_stage_written_elsewhere_runs_as_a_cached_prefect_task(corpus_dir, flow_env, harness):
    """tests/toy_stage.py plugged in with one line (tests/test_contract.py: compose_with_toy) gets
    a Prefect task of its own, cached on its key like every stage: no task or flow code changes."""
    from prefect import flow

    from flows.factory import PrefectRunner
    from flows.pipeline import context_for
    from flows.recipe import load_recipe
    from store import open_store

    from .test_contract import compose_with_toy

    @flow(name="toy-factory")
    def toy_factory(path: str) -> dict:
        recipe = load_recipe(path)
        return compose_with_toy(recipe, PrefectRunner(open_store(), context_for(recipe)))

    base, _ = flow_env
    recipe = write_recipe(base / "micro.yaml", recipe_dict(corpus_dir, **FLOW_SECTIONS))
    states = []
    for _ in range(2):
        state = toy_factory(str(recipe), return_state=True)
        assert state.is_completed(), state
        states.append(_task_states(state.state_details.flow_run_id))
    assert states[0]["toy"] == "Completed" and states[1]["toy"] == "Cached", states
    assert states[1]["data"] == states[1]["pretrain"] == "Cached", states
    assert state.result()["toy"].metadata["parameters"] == state.result()["teacher"].architecture.parameters


def _plan(recipe: Path, root: str) -> list:
    """The plan of ``recipe`` up to evaluation against the store at ``root`` (PlanRunner, nothing runs)."""
    from flows.pipeline import PlanRunner, compose
    from flows.recipe import load_recipe
    from store import open_store

    planner = PlanRunner(open_store(root))
    return planner.name_steps(compose(load_recipe(str(recipe)), "evaluate", planner))


@pytest.mark.slow  # `factory run` subprocesses, killed and run again
def test_killed_during_pretraining_and_distillation_then_rerun_resumes_registers_once_with_a_clean_runs_digests(
        corpus_dir, tmp_path):
    env = dict(os.environ, FACTORY_ARTIFACT_ROOT=str(tmp_path / "artifacts"), PREFECT_HOME=str(tmp_path / "prefect"),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for key in ("PREFECT_API_URL", "PREFECT_RESULTS_LOCAL_STORAGE_PATH"):
        env.pop(key, None)
    pretrain = {"steps": 30, "checkpoint_every": 10, "keep_checkpoints": 5, "eval_every": 30}
    recipe = write_recipe(tmp_path / "micro.yaml", recipe_dict(corpus_dir, train=pretrain, **FLOW_SECTIONS))
    command = [sys.executable, "-m", "flows.cli", "run", str(recipe)]
    root = tmp_path / "artifacts"

    # The same recipe, never interrupted, in a store of its own (no Prefect needed).
    clean_root = tmp_path / "clean"
    clean = subprocess.run([sys.executable, "-m", "flows.cli", "evaluate", str(recipe)], cwd=REPO,
                           env=dict(env, FACTORY_ARTIFACT_ROOT=str(clean_root)), capture_output=True, text=True,
                           timeout=900)
    assert clean.returncode == 0, clean.stderr[-3000:]

    def run_until_killed(checkpoint: str, what: str) -> None:
        """Start ``factory run``; SIGKILL the whole job (as when its container dies) once ``checkpoint`` is sealed."""
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)

        def sealed():
            assert child.poll() is None, f"the flow ended before {what}"
            return list(root.glob(f"{checkpoint}/COMPLETE"))

        _wait_until(sealed, 600, what, every=0.05)
        os.killpg(child.pid, signal.SIGKILL)  # its ephemeral Prefect server must not outlive the test either
        assert child.wait() == -signal.SIGKILL

    run_until_killed("pretrain/*/checkpoints/step_00000010", "pretraining's first checkpoint")
    assert not list(root.glob("pretrain/*/model/model.safetensors"))
    run_until_killed("distill/*/checkpoints/step_00000010", "distillation's first checkpoint")
    assert not list(root.glob("distill/*/model/model.safetensors"))

    # The plan says what a re-run will do, and why, without starting anything.
    plan = subprocess.run([*command[:-1], "--plan", str(recipe)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert plan.returncode == 0, plan.stderr[-3000:]
    steps = {name: (stage, status, reason) for name, stage, status, reason in  # the lines after the summary
             (re.split(r"\s{2,}", line, maxsplit=3) for line in plan.stdout.strip().split("\n\n")[-1].splitlines())}
    for name, stage in (("data", "data"), ("teacher", "pretrain"), ("scores", "importance"), ("student", "prune")):
        assert steps[name][:2] == (stage, "cached"), steps
    assert steps["distilled"][:2] == ("distill", "to run") and steps["distilled"][2].startswith("no stored result")
    assert steps["evaluation"] == ("evaluate", "to run", "after distill")
    assert steps["teacher_version"][:2] == ("register", "to run")  # never cached: registration is idempotent
    assert steps["student_version"] == ("register", "to run", "after distill, evaluate")

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    for stage in ("data", "pretrain", "importance", "prune"):
        assert f"Task run '{stage}-" in log and "Cached" in log
    assert "resuming distill micro from" in log
    assert rerun.stdout.strip().splitlines()[-1] == "models:/micro/1"

    # Killed twice and resumed, the run made what the clean run made: the same keys for every stage and the
    # same digests for every artifact (the evaluation's report holds timings: its key is what must match).
    killed_plan, clean_plan = _plan(recipe, str(root)), _plan(recipe, str(clean_root))
    assert all(step.cached for step in killed_plan + clean_plan if step.cacheable)
    assert [(s.name, s.key) for s in killed_plan] == [(s.name, s.key) for s in clean_plan]
    digests = lambda plan: {s.name: s.result.digest for s in plan if s.cacheable and s.stage != "evaluate"}  # noqa: E731
    assert digests(killed_plan) == digests(clean_plan)

    # Everything stored now: a third run starts no Prefect server, runs no flow, registers nothing new.
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "every stage is stored" in again.stderr and "Flow run" not in again.stdout + again.stderr
    assert "Starting temporary server" not in again.stdout + again.stderr
    table = lambda out: out.strip().splitlines()[-8:]  # noqa: E731  the table, the gate, the report, the URI
    assert table(again.stdout) == table(rerun.stdout)

    check = subprocess.run([sys.executable, "-m", "flows.cli", "models", "list", "--json"], cwd=REPO, env=env,
                           capture_output=True, text=True)
    versions = json.loads(check.stdout)
    student, teacher = ([r for r in versions if r["name"] == name] for name in ("micro", "micro-teacher"))
    assert len(student) == len(teacher) == 1 and "champion" in student[0]["aliases"]
    assert student[0]["digest"] == digests(clean_plan)["distilled"]
    assert teacher[0]["digest"] == digests(clean_plan)["teacher"]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 (its own database) for the deployment test."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                                str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/health", timeout=240, process=process)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


def test_a_served_deployment_killed_mid_run_and_retried_from_the_ui_resumes(corpus_dir, tmp_path, prefect_server):
    """What the UI's "Run" and then "Retry" do for a served factory deployment whose flow-run
    process dies during distillation (the OOM killer, a lost node): the retry reuses every
    finished stage, resumes distillation from its checkpoint and registers one version."""
    import psutil
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.exceptions import ObjectNotFound
    from prefect.states import AwaitingRetry

    env = dict(os.environ, PREFECT_API_URL=prefect_server, FACTORY_ARTIFACT_ROOT=str(tmp_path / "artifacts"),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_RUNNER_POLL_FREQUENCY="2")
    env.pop("PREFECT_RESULTS_LOCAL_STORAGE_PATH", None)
    recipe = write_recipe(tmp_path / "micro.yaml", recipe_dict(corpus_dir, **FLOW_SECTIONS))
    serve_log = tmp_path / "serve.log"
    serve = subprocess.Popen([sys.executable, "-c", "from flows.factory import factory; factory.serve(name='ci')"],
                             cwd=REPO, env=env, stdout=open(serve_log, "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)

    def deployment():
        try:
            return client.read_deployment_by_name("factory/ci")
        except ObjectNotFound:
            assert serve.poll() is None, serve_log.read_text()[-3000:]

    def state():
        return client.read_flow_run(run.id).state

    try:
        with SyncPrefectClient(prefect_server) as client:
            # "Run": the server schedules a flow run; the served flow picks it up.
            run = client.create_flow_run_from_deployment(_wait_until(deployment, 240, "the deployment").id,
                                                         parameters={"recipe": str(recipe)})
            root = tmp_path / "artifacts"
            _wait_until(lambda: list(root.glob("distill/*/checkpoints/step_00000010/COMPLETE"))
                        or state().is_final(), 600, "distillation's first checkpoint", every=0.05)
            assert not state().is_final(), state()
            # The flow run's own process (the runner spawns one per run), killed as the OOM killer would.
            flow_process, = [p for p in psutil.Process(serve.pid).children(recursive=True)
                             if "spawn_main" in " ".join(p.cmdline())]
            flow_process.kill()
            crashed = _wait_until(lambda: (s := state()).is_final() and s, 120, "the runner to report the crash")
            assert crashed.is_crashed(), crashed
            assert not list(root.glob("distill/*/model/model.safetensors"))

            # "Retry" (the UI sets this state, forced, on the same flow run).
            client.set_flow_run_state(run.id, AwaitingRetry(message="Retry from the UI"), force=True)
            final = _wait_until(lambda: (s := state()).is_final() and s.name != "Crashed" and s, 600, "the retry")
            assert final.is_completed(), final.message + serve_log.read_text()[-3000:]
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)

    states = {}
    for r in sorted(task_runs, key=lambda r: r.created):
        states.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state.name)
    for stage in ("data", "pretrain", "importance", "prune"):  # done before the kill: cached on retry
        assert states[stage] == ["Completed", "Cached"], states
    assert states["distill"][-1] == "Completed" and states["register"][-1] == "Completed", states
    assert "resuming distill micro from" in serve_log.read_text()
    check = subprocess.run([sys.executable, "-m", "flows.cli", "models", "list", "--json"], cwd=REPO, env=env,
                           capture_output=True, text=True)
    rows = [r for r in json.loads(check.stdout) if r["name"] == "micro"]
    assert len(rows) == 1 and rows[0]["version"] == "1" and "champion" in rows[0]["aliases"], rows


@pytest.mark.slow  # a `factory run` subprocess and its server
def test_the_ephemeral_prefect_server_yields_to_training_and_dies_with_a_killed_factory_run(corpus_dir, tmp_path):
    """The ephemeral server runs in the SCHED_IDLE class (the training keeps both cores), and
    ``kill -9`` of ``factory run`` alone (not its process group) must not leave it running."""
    import psutil

    env = dict(os.environ, FACTORY_ARTIFACT_ROOT=str(tmp_path / "artifacts"), PREFECT_HOME=str(tmp_path / "prefect"),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    for key in ("PREFECT_API_URL", "PREFECT_RESULTS_LOCAL_STORAGE_PATH"):
        env.pop(key, None)
    recipe = write_recipe(tmp_path / "micro.yaml", recipe_dict(corpus_dir, **FLOW_SECTIONS))
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(recipe)], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        server = _wait_until(lambda: next((p for p in psutil.Process(run.pid).children()
                                           if "uvicorn" in p.cmdline()), None), 120, "the ephemeral server")
        port = server.cmdline()[server.cmdline().index("--port") + 1]
        wait_for_http(f"http://127.0.0.1:{port}/api/health", timeout=240)
        assert {os.sched_getscheduler(thread.id) for thread in server.threads()} == {os.SCHED_IDLE}
        run.kill()
        assert run.wait() == -signal.SIGKILL
        _, alive = psutil.wait_procs([server], timeout=30)
        assert not alive, "the ephemeral Prefect server outlived its factory run"
    finally:
        try:
            os.killpg(run.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# One flow run on a "machine": its own disk (FACTORY_WORK_DIR) and its own Prefect (PREFECT_HOME: an
# ephemeral server and database of its own), as `factory run` starts it; what Prefect recorded: argv[2].
_FLOW_ON_A_MACHINE = """
import json, sys
from flows.local_stack import prefect_environment, start_ephemeral_prefect
prefect_environment()
start_ephemeral_prefect()
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from flows.factory import pretrain
state = pretrain(sys.argv[1], return_state=True)
flow_run = state.state_details.flow_run_id
with get_client(sync_client=True) as client:
    name = client.read_flow_run(flow_run).name
    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run])))
open(sys.argv[2], "w").write(json.dumps({"state": state.name, "name": name,
                                         "tasks": {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}}))
"""


def test_stage_results_in_the_bucket_make_every_stage_cached_on_a_new_machine(corpus_dir, tmp_path, s3_env):
    """With an s3:// root, the stage tasks' results live in the bucket (tasks/policies.py:
    result_storage), so a flow run on another machine, with an empty disk and a Prefect server and
    database of its own, finds every stage Cached and computes nothing."""
    import boto3

    from tasks.policies import result_storage

    assert result_storage(str(tmp_path / "local")) is None  # a local root: Prefect's local storage, as before
    bucket = boto3.client("s3")
    bucket.create_bucket(Bucket="cluster")
    root = "s3://cluster/factory"
    recipe = write_recipe(tmp_path / "micro.yaml", recipe_dict(corpus_dir))

    def flow_run_on(machine: str) -> dict:
        home = tmp_path / machine
        env = dict(os.environ, FACTORY_ARTIFACT_ROOT=root, FACTORY_WORK_DIR=str(home / "work"),
                   PREFECT_HOME=str(home / "prefect"), MLFLOW_TRACKING_URI=f"sqlite:///{home}.db")
        for key in ("PREFECT_API_URL", "PREFECT_RESULTS_LOCAL_STORAGE_PATH"):
            env.pop(key, None)
        out = tmp_path / f"{machine}.json"
        run = subprocess.run([sys.executable, "-c", _FLOW_ON_A_MACHINE, str(recipe), str(out)], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0 and out.is_file(), run.stderr[-3000:]
        return json.loads(out.read_text())

    def objects() -> dict[str, tuple]:
        listed = bucket.list_objects_v2(Bucket="cluster", Prefix="factory/")["Contents"]
        return {o["Key"]: (o["ETag"], o["LastModified"]) for o in listed}

    first = flow_run_on("machine-a")
    assert first == {"state": "Completed", "name": "micro: pretrain",
                     "tasks": {"data": "Completed", "pretrain": "Completed"}}, first
    stored = objects()
    results = sorted(k.removeprefix("factory/prefect-results/").split("-")[0] for k in stored
                     if k.startswith("factory/prefect-results/"))
    assert results == ["data", "pretrain"], sorted(stored)  # the refs, under their cache keys

    second = flow_run_on("machine-b")
    assert second["state"] == "Completed", second
    assert second["tasks"] == {"data": "Cached", "pretrain": "Cached"}, second
    assert objects() == stored  # nothing published, nothing rewritten
    work = tmp_path / "machine-b" / "work"
    assert not work.exists() or not any(work.iterdir()), sorted(work.rglob("*"))  # nothing trained or fetched


def test_the_ephemeral_server_retries_sqlite_lock_conflicts_itself_and_passes_other_answers():
    """Prefect's server answers a SQLite "database is locked" with a 503 its client retries only
    after 2 s; the ephemeral server's app (flows/local_stack.py) runs such a request again at once."""
    import sqlite3

    import sqlalchemy.exc
    from prefect.server.api.server import custom_internal_exception_handler
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from flows.local_stack import RetryLockedRequests

    bodies, locked_for = [], {"write": 2, "stuck": 99}

    async def write(request):  # the first attempts meet another connection's write
        bodies.append(await request.body())
        name = request.url.path.strip("/")
        if locked_for[name] > 0:
            locked_for[name] -= 1
            raise sqlalchemy.exc.OperationalError("UPDATE ...", {}, sqlite3.OperationalError("database is locked"))
        return JSONResponse({"ok": True})

    async def not_ready(request):  # a 503 of another kind: not Prefect's retryable answer
        bodies.append(await request.body())
        return JSONResponse({"detail": "not ready"}, status_code=503)

    app = Starlette(routes=[Route("/write", write, methods=["POST"]), Route("/stuck", write, methods=["POST"]),
                            Route("/not-ready", not_ready, methods=["POST"])],
                    exception_handlers={Exception: custom_internal_exception_handler})
    client = TestClient(RetryLockedRequests(app), raise_server_exceptions=False)

    answer = client.post("/write", content=b'{"slots": 1}')
    assert answer.status_code == 200 and answer.json() == {"ok": True}
    assert bodies == [b'{"slots": 1}'] * 3  # the same request, run until the lock was gone

    bodies.clear()
    answer = client.post("/not-ready", content=b"x")
    assert answer.status_code == 503 and answer.json() == {"detail": "not ready"} and bodies == [b"x"]

    bodies.clear()
    answer = client.post("/stuck", content=b"y")  # a lock that stays: Prefect's 503, for its client to retry
    assert answer.status_code == 503 and answer.json() == {"exception_message": "Service Unavailable"}
    assert len(bodies) == 1 + len(RetryLockedRequests.delays_s)


def test_prefect_yaml_and_work_pool_templates_are_valid():
    import importlib

    from prefect import Flow

    config = yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())
    assert config["deployments"]
    for deployment in config["deployments"]:
        module, name = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), name)
        assert isinstance(flow, Flow), deployment["name"]
        recipe = deployment["parameters"]["recipe"]
        assert (REPO / recipe).is_file(), recipe
        flow.validate_parameters(deployment["parameters"])  # the UI form accepts them
        assert deployment["work_pool"]["name"].startswith("factory-")
        # The shared tracking server, from the deploying shell (or the worker's environment).
        assert deployment["work_pool"]["job_variables"]["env"]["MLFLOW_TRACKING_URI"] == "{{ $MLFLOW_TRACKING_URI }}"
        for schedule in deployment.get("schedules", []):
            from prefect.client.schemas.schedules import CronSchedule

            CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))

    templates = {p.stem: json.loads(p.read_text()) for p in (REPO / "deploy" / "work-pools").glob("*.json")}
    for name, template in templates.items():
        assert set(template) == {"job_configuration", "variables"}, name
        # every {{ variable }} the job uses is declared
        used = {v.strip() for v in __import__("re").findall(r"{{\s*([\w]+)\s*}}", json.dumps(template["job_configuration"]))}
        assert used <= set(template["variables"]["properties"]), (name, used - set(template["variables"]["properties"]))
    pod = templates["kubernetes-gpu"]["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_limit }}"
    assert pod["nodeSelector"] == "{{ node_selector }}"
    requests = templates["docker-gpu"]["job_configuration"]["container_create_kwargs"]["device_requests"]
    assert requests[0]["Capabilities"] == [["gpu"]] and requests[0]["Count"] == "{{ gpu_count }}"
    assert "CUDA_VISIBLE_DEVICES" in templates["process"]["variables"]["properties"]["env"]["default"]
    for name, template in templates.items():  # a deployment made without prefect.yaml still gets a server
        tracking = template["variables"]["properties"]["env"]["default"]["MLFLOW_TRACKING_URI"]
        assert tracking.startswith("http://"), (name, tracking)


def test_only_transient_infrastructure_errors_are_retried():
    from botocore.exceptions import ClientError, EndpointConnectionError

    from model.train import TrainingDiverged
    from tasks.policies import is_transient

    throttled = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
    denied = ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "PutObject")
    wrapped = RuntimeError("upload failed")
    wrapped.__cause__ = EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
    assert is_transient(throttled) and is_transient(wrapped) and is_transient(ConnectionResetError())
    for deterministic in (denied, ValueError("bad recipe"), TrainingDiverged("loss is nan"),
                          RuntimeError("CUDA out of memory"), FileNotFoundError("no checkpoint")):
        assert not is_transient(deterministic), deterministic
