"""TokenReader: windows straight from memory-mapped shards, split, shuffle, mixing, resume, ranks,
and the torch IterableDataset under DataLoader workers."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from refinery.tasks.tokens.reader import TokenReader, split_windows
from refinery.tasks.tokens.shards import MappedTokenFile
from tests.tokens.conftest import counting_docs, make_token_dataset

L = 32  # seq_len


@pytest.fixture(scope="module")
def stream_ds(tmp_path_factory):
    docs = counting_docs(300, seed=1)
    ds = make_token_dataset(tmp_path_factory.mktemp("tok"), docs, max_tokens=4000, batch_tokens=777, parts=3)
    return ds, np.concatenate(docs)


@pytest.fixture(scope="module")
def second_ds(tmp_path_factory):
    docs = counting_docs(100, seed=2, start=1_000_000)
    return make_token_dataset(tmp_path_factory.mktemp("tok2"), docs, max_tokens=3000, parts=1)


def keys(batch) -> list[bytes]:
    return [row.tobytes() for row in batch]


def test_layout_and_windows_match_the_stream(stream_ds):
    ds, stream = stream_ds
    m = ds.manifest
    assert m["total_tokens"] == len(stream) == sum(m["tokens_per_file"].values())
    assert m["documents"] == 300 and m["dtype"] == "uint32" and len(m["token_files"]) > 3  # cut by max_tokens
    f = MappedTokenFile(f"{ds.path}/{m['token_files'][0]}")
    assert len(f.chunks) > 1  # several record batches: windows cross batch and file boundaries below
    r = TokenReader(ds.path, L)
    n = (len(stream) - 1) // L
    for i in range(n):
        np.testing.assert_array_equal(r.window(0, i), stream[i * L: i * L + L + 1])
    b = r.next_batch(8)
    assert b.shape == (8, L + 1) and b.dtype == np.int64
    assert r.vocab_size == 70_000 and r.eos_id == 0


def test_memory_mapped_without_copy(stream_ds):
    ds, _ = stream_ds
    before = pa.total_allocated_bytes()
    r = TokenReader(ds.path, L)
    f = r._sources[0].files[0]
    assert pa.total_allocated_bytes() - before < 4096  # nothing of the shards was read into Arrow memory
    assert not f.chunks[0].flags.owndata and not f.chunks[0].flags.writeable  # views of the read-only map
    assert r.num_windows > 0


def test_split_is_disjoint_fixed_and_spread():
    tr, va = split_windows(1000, 0.05)
    assert len(va) == 50 and len(tr) == 950 and not set(tr) & set(va)
    assert sorted(np.concatenate([tr, va])) == list(range(1000))
    assert va.min() < 100 and va.max() == 999  # blocks all along the stream, not only the tail
    tr2, va2 = split_windows(1000, 0.05)
    assert (va == va2).all()
    assert len(split_windows(10, 0.05)[1]) == 1
    assert len(split_windows(10, 0.0)[1]) == 0


def test_train_val_never_overlap_and_seeds(stream_ds):
    ds, _ = stream_ds
    tr = TokenReader(ds.path, L, seed=0)
    va = TokenReader(ds.path, L, split="val", seed=5)
    assert tr.num_windows + va.num_windows == (tr._sources[0].num_tokens - 1) // L
    train_keys = set(keys(tr.next_batch(tr.num_windows)))  # one full epoch
    assert len(train_keys) == tr.num_windows  # an epoch visits every training window exactly once
    val_keys = [k for b in va.eval_batches(7) for k in keys(b)]
    assert len(val_keys) == va.num_windows and not train_keys & set(val_keys)
    # deterministic from the seed; another seed, another order; the next epoch reshuffles
    a, b, c = (TokenReader(ds.path, L, seed=s) for s in (3, 3, 4))
    ea, eb, ec = a.next_batch(a.num_windows), b.next_batch(b.num_windows), c.next_batch(c.num_windows)
    assert (ea == eb).all() and not (ea == ec).all()
    second = a.next_batch(a.num_windows)
    assert set(keys(second)) == set(keys(ea)) and not (second == ea).all()
    # eval is deterministic and finite, with max_batches honoured
    assert [x.tolist() for x in va.eval_batches(5)] == [x.tolist() for x in va.eval_batches(5)]
    assert len(list(va.eval_batches(2, max_batches=3))) == 3


def test_resume_yields_the_same_batches(stream_ds, second_ds):
    ds, _ = stream_ds
    paths = [ds.path, second_ds.path]
    ref = TokenReader(paths, L, seed=7, weights=[0.6, 0.4])
    ref_batches = [ref.next_batch(50) for _ in range(40)]  # crosses several epochs of both datasets
    r = TokenReader(paths, L, seed=7, weights=[0.6, 0.4])
    for _ in range(13):
        r.next_batch(50)
    sd = r.state_dict()
    resumed = TokenReader(paths, L, seed=7, weights=[0.6, 0.4])
    resumed.load_state_dict(sd)
    for k in range(13, 40):
        np.testing.assert_array_equal(resumed.next_batch(50), ref_batches[k])
    with pytest.raises(ValueError, match="seq_len"):
        TokenReader(paths, L + 1, seed=7).load_state_dict(sd)


def test_weighted_mixing(stream_ds, second_ds):
    ds, _ = stream_ds
    r = TokenReader([ds.path, second_ds.path], L, weights=[0.8, 0.2], seed=1)
    b = r.next_batch(5000)
    frac_second = float((b.max(axis=1) >= 1_000_000).mean())
    assert abs(frac_second - 0.2) < 0.03
    only_first = TokenReader([ds.path, second_ds.path], L, weights=[1, 0]).next_batch(500)
    assert (only_first.max(axis=1) < 1_000_000).all()
    # default weights: proportional to the datasets' sizes
    r = TokenReader(f"{ds.path},{second_ds.path}", L)
    expect = r.windows_per_dataset[1] / r.num_windows
    assert abs(r.weights[1] - expect) < 1e-9
    with pytest.raises(ValueError, match="weights"):
        TokenReader([ds.path, second_ds.path], L, weights=[1.0])


def test_mixing_refuses_different_tokenizers(stream_ds, tmp_path):
    ds, _ = stream_ds
    other = make_token_dataset(tmp_path, counting_docs(20), sha="another-tokenizer", parts=1)
    with pytest.raises(ValueError, match="different tokenizer"):
        TokenReader([ds.path, other.path], L)


def test_ranks_see_disjoint_parts(stream_ds):
    ds, _ = stream_ds
    world, bs = 3, 10
    single = TokenReader(ds.path, L, seed=2)
    steps = single.num_windows // (bs * world)
    glob = [single.next_batch(bs * world) for _ in range(steps)]
    seen = []
    for rank in range(world):
        r = TokenReader(ds.path, L, seed=2, rank=rank, world_size=world)
        mine = [r.next_batch(bs) for _ in range(steps)]
        for k in range(steps):  # rank r's batch k is its slice of the global batch k
            np.testing.assert_array_equal(mine[k], glob[k][rank * bs:(rank + 1) * bs])
        seen.append(set(k for b in mine for k in keys(b)))
        assert r.state_dict()["g"] == single.state_dict()["g"]  # every rank holds the global position
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert sum(map(len, seen)) == steps * bs * world
    vals = [set(k for b in TokenReader(ds.path, L, split="val", rank=i, world_size=world).eval_batches(4) for k in keys(b))
            for i in range(world)]
    assert not (vals[0] & vals[1]) and sum(map(len, vals)) == TokenReader(ds.path, L, split="val").num_windows


def test_errors(stream_ds, tmp_path):
    ds, _ = stream_ds
    with pytest.raises(ValueError, match="none left"):
        TokenReader(ds.path, 10_000_000)
    with pytest.raises(ValueError, match="rank"):
        TokenReader(ds.path, L, rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="manifest"):
        TokenReader(str(tmp_path), L)


def test_uint16_shards(tmp_path):
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(3, 512, int(rng.integers(5, 90))), 0) for _ in range(80)]
    ds = make_token_dataset(tmp_path, docs, vocab_size=512, max_tokens=1000, batch_tokens=100)
    assert ds.manifest["dtype"] == "uint16"
    stream = np.concatenate(docs)
    r = TokenReader(ds.path, 16, val_fraction=0.1)
    for i in r.split_ids()[:40]:
        np.testing.assert_array_equal(r.window(0, i), stream[i * 16: i * 16 + 17])


def test_pickled_reader_keeps_position(stream_ds):
    import pickle

    ds, _ = stream_ds
    r = TokenReader(ds.path, L, seed=9)
    r.next_batch(17)
    clone = pickle.loads(pickle.dumps(r))
    np.testing.assert_array_equal(clone.next_batch(5), r.next_batch(5))


def test_dataloader_workers_split_disjointly(stream_ds):
    """DataLoader(num_workers=2) under 2 DDP ranks: the 4 (rank, worker) readers never share a window."""
    import torch
    from torch.utils.data import DataLoader

    from refinery.tasks.tokens.torch_data import TokenIterableDataset

    ds, _ = stream_ds
    n = TokenReader(ds.path, L).num_windows
    per_rank = []
    for rank in range(2):
        it = TokenIterableDataset(ds.path, L, seed=3, chunk=8, rank=rank, world_size=2)
        rows = []
        for b in DataLoader(it, batch_size=16, num_workers=2):
            assert b.dtype == torch.int64 and b.shape[1] == L + 1
            rows += keys(b.numpy())
            if len(rows) >= (n - 64) // 2:  # most of one epoch in all
                break
        assert len(set(rows)) == len(rows)
        per_rank.append(set(rows))
    assert not per_rank[0] & per_rank[1]
    val = TokenIterableDataset([ds.path], L, split="val")
    got = [k for b in DataLoader(val, batch_size=4, num_workers=2) for k in keys(b.numpy())]
    expect = [k for b in TokenReader(ds.path, L, split="val").eval_batches(64) for k in keys(b)]
    assert sorted(got) == sorted(expect)  # finite: every validation window exactly once
