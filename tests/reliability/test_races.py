"""One writer per fingerprint: processes, threads and CLI runs racing on one dataset.

Every trial starts its racers together (a barrier) on a fresh root and then checks what a reader
sees: one complete manifest equal to a clean run's, every shard executed once (counted through
REFINERY_EXEC_LOG, so a racer that rebuilt instead of waiting is caught), and no staging, lock or
quarantine folder left behind.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from refinery_testlib import moto_s3, read_exec_log
from refinery.tasks.store import Dataset, Store, WriterLock, _Lease
from toy_stages import Toy, ToyConfig

ROOT = Path(__file__).resolve().parents[2]
REFINERY = str(Path(sys.executable).parent / "refinery")
CFG = ToyConfig(shards=6, rows=5)
TRIALS, RACERS = 20, 3


def _signature(ds: Dataset) -> tuple:
    """What must be equal between two builds of one fingerprint (not the build time)."""
    files = [(f["path"], f["rows"], f["bytes"], f["sha256"]) for f in ds.manifest["files"]]
    return ds.fingerprint, tuple(files), json.dumps(ds.counts, sort_keys=True)


def _leftovers(stage_dir: Path) -> list[str]:
    return sorted(p.name for p in stage_dir.iterdir() if p.name.startswith("."))


def _racer(root: str, barrier, out) -> None:
    barrier.wait(timeout=60)
    ds = Toy.run(root, [], CFG)
    out.put((os.getpid(), ds.path, ds.manifest["counts"]["docs_out"], len(ds.manifest["files"])))


def test_processes_racing_on_one_fingerprint_publish_once_and_completely(tmp_path, exec_log):
    clean = Toy.run(tmp_path / "clean", [], CFG)
    want = _signature(clean)
    per_build = len(read_exec_log(exec_log))          # 6 shards + the reduce step
    ctx = mp.get_context("fork")                       # fast: the racers share this process's imports
    for trial in range(TRIALS):
        root = tmp_path / f"trial-{trial}"
        barrier, out = ctx.Barrier(RACERS), ctx.Queue()
        procs = [ctx.Process(target=_racer, args=(str(root), barrier, out)) for _ in range(RACERS)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0, f"trial {trial}: a racer failed (exit {p.exitcode})"
        seen = [out.get(timeout=5) for _ in procs]
        assert {path for _, path, _, _ in seen} == {str(root / "toy" / clean.fingerprint)}
        assert all(rows == 30 and n == len(clean.manifest["files"]) for _, _, rows, n in seen), seen
        ds = Dataset.open(root / "toy" / clean.fingerprint)
        assert _signature(ds) == want and ds.read_table().num_rows == 30
        assert ds.verify() == []
        assert _leftovers(root / "toy") == [], f"trial {trial}"
    lines = read_exec_log(exec_log)
    assert len(lines) == per_build * (TRIALS + 1), "a racer built instead of waiting for the writer"
    assert set(Counter(lines).values()) == {TRIALS + 1}   # each shard once per root


def test_threads_racing_in_one_process(tmp_path, exec_log):
    paths, errors = [], []

    def racer():
        try:
            paths.append(Toy.run(tmp_path / "w", [], CFG).path)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=racer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(set(paths)) == 1
    assert len(read_exec_log(exec_log)) == 7
    assert _leftovers(tmp_path / "w" / "toy") == []


def _cli_env(home: Path, exec_log: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    env.update(PREFECT_HOME=str(home), REFINERY_EXEC_LOG=str(exec_log))   # a Prefect database per racer
    return env


@pytest.mark.slow
def test_cli_runs_racing_on_one_workdir(tmp_path, exec_log):
    """Three ``refinery run curate`` processes (each with its own Prefect database, sharing the
    workdir and its result store) started together: all succeed with the same outputs, every
    dataset is intact, every stage and shard ran exactly once in all (so each dataset is what one
    uncontended run builds), and nothing is left in the stage folders. One trial by default (about
    a minute on two cores); REFINERY_CLI_RACE_TRIALS=N for more."""
    from refinery.tasks.demo.crawl import make_demo_crawl

    make_demo_crawl(tmp_path / "crawl", seed=0, n_pages=40, n_files=2)
    for trial in range(int(os.environ.get("REFINERY_CLI_RACE_TRIALS", "1"))):
        work, before = tmp_path / f"work-{trial}", len(read_exec_log(exec_log))
        args = [REFINERY, "run", "curate", "--set", f"input={tmp_path / 'crawl'}/*.warc.gz", "--workdir", str(work),
                "--json"]
        procs = [subprocess.Popen(args, env=_cli_env(tmp_path / f"prefect-{trial}-{i}", exec_log), cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(RACERS)]
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=900)
            assert p.returncode == 0, err[-4000:]
            outs.append(json.loads(out.strip().splitlines()[-1])["outputs"])
        assert all(o == outs[0] for o in outs) and {"ingest", "filter", "dedup"} <= set(outs[0])
        for stage, path in outs[0].items():
            assert Dataset.open(path).verify() == [], stage
            assert _leftovers(Path(path).parent) == [], stage
        lines = read_exec_log(exec_log)[before:]
        assert lines and max(Counter(lines).values()) == 1, Counter(lines).most_common(3)
        assert sorted({line.split()[0] for line in lines}) == sorted(outs[0])


def test_a_dead_holder_does_not_block(tmp_path):
    """The kernel drops a killed holder's flock: the next writer gets the lock at once."""
    store = Store(tmp_path)
    code = ("import sys, time; sys.path[:0] = [%r, %r]\n"
            "from refinery.tasks.store import Store\n"
            "lock = Store(%r).lock('toy', 'fp'); lock.acquire(); print('held', flush=True); time.sleep(600)\n"
            % (str(ROOT), str(ROOT / "tests"), str(tmp_path)))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError, match="still built by pid"):
            store.lock("toy", "fp", timeout=0.3).acquire()
    finally:
        proc.kill()
        proc.wait()
    t0 = time.monotonic()
    with store.lock("toy", "fp", timeout=10):
        assert time.monotonic() - t0 < 5
    assert not (tmp_path / "toy" / ".lock-fp").exists()   # the holder removes it on release


def test_object_store_lease_excludes_and_expires():
    """Leases on an fsspec store (memory://): one holder at a time; an expired lease is taken over."""
    import fsspec

    fs = fsspec.filesystem("memory")
    lease_dir = "/leases-test/.lease-fp"
    a, b = _Lease(fs, lease_dir, lease_seconds=30), _Lease(fs, lease_dir, lease_seconds=30)
    assert a.try_acquire({"pid": 1}) is True
    assert "pid 1" in b.try_acquire({"pid": 2})          # held and alive: b waits
    a.release()
    assert b.try_acquire({"pid": 2}) is True
    # b "dies" without releasing; once its lease is past its expiry, c takes over with the next generation
    b._stop.set()
    rec = json.loads(fs.cat(b._file(b.gen)))
    fs.pipe(b._file(b.gen), json.dumps(dict(rec, expires=time.time() - 1)).encode())
    c = _Lease(fs, lease_dir, lease_seconds=30)
    assert c.try_acquire({"pid": 3}) is True and c.gen == b.gen + 1
    assert b._gens() == [c.gen]                           # the dead holder's lease was dropped
    c.release()
    assert c._gens() == []


def test_leases_serialize_writers(tmp_path):
    """Three threads contending through the lease algorithm alone (on a local folder, where the
    conditional create is O_EXCL): never two inside at once."""
    from fsspec.implementations.local import LocalFileSystem

    store = Store(tmp_path)
    inside, worst, done = [0], [0], []

    def writer(i):
        lock = WriterLock(store, "toy", "fp", lease_seconds=30)
        lock._new_impl = lambda: _Lease(LocalFileSystem(), str(tmp_path / "toy" / ".lease-fp"), 30)
        lock.key = f"separate-{i}"   # no shared in-process lock: only the lease excludes
        for _ in range(3):
            with lock:
                inside[0] += 1
                worst[0] = max(worst[0], inside[0])
                time.sleep(0.02)
                inside[0] -= 1
                done.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert worst[0] == 1 and len(done) == 9


# --------------------------------------------------------------------------- object store (moto's S3 server)
S3_TRIALS = 3


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch) -> str:
    import boto3

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    name = f"races-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def _s3_racer(bucket: str, trials: int, barrier, out) -> None:
    for t in range(trials):
        barrier.wait(timeout=120)
        ds = Toy.run(f"s3://{bucket}/trial-{t}", [], CFG)
        out.put((t, ds.path))


def test_processes_racing_on_s3_publish_once_and_completely(tmp_path, exec_log, s3_bucket):
    """The lease on an object store (conditional writes, S3's If-None-Match): three processes
    racing through several trials; one builds, the others wait and reuse its dataset."""
    import s3fs

    want = _signature(Toy.run(tmp_path / "clean", [], CFG))
    per_build = len(read_exec_log(exec_log))
    ctx = mp.get_context("spawn")      # no fork of a process with live S3 client threads
    barrier, out = ctx.Barrier(RACERS), ctx.Queue()
    procs = [ctx.Process(target=_s3_racer, args=(s3_bucket, S3_TRIALS, barrier, out)) for _ in range(RACERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    seen = [out.get(timeout=5) for _ in range(RACERS * S3_TRIALS)]
    fs = s3fs.S3FileSystem()
    for t in range(S3_TRIALS):
        paths = {path for trial, path in seen if trial == t}
        assert len(paths) == 1
        ds = Dataset.open(paths.pop())
        assert _signature(ds) == want and ds.verify() == []
        assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/trial-{t}/toy", refresh=True)] == [ds.fingerprint]
    lines = read_exec_log(exec_log)
    assert len(lines) == per_build * (S3_TRIALS + 1), "a racer built instead of waiting for the lease holder"


def test_s3_lease_of_a_dead_holder_expires(s3_bucket):
    import s3fs

    store = Store(f"s3://{s3_bucket}/w")
    fs = s3fs.S3FileSystem()
    lease = f"{s3_bucket}/w/toy/.lease-fp/{1:012d}.json"
    fs.pipe(lease, json.dumps({"pid": 1, "host": "gone", "id": "x", "expires": time.time() + 60}).encode())
    with pytest.raises(TimeoutError, match="still built by pid 1 on gone"):
        store.lock("toy", "fp", timeout=1).acquire()
    fs.pipe(lease, json.dumps({"pid": 1, "host": "gone", "id": "x", "expires": time.time() - 1}).encode())
    with store.lock("toy", "fp", timeout=10) as lock:
        assert lock._impl.gen == 2 and not fs.exists(lease)    # taken over; the stale lease dropped
    assert not fs.exists(f"{s3_bucket}/w/toy/.lease-fp/{2:012d}.json")   # released


def test_a_holder_that_lost_its_lease_does_not_publish():
    """A holder whose lease was taken over (it stalled past the expiry) notices at its next
    heartbeat and refuses to publish."""
    import pyarrow as pa

    store = Store("memory://lost-lease")
    with store.lock("toy", "fp", lease_seconds=0.6) as lock:
        b = store.builder("toy", "fp")
        b.write_table("part-00000.parquet", pa.table({"x": [1]}))
        taker = lock._impl._file(lock._impl.gen + 1)        # another run's takeover
        store.fs.pipe(taker, json.dumps({"pid": 2, "expires": time.time() + 60}).encode())
        deadline = time.time() + 5
        while not lock.lost and time.time() < deadline:
            time.sleep(0.05)
        assert lock.lost
        with pytest.raises(RuntimeError, match="lease expired while building"):
            b.publish(version="1", config={}, inputs=[])
    assert store.get("toy", "fp") is None
    assert store.fs.exists(taker)                            # the new holder's lease is left alone


def test_a_read_only_store_is_read_without_a_lock(tmp_path, monkeypatch, caplog):
    """Where the lock file cannot be created (a read-only mount), nobody can write either: a
    published dataset is still found, with a warning."""
    import errno

    built = Toy.run(tmp_path, [], CFG)
    real_open = os.open

    def read_only(path, flags, *a):
        if ".lock-" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", read_only)
    with caplog.at_level("WARNING", logger="refinery.store"):
        with Store(tmp_path).lock("toy", built.fingerprint, timeout=1):
            pass
    assert "going on without it" in caplog.text
    assert Toy.run(tmp_path, [], CFG).path == built.path
