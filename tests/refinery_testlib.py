"""Helpers shared by tests (a uniquely named module: folder conftests shadow `conftest`)."""
import sys
from contextlib import contextmanager
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


def trl_grpo_loss(logp, old, ref, adv, mask, beta, loss_type, eps_low, eps_high, max_len):
    """TRL 1.16's GRPOTrainer._compute_loss of ``loss_type`` run as is: the forward replaced by the given log-probs, the accelerator
    by single-process identities, one micro-batch per generation batch (``num_items_in_batch``:
    the batch's completion tokens)."""
    from collections import defaultdict
    from types import SimpleNamespace

    import torch
    from trl.trainer.grpo_trainer import GRPOTrainer as TRLGRPO

    ident = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x,
                            num_processes=1, sync_gradients=True)
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high,
        max_completion_length=max_len,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, accelerator=ident,
        _metrics=defaultdict(lambda: defaultdict(list)))
    B, T = logp.shape
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return TRLGRPO._compute_loss(fake, None, inputs)


@contextmanager
def moto_s3():
    """A moto S3 server on 127.0.0.1 for the block; yields its endpoint URL.

    fsspec caches filesystem instances by their arguments, not by the environment, so an
    `S3FileSystem()` made against an earlier test's server (read from AWS_ENDPOINT_URL) would
    be reused and point at a stopped port: the cache is cleared on the way in and out."""
    import pytest

    server_mod = pytest.importorskip("moto.server")

    def forget():
        s3fs = sys.modules.get("s3fs")
        if s3fs is not None:
            s3fs.S3FileSystem.clear_instance_cache()

    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    forget()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        forget()
        server.stop()


@contextmanager
def serving(lm, model_id: str, **engine_kw):
    """``refinery serve``'s server for a loaded model (``refinery.tasks.eval.generate.load_model``)
    in a thread of this process, on 127.0.0.1 and a free port: yields (its /v1 URL, the socket)."""
    import threading
    import time

    from refinery.tasks.serve import ServedModel, bind, make_server, url_of

    sock = bind(port=0)
    server = make_server(ServedModel(lm, model_id, **engine_kw), log_level="warning")
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the server did not start"
    try:
        yield url_of(sock), sock
    finally:
        server.should_exit = True
        t.join(timeout=15)
        assert not t.is_alive(), "the server did not stop"
