"""What every stage task shares: its cache policy and its retry rule.

Cache key (docs/resumability.md, level 1): the stage's own ``key`` (model/contract.py): the
stage name, the digest of the recipe section it reads, the digests of its input refs and its
code version. Results are the stage's JSON ref, persisted under the artifact root, so a new
flow run (a schedule, a UI click, ``factory run`` again) reuses every finished stage. The flow
checks that a cached ref's artifact is still whole and refreshes the task when it is not
(``flows/factory.py: PrefectRunner``); the stages also skip work whose stored result
verifies, so even a refreshed task recomputes nothing that is intact.

Retries: only transient infrastructure errors (S3, the MLflow server, the network) are
retried with backoff; a bad recipe, a NaN loss or running out of memory fails at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext


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
