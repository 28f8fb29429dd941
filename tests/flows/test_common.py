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
