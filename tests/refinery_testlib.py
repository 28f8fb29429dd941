"""Helpers shared by tests (a uniquely named module: folder conftests shadow `conftest`)."""
from pathlib import Path


def read_exec_log(path: Path) -> list[str]:
    """Lines of the REFINERY_EXEC_LOG file: one per real stage (or shard) execution."""
    return Path(path).read_text().splitlines() if Path(path).exists() else []
