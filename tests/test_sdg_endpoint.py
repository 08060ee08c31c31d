"""The OpenAI-compatible endpoint backend against a real server: ``transformers serve``
(FastAPI + uvicorn, from transformers' ``serving`` extra) on 127.0.0.1 serving the tiny
checkpoint. A small fault-injecting proxy in front of it answers 429 / 503 / slowly for
a while, to show retries with backoff, the concurrency limit and clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from model.contract import StageContext
from sdg import sdg_stage
from sdg.backends import ChatRequest, EndpointError, EndpointGenerator
from sdg.spec import SDGSpec
from store.local import LocalStore

from .conftest import free_port, wait_for_http
from .test_sdg_generation import tiny_checkpoint

pytest.importorskip("openai", reason="transformers serve needs the `serving` extra (openai, fastapi, uvicorn)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``transformers serve FOLDER`` on 127.0.0.1; yields (base URL, model id)."""
    folder = tiny_checkpoint(tmp_path_factory)
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder),
                                    "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/health", timeout=120, process=process)
            yield f"http://127.0.0.1:{port}/v1", str(folder)
        finally:
            process.terminate()
            process.wait(timeout=30)


class FaultyProxy:
    """Forwards to the real server, except while ``fault(n, elapsed)`` returns a reply
    (status, headers, delay) for the n-th request; counts requests in flight."""

    def __init__(self, upstream: str, fault=lambda n, elapsed: None):
        self.upstream, self.fault = upstream.removesuffix("/v1"), fault
        self.requests, self.in_flight, self.max_in_flight = 0, 0, 0
        self.lock = threading.Lock()
        self.start = time.monotonic()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self, method: str):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else None
                with proxy.lock:
                    proxy.requests += 1
                    n = proxy.requests
                    proxy.in_flight += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    fault = proxy.fault(n, time.monotonic() - proxy.start)
                    if fault is not None:
                        status, headers, delay = fault
                        time.sleep(delay)
                        self._reply(status, json.dumps({"error": {"message": f"injected {status}"}}).encode(), headers)
                        return
                    request = urllib.request.Request(proxy.upstream + self.path, data=body, method=method,
                                                     headers={"Content-Type": "application/json"})
                    try:
                        with urllib.request.urlopen(request, timeout=60) as response:
                            self._reply(response.status, response.read(), {"Content-Type": "application/json"})
                    except urllib.error.HTTPError as e:
                        self._reply(e.code, e.read())
                finally:
                    with proxy.lock:
                        proxy.in_flight -= 1

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(served):
    proxies = []

    def make(fault=lambda n, elapsed: None):
        proxies.append(FaultyProxy(served[0], fault))
        return proxies[-1]

    yield make
    for p in proxies:
        p.close()


def _requests(n: int) -> list[ChatRequest]:
    return [ChatRequest(messages=[{"role": "user", "content": f"Tell me about river number {i}."}],
                        max_new_tokens=8, temperature=0.7) for i in range(n)]


def test_endpoint_generates_with_a_concurrency_limit_independent_of_the_batch(served, proxy):
    p = proxy()
    generator = EndpointGenerator(p.url, max_concurrency=3)  # model: discovered from GET /v1/models
    assert generator.model == served[1] and generator.identity == f"endpoint:{p.url}#{served[1]}"
    results = dict(generator.generate_iter(_requests(8)))
    assert sorted(results) == list(range(8)) and all(isinstance(t, str) for t in results.values())
    assert any(results.values())  # the tiny model's text is noise, but it is text from the server
    assert 2 <= p.max_in_flight <= 3 and generator.stats.max_in_flight <= 3
    generator.close()


def test_a_server_answering_429_for_a_while_is_retried_with_backoff(served, proxy):
    p = proxy(lambda n, elapsed: (429, {}, 0.0) if elapsed < 1.0 else None)
    generator = EndpointGenerator(p.url, model=served[1], max_concurrency=2, backoff_s=0.1, max_backoff_s=2.0,
                                  max_retries=8)
    results = dict(generator.generate_iter(_requests(2)))
    assert sorted(results) == [0, 1]
    assert generator.stats.retries >= 2
    # Exponential with jitter: each wait lies in [ceiling/2, ceiling], ceiling = 0.1 * 2^attempt.
    waits = generator.stats.waits
    assert all(0.05 - 1e-9 <= w <= 2.0 for w in waits) and max(waits) > 0.1  # it backed off further each time
    assert p.requests == 2 + generator.stats.retries
    generator.close()


def test_retry_after_is_honoured_and_5xx_and_timeouts_are_retried(served, proxy):
    faults = {1: (429, {"Retry-After": "0.4"}, 0.0), 2: (503, {}, 0.0), 3: (200, {}, 3.0)}  # 3: too slow
    p = proxy(lambda n, elapsed: faults.get(n))
    generator = EndpointGenerator(p.url, model=served[1], max_concurrency=1, timeout_s=1.0, backoff_s=0.05)
    [(_, text)] = list(generator.generate_iter(_requests(1)))
    assert isinstance(text, str)
    assert generator.stats.retries == 3 and generator.stats.waits[0] == pytest.approx(0.4)
    assert p.requests == 4


def test_refused_requests_fail_at_once_with_the_reason(served, proxy):
    p = proxy(lambda n, elapsed: (400, {}, 0.0))
    generator = EndpointGenerator(p.url, model=served[1], backoff_s=0.05)
    with pytest.raises(EndpointError, match="HTTP 400.*injected 400"):
        list(generator.generate_iter(_requests(1)))
    assert generator.stats.retries == 0
    always_busy = EndpointGenerator(proxy(lambda n, elapsed: (503, {}, 0.0)).url, model=served[1], max_retries=2,
                                    backoff_s=0.01)
    with pytest.raises(EndpointError, match="still failing after 2 retries: HTTP 503"):
        list(always_busy.generate_iter(_requests(1)))


def test_sdg_stage_with_an_endpoint_generator(tmp_path, served, proxy):
    p = proxy(lambda n, elapsed: (429, {}, 0.0) if n % 4 == 0 else None)  # a busy server now and then
    spec = SDGSpec.model_validate({
        "generator": {"endpoint": p.url, "endpoint_model": served[1], "max_new_tokens": 8, "temperature": 0.7,
                      "max_concurrency": 2, "backoff_s": 0.05},
        "open_qa": {"topics": ["rivers", "mountains"], "subtopics_per_topic": 0, "questions_per_topic": 1,
                    "revise": False},
        "instruction_following": {"prompts": 2, "constraints": ["no_commas"]},
    })
    ref = sdg_stage.run(spec, {}, LocalStore(tmp_path / "store"), StageContext("endpoint"))
    rows = [json.loads(line) for line in (Path(ref.uri) / "sft.jsonl").read_text().splitlines()]
    assert ref.metadata["generator"] == f"endpoint:{p.url}#{served[1]}"
    assert ref.metadata["stats"]["responses"]["generated"] == 2 * ref.metadata["stats"]["prompts"]["kept"]
    assert all(r["generator"] == ref.metadata["generator"] for r in rows)
