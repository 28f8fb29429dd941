"""The one base model of every configuration in Refinery (flow parameters and stage configs).

Unknown keys fail (``extra="forbid"``), so a typo such as ``--set ppo.kl_coeff=0.5`` is an error
rather than a silently ignored setting; the CLI turns that error into a "did you mean" message.
Pydantic only: cheap to import from the CLI.
"""
from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that refuses unknown keys. Its error messages do not quote the input
    (a refused value may be a credential); the CLI's messages come from ``errors()``."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)



_SECRET_NAME = re.compile(r"key|secret|token|passw|pwd|credential|auth|cookie|session|signature|"
                          r"connection_?string|private|sas\b", re.I)
_SECRET_VALUE = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|-----BEGIN [A-Z ]*PRIVATE KEY-----")
# Any user info in a URL's authority (``user:password@``, or a bare ``TOKEN@`` as git hosts and
# some APIs take): it would travel into fingerprints, manifests and Prefect's database.
_URL_USERINFO = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#\s]*@")
SECRET_HINT = ("put credentials in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
               "AWS_SESSION_TOKEN or AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*) "
               "or in a Prefect credentials block, never in a config")


def secret_option_paths(options: Any, prefix: str = "") -> list[str]:
    """Dotted names of the options in ``options`` (nested dicts included) that hold a secret:
    a non-empty value under a secret-looking name, or a value that looks like a key itself."""
    found = []
    items = options.items() if isinstance(options, dict) else enumerate(options) if isinstance(options, list) else []
    for k, v in items:
        name = f"{prefix}{k}"
        if isinstance(v, (dict, list)):
            found += secret_option_paths(v, name + ".")
        elif isinstance(v, str) and v and (_SECRET_NAME.search(str(k)) or _SECRET_VALUE.search(v)):
            found.append(name)
    return found


def check_storage_options(options: dict, what: str = "storage_options") -> dict:
    """``options`` unchanged, or ValueError naming (never quoting) the options that hold secrets."""
    bad = secret_option_paths(options)
    if bad:
        raise ValueError(f"{what}: {', '.join(bad)} look(s) like credentials; {SECRET_HINT}")
    return options


def check_url(url: str, what: str = "path") -> str:
    """``url`` unchanged, or ValueError when it carries credentials: any user info before the host
    (``scheme://user:pass@host``, ``scheme://TOKEN@host``). The error never quotes the URL."""
    if _URL_USERINFO.match(url):
        raise ValueError(f"{what}: the URL carries credentials (user:password@ or token@ before the host); "
                         f"{SECRET_HINT}")
    return url


def check_no_secrets(value: Any, where: str = "") -> None:
    """Walk a config's values (after validation): a URL that carries credentials anywhere, or a
    secret-looking storage option, is refused before anything runs or is stored."""
    if isinstance(value, str):
        for part in value.split(","):
            check_url(part.strip(), where or "value")
    elif isinstance(value, dict):
        for k, v in value.items():
            name = f"{where}.{k}" if where else str(k)
            if "storage_options" in str(k) and isinstance(v, dict):
                check_storage_options(v, name)
            check_no_secrets(v, name)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_no_secrets(v, f"{where}[{i}]")


__all__ = ["StrictModel", "SECRET_HINT", "check_url", "check_storage_options", "secret_option_paths",
           "check_no_secrets"]
