"""Linear + cross-entropy over chunks of tokens: the full ``[tokens, vocab]`` logits never exist.

The plain loss projects every hidden state onto the vocabulary, upcasts the logits to float32 and
keeps them (or their log-softmax) for backward: at 8k tokens x 128k vocabulary that is 4 GiB per
copy, more than a small model's layers. Here (the idea of Liger-Kernel's fused linear
cross-entropy and Apple's cut cross-entropy, written as plain PyTorch) the forward walks the
flattened tokens ``chunk_tokens`` rows at a time and, per chunk,

    logits  = hidden[chunk] @ weight.T (+ bias)     in the compute dtype, then float32 (chunk only)
    loss   += logsumexp(logits) - logits[label]     over labels != ignore_index
    dlogits = (softmax(logits) - onehot(label)) / n_valid
    grad_hidden[chunk]  = dlogits @ weight          (compute dtype, as a matmul's backward would)
    grad_weight        += dlogits.T @ hidden[chunk] (float32 accumulator)

so what lives from forward to backward is ``grad_hidden`` ``[tokens, hidden]`` and ``grad_weight``
``[vocab, hidden]`` (the size of the weight's own gradient), and the largest transient is one
chunk's logits. Backward only scales them by the incoming gradient. The gradient is computed
in forward even when it is never asked for, unless grad mode is off or nothing requires grad
(validation does no extra work).

    linear_cross_entropy(hidden, weight, labels, chunk_tokens, ignore_index=-100, bias=None)
        the mean cross-entropy over labels != ignore_index (0 when every label is ignored)
    causal_lm_loss(model, input_ids, labels, chunk_tokens)
        a Hugging Face causal LM's loss without its logits: the model's forward runs with
        ``logits_to_keep`` empty (the head projects no position) and ``output_hidden_states``,
        then the head's weight meets the last hidden states here. The forward is the wrapped
        model's own (DDP's gradient hooks, FSDP2's unsharding and torch.compile all apply).
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- the loss
@dataclass
class _Needs:
    """Which gradients the forward computes (none in validation)."""

    hidden: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the plain ``F.linear`` would multiply in: autocast's when it is on, else the inputs'."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} and weight {weight.dtype} "
                         "(outside autocast they must match, as for F.linear)")
    return hidden.dtype


@dataclass
class _ChunkGrads:
    """Where one chunk's gradients go: its rows of grad_hidden, the float32 accumulators of the head."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def _chunk(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, labels: torch.Tensor, valid: torch.Tensor,
           denom: torch.Tensor, grads: _ChunkGrads) -> torch.Tensor:
    """One chunk: its summed loss, and its gradients written into ``grads``. A function of its own
    so that the chunk's [rows, vocab] buffer is freed before the next chunk allocates its own."""
    logits = torch.nn.functional.linear(h, w, b).float()   # the only [rows, vocab] tensor
    target = torch.where(valid, labels, 0)
    picked = logits.gather(1, target[:, None]).squeeze(1)
    # logsumexp in place (torch.logsumexp would allocate a second [rows, vocab]); the exponentials
    # stay in the buffer and become the softmax
    top = logits.amax(dim=-1, keepdim=True)
    exps = logits.sub_(top).exp_()
    total = exps.sum(dim=-1, keepdim=True)
    lse = (total.log() + top).squeeze(1)
    loss = torch.where(valid, lse - picked, 0.0).sum()
    if grads.hidden is None and grads.weight is None and grads.bias is None:
        return loss
    # d(mean loss)/d logits = (softmax - onehot) / n_valid on valid rows, 0 on ignored ones
    dlogits = exps.div_(total)
    dlogits.scatter_add_(1, target[:, None], -valid[:, None].to(dlogits.dtype))
    dlogits.mul_((valid.to(torch.float32) / denom)[:, None])
    if grads.hidden is not None:
        grads.hidden.copy_(dlogits.to(w.dtype) @ w)
    if grads.weight is not None:
        grads.weight.addmm_(dlogits.t(), h.float())
    if grads.bias is not None:
        grads.bias += dlogits.sum(0)
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and its gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                labels: torch.Tensor, chunk_tokens: int, ignore_index: int, dtype: torch.dtype,
                needs: _Needs) -> torch.Tensor:
        valid_all = labels != ignore_index
        # the mean's denominator; 1 when every label is ignored, so the loss and gradients are 0
        denom = valid_all.sum().clamp(min=1).to(torch.float32)
        w = weight.to(dtype)                       # once for all chunks (no copy when it is already dtype)
        b = bias.to(dtype) if bias is not None else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if needs.hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs.weight else None
        grad_bias = torch.zeros(weight.size(0), dtype=torch.float32, device=weight.device) if needs.bias else None
        # our explicit casts decide the dtypes; autocast would recast the float32 gradient matmuls
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.size(0), chunk_tokens):
                rows = slice(start, min(start + chunk_tokens, hidden.size(0)))
                grads = _ChunkGrads(None if grad_hidden is None else grad_hidden[rows], grad_weight, grad_bias)
                loss += _chunk(hidden[rows].to(dtype), w, b, labels[rows], valid_all[rows], denom, grads)
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                              None if grad_bias is None or bias is None else grad_bias.to(bias.dtype))
        return loss / denom

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if ctx.needs_input_grad[0] and grad_hidden is None or ctx.needs_input_grad[1] and grad_weight is None:
            raise RuntimeError("linear_cross_entropy: a gradient was not computed in forward (grad mode was off "
                               "or the inputs did not require grad when the loss was computed)")

        # in place: the saved gradients serve this one backward (a second one, retain_graph, fails
        # autograd's version check instead of reading scaled values), and no [vocab, hidden] copy is made
        def scaled(g: torch.Tensor | None) -> torch.Tensor | None:
            return None if g is None else g.mul_(grad_output.to(g.dtype))

        return scaled(grad_hidden), scaled(grad_weight), scaled(grad_bias), None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                         ignore_index: int = IGNORE_INDEX, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` over labels !=
    ``ignore_index``, in float32, computed ``chunk_tokens`` rows at a time.

    ``hidden`` is ``[..., H]`` (flattened to rows), ``labels`` the matching ``[...]``, ``weight``
    ``[V, H]``, ``bias`` ``[V]`` or None. Equal to ``F.cross_entropy(F.linear(hidden, weight,
    bias).float(), labels)`` (same autocast dtype), except that every label ignored gives 0, not NaN."""
    if chunk_tokens < 1:
        raise ValueError(f"linear_cross_entropy: chunk_tokens must be at least 1, got {chunk_tokens}")
    if weight.dim() != 2 or hidden.size(-1) != weight.size(1):
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} does not fit weight {tuple(weight.shape)}")
    rows = hidden.reshape(-1, hidden.size(-1))
    flat = labels.reshape(-1)
    if flat.numel() != rows.size(0):
        raise ValueError(f"linear_cross_entropy: {flat.numel()} labels for {rows.size(0)} hidden states")
    grad = torch.is_grad_enabled()
    needs = _Needs(hidden=grad and rows.requires_grad, weight=grad and weight.requires_grad,
                   bias=grad and bias is not None and bias.requires_grad)
    dtype = _compute_dtype(rows, weight)
    out = _LinearCrossEntropy.apply(rows, weight, bias, flat, int(chunk_tokens), int(ignore_index), dtype, needs)
    return out  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- a causal LM's loss
def unwrap(model: Any) -> Any:
    """The Hugging Face model inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers;
    FSDP2 changes the model's class in place, so a sharded model is its own inner model."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def check_supported(model: Any) -> None:
    """Refuse models whose head is not a plain linear projection of the last hidden state that
    the forward can skip: a clear error instead of a silently different loss."""
    inner = unwrap(model)
    name = type(inner).__name__
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"loss_chunk_tokens: {name} has no output embedding (lm_head) to chunk the loss over")
    if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        raise ValueError(f"loss_chunk_tokens: {name}.forward takes no logits_to_keep, so its logits cannot be "
                         "skipped; use loss_chunk_tokens=0")
    config = getattr(inner, "config", None)
    for field in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        value = getattr(config, field, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"loss_chunk_tokens: {name} transforms its logits ({field}={value}); the chunked "
                             "loss projects with the head's weight only; use loss_chunk_tokens=0")


def _sharded(t: torch.Tensor | None) -> bool:
    return t is not None and type(t).__name__ == "DTensor"


@contextlib.contextmanager
def _gathered_head(model: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The output head's weight and bias as whole tensors, right after the model's forward.

    FSDP2 keeps the root unit (embeddings, tied head, final norm) gathered after a forward that
    backward will follow, and autograd then reduce-scatters the head's gradient from the chunked
    loss with the rest. A forward without gradients (evaluation) may have resharded it already:
    then it is gathered here for the loss (a collective: every rank evaluates) and resharded after."""
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    regather = _sharded(head.weight) or _sharded(getattr(head, "bias", None))
    if regather:
        if torch.is_grad_enabled():
            # a sharded head here means reshard_after_forward on the root: the gradient would miss it
            raise RuntimeError("loss_chunk_tokens: the output head is sharded after a training forward (FSDP "
                               "reshard_after_forward on the root unit); use loss_chunk_tokens=0 with this sharding")
        inner.unshard()
        head = inner.get_output_embeddings()
    try:
        yield head.weight, getattr(head, "bias", None)
    finally:
        if regather:
            inner.reshard()


def causal_lm_loss(model: Any, input_ids: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
                   *, check_head: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM on aligned ``input_ids``/``labels`` ``(B, T)``
    (already shifted: ``labels[:, t]`` is the token after ``input_ids[:, t]``), without its logits.

    ``check_head`` keeps the model's own logits of the last position and compares them with the
    head's weight applied to the last hidden state: proof, once per run, that the hidden states
    taken are the ones the head projects (a model that rescales them fails loudly)."""
    keep = [input_ids.size(1) - 1] if check_head else []
    out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True,
                logits_to_keep=torch.tensor(keep, dtype=torch.long, device=input_ids.device))
    if out.hidden_states is None:
        raise ValueError(f"loss_chunk_tokens: {type(unwrap(model)).__name__} returned no hidden states")
    if out.logits is not None and out.logits.size(-2) != len(keep):
        raise ValueError(f"loss_chunk_tokens: {type(unwrap(model)).__name__} ignored logits_to_keep and computed "
                         f"{out.logits.size(-2)} positions of logits")
    hidden = out.hidden_states[-1]
    with _gathered_head(model) as (weight, bias):
        if check_head:
            _check_last_position(out.logits[:, -1], hidden[:, -1], weight, bias)
        return linear_cross_entropy(hidden, weight, labels, chunk_tokens, IGNORE_INDEX, bias)


def _check_last_position(model_logits: torch.Tensor, last_hidden: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None) -> None:
    dtype = _compute_dtype(last_hidden, weight)
    with torch.no_grad():
        ours = torch.nn.functional.linear(last_hidden.to(dtype), weight.to(dtype),
                                          None if bias is None else bias.to(dtype)).float()
        theirs = model_logits.float()
        # the same matmul in the same dtype; only the kernel's blocking may differ
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        if not torch.allclose(ours, theirs, rtol=tol, atol=tol * max(1.0, float(theirs.abs().max()))):
            raise ValueError("loss_chunk_tokens: the model's logits are not its head's weight times the last hidden "
                             f"state (largest difference {float((ours - theirs).abs().max()):.3g}); "
                             "use loss_chunk_tokens=0 for this model")


__all__ = ["linear_cross_entropy", "causal_lm_loss", "check_supported", "unwrap", "IGNORE_INDEX"]
