"""Which judge endpoints ``qsens up`` may hand the API key to.

A spec names the judge's ``base_url``; a spec from someone else could name their own server
and collect the key the judge sends. So the judge child gets the key variables only when its
base URL is HTTPS on an allow-listed host: ``api.openai.com``, plus the hosts in
``QSENS_JUDGE_ALLOWED_HOSTS`` (comma separated) or given with ``qsens up --allow-judge-host``.
Otherwise they are withheld (a local endpoint needs no key) and ``qsens up`` says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = [
    "ALLOWED_HOSTS_ENV",
    "DEFAULT_ALLOWED_HOSTS",
    "KEY_VARIABLES",
    "allowed_hosts",
    "key_allowed",
    "withheld_note",
]

DEFAULT_ALLOWED_HOSTS = ("api.openai.com",)
ALLOWED_HOSTS_ENV = "QSENS_JUDGE_ALLOWED_HOSTS"
#: Every variable the judge reads its key from (``JudgeSettings.api_key`` / ``api_key_file``).
KEY_VARIABLES = ("OPENAI_API_KEY", "QSENS_JUDGE_API_KEY", "QSENS_JUDGE_API_KEY_FILE")


def allowed_hosts(extra: Iterable[str] = ()) -> set[str]:
    """The default hosts, those in QSENS_JUDGE_ALLOWED_HOSTS, and ``extra`` (lower case)."""
    listed = os.environ.get(ALLOWED_HOSTS_ENV, "").split(",")
    return {h.strip().lower() for h in (*DEFAULT_ALLOWED_HOSTS, *listed, *extra) if h.strip()}


def key_allowed(base_url: str | None, extra_hosts: Iterable[str] = ()) -> bool:
    """Whether a judge at ``base_url`` (None: OpenAI itself) may get the API key."""
    if base_url is None:
        return True
    try:
        parts = urlsplit(base_url.strip())
        host = (parts.hostname or "").lower()
    except ValueError:
        return False
    # Plain HTTP would send the key in the clear, whoever the host is.
    return parts.scheme == "https" and not parts.username and host in allowed_hosts(extra_hosts)


def withheld_note(base_url: str) -> str:
    """What ``qsens up`` prints when it withholds the key."""
    host = urlsplit(base_url).hostname or base_url
    return (
        f"the judge's base_url {base_url} is not an allow-listed HTTPS endpoint, so it gets no "
        f"API key ({', '.join(KEY_VARIABLES)} withheld); if you trust it, allow it with "
        f"`--allow-judge-host {host}` or {ALLOWED_HOSTS_ENV}"
    )
