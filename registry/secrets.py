"""Keep secrets out of MLflow and out of logs: one scrubber for every value we send.

``scrub(value)`` walks dicts, lists and strings and replaces with ``***``:
  - string values under secret-looking keys (``password``, ``api_key``, ``hf_token``,
    ``aws_secret_access_key``, ``Authorization``, ...; ``tokenizer`` and ``tokens_seen``
    are not secrets, and numbers never are);
  - credentials inside URIs (``https://user:pass@host`` -> ``https://***@host``) and
    secret query parameters (presigned ``X-Amz-Signature``, ``token=``, ``api_key=``);
  - strings shaped like well-known credentials (AWS access key ids, Hugging Face, OpenAI
    and GitHub tokens, bearer tokens, PEM private keys);
  - the current value of every environment variable whose name looks secret
    (``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD``, ``HF_TOKEN``, ...), wherever
    it appears.

``ScrubFilter`` applies the same to log records.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import urlsplit

REDACTED = "***"
_MIN_ENV_SECRET_LEN = 8  # shorter values ("test", "1") would redact ordinary words

# A key is secret when one of its words is one of these, or two neighbouring words form a pair below.
_SECRET_WORDS = {"password", "passwd", "pwd", "passphrase", "secret", "token", "apikey", "credential",
                 "credentials", "authorization", "auth", "cookie", "signature", "privatekey", "accesskey"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("session", "token"),
                 ("client", "secret"), ("account", "key"), ("sas", "token")}

_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/?#@\s]+)@")
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|access_token"
    r"|api_key|apikey|key|password|secret|code)=)[^&#\s]+",
    re.IGNORECASE,
)
_TOKEN_SHAPES = [
    re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{16}\b"),  # AWS access key ids
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face
    re.compile(r"\bsk-[A-Za-z0-9_\-]{20,}"),  # OpenAI-style
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),  # GitHub
    re.compile(r"\bxox[abposr]-[A-Za-z0-9\-]{10,}"),  # Slack
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=\-]{16,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL),
]


def _key_words(key: str) -> list[str]:
    """'awsSecretAccessKey' / 'AWS_SECRET_ACCESS_KEY' / 'x-api-key' -> ['aws', 'secret', 'access', 'key']."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return [w for w in re.split(r"[^a-zA-Z0-9]+", spaced.lower()) if w]


def is_secret_key(key: str) -> bool:
    words = _key_words(str(key))
    return any(w in _SECRET_WORDS for w in words) or any(pair in _SECRET_PAIRS for pair in zip(words, words[1:], strict=False))


def _environment() -> dict[str, str]:
    """A copy of ``os.environ`` taken while other threads may change it: iterating it while
    MLflow's telemetry thread unset a variable raised KeyError and failed a factory run."""
    while True:
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):  # a variable went away (or came) mid-copy: copy again
            continue


def _env_secrets() -> list[str]:
    values = {v for k, v in _environment().items() if is_secret_key(k) and len(v) >= _MIN_ENV_SECRET_LEN}
    return sorted(values, key=len, reverse=True)  # longest first: a secret that contains another goes whole


def scrub_text(text: str) -> str:
    """``text`` with every credential we can recognise replaced by ``***``."""
    for secret in _env_secrets():
        text = text.replace(secret, REDACTED)
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _SECRET_QUERY.sub(lambda m: f"{m['name']}{REDACTED}", text)
    for pattern in _TOKEN_SHAPES:
        text = pattern.sub(REDACTED, text)
    return text


def scrub(value):
    """A copy of ``value`` (dicts, lists, tuples, strings, numbers) safe to log or send to MLflow."""
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(v, str) and v and is_secret_key(k) else scrub(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub(v) for v in value)
    if isinstance(value, str):
        return scrub_text(value)
    return value


def uri_has_credentials(uri: str) -> bool:
    try:
        parts = urlsplit(uri)
    except ValueError:
        return False
    return bool(parts.username or parts.password)


class ScrubFilter(logging.Filter):
    """A logging filter that scrubs each record's message (arguments included) before it is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub_text(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def install_log_scrubber(logger_names: tuple[str, ...] = ("", "mlflow", "registry")) -> None:
    """Add a ScrubFilter to every handler of these loggers (the root logger is ''). Idempotent."""
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, ScrubFilter) for f in handler.filters):
                handler.addFilter(ScrubFilter())
