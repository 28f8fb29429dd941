import contextlib
import inspect

from pydantic import BaseModel, Field

from refinery.flows.common import FlowParams, gpu_slot, refinery_flow


def test_gpu_slot_takes_the_named_concurrency_limit(monkeypatch):
    import prefect.concurrency.sync as sync

    calls = []

    @contextlib.contextmanager
    def fake(name, occupy=1, **kw):
        calls.append((name, occupy))
        yield

    monkeypatch.setattr(sync, "concurrency", fake)
    monkeypatch.delenv("REFINERY_GPU_SLOTS", raising=False)
    with gpu_slot():
        pass
    assert calls == []
    monkeypatch.setenv("REFINERY_GPU_SLOTS", "gpu-slots")
    with gpu_slot():
        pass
    assert calls == [("gpu-slots", 1)]


def test_flow_signature_and_docs_come_from_the_params_model():
    class Sub(BaseModel):
        n: int = 3

    class P(FlowParams):
        input: str = Field(description="The upstream dataset.")
        sub: Sub = Field(default_factory=Sub, description="Nested settings.")

    @refinery_flow("t-flow", P)
    def t_flow(p: P) -> dict:
        """A test flow."""
        return {"outputs": {}, "counts": {"n": p.sub.n}}

    sig = inspect.signature(t_flow.fn)
    assert list(sig.parameters) == ["workdir", "task_runner", "input", "sub"]
    assert sig.parameters["input"].default is inspect.Parameter.empty
    assert sig.parameters["sub"].default == Sub()
    assert "input: The upstream dataset." in t_flow.fn.__doc__
    schema = t_flow.parameters.model_dump()
    assert schema["properties"]["input"]["description"] == "The upstream dataset."
    assert schema["required"] == ["input"]


def test_summary_table_says_cached_for_a_stage_found_built(tmp_path):
    from toy_stages import DoubleConfig, Toy, ToyConfig, double

    from refinery.flows.common import stage_rows

    built = Toy.run(tmp_path, [], ToyConfig())
    found = Toy.run(tmp_path, [], ToyConfig())
    assert (built.cached, found.cached) == (False, True)
    rows = {r["stage"]: r for r in stage_rows({"toy": found, "double": double.run(tmp_path, [found], DoubleConfig())})}
    assert rows["toy"]["seconds"] == "cached"
    assert isinstance(rows["double"]["seconds"], float)  # built by this run: its own time


def test_one_identity_rule_for_raw_input_files(tmp_path):
    import os

    import fsspec

    from refinery.tasks.align.data import file_identity as align_identity
    from refinery.tasks.finetune.config import file_identity as finetune_identity
    from refinery.tasks.ingest.sources import identity as ingest_identity
    from refinery.tasks.runtime import file_identity

    f = tmp_path / "data.jsonl"
    f.write_text('{"text": "a"}\n')
    st = os.stat(f)
    ident = file_identity(f)
    assert ident == f"{f}|{st.st_size}|{st.st_mtime_ns}"
    assert align_identity(f) == finetune_identity(str(f)) == ingest_identity(str(f)) == ident
    assert file_identity(f"file://{f}") == ident
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, touched: a new identity
    assert file_identity(f) != ident
    assert file_identity(tmp_path / "nope") == f"{tmp_path / 'nope'}|missing|FileNotFoundError"
    mem = fsspec.filesystem("memory")
    mem.pipe("/ident-test/x.jsonl", b"abc")
    try:
        assert file_identity("memory://ident-test/x.jsonl").startswith("memory://ident-test/x.jsonl|3|")
    finally:
        mem.rm("/ident-test", recursive=True)
