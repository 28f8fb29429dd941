"""Optional dependencies and the lock: a feature whose extra is missing says which extra to install
(the import made to fail, at each place the code imports one), pyproject.toml's extras name the
packages refinery.tasks.extras knows, and the lock (constraints.txt) pins every requirement at a
version the lower bounds of pyproject.toml accept."""
from __future__ import annotations

import sys
import tomllib
import types
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from refinery.tasks import extras
from refinery.tasks.extras import MissingExtra, require

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _missing(monkeypatch, *modules: str) -> None:
    """Make ``import MODULE`` fail as it does when the package is not installed."""
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)   # import raises ModuleNotFoundError(name=m)


def test_require_names_the_package_and_the_extra(monkeypatch):
    _missing(monkeypatch, "ftfy")
    with pytest.raises(MissingExtra) as e:
        require("ftfy", "ingest.repair_text=ftfy")
    assert str(e.value) == "ingest.repair_text=ftfy needs the optional dependency ftfy: pip install 'refinery[ftfy]'"
    assert isinstance(e.value, ImportError) and e.value.name == "ftfy"
    with pytest.raises(KeyError):
        require("numpy", "anything")   # not an optional dependency: a mistake in the caller


def test_a_package_that_is_there_but_breaks_keeps_its_own_error(monkeypatch):
    """Only a missing package is a missing extra: one that fails on a missing dependency of its
    own (a broken install) raises that error."""
    def fail(name, *args, **kwargs):
        if name == "ftfy":
            raise ModuleNotFoundError("No module named 'wcwidth'", name="wcwidth")
        return real_import(name, *args, **kwargs)

    import importlib
    real_import = importlib.import_module
    monkeypatch.delitem(sys.modules, "ftfy", raising=False)
    monkeypatch.setattr(importlib, "import_module", fail)
    with pytest.raises(ModuleNotFoundError) as e:
        require("ftfy", "ingest.repair_text=ftfy")
    assert not isinstance(e.value, MissingExtra) and e.value.name == "wcwidth"


def test_each_feature_says_which_extra_it_needs(monkeypatch):
    """The places that import an optional package, with that package missing."""
    from refinery.tasks.filters import segment
    from refinery.tasks.ingest.extract import get_extractor
    from refinery.tasks.ingest.repair import _ftfy, repair_text

    _missing(monkeypatch, "ftfy", "trafilatura", "rjieba", "jieba", "fugashi", "bitsandbytes")
    _ftfy.cache_clear()
    with pytest.raises(MissingExtra, match=r"repair_text=ftfy needs the optional dependency ftfy: pip install 'refinery\[ftfy\]'"):
        repair_text("caf\u00c3\u00a9", "ftfy")
    _ftfy.cache_clear()
    with pytest.raises(MissingExtra, match=r"extractor=trafilatura needs .* trafilatura: pip install 'refinery\[trafilatura\]'"):
        get_extractor("trafilatura")
    with pytest.raises(segment.SegmenterUnavailable, match=r"Chinese .* rjieba: pip install 'refinery\[zh\]' \(or install jieba\)"):
        segment._jieba.__wrapped__()
    with pytest.raises(segment.SegmenterUnavailable, match=r"Japanese .* fugashi: pip install 'refinery\[ja\]'"):
        segment._mecab.__wrapped__()


def test_qlora_and_8bit_optimizers_say_which_extra_they_need(monkeypatch):
    import torch

    from refinery.tasks.engine.optim import OPTIMIZERS
    from refinery.tasks.engine import optim

    _missing(monkeypatch, "bitsandbytes")
    cfg = types.SimpleNamespace(lr=1e-3, head_lr=None, weight_decay=0.0)
    cuda = types.SimpleNamespace(type="cuda")   # the check comes before any CUDA work
    kinds = [k for k in OPTIMIZERS if "8bit" in k]
    assert kinds
    for kind in kinds:
        with pytest.raises(MissingExtra, match=rf"optimizer={kind} needs the optional dependency bitsandbytes: "
                                               r"pip install 'refinery\[qlora\]'"):
            optim.build_optimizer(torch.nn.Linear(4, 4), cfg, cuda, kind=kind)


def test_qlora_model_loading_says_which_extra_it_needs(monkeypatch, tmp_path):
    import json

    import torch

    from refinery.tasks.finetune import methods

    model_dir = tmp_path / "model"   # the check comes before any weights load: a config is enough
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    _missing(monkeypatch, "bitsandbytes")
    cfg = types.SimpleNamespace(method="qlora", revision=None, bnb_4bit_quant_type="nf4", bnb_double_quant=True)
    with pytest.raises(MissingExtra, match=r"method=qlora needs the optional dependency bitsandbytes: "
                                           r"pip install 'refinery\[qlora\]'"):
        methods.load_base_model(cfg, str(model_dir), torch.device("cpu"), torch.float32, torch.float32)


def test_s3_urls_without_s3fs_name_the_extra(monkeypatch):
    import fsspec
    import fsspec.registry as _  # noqa: F401

    registry = sys.modules["fsspec.registry"]
    _missing(monkeypatch, "s3fs")
    monkeypatch.delitem(registry._registry, "s3", raising=False)
    with pytest.raises(ImportError, match=r"s3:// storage needs the optional dependency s3fs: pip install 'refinery\[s3\]'"):
        fsspec.filesystem("s3")


def test_pyproject_extras_hold_the_optional_packages():
    """Each package refinery.tasks.extras imports is in its extra, out of the base dependencies, and
    `all` (what make install and the tests install) gathers every extra."""
    optional = PROJECT["optional-dependencies"]
    base = {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]}
    for module, (dist, extra) in extras.EXTRAS.items():
        assert canonicalize_name(dist) in {canonicalize_name(Requirement(r).name) for r in optional[extra]}, module
        assert canonicalize_name(dist) not in base, f"{dist} is optional ([{extra}]) but also a base dependency"
    (everything,) = optional["all"]
    assert Requirement(everything).extras == {e for _d, e in extras.EXTRAS.values()}
    assert any(Requirement(r).name == "refinery" and "all" in Requirement(r).extras for r in optional["test"])
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt -e '.[all,test,scale]'" in makefile


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not NAME==VERSION"
            assert "+" not in version, f"{line}: a local label would not match a CUDA (or CPU) build"
            pins[canonicalize_name(name)] = version
    return pins


def test_the_lock_pins_every_requirement_within_the_lower_bounds():
    pins = _lock()
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    reqs += [Requirement(r) for group in PROJECT["optional-dependencies"].values() for r in group]
    for req in reqs:
        name = canonicalize_name(req.name)
        if name == "refinery":
            continue
        assert name in pins, f"{req} is not in the lock (make lock)"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), f"lock pins {name}=={pins[name]}, outside {req}"
    assert "refinery" not in pins
    assert pins["torch"] == "2.13.0"    # what the Makefile and the Dockerfiles install first


def test_the_lock_is_what_this_environment_has():
    """docker/lock.py, run here, writes the committed lock: pins of packages that are installed and
    that the project needs, and no package that it does not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("refinery_lock_tool", ROOT / "docker" / "lock.py")
    assert spec is not None and spec.loader is not None
    lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock)
    wanted = lock.closure(lock.project_requirements(ROOT / "pyproject.toml", ["all", "test", "scale"]))
    assert set(wanted) == set(_lock()), set(wanted) ^ set(_lock())
    assert {"fugashi", "rjieba", "bitsandbytes", "s3fs", "ftfy", "trafilatura", "pytest", "ray"} <= set(wanted)
