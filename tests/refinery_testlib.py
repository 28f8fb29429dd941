"""Helpers shared by tests (a uniquely named module: folder conftests shadow `conftest`)."""
from pathlib import Path


def read_exec_log(path: Path) -> list[str]:
    """Lines of the REFINERY_EXEC_LOG file: one per real stage (or shard) execution."""
    return Path(path).read_text().splitlines() if Path(path).exists() else []


def shared_file(shared_data: Path, rel: str | Path) -> Path:
    """``shared_data / rel``, skipping the test when that file is absent."""
    import pytest

    p = Path(shared_data) / rel
    if not p.exists():
        pytest.skip(f"{p} is absent")
    return p


def assert_same_metrics(a: list[dict], b: list[dict], tol: float = 1e-6, what: str = "") -> None:
    """Two runs' metric rows (timing left out: ``without_timing``) are the same curve: the same rows
    with the same keys, numbers within ``tol``, everything else equal (a resumed run against an
    uninterrupted one)."""
    assert len(a) == len(b), (what, len(a), len(b))
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys(), (what, ra, rb)
        for k in ra:
            if isinstance(ra[k], float):
                assert abs(ra[k] - rb[k]) <= tol, (what, ra["step"], ra["split"], k, ra[k], rb[k])
            else:
                assert ra[k] == rb[k], (what, ra["step"], ra["split"], k)
