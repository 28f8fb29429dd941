from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def planted(shared_data):
    """(rows, pairs): ~570 real documents plus 200 mutated copies of known Jaccard in [0.5, 1]."""
    from helpers import planted_corpus

    return planted_corpus(shared_data, seed=0, n_copies=200)
