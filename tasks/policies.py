"""What every stage task shares: its cache policy and its retry rule.

Cache key (docs/resumability.md, level 1): the stage's own ``key`` (model/contract.py): the
stage name, the digest of the recipe section it reads, the digests of its input refs and its
code version. Results are the stage's JSON ref, persisted beside the artifacts, so a new flow
run (a schedule, a UI click, ``factory run`` again, on this machine or another) reuses every
finished stage. The flow checks that a cached ref's artifact is still whole and refreshes the
task when it is not (``flows/factory.py: PrefectRunner``); the stages also skip work whose
stored result verifies, so even a refreshed task recomputes nothing that is intact.

Where results live (``result_storage``), under the cache key as file name:

- a local root: ``<root>/prefect-results/`` (Prefect's local result storage, which
  ``flows/local_stack.py: prefect_environment`` points there);
- an ``s3://bucket/prefix`` root: ``s3://bucket/prefix/prefect-results/``, through a prefect-aws
  ``S3Bucket`` block named ``factory-results-<digest of the root>`` that the first flow run
  saves on its Prefect server. Its ``AwsCredentials`` hold no secrets: boto3 finds credentials,
  region and endpoint (``AWS_ENDPOINT_URL`` for MinIO) the standard way on each worker, as the
  artifact store does. Every worker, and a new machine with an empty disk and a fresh Prefect
  server, finds the same results. Prefect refuses an unsaved block as a task's
  ``result_storage`` (``Task.__init__``: "must be persisted server-side"), and results written
  through one would name no block for readers; hence the saved block, passed by its slug.

Retries: only transient infrastructure errors (S3, the MLflow server, the network) are
retried with backoff; a bad recipe, a NaN loss or running out of memory fails at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import FlowRunContext, TaskRunContext

from store import artifact_root

RESULTS_FOLDER = "prefect-results"


class StageCache(CachePolicy):
    """A task's cache key is its stage's own key (``model/contract.py: stage_key``): exactly
    what the stage uses for its stored ref, so Prefect and the store never disagree. A stage
    whose key is None (registration) is never cached."""

    def __init__(self, key_fn: Callable[[Any, dict], str | None], spec_arg: str = "spec", inputs_arg: str = "inputs"):
        super().__init__()
        self.key_fn, self.spec_arg, self.inputs_arg = key_fn, spec_arg, inputs_arg

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        key = self.key_fn(inputs[self.spec_arg], inputs.get(self.inputs_arg) or {})
        return None if key is None else f"{task_ctx.task.name}-{key[:40]}"


def results_block_name(root: str) -> str:
    """The name of the results block of an ``s3://`` root: one per root, stable across machines."""
    from store.s3 import parse_s3_uri

    bucket, prefix = parse_s3_uri(root)
    return f"factory-results-{hashlib.sha256(f's3://{bucket}/{prefix}'.encode()).hexdigest()[:12]}"


_SAVED: set[tuple[str, str]] = set()  # (flow run, block slug): checked once per flow run


def result_storage(root: str | None = None) -> str | None:
    """The ``result_storage`` of the stage tasks for an artifact root (default: ``artifact_root()``).

    None for a local root: Prefect's local result storage, ``<root>/prefect-results`` once
    ``prefect_environment`` has run. For ``s3://bucket/prefix``, the slug of the S3Bucket block
    for ``s3://bucket/prefix/prefect-results``, saved on the current Prefect server when it is not
    there yet (a block edited in the UI, say with credentials of its own, is used as it is)."""
    root = root or artifact_root()
    if not root.startswith("s3://"):
        return None
    from prefect_aws import AwsCredentials, S3Bucket

    from store.s3 import parse_s3_uri

    name = results_block_name(root)
    slug = f"{S3Bucket.get_block_type_slug()}/{name}"
    context = FlowRunContext.get()
    run = str(context.flow_run.id) if context is not None and context.flow_run is not None else ""
    if not run or (run, slug) not in _SAVED:
        bucket, prefix = parse_s3_uri(root)
        try:
            S3Bucket.load(name)
        except ValueError:  # not on this server yet (a fresh server, a new machine's ephemeral one)
            folder = "/".join(p for p in (prefix, RESULTS_FOLDER) if p)
            block = S3Bucket(bucket_name=bucket, bucket_folder=folder, credentials=AwsCredentials())
            try:
                block.save(name)
            except ValueError:  # another worker saved it in between
                S3Bucket.load(name)
        if run:
            _SAVED.add((run, slug))
    return slug


TRANSIENT_NAMES = {
    # botocore / urllib3 / requests / http
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ConnectionError", "Timeout", "ReadTimeout", "ProtocolError", "IncompleteRead",
    # builtins
    "ConnectionResetError", "ConnectionRefusedError", "ConnectionAbortedError", "TimeoutError", "BrokenPipeError",
}


def is_transient(error: BaseException) -> bool:
    """Worth retrying: the network, S3 throttling or 5xx, an MLflow server that is down or busy."""
    for e in _chain(error):
        if type(e).__name__ in TRANSIENT_NAMES:
            return True
        code = getattr(e, "response", None)
        if isinstance(code, dict):  # botocore ClientError
            status = code.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status in (429, 500, 502, 503, 504) or code.get("Error", {}).get("Code") in ("SlowDown", "Throttling"):
                return True
        if type(e).__name__ in ("MlflowException", "RestException"):
            text = str(e)
            if any(s in text for s in ("503", "502", "504", "429", "TEMPORARILY_UNAVAILABLE", "Connection")):
                return True
    return False


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def retry_transient(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn: retry only transient infrastructure errors."""
    try:
        state.result()
    except BaseException as error:  # noqa: BLE001 - classify, never swallow: Prefect re-raises
        return is_transient(error)
    return False
