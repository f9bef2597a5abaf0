"""Secrets out of every text before it is logged, raised or written (see the package docstring)."""
from __future__ import annotations

import os
import re
from typing import Any, Callable, List





REDACTED = "***"
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<secret>[^/@\s:]+:[^/@\s]+)@")
# Query parameters that carry signatures, tokens or keys (S3/GCS presigned URLs, Azure SAS, OAuth).
# The name must not continue an identifier, so ``image_key=jpg`` or ``monkey=`` are left alone.
_SECRET_QUERY = re.compile(
    r"(?i)(?<![A-Za-z0-9_.])(?:x-amz-(?:signature|credential|security-token)|x-goog-(?:signature|credential)|"
    r"signature|awsaccesskeyid|googleaccessid|sig|token|access_token|id_token|refresh_token|client_secret|"
    r"secret|password|api_key|apikey|key)=(?P<secret>[^&\s\"']+)"
)
_BEARER = re.compile(r"(?i)bearer\s+(?P<secret>[A-Za-z0-9._~+/=-]+)")
# Always secret when set (4+ characters); any other variable whose name reads as a secret (see
# is_secret_name, e.g. HF_TOKEN, OPENAI_API_KEY) counts from 8 characters, so that a short value
# such as ``1`` is never replaced wherever it occurs.
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID",
               "GOOGLE_OAUTH_ACCESS_TOKEN", "WANDB_API_KEY")
_SECRET_WORDS = frozenset({"secret", "password", "passwd", "token", "apikey", "signature"})
_KEY_QUALIFIERS = frozenset({"api", "access", "secret", "private", "account", "auth", "session", "signing"})


def is_secret_name(name: str) -> bool:
    """Whether a config key or environment variable name denotes a credential: one of its words
    (split at ``_``, ``-``, ``.`` and camelCase) is secret/password/token/apikey/signature, or it
    has an api/access/private/... ``key`` (``WANDB_API_KEY``, ``aws_secret_access_key``, ``accessKey``).
    ``tokenizer``, ``max_tokens``, ``image_key`` and ``TOKENIZERS_PARALLELISM`` are not."""
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    if any(w in _SECRET_WORDS for w in words):
        return True
    return any(a in _KEY_QUALIFIERS and b == "key" for a, b in zip(words, words[1:]))


def environment_secrets() -> List[str]:
    """Values of the secret environment variables of this process, longest first."""
    values = set()
    for name, value in os.environ.items():
        if value and ((name in _SECRET_ENV and len(value) >= 4) or (is_secret_name(name) and len(value) >= 8)):
            values.add(value)
    return sorted(values, key=len, reverse=True)


def replace_secrets(text: str, replace: Callable[[str], str]) -> str:
    """``text`` with every credential in it replaced by ``replace(credential)``: the password part
    of URL userinfo (with its user), signed-URL and OAuth query values, bearer tokens, and the values
    of secret environment variables. :func:`redact` masks them; launch/slurm.py swaps them for
    environment references so that a rendered script never holds one."""
    def sub(m: "re.Match[str]") -> str:
        start, end = m.span("secret")
        return m.group(0)[:start - m.start()] + replace(m.group("secret")) + m.group(0)[end - m.start():]

    for pattern in (_USERINFO, _SECRET_QUERY, _BEARER):
        text = pattern.sub(sub, text)
    for value in environment_secrets():
        if value in text:
            text = text.replace(value, replace(value))
    return text


def redact(text: Any) -> str:
    """``text`` with credentials removed (see :func:`replace_secrets`): for logs and error messages."""
    return replace_secrets(str(text), lambda _secret: REDACTED)


def is_redacted(value: Any) -> bool:
    """Whether a persisted config value had a credential masked (it cannot be used to connect)."""
    return isinstance(value, str) and REDACTED in value


def redact_config(obj: Any) -> Any:
    """A copy of a config tree (dicts, lists, tuples, scalars) that is safe to persist: every string
    goes through :func:`redact`, and a non-empty string under a key that names a credential
    (:func:`is_secret_name`: ``password``, ``api_key``, ``aws_secret_access_key``, ...) is masked
    whole. The one function behind every copy of the resolved config that leaves the process
    (run directory, checkpoints, exports, W&B); the running process keeps the real values."""
    if isinstance(obj, dict):
        return {k: (REDACTED if isinstance(v, str) and v and isinstance(k, str) and is_secret_name(k)
                    else redact_config(v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_config(v) for v in obj)
    if isinstance(obj, str):
        return redact(obj)
    return obj
