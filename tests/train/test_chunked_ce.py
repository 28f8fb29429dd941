"""Chunked linear + cross-entropy (``loss_chunk_tokens``): the loss and the gradients of hidden
states, weight and bias equal ``F.cross_entropy`` on the full logits (float32 within 1e-5;
bfloat16 and autocast loosely), with ignored labels, an uneven last chunk and an all-ignored batch;
the largest tensor and the peak RSS of forward + backward shrink; the causal-LM objective built on
it gives the plain objective's loss and gradients for Llama and GPT-2 (through torch.compile too)
and refuses a head that rescales its logits; a tiny pretrain run follows the plain run's loss
curve within 1e-4; mlm and span refuse the knob at validation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from train_fixtures import (corpus_texts, corpus_tokens, cfg_for, losses, one_thread, readers, run,  # noqa: F401
                            train_tokenizer_dir, val_losses)

from refinery.tasks.train.chunked_ce import linear_cross_entropy

ROOT = Path(__file__).resolve().parents[2]


def _problem(n: int = 37, hidden: int = 16, vocab: int = 50, dtype=torch.float32, bias: bool = True,
             ignored_every: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, vocab, (n,), generator=g)
    if ignored_every:
        y[::ignored_every] = -100
    return h, w, b, y


def _loss_and_grads(fn, h, w, b, scale: float = 3.0):
    """Loss and gradients of ``scale * fn()`` (a scale other than 1 checks that backward uses grad_output)."""
    params = [t for t in (h, w, b) if t is not None]
    for t in params:
        t.grad = None
    loss = fn()
    (loss * scale).backward()
    return loss.detach(), [t.grad.clone() for t in params]


@pytest.mark.parametrize("chunk", [1, 8, 10, 37, 100])     # 10: uneven last chunk; 100: one chunk bigger than the rows
@pytest.mark.parametrize("bias", [False, True])
def test_float32_matches_full_logits(chunk, bias):
    h, w, b, y = _problem(bias=bias)
    ref, ref_grads = _loss_and_grads(lambda: F.cross_entropy(F.linear(h, w, b).float(), y), h, w, b)
    got, grads = _loss_and_grads(lambda: linear_cross_entropy(h, w, y, chunk, bias=b), h, w, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_batched_hidden_and_custom_ignore_index():
    """[B, T, H] hidden states with [B, T] labels, and an ignore_index other than -100."""
    h, w, _, y = _problem(n=24, bias=False, ignored_every=0)
    y[3:7] = 7
    h3, y2 = h.detach().reshape(2, 12, -1).requires_grad_(), y.reshape(2, 12)
    ref, (rh, rw) = _loss_and_grads(lambda: F.cross_entropy(F.linear(h3, w).float().reshape(24, -1), y2.reshape(-1),
                                                            ignore_index=7), h3, w, None)
    got, (gh, gw) = _loss_and_grads(lambda: linear_cross_entropy(h3, w, y2, 5, ignore_index=7), h3, w, None)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)
    assert gh.shape == h3.shape


def test_bfloat16_inputs_match_loosely():
    h, w, b, y = _problem(n=64, hidden=32, vocab=200, dtype=torch.bfloat16)
    ref, ref_grads = _loss_and_grads(lambda: F.cross_entropy(F.linear(h, w, b).float(), y), h, w, b)
    got, grads = _loss_and_grads(lambda: linear_cross_entropy(h, w, y, 24, bias=b), h, w, b)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    for a, r in zip(grads, ref_grads):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), r.float(), rtol=2e-2, atol=2e-3)


def test_autocast_bfloat16_with_float32_weights():
    """The loop's mixed precision: float32 weights, bf16 autocast; gradients come back in float32."""
    h, w, _, y = _problem(n=64, hidden=32, vocab=200, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = _loss_and_grads(lambda: F.cross_entropy(F.linear(h, w).float(), y), h, w, None)
        got, grads = _loss_and_grads(lambda: linear_cross_entropy(h, w, y, 24), h, w, None)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    for a, r in zip(grads, ref_grads):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-3)


def test_all_ignored_gives_zero_not_nan():
    h, w, b, _ = _problem()
    y = torch.full((h.size(0),), -100)
    loss, grads = _loss_and_grads(lambda: linear_cross_entropy(h, w, y, 8, bias=b), h, w, b)
    assert float(loss) == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_no_grad_gives_the_same_loss_and_errors_are_clear():
    h, w, b, y = _problem()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, y, 8, bias=b)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(h, w, b), y))
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_cross_entropy(h, w, y, 0)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, y[:-1], 8)
    with pytest.raises(ValueError, match="does not fit"):
        linear_cross_entropy(h[:, :-1], w, y, 8)
    with pytest.raises(ValueError, match="must match"):
        linear_cross_entropy(h.to(torch.bfloat16), w, y, 8)


# ----------------------------------------------------------------------------- memory
class _LargestTensor(TorchDispatchMode):
    """The largest tensor (elements) any op produces while active, forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_full_logits_are_never_materialised():
    n, hidden, vocab, chunk = 512, 32, 2048, 64
    h, w, _, y = _problem(n=n, hidden=hidden, vocab=vocab, bias=False)
    with _LargestTensor() as plain:
        F.cross_entropy(F.linear(h, w).float(), y).backward()
    with _LargestTensor() as chunked:
        linear_cross_entropy(h, w, y, chunk).backward()
    assert plain.largest >= n * vocab                      # the measure sees the full logits
    assert chunked.largest == max(chunk * vocab, vocab * hidden, n * hidden), chunked.largest


_RSS_PROBE = r"""
import json, sys, torch, torch.nn.functional as F
from refinery.tasks.train.chunked_ce import linear_cross_entropy
torch.set_num_threads(1)
n, hidden, vocab, chunk = 4096, 64, 8192, 256
g = torch.Generator().manual_seed(0)
h = torch.randn(n, hidden, generator=g).requires_grad_()
w = (torch.randn(vocab, hidden, generator=g) * 0.1).requires_grad_()
y = torch.randint(0, vocab, (n,), generator=g)
for fn in (lambda a, b, t: F.cross_entropy(F.linear(a, b).float(), t), lambda a, b, t: linear_cross_entropy(a, b, t, 8)):
    fn(h[:16], w[:64], y[:16] % 64).backward()   # load the kernels' code and pools before measuring
h.grad = w.grad = None
def status(key):
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith(key + ":"))
try:   # reset the high-water mark to the resident set now (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before = status("VmRSS")
if sys.argv[1] == "plain":
    loss = F.cross_entropy(F.linear(h, w).float(), y)
else:
    loss = linear_cross_entropy(h, w, y, chunk)
loss.backward()
print(json.dumps({"kib": status("VmHWM") - before, "loss": float(loss.detach())}))
"""


def test_peak_rss_of_forward_and_backward_is_lower():
    """Peak resident memory (the process image's own VmHWM, reset just before, each variant in a
    fresh process: ru_maxrss would start at the parent's peak, pytest's size in the full suite) of forward + backward at
    4096 tokens x 8192 vocabulary: one float32 logits tensor is 128 MiB; plain holds it and its
    gradient at once, chunked at most a 256-row chunk (8 MiB) besides the 2 MiB weight gradient."""
    out = {}
    for kind in ("plain", "chunked"):
        # glibc serves big blocks from mmap and unmaps them when freed (a fixed threshold: the
        # dynamic one would move freed 8 MiB chunks into the heap, where RSS keeps them)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2 ** 20)}
        res = subprocess.run([sys.executable, "-c", _RSS_PROBE, kind], capture_output=True, text=True, cwd=ROOT,
                             timeout=300, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])
    logits_kib = 4096 * 8192 * 4 // 1024
    assert abs(out["plain"]["loss"] - out["chunked"]["loss"]) < 1e-4
    assert out["plain"]["kib"] >= logits_kib, out
    assert out["chunked"]["kib"] < logits_kib / 4, out


# ----------------------------------------------------------------------------- the causal-LM objective
def _tiny_lm(kind: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                          pad_token_id=1)
    elif kind == "llama-untied":
        cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                          pad_token_id=1)
    else:
        cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(cfg)


def _objective_loss_and_grads(model, chunk: int, batch: dict, compile_eager: bool = False):
    from refinery.tasks.train.objectives import CausalLM

    model.zero_grad(set_to_none=True)
    run_model = torch.compile(model, backend="eager") if compile_eager else model
    loss = CausalLM(chunk).loss(run_model, batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind,compile_eager", [("llama", False), ("llama-untied", False), ("gpt2", False),
                                                ("llama", True)])
def test_causal_lm_objective_equals_the_plain_one(kind, compile_eager):
    from refinery.tasks.train.objectives import CausalLM

    model = _tiny_lm(kind)
    batch = CausalLM().prepare(torch.randint(2, 96, (3, 21), generator=torch.Generator().manual_seed(1)))
    ref, ref_grads = _objective_loss_and_grads(model, 0, batch)
    got, grads = _objective_loss_and_grads(model, 7, batch, compile_eager)
    assert abs(got - ref) < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_head_that_rescales_its_logits_is_refused():
    from refinery.tasks.train.objectives import CausalLM

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    model = _tiny_lm("llama-untied")
    old = model.lm_head
    model.lm_head = Scaled(old.in_features, old.out_features, bias=False)
    batch = CausalLM().prepare(torch.randint(2, 96, (2, 9)))
    with pytest.raises(ValueError, match="not its head's weight"):
        CausalLM(4).loss(model, batch)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        CausalLM(4).loss(model, batch)


def test_mlm_and_span_refuse_the_knob():
    from pydantic import ValidationError

    from refinery.tasks.train.config import TrainConfig

    assert TrainConfig(objective="clm", loss_chunk_tokens=1024).loss_chunk_tokens == 1024
    for objective in ("mlm", "span"):
        with pytest.raises(ValidationError, match="clm objective only"):
            TrainConfig(objective=objective, loss_chunk_tokens=1024)
    with pytest.raises(ValidationError):
        TrainConfig(loss_chunk_tokens=-1)


# ----------------------------------------------------------------------------- a pretrain run
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_pretrain_run_follows_the_plain_loss_curve(grad_checkpointing, readers, tmp_path):
    """Same seed, data and model: the chunked run's training and validation losses equal the plain
    run's within 1e-4 (float32; only the summation order of the loss differs), with and without
    activation checkpointing. 8 x 64 tokens per micro-batch in chunks of 100: the last chunk is uneven."""
    cfg = cfg_for(max_steps=6, eval_every=3, batch_size=8, grad_accum=2)
    plain = run(cfg, readers, tmp_path / "plain")
    chunked = run(cfg.model_copy(update={"loss_chunk_tokens": 100, "grad_checkpointing": grad_checkpointing}),
                  readers, tmp_path / "chunked")
    a, b = losses(plain), losses(chunked)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])
    assert a[6] < a[1] - 0.3, "the run learns"
    va, vb = val_losses(plain), val_losses(chunked)
    assert sorted(va) == sorted(vb) == [0, 3, 6]
    for step in va:
        assert abs(va[step] - vb[step]) < 1e-4, (step, va[step], vb[step])


def test_memory_plan_counts_one_chunk_of_logits():
    """`refinery plan`: with loss_chunk_tokens the logits term is one chunk (workspace) and the kept
    gradients (activations), not micro-batch x seq_len x vocab."""
    from transformers import LlamaConfig

    from refinery.tasks.train.plan import Setup, estimate, model_shape

    shape = model_shape(LlamaConfig(vocab_size=32768, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                    num_attention_heads=4, tie_word_embeddings=True))
    plain = estimate(shape, Setup(micro_batch=8, seq_len=1024, compute_dtype="bfloat16"))
    chunked = estimate(shape, Setup(micro_batch=8, seq_len=1024, compute_dtype="bfloat16", loss_chunk_tokens=1024))
    tokens, vocab, hidden = 8 * 1024, 32768, 256
    assert plain.rows["workspace"] - chunked.rows["workspace"] == (tokens - 1024) * vocab * (2 + 4)
    assert plain.rows["activations"] - chunked.rows["activations"] == \
        tokens * vocab * 4 - (tokens * hidden * 4 + vocab * hidden * 4)
    for k in ("parameters", "gradients", "optimizer"):
        assert plain.rows[k] == chunked.rows[k]


def test_a_second_backward_fails_loudly():
    """Backward scales the gradients saved in forward in place: retain_graph and a second backward
    must stop with autograd's error, not return twice-scaled gradients."""
    h, w, b, y = _problem()
    loss = linear_cross_entropy(h, w, y, 8, bias=b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace|in-place|modified"):
        loss.backward()
