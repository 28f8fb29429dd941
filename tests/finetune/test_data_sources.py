"""Training data from where users keep it (refinery.tasks.records): every file format, dataset
folders (a refinery dataset, save_to_disk, plain data files), s3:// through moto, identities, and
reading that streams: the memory it takes does not grow with the file."""
from __future__ import annotations

import gzip
import json
import os
import tracemalloc
from pathlib import Path

import pytest

from refinery.tasks import records as R
from refinery.tasks.finetune import data as D
from refinery.tasks.runtime import StageOutput, stage
from refinery_testlib import moto_s3, shared_file

ALPACA = "sft/alpaca_en_demo.json"


@pytest.fixture(scope="module")
def alpaca(shared_data) -> list[dict]:
    return json.loads(shared_file(shared_data, ALPACA).read_text())[:40]


def _messages(examples: list[D.Example]) -> list[tuple[int, list[dict]]]:
    return [(e.record, e.messages) for e in examples]


def write_as(kind: str, rows: list, folder: Path) -> Path:
    """``rows`` written the way ``kind`` says; the path (file or folder) to read them from."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    text_jsonl = "".join(json.dumps(r) + "\n" for r in rows)
    if kind == "json":
        (p := folder / "d.json").write_text(json.dumps(rows, indent=2))
    elif kind == "json_wrapped":   # pretty-printed, other keys before the list
        (p := folder / "d.json").write_text(json.dumps({"version": 2, "meta": {"n": [1, 2]}, "train": rows}, indent=1))
    elif kind == "json_one_line":
        (p := folder / "d.json").write_text(json.dumps({"data": rows}))
    elif kind == "jsonl":
        (p := folder / "d.jsonl").write_text(text_jsonl)
    elif kind == "jsonl_gz":
        (p := folder / "d.jsonl.gz").write_bytes(gzip.compress(text_jsonl.encode()))
    elif kind == "json_gz":
        (p := folder / "d.json.gz").write_bytes(gzip.compress(json.dumps(rows).encode()))
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), p := folder / "d.parquet", row_group_size=7)
    elif kind == "jsonl_unnamed":   # no telling suffix: the content decides
        (p := folder / "d.data").write_text(text_jsonl)
    elif kind == "folder_files":   # split files as load_dataset reads them, plus a file it ignores
        (p := folder / "ds").mkdir()
        pq.write_table(pa.Table.from_pylist(rows[:15]), p / "train-00000-of-00002.parquet")
        (p / "train-00001-of-00002.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[15:]))
        (p / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    elif kind == "save_to_disk":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(p := folder / "hf"), max_shard_size="20KB")
    elif kind == "save_to_disk_dict":
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                              "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(p := folder / "hfd"))
    elif kind == "refinery_dataset":
        p = refinery_dataset(rows, folder / "work")
    else:
        raise AssertionError(kind)
    return p


@stage("test_sft_export", version="1")
def sft_export(b, inputs, cfg):
    """A stage publishing instruction records, the way a curated output is published: parquet parts."""
    import pyarrow as pa

    from refinery.tasks.card import part_name

    rows = cfg["rows"]
    half = len(rows) // 2
    b.write_table(part_name(0), pa.Table.from_pylist(rows[:half]))
    b.write_table(part_name(1), pa.Table.from_pylist(rows[half:]))
    b.write_table("excluded/dropped.parquet", pa.Table.from_pylist(rows[:1]))   # a side table: not data
    return StageOutput(counts={"docs_out": len(rows)})


def refinery_dataset(rows: list, root: Path) -> Path:
    return Path(sft_export.run(str(root), [], {"rows": rows}).path)


FORMATS = ["json", "json_wrapped", "json_one_line", "jsonl", "jsonl_gz", "json_gz", "parquet", "jsonl_unnamed",
           "folder_files", "save_to_disk", "save_to_disk_dict", "refinery_dataset"]


@pytest.mark.parametrize("kind", FORMATS)
def test_sft_examples_are_the_same_from_every_format(kind, alpaca, tmp_path):
    ref, ref_rep = D.read_examples(write_as("json", alpaca, tmp_path / "ref"))
    ex, rep = D.read_examples(write_as(kind, alpaca, tmp_path / kind))
    assert _messages(ex) == _messages(ref) and len(ex) == 40
    assert rep.records == 40 and rep.bad == 0 and rep.formats == ref_rep.formats


def test_save_to_disk_and_refinery_dataset_identities(alpaca, tmp_path):
    hf = write_as("save_to_disk", alpaca, tmp_path / "a")
    ident = R.identity(hf)
    assert ident.startswith(f"{hf}|folder|") and R.identity(hf) == ident
    arrow = sorted(hf.glob("*.arrow"))[0]
    os.utime(arrow, ns=(0, os.stat(arrow).st_mtime_ns + 10**9))   # a data file changes: a new identity
    assert R.identity(hf) != ident
    ds = write_as("refinery_dataset", alpaca, tmp_path / "b")
    fingerprint = json.loads((ds / "manifest.json").read_text())["fingerprint"]
    assert R.identity(ds) == f"{ds}|dataset|{fingerprint}"
    assert R.data_files(ds) == [str(ds / "part-00000.train.parquet"), str(ds / "part-00001.train.parquet")]
    from refinery.tasks.finetune.config import file_identity
    from refinery.tasks.runtime import file_identity as raw_identity

    f = write_as("jsonl", alpaca, tmp_path / "c")
    assert file_identity(str(f)) == R.identity(f) == raw_identity(f)   # a file: the raw inputs' one rule
    assert R.identity(tmp_path / "nope").endswith("|missing|FileNotFoundError")
    with pytest.raises(FileNotFoundError, match="nope"):
        R.identity(tmp_path / "nope", required=True)


def test_bad_records_and_broken_files_in_the_new_formats(tmp_path, monkeypatch):
    good = {"instruction": "a", "output": "b"}
    # records cut across the reading window, numbers across its edge
    monkeypatch.setattr(R, "_CHUNK", 16)
    p = tmp_path / "w.json"
    p.write_text(json.dumps({"n": 123456789, "examples": [good, {"instruction": "x" * 100, "output": "é" * 50},
                                                           {"instruction": "", "output": "b"}, 12345678901]}))
    ex, rep = D.read_examples(p)
    assert [e.record for e in ex] == [1, 2] and ex[1].messages[-1]["content"] == "é" * 50
    assert {b["record"]: b["reason"].split(":")[0] for b in rep.bad_records} == {3: "empty_instruction", 4: "not_an_object"}
    # a one-line document longer than the window is streamed too; a long JSONL line is read whole
    p.write_text(json.dumps({"data": [good] * 20}))
    assert len(D.read_examples(p)[0]) == 20
    (lj := tmp_path / "long.jsonl").write_text(json.dumps({**good, "input": "y" * 50}) + "\n" + json.dumps(good) + "\n")
    assert [e.record for e in D.read_examples(lj)[0]] == [1, 2]
    # blank lines keep the JSONL numbering; a broken line is a bad record
    (j := tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b"\n\n" + json.dumps(good).encode() + b"\n\n{oops\n"))
    ex, rep = D.read_examples(j)
    assert [e.record for e in ex] == [3] and rep.bad_records[0]["record"] == 5
    for name, content, match in [("cut.json", b'[{"instruction": "a", "output": "b"}, {"instr', "cut.json"),
                                 ("trail.json", b'[{"instruction": "a", "output": "b"}] x', "trail.json"),
                                 ("nogz.jsonl.gz", b'{"instruction": "a"}\n', "nogz.jsonl.gz"),
                                 ("bad.parquet", b"PAR1 not really", "bad.parquet")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=match):
            D.read_examples(tmp_path / name)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without data files"):
        D.read_examples(tmp_path / "empty")


# --------------------------------------------------------------------------- streaming SFT preparation
def test_read_split_encode_equals_the_in_memory_path(tiny_tokenizer, alpaca, tmp_path):
    """The streaming path gives the examples, split, order and counts of read + split + encode."""
    tok = tiny_tokenizer
    D.ensure_chat_template(tok)
    rows = alpaca + [{"instruction": "x"}] + [{"instances": [{"input": "a", "output": "b"}, {"input": "c", "output": "d"}],
                                                "instruction": "two"}]
    path = write_as("jsonl_gz", rows, tmp_path)
    for max_records, max_val in ((None, None), (30, 3)):
        ex, rep = D.read_examples(path, max_records=max_records)
        train_ex, val_ex = D.split_examples(ex, 0.2, seed=3, max_val=max_val)
        ref_train, ref_tc = D.encode_all(tok, train_ex, 64, rep)
        ref_val, ref_vc = D.encode_all(tok, val_ex, 64, rep)
        got = D.read_split_encode(tok, path, 64, max_records=max_records, val_fraction=0.2, seed=3, max_val=max_val)
        assert isinstance(got.train_items, D.EncodedStore) and len(got.train_items) == len(ref_train)
        assert [(e.input_ids, e.labels, e.record, e.truncated) for e in got.train_items] == \
            [(e.input_ids, e.labels, e.record, e.truncated) for e in ref_train]
        assert [(e.input_ids, e.labels) for e in got.val_items] == [(e.input_ids, e.labels) for e in ref_val]
        assert got.train_counts == ref_tc and got.val_counts == ref_vc
        assert _messages(got.val_examples) == _messages(val_ex)
        assert (got.report.records, got.report.examples, got.report.bad) == (rep.records, rep.examples, rep.bad)
        # the lazy epoch equals the eager one (the old make_batches), packed and not
        for packing in (False, True):
            lazy = D.make_batches(got.train_items, 4, 0, packing, 64, seed=7)
            eager = D.make_batches(ref_train, 4, 0, packing, 64, seed=7)
            assert len(lazy) == len(eager) > 1
            for a, b in zip(lazy, eager):
                assert a.input_ids.equal(b.input_ids) and a.labels.equal(b.labels) and a.n_labels == b.n_labels
        import random

        order = list(range(len(ref_train)))
        random.Random(7).shuffle(order)
        rows_ = D.pack([ref_train[i] for i in order], 64)
        assert sum(1 for _ in D.make_batches(ref_train, 4, 0, True, 64, seed=7)) == (len(rows_) + 3) // 4


# --------------------------------------------------------------------------- memory
class ByteTokenizer:
    """A tokenizer as cheap as can be (bytes are tokens), so the memory test measures the reader."""

    is_fast = False
    chat_template = "plain"
    pad_token_id = 0

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode()[:4000])}


def _jsonl_file(path: Path, mb: float) -> Path:
    line = {"instruction": "Summarise the following paragraph. " * 4, "input": "lorem ipsum dolor " * 30,
            "output": "A short summary of the paragraph. " * 8}
    with open(path, "w") as f:
        i = 0
        while f.tell() < mb * 1e6:
            f.write(json.dumps({**line, "id": i}) + "\n")
            i += 1
    return path


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    small, big = _jsonl_file(tmp_path / "small.jsonl", 3), _jsonl_file(tmp_path / "big.jsonl", 18)
    big_json = tmp_path / "big.json"   # the same records as one JSON list
    with open(big) as src, open(big_json, "w") as out:
        out.write("[" + ",\n".join(line.rstrip("\n") for line in src) + "]")
    big_pq = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist([json.loads(line) for line in open(small)] * 6), big_pq, row_group_size=2000)

    def drain(p):
        return lambda: sum(1 for _ in R.iter_records(p))

    peaks = {name: _peak(drain(p)) for name, p in
             [("small", small), ("big", big), ("big_json", big_json), ("big_parquet", big_pq)]}
    mb = {k: round(v / 1e6, 2) for k, v in peaks.items()}
    assert peaks["big"] < 4e6 and peaks["big_json"] < 8e6 and peaks["big_parquet"] < 16e6, mb
    assert peaks["big"] < 1.5 * peaks["small"] + 1e6, mb   # 6x the file, about the same memory

    # the whole SFT preparation: read, split and encode (the training examples go to disk)
    tok = ByteTokenizer()
    small, big = _jsonl_file(tmp_path / "s.jsonl", 0.5), _jsonl_file(tmp_path / "b.jsonl", 2.5)

    def prepare(p):
        return lambda: D.read_split_encode(tok, p, 2048, val_fraction=0.01, seed=0, max_val=16)

    p_small, p_big = _peak(prepare(small)), _peak(prepare(big))
    n_records = sum(1 for _ in open(big))
    # what grows is the compact index (tens of bytes a record), not the records or their tokens
    assert p_big < p_small + 64 * n_records + 1e6 and p_big < 6e6, (p_small / 1e6, p_big / 1e6, n_records)
    split = D.read_split_encode(tok, big, 2048, val_fraction=0.01, seed=0, max_val=16)
    first = [split.train_items[i].record for i in range(10)]
    assert len(split.train_items) == n_records - 16 and first != sorted(first)   # in the seeded split order


# --------------------------------------------------------------------------- preference, KTO and GRPO data
def _pairs(pairs) -> list[tuple]:
    return [(p.prompt, p.chosen, p.rejected) for p in pairs]


@pytest.mark.parametrize("kind", ["jsonl_gz", "json_wrapped", "parquet", "folder_files", "save_to_disk",
                                  "refinery_dataset"])
def test_align_data_is_the_same_from_every_format(kind, shared_data, tmp_path):
    from refinery.tasks.align.data import load_pairs, load_prompts, load_unpaired

    dpo = json.loads(shared_file(shared_data, "preference/dpo_en_demo.json").read_text())[:30]
    kto = json.loads(shared_file(shared_data, "preference/kto_en_demo.json").read_text())[:30]
    gsm = [json.loads(line) for line in shared_file(shared_data, "eval/gsm8k-test.jsonl").read_text().splitlines()[:30]]
    for rows, load, key in [(dpo, load_pairs, _pairs),
                            (kto, load_unpaired, lambda xs: [(x.prompt, x.completion, x.label) for x in xs]),
                            (gsm, load_prompts, lambda xs: [(x.prompt, x.columns) for x in xs])]:
        ref, ref_counts = load(write_as("json", rows, tmp_path / f"ref-{load.__name__}"), min_valid_fraction=0.5)
        got, counts = load(write_as(kind, rows, tmp_path / f"{kind}-{load.__name__}"), min_valid_fraction=0.5)
        assert key(got) == key(ref) and len(got) == 30 and counts == ref_counts, load.__name__


def test_too_many_bad_records_from_a_table(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from refinery.tasks.align.data import TooManyBadRecords, load_pairs

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] + [{"prompt": "p", "chosen": "same", "rejected": "same"}] * 3
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    with pytest.raises(TooManyBadRecords, match="p.parquet.*identical_replies=3"):
        load_pairs(tmp_path / "p.parquet", min_valid_fraction=0.5)


# --------------------------------------------------------------------------- object storage (moto)
@pytest.fixture(scope="module")
def s3_env():
    with moto_s3() as endpoint:
        yield {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": endpoint}


def test_s3_files_and_folders(s3_env, monkeypatch, alpaca, shared_data, tmp_path):
    """Credentials and endpoint only from the environment, as everywhere else."""
    import boto3
    import fsspec

    from refinery.tasks.align.data import load_pairs
    from refinery.tasks.finetune.config import file_identity

    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    fsspec.filesystem("s3").clear_instance_cache()
    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name="us-east-1")
    s3.create_bucket(Bucket="data")
    local = {k: write_as(k, alpaca, tmp_path / k) for k in ("jsonl_gz", "parquet", "save_to_disk")}
    s3.upload_file(str(local["jsonl_gz"]), "data", "sft/a.jsonl.gz")
    s3.upload_file(str(local["parquet"]), "data", "sft/a.parquet")
    for f in local["save_to_disk"].iterdir():
        s3.upload_file(str(f), "data", f"sft/hf/{f.name}")
    dpo = shared_file(shared_data, "preference/dpo_en_demo.json")
    s3.upload_file(str(dpo), "data", "pref/dpo.json")

    ref, _ = D.read_examples(local["jsonl_gz"])
    for url in ("s3://data/sft/a.jsonl.gz", "s3://data/sft/a.parquet", "s3://data/sft/hf"):
        ex, rep = D.read_examples(url)
        assert _messages(ex) == _messages(ref) and rep.path == url, url
    assert _pairs(load_pairs("s3://data/pref/dpo.json")[0]) == _pairs(load_pairs(dpo)[0])

    etag = s3.head_object(Bucket="data", Key="sft/a.parquet")["ETag"]
    assert file_identity("s3://data/sft/a.parquet") == f"s3://data/sft/a.parquet|{os.path.getsize(local['parquet'])}|{etag}"
    folder = R.identity("s3://data/sft/hf")
    assert folder.startswith("s3://data/sft/hf|folder|")
    s3.upload_file(str(local["parquet"]), "data", "sft/hf/" + sorted(p.name for p in local["save_to_disk"].glob("*.arrow"))[0])
    fsspec.filesystem("s3").invalidate_cache()
    assert R.identity("s3://data/sft/hf") != folder   # a data file replaced: a new identity
    assert R.identity("s3://data/nope.jsonl").endswith("|missing|FileNotFoundError")
    with pytest.raises(FileNotFoundError, match="s3://data/nope.jsonl"):
        D.read_examples("s3://data/nope.jsonl")
