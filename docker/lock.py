"""Write the lock, constraints.txt: every distribution that ``pip install -e '.[all,test,scale]'``
installs, pinned to the version this environment has (``make lock`` runs it with the project's venv).

The set is the requirements of pyproject.toml (its dependencies and those extras) and, through the
installed packages' metadata, theirs, with environment markers evaluated here; refinery itself and
anything else installed in the venv by hand are left out. A local version label is dropped
(``torch==2.13.0+cpu`` is written ``torch==2.13.0``): it names the index a wheel came from, not the
release, and ``==2.13.0`` accepts every build of 2.13.0, so a CPU machine keeps its CPU wheel and a
GPU host gets the CUDA build of the same release. Packages only a CUDA host installs (torch's
``nvidia-*``, ``triton``) are not in a CPU venv's set: torch pins those itself.

    python docker/lock.py [--extras all,test,scale] [--out constraints.txt] [--check]

``--check`` writes nothing and exits 1 when the file differs from what it would write.
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# The lock: every distribution `pip install -e '.[{extras}]'` installs, pinned (`make install` passes
# it with -c). Written by `make lock` (docker/lock.py) from a working venv; do not edit by hand.
# Local version labels are dropped (torch==2.13.0, not 2.13.0+cpu): a CPU machine keeps the CPU wheel
# of that release, a GPU host gets its CUDA build.
"""


def project_requirements(pyproject: Path, extras: list[str]) -> list[Requirement]:
    """The project's own requirements with ``extras``; an extra naming the project itself
    (``refinery[zh,ja]``) is expanded in place."""
    project = tomllib.loads(pyproject.read_text())["project"]
    name = canonicalize_name(project["name"])
    optional = project.get("optional-dependencies", {})
    out = [Requirement(r) for r in project.get("dependencies", [])]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r} (it has: {', '.join(optional)})")
        seen.add(extra)
        for r in map(Requirement, optional[extra]):
            if canonicalize_name(r.name) == name:
                todo += sorted(r.extras)
            else:
                out.append(r)
    return out


def closure(requirements: list[Requirement]) -> dict[str, str]:
    """Canonical name -> installed version of every distribution the requirements pull in here."""
    pinned: dict[str, str] = {}
    wanted: dict[str, set[str]] = {}   # name -> extras already followed
    todo = [(r, {""}) for r in requirements]
    while todo:
        req, parent_extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in parent_extras):
            continue
        key = canonicalize_name(req.name)
        extras = set(req.extras)
        if key in wanted and extras <= wanted[key]:
            continue
        wanted[key] = wanted.get(key, set()) | extras
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{req.name} is required ({req}) but not installed here: run `make install` first") from None
        pinned[key] = dist.version
        todo += [(Requirement(r), {""} | wanted[key]) for r in dist.requires or []]
    return pinned


def render(pins: dict[str, str], extras: list[str]) -> str:
    lines = [f"{name}=={version.split('+')[0]}" for name, version in sorted(pins.items())]
    return HEADER.format(extras=",".join(extras)) + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extras", default="all,test,scale")
    ap.add_argument("--out", default=str(ROOT / "constraints.txt"))
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    extras = [e for e in args.extras.split(",") if e]
    text = render(closure(project_requirements(ROOT / "pyproject.toml", extras)), extras)
    out = Path(args.out)
    if args.check:
        same = out.exists() and out.read_text() == text
        print(f"{out}: {'up to date' if same else 'differs from this environment (make lock)'}")
        return 0 if same else 1
    out.write_text(text)
    print(f"{out}: {sum(1 for line in text.splitlines() if not line.startswith('#'))} pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
