"""Optional dependencies: the one place that imports them and names the extra that installs them.

A feature that few runs use keeps its package out of the base install (``pip install refinery``):
Chinese and Japanese word segmentation, QLoRA and the 8-bit optimizers, the trafilatura extractor,
ftfy text repair and ``s3://`` storage. ``pip install 'refinery[all]'`` (what ``make install``
does) installs every one of them. A run that needs a missing one fails with
``MissingExtra`` saying what needs what and how to install it, never a bare ``ModuleNotFoundError``
from deep inside a stage::

    ftfy = require("ftfy", "ingest.repair_text=ftfy")

``pyproject.toml``'s ``[project.optional-dependencies]`` must name each package under its extra
(``tests/ops/test_extras.py`` checks both ways).
"""
from __future__ import annotations

import importlib
from types import ModuleType

# import name -> (distribution, extra that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "rjieba": ("rjieba", "zh"),
    "fugashi": ("fugashi", "ja"),
    "unidic_lite": ("unidic-lite", "ja"),
    "bitsandbytes": ("bitsandbytes", "qlora"),
    "trafilatura": ("trafilatura", "trafilatura"),
    "ftfy": ("ftfy", "ftfy"),
    "s3fs": ("s3fs", "s3"),
}

# fsspec protocols whose filesystem an extra installs (fsspec imports it when a URL names the protocol)
FSSPEC_PROTOCOLS = {"s3": "s3fs", "s3a": "s3fs"}


class MissingExtra(ImportError):
    """A feature was asked for whose optional dependency is not installed."""


def install_hint(module: str, feature: str) -> str:
    """``FEATURE needs the optional dependency DIST: pip install 'refinery[EXTRA]'``."""
    dist, extra = EXTRAS[module]
    return f"{feature} needs the optional dependency {dist}: pip install 'refinery[{extra}]'"


def require(module: str, feature: str) -> ModuleType:
    """Import the optional ``module`` (a key of :data:`EXTRAS`) for ``feature`` (what the user asked
    for, in their words: ``"extractor=trafilatura"``). Missing, it raises :class:`MissingExtra`
    naming the package and its extra; a package that is there but fails to import (a broken build,
    a missing system library) raises its own error unchanged."""
    if module not in EXTRAS:
        raise KeyError(f"{module!r} is not an optional dependency (refinery.tasks.extras.EXTRAS)")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] != module:
            raise   # the package is there; something it imports is not
        raise MissingExtra(install_hint(module, feature), name=module) from e


def _name_fsspec_extras() -> None:
    """fsspec's own message for a missing filesystem package ("Install s3fs to access S3") becomes
    ours, naming the extra."""
    from fsspec.registry import known_implementations

    for protocol, module in FSSPEC_PROTOCOLS.items():
        if protocol in known_implementations:
            known_implementations[protocol]["err"] = install_hint(module, f"{protocol}:// storage")


_name_fsspec_extras()
