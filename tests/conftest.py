"""Shared fixtures: a small real-text corpus, micro recipes, the factory CLI as a subprocess, the
servers the slow tier starts, and the rule that keeps the fast tier fast.

Two tiers: ``make test-fast`` (``pytest -m "not slow"``) runs in-process code only; ``make test``
runs everything. A test is slow when it starts a server (through a fixture in SERVER_FIXTURES:
marked automatically) or a process (marked by hand; a fast test that starts one fails, saying so).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

SERVER_FIXTURES = {"s3_server", "s3_env", "mlflow_server", "server_store", "auth_s3", "served", "proxy", "harness",
                   "prefect_server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fast_tests_start_no_process(request, monkeypatch):
    """Outside the slow tier, starting a Python process (the factory CLI, torchrun, a server, the
    SDG sandbox) fails the test with what to do. Short tools libraries call on their own
    (``git describe`` for lineage, ``file`` in ``platform``) are let through."""
    if request.node.get_closest_marker("slow") is not None:
        return
    execute_child = subprocess.Popen._execute_child

    def refuse(self, args, *rest, **kwargs):
        program = Path(str(args[0] if isinstance(args, list | tuple) else args).split()[0]).name
        if program.startswith("python") or program in ("unshare", "bwrap", Path(sys.executable).name):
            raise AssertionError(f"{request.node.nodeid} starts a process ({program}): mark it @pytest.mark.slow")
        return execute_child(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)

# A recipe small enough for a test: the `micro` preset (every layer type, 4 Mamba groups),
# 64-token sequences, a 512-token BPE, a handful of steps.
MICRO_RECIPE = {
    "name": "micro",
    "data": {"source": None, "seq_len": 64, "validation_fraction": 0.1},
    "tokenizer": {"vocab_size": 512},
    "model": {"preset": "micro"},
    "train": {"steps": 6, "batch_size": 8, "micro_batch_size": 4, "lr": 1e-2, "warmup_steps": 2,
              "checkpoint_every": 3, "eval_every": 3, "eval_batches": 2},
}


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """About 60 real documents (standard-library modules, as .txt files): ~1 MB of code and prose."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("corpus")
    files = sorted((stdlib / "json").glob("*.py")) + sorted(stdlib.glob("[a-c]*.py"))[:55]
    for path in files:
        shutil.copy(path, out / f"{path.parent.name}-{path.stem}.txt")
    return out


@pytest.fixture(scope="session")
def micro_data(corpus_dir, tmp_path_factory):
    """``corpus_dir`` as 64-token rows with a 512-token BPE (a DataRef), prepared once per session."""
    from model.spec import DataSpec, TokenizerSpec
    from store.local import LocalStore

    store = LocalStore(tmp_path_factory.mktemp("micro-data"))
    return prepare_data(DataSpec(source=str(corpus_dir), seq_len=64, validation_fraction=0.1),
                        TokenizerSpec(vocab_size=512), store)


def prepare_data(data, tokenizer, store, recipe_name: str = "micro"):
    """The data stage on a data and a tokenizer section (a DataRef)."""
    from model import data_stage
    from model.contract import StageContext

    return data_stage.run(data_stage.DataStageSpec(data=data, tokenizer=tokenizer), {}, store, StageContext(recipe_name))


def recipe_dict(corpus: Path, **sections) -> dict:
    """MICRO_RECIPE on ``corpus`` with sections updated key by key."""
    recipe = copy.deepcopy(MICRO_RECIPE)
    recipe["data"]["source"] = str(corpus)
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(section), dict):
            recipe[section].update(values)
        else:
            recipe[section] = values
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def artifact_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "artifacts"
    monkeypatch.setenv("FACTORY_ARTIFACT_ROOT", str(root))
    return root


def run_factory(*args: str, root: Path, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, FACTORY_ARTIFACT_ROOT=str(root))
    result = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"factory {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, for the whole session.

    Yields the endpoint URL; tests point boto3 at it with the standard AWS_* variables."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(endpoint, timeout=60, process=process)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """boto3 configured the standard way for the test server: endpoint and (fake) credentials."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server


MLFLOW_ARTIFACT_BUCKET = "mlflow-artifacts"


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 for the whole session: a SQLite backend and
    artifacts proxied to ``s3://mlflow-artifacts/artifacts`` on the moto server (so clients
    need no S3 credentials). Yields the tracking URI; starting it takes ~10-25 s."""
    import boto3

    folder = tmp_path_factory.mktemp("mlflow-server")
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=MLFLOW_ARTIFACT_BUCKET)
    env = dict(os.environ, **aws, AWS_ENDPOINT_URL=s3_server, MLFLOW_S3_ENDPOINT_URL=s3_server)
    env.pop("MLFLOW_TRACKING_URI", None)
    port = free_port()
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", f"s3://{MLFLOW_ARTIFACT_BUCKET}/artifacts"],
        cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", timeout=180, process=process)
        yield uri
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def run_cli(*args: str, capsys) -> tuple[int, str, str]:
    """The factory command in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from flows.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: on a shared 2-core machine, OpenMP threads waiting for
    busy cores made tiny forwards 10-20x slower. Restored afterwards for other modules.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
