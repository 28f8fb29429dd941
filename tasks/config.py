"""The one base model of every configuration in Refinery (flow parameters and stage configs).

Unknown keys fail (``extra="forbid"``), so a typo such as ``--set ppo.kl_coeff=0.5`` is an error
rather than a silently ignored setting; the CLI turns that error into a "did you mean" message.
Pydantic only: cheap to import from the CLI.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that refuses unknown keys. Its error messages do not quote the input
    (a refused value may be a credential); the CLI's messages come from ``errors()``."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


__all__ = ["StrictModel"]
