"""Model cards with the whole lineage, ``refinery card`` and ``refinery push``, in-process.

One small lineage is built from real stores: curation datasets with hand-written manifests (an ingest
with crawl files, a filter with drop reasons and languages, a decontamination, a tokenize), a
pretrain-like dataset published by a toy stage under ``with_model_cards`` (the tiny model and a
metrics file), then the real finetune stage (LoRA, two steps) on it, and an evaluate-like dataset
with a results.parquet. The push goes to a small in-process mock of the hub's HTTP API (create repo,
branch, preupload, commit) on 127.0.0.1, which ``HF_ENDPOINT`` names.
"""
from __future__ import annotations

import base64
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from refinery.tasks.runtime import StageOutput, stage
from refinery.tasks.store import Dataset, Store

IDS = [[0, 5, 17, 99, 300, 42, 7, 8, 260, 11]]


def _publish(store: Store, stage_name: str, fp: str, *, inputs=(), config=None, counts=None, extra=None,
             tables=None, files=None) -> Dataset:
    """A dataset with a hand-written manifest (the curation stages' keys as they write them)."""
    import pyarrow as pa

    b = store.builder(stage_name, fp)
    for rel, rows in (tables or {}).items():
        b.write_table(rel, pa.Table.from_pylist(rows))
    for rel, data in (files or {}).items():
        b.write_bytes(rel, data)
    return b.publish(version="1", config=config or {}, inputs=[d.ref() for d in inputs], counts=counts or {},
                     extra=extra)


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    """A few instruction records (Alpaca format)."""
    recs = [{"instruction": "Repeat the words.", "input": f"w{i} x{i}", "output": f"w{i} x{i}"} for i in range(12)]
    p = tmp_path_factory.mktemp("sft") / "words.json"
    p.write_text(json.dumps(recs))
    return p


@pytest.fixture(scope="module")
def lineage(tmp_path_factory, tiny_causal_lm_dir, sft_file):
    """The stores: ingest -> filter -> decontaminate -> tokenize -> pretrain -> finetune (LoRA) -> evaluate."""
    from refinery.tasks.export.card import with_model_cards
    from refinery.tasks.finetune.config import FinetuneConfig
    from refinery.tasks.finetune.stage import finetune

    root = tmp_path_factory.mktemp("cards") / "work"
    store = Store(root)
    doc = [{"id": "a", "text": "x"}]
    ingest = _publish(store, "ingest", "ingest0000000001", tables={"part-00000.train.parquet": doc},
                      config={"inputs": [{"path": str(root / "crawl" / f"cc-{i}.warc.gz"), "source": "cc"} for i in range(3)]},
                      counts={"docs_in": 40, "docs_out": 37, "dropped": {"http_status": 2}, "record_errors": {"bad_record": 1}})
    filt = _publish(store, "filter", "filter0000000001", inputs=[ingest], tables={"part-00000.train.parquet": doc},
                    counts={"docs_in": 37, "docs_out": 27, "dropped": 10,
                            "dropped_by_reason": {"gopher_repetition:top_2_gram": 6, "url:domain": 3, "c4:lorem": 1},
                            "by_language": {"en": {"docs_out": 26}, "de": {"docs_out": 1}, "fr": {"docs_out": 0}}})
    decon = _publish(store, "decontaminate", "decont0000000001", inputs=[filt], tables={"part-00000.train.parquet": doc},
                     counts={"docs_in": 27, "docs_out": 25, "dropped": 2, "modified": 0, "by_benchmark": {"gsm8k": 2, "mmlu": 0}},
                     extra={"benchmarks": ["gsm8k", "mmlu"], "policy": "drop", "n": 13})
    tok = _publish(store, "tokenize", "tokens0000000001", inputs=[decon], files={"part-00000-000.arrow": b"0"},
                   counts={"docs_in": 25, "docs_out": 25, "tokens": 6679},
                   extra={"tokenizer": {"fingerprint": "tok0000000000001", "sha256": "ab" * 32, "path": str(root / "t")},
                          "vocab_size": 512, "dtype": "uint16"})
    metrics = tmp_path_factory.mktemp("metrics")
    (metrics / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "split": "val", "val_loss": 6.3, "seconds": 0.1},
        {"step": 1, "split": "train", "loss": 6.25, "seconds": 0.5, "tokens_per_sec": 100.0},
        {"step": 2, "split": "train", "loss": 6.1, "seconds": 0.9}, {"step": 2, "split": "val", "val_loss": 6.0}]))

    @stage("pretrain", version="1")
    @with_model_cards
    def fake_pretrain(b, inputs, cfg):
        b.put_dir(tiny_causal_lm_dir)
        b.put_dir(metrics, "metrics")
        return StageOutput(counts={"steps": 2, "tokens": 1024, "params": 1}, extra={"model": ".", "val_loss_end": 6.0})

    pre = fake_pretrain.run(store, [tok], {"objective": "clm", "max_steps": 2, "lr": 0.003})
    cfg = FinetuneConfig(model=pre.path, data=str(sft_file), method="lora", device="cpu", max_steps=2, eval_every=2,
                         seq_len=64, batch_size=4, val_fraction=0.25, num_samples=0)
    ft = finetune.run(store, cfg=cfg)
    return {"root": root, "store": store, "pretrain": pre, "finetune": ft, "decontaminate": decon}


def _evaluate(store: Store, models: list[Dataset], values: dict) -> Dataset:
    """An evaluate dataset as the evaluate stage writes one: config.models with identities, results.parquet."""
    specs = [{"label": f"{d.stage}-{d.fingerprint[:6]}", "path": d.path, "identity": f"dataset:{d.stage}:{d.fingerprint}"}
             for d in models]
    rows = [{"model": s["label"], "task": task, "metric": metric, "value": v, "stderr": None, "n": 4}
            for s in specs for (task, metric), v in values.items()]
    return _publish(store, "evaluate", "eval000000000001", config={"models": specs}, counts={"models": len(specs)},
                    tables={"results.parquet": rows}, extra={"results": "results.parquet"})


def _meta(path: Path) -> dict:
    from huggingface_hub import ModelCard, metadata_load

    card = ModelCard.load(path)   # the hub's own parser: front matter and body
    meta = metadata_load(path)
    assert card.data.to_dict() == meta
    return meta


# --------------------------------------------------------------------------- cards written at publish
def test_every_published_model_has_a_card_the_hub_parses(lineage):
    root = lineage["root"]
    pre, ft = lineage["pretrain"], lineage["finetune"]
    meta = _meta(Path(pre.path) / "README.md")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "other" and "base_model" not in meta     # trained from scratch
    assert meta["datasets"] == ["tokenize/tokens0000000001"] and meta["language"] == ["de", "en"]
    assert "model-index" not in meta   # nothing evaluated it yet

    merged, adapter = _meta(Path(ft.path) / "merged" / "README.md"), _meta(Path(ft.path) / "adapter" / "README.md")
    base = f"../../../pretrain/{pre.fingerprint}"
    assert merged["base_model"] == adapter["base_model"] == base
    assert (Path(ft.path) / "merged" / base / "config.json").is_file()   # relative to the model folder: it loads
    assert merged["library_name"] == "transformers" and adapter["library_name"] == "peft"
    assert "lora" in merged["tags"] and "peft" in adapter["tags"] and "refinery" in merged["tags"]
    assert merged["datasets"] == ["tokenize/tokens0000000001", Path(ft.config["data"]).name]

    for ds in (pre, ft):   # the cards are files of the dataset: listed, sha256 checked
        assert Dataset.open(ds.path).verify() == []
    listed = {f["path"] for f in ft.manifest["files"]}
    assert {"README.md", "merged/README.md", "adapter/README.md"} <= listed
    for card in [Path(pre.path) / "README.md", *Path(ft.path).glob("*/README.md")]:
        assert str(root) not in card.read_text() and "/tmp" not in card.read_text()   # no absolute path


def test_the_card_body_carries_the_lineage(lineage):
    text = (Path(lineage["finetune"].path) / "merged" / "README.md").read_text()
    for needle in ("`cc-0.warc.gz`", "source `cc`",                                            # crawl sources
                   "| `filter` | `filter0000000001` | 37 | 27 | gopher_repetition:top_2_gram 6, url:domain 3, c4:lorem 1 |",
                   "| `ingest` | `ingest0000000001` | 40 | 37 | http_status 2, bad_record 1 |",
                   "against `gsm8k`, `mmlu`: 2 documents removed",                               # decontamination
                   "6,679 tokens", "tokenizer `tok0000000000001`",                                 # tokenizer
                   "| `pretrain` |", "| `finetune` |", "`lora.r`", "## Loss curve",
                   "![metrics/loss.png](metrics/loss.png)", "No evaluation of this model yet"):
        assert needle in text, needle
    pre = (Path(lineage["pretrain"].path) / "README.md").read_text()
    assert "| 0 | - | 6.3 |" in pre and "| 2 | 6.1 | 6 |" in pre     # the loss curve, timings left out


# --------------------------------------------------------------------------- regenerated later
def test_refinery_card_regenerates_with_the_evaluations_exactly(lineage, tmp_path):
    """Without evaluations ``card_for`` writes the published bytes again (deterministic, and the
    same after the workdir moved); with an evaluate dataset its model-index holds the numbers of
    results.parquet exactly; the published dataset is left as it was."""
    import pyarrow.parquet as pq

    from refinery.tasks.export.card import card_for

    ft = lineage["finetune"]
    published = (Path(ft.path) / "merged" / "README.md").read_text()
    assert card_for(ft.path, evaluations=[]) == published
    moved = tmp_path / "elsewhere" / "work"
    shutil.copytree(lineage["root"], moved, symlinks=True)
    assert card_for(str(moved / "finetune" / ft.fingerprint), evaluations=[]) == published
    assert card_for(str(moved / "finetune" / ft.fingerprint / "adapter"), evaluations=[]) == \
        (Path(ft.path) / "adapter" / "README.md").read_text()

    ev = _evaluate(lineage["store"], [lineage["pretrain"], ft],
                   {("heldout", "bits_per_byte"): 4.933207334317904, ("gsm8k", "exact_match,strict-match"): 0.25})
    text = card_for(ft.path)
    out = tmp_path / "README.md"
    out.write_text(text)
    meta = _meta(out)
    got = {(r["dataset"]["type"], m["name"]): m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    rows = pq.read_table(Path(ev.path) / "results.parquet").to_pylist()
    want = {(r["task"], r["metric"]): r["value"] for r in rows if r["model"] == f"finetune-{ft.fingerprint[:6]}"}
    assert got == want and len(got) == 2
    assert meta["model-index"][0]["results"][0]["dataset"]["config"] == f"evaluate/{ev.fingerprint}"
    assert "| `gsm8k` | `exact_match,strict-match` | 0.25 |" in text
    assert Dataset.open(ft.path).verify() == []   # nothing written into the published dataset


def test_dataset_cards_gain_hub_metadata(lineage):
    """A dataset's card (regenerated = published) has license, language, size_categories, source_datasets."""
    from huggingface_hub import DatasetCard

    from refinery.tasks.card import size_category
    from refinery.tasks.export.card import card_for

    filt = Path(lineage["root"]) / "filter" / "filter0000000001"
    assert card_for(str(filt)) == (filt / "README.md").read_text()
    data = DatasetCard.load(filt / "README.md").data.to_dict()
    assert data["license"] == "other" and data["language"] == ["de", "en"]
    assert data["size_categories"] == ["n<1K"] and data["source_datasets"] == ["ingest/ingest0000000001"]
    assert DatasetCard.load(Path(lineage["root"]) / "ingest" / "ingest0000000001" / "README.md").data.to_dict()[
        "source_datasets"] == ["original"]
    assert [size_category(n) for n in (0, 999, 1000, 12_345_678, 10**13)] == \
        ["n<1K", "n<1K", "1K<n<10K", "10M<n<100M", "n>1T"]


# --------------------------------------------------------------------------- the adapter's base
def test_adapter_config_names_its_base_relatively_and_loads(lineage):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from refinery.tasks.finetune.methods import adapter_base_model

    ft, pre = lineage["finetune"], lineage["pretrain"]
    adapter = Path(ft.path) / "adapter"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == f"../../../pretrain/{pre.fingerprint}"
    assert adapter_base_model(adapter) == pre.path
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapter_base_model(adapter)), str(adapter))
    merged = AutoModelForCausalLM.from_pretrained(Path(ft.path) / "merged")
    with torch.no_grad():
        a, m = model.eval()(torch.tensor(IDS)).logits, merged.eval()(torch.tensor(IDS)).logits
    assert (a - m).abs().max().item() < 1e-4


# --------------------------------------------------------------------------- push, against a mock hub
class MockHub(BaseHTTPRequestHandler):
    """The endpoints ``HfApi.create_repo``, ``create_branch`` and ``create_commit`` call."""

    calls: list = []
    commits: list = []
    validated: list = []

    def log_message(self, *a):   # quiet
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):   # noqa: N802  (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.calls.append((self.path, self.headers.get("Authorization")))
        if self.path == "/api/repos/create":
            req = json.loads(body)
            return self._reply(200, {"url": f"http://{self.headers['Host']}/{req.get('organization')}/{req['name']}"})
        if self.path == "/api/validate-yaml":   # the hub checks a README's metadata before a commit
            self.validated.append(json.loads(body))
            return self._reply(200, {})
        if "/branch/" in self.path:
            return self._reply(200, {})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if "/commit/" in self.path:
            lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
            files = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
            self.commits.append({"path": self.path, "header": lines[0]["value"], "files": files})
            return self._reply(200, {"commitUrl": f"http://{self.headers['Host']}/org/tiny/commit/" + "a" * 40, "commitOid": "a" * 40, "pullRequestUrl": None})
        return self._reply(404, {"error": f"mock hub: no {self.path}"})


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants as hc

    server = ThreadingHTTPServer(("127.0.0.1", 0), MockHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    MockHub.calls, MockHub.commits, MockHub.validated = [], [], []
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)   # the suite runs offline; this "hub" is local
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield MockHub
    server.shutdown()
    server.server_close()


def test_push_uploads_the_model_folder_with_its_regenerated_card(lineage, hub, monkeypatch, capsys):
    from refinery.flows.cli import main

    ft = lineage["finetune"]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert main(["push", ft.path, "--repo", "org/tiny"]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err and hub.calls == []   # no token: nothing sent

    monkeypatch.setenv("HF_TOKEN", "hf_test_secret")
    assert main(["push", ft.path, "--repo", "org/tiny", "--private", "--revision", "v1", "--json",
                 "--base-model", "org/tiny-base"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["repo_type"] == "model" and res["revision"] == "v1" and res["commit"] == "a" * 40
    assert all(auth == "Bearer hf_test_secret" for _, auth in hub.calls)
    assert [p for p, _ in hub.calls][:2] == ["/api/repos/create", "/api/models/org/tiny/branch/v1"]
    (commit,) = hub.commits
    assert commit["path"] == "/api/models/org/tiny/commit/v1"
    files = commit["files"]
    merged = Path(ft.path) / "merged"
    want = {p.relative_to(merged).as_posix() for p in merged.rglob("*") if p.is_file()}
    assert set(files) == want and files["model.safetensors"] == (merged / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert hub.validated == [{"content": card, "repoType": "model"}]
    assert card.startswith("---\n") and "base_model: org/tiny-base\n" in card and "hf_test_secret" not in card
    assert f"Base model: `../../../pretrain/{lineage['pretrain'].fingerprint}`" in card   # the text keeps the lineage

    # without --base-model a relative base (no hub id) leaves the metadata; the dataset is pushed as is
    hub.commits.clear()
    assert main(["push", f"{ft.path}/adapter", "--repo", "org/tiny-adapter"]) == 0
    files = hub.commits[0]["files"]
    assert "adapter_config.json" in files and "base_model" not in _meta_of(files["README.md"].decode())
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"].startswith("../../../pretrain/")
    assert Dataset.open(ft.path).verify() == []


def _meta_of(text: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(text).data.to_dict()


def test_a_base_outside_the_workdir_is_named_not_pathed(tmp_path):
    """In the card's own workdir: a path relative to the model folder (true wherever the workdir
    goes); elsewhere: its STAGE/FINGERPRINT name, out of the metadata (the card's bytes must not
    depend on where two workdirs happen to lie); a hub id as given."""
    from refinery.tasks.export.card import card_base

    def dataset(where: Path, stage: str, fp: str) -> Path:
        d = where / stage / fp
        (d / "model").mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"stage": stage, "fingerprint": fp, "model": "model"}))
        return d

    work, other = tmp_path / "w", tmp_path / "elsewhere" / "deeper"
    inside, outside = dataset(work, "finetune", "aa11"), dataset(other, "finetune", "bb22")
    model_dir = str(work / "dpo" / "cc33" / "model")
    assert card_base(str(inside), model_dir, str(work)) == ("../../../finetune/aa11/model",) * 2
    meta, text = card_base(str(outside), model_dir, str(work))
    assert meta is None and text.startswith("finetune/bb22 ") and str(tmp_path) not in text
    assert card_base("org/name", model_dir, str(work)) == ("org/name", "org/name")
