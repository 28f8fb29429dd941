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
