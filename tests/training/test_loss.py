"""The chunked token loss (`pipelines.training.step.token_loss_sum`): the same value and gradient as the
fp32-copy-of-every-logit formula it replaced (issue 13), without keeping an fp32 (B, T, V) tensor for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipelines.models.presets import build_preset
from pipelines.training import step
from pipelines.training.step import chunk_rows, chunked_token_loss_sum, forward_loss, token_loss_sum

CPU = torch.device("cpu")


def reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """token_loss_sum before issue 13."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def make(batch=3, seq=9, vocab=37, dtype=torch.float32, seed=0, ignored=0.3):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, seq, vocab, generator=g) * 3).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[torch.rand(batch, seq, generator=g) < ignored] = -100
    labels[0, :3] = -100  # a prompt
    return logits, labels


def value_and_grad(fn, logits, labels, upstream=0.37):
    leaf = logits.detach().clone().requires_grad_()
    loss = fn(leaf, labels)
    (loss * upstream).backward()  # a non-unit upstream gradient (the loop divides by the window's tokens)
    return loss.detach(), leaf.grad


def close(dtype):
    # bf16 gradients: both are the same fp32 value rounded once to bf16, up to fp32 summation order
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 4, 5, 8, 1000], ids=lambda c: f"chunk{c}")
def test_equals_reference_value_and_gradient(dtype, chunk):
    # 3 x 8 = 24 shifted rows: chunks of 4 and 8 divide them, 5 does not, 1000 is larger than the data
    logits, labels = make(dtype=dtype)
    want, want_grad = value_and_grad(reference, logits, labels)
    got, got_grad = value_and_grad(lambda x, y: chunked_token_loss_sum(x, y, chunk), logits, labels)
    assert got.dtype == torch.float32 and got_grad.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, **close(dtype))
    # ignored positions (and every logit of the last position, which predicts nothing) get a zero gradient
    assert not got_grad[:, -1].any()
    assert not got_grad[:, :-1][labels[:, 1:] == -100].any()


def test_default_chunk_rows_follow_the_vocabulary():
    assert chunk_rows(128_256) == step.CHUNK_ELEMENTS // 128_256 >= 64  # a chunk: ~CHUNK_ELEMENTS fp32 logits
    assert chunk_rows(384) > chunk_rows(32_000) > chunk_rows(128_256)
    assert chunk_rows(step.CHUNK_ELEMENTS * 2) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_chunking_equals_reference(dtype, monkeypatch):
    logits, labels = make(batch=4, seq=33, vocab=500, dtype=dtype, ignored=0.1)
    monkeypatch.setattr(step, "CHUNK_ELEMENTS", 500 * 7)  # 7 rows per chunk: several chunks, a partial last one
    want, want_grad = value_and_grad(reference, logits, labels)
    got, got_grad = value_and_grad(token_loss_sum, logits, labels)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(got_grad, want_grad, **close(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_ignored_is_zero_with_zero_gradient(dtype):
    logits, labels = make(dtype=dtype)
    labels[:] = -100
    labels[:, 0] = 5  # the first position's label is never a target (nothing predicts it)
    loss, grad = value_and_grad(token_loss_sum, logits, labels)
    assert float(loss) == 0.0 == float(reference(logits, labels))
    assert grad.shape == logits.shape and not grad.any()


def test_single_position_and_one_row():
    logits, labels = make(batch=1, seq=1)
    assert float(token_loss_sum(logits, labels)) == 0.0
    logits, labels = make(batch=1, seq=2, ignored=0.0)
    torch.testing.assert_close(token_loss_sum(logits, labels), reference(logits, labels))


def test_non_contiguous_logits():
    logits, labels = make(seq=12, ignored=0.2)
    wide = torch.cat([logits, logits], dim=-1)[..., :logits.size(-1)]  # a strided view
    assert not wide.is_contiguous()
    want, want_grad = value_and_grad(reference, logits, labels)
    got, got_grad = value_and_grad(token_loss_sum, wide, labels)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


def test_no_grad_and_frozen_logits():
    logits, labels = make()
    with torch.no_grad():
        torch.testing.assert_close(token_loss_sum(logits, labels), reference(logits, labels))
    loss = token_loss_sum(logits, labels)  # logits that require no grad: a plain value
    assert not loss.requires_grad


def test_under_autocast():
    logits, labels = make(dtype=torch.bfloat16)
    want, want_grad = value_and_grad(reference, logits, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grad = value_and_grad(token_loss_sum, logits, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, **close(torch.bfloat16))


def test_rejects_bad_shapes_and_chunks():
    logits, labels = make()
    with pytest.raises(ValueError, match="labels"):
        token_loss_sum(logits, labels[:, 1:])
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_loss_sum(logits, labels, 0)


def test_autograd_keeps_no_fp32_copy_of_the_logits():
    """What backward holds: the logits themselves (no copy), the labelled rows, their targets and one fp32
    log-sum-exp per labelled row; the reference keeps an fp32 log-softmax of every logit."""
    logits, labels = make(batch=4, seq=64, vocab=1000, dtype=torch.bfloat16, ignored=0.5)
    logits.requires_grad_()

    def saved(fn):
        out = []

        def pack(t):
            out.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(logits, labels)
        return out

    n = logits.numel()
    fp32 = sum(t.numel() for t in saved(reference) if t.dtype == torch.float32)
    assert fp32 >= logits[:, :-1].numel()  # the reference: an fp32 tensor the size of the shifted logits
    kept = saved(token_loss_sum)
    assert sum(t.numel() for t in kept if t.dtype == torch.float32) <= logits.size(0) * logits.size(1)
    assert [t for t in kept if t.numel() >= n] and all(
        t.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr() for t in kept if t.numel() >= n)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tiny_model_end_to_end(precision):
    """tiny-llama: the same loss and parameter gradients as the reference, through the loop's forward_loss."""
    torch.manual_seed(0)
    ids = torch.randint(3, 380, (3, 24))
    labels = ids.clone()
    labels[:, :8] = -100  # prompts
    mask = torch.ones_like(ids)
    mask[2, 18:] = 0  # padding
    labels[2, 18:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def run(loss_fn):
        model = build_preset("tiny-llama", seed=0).eval()
        if loss_fn is None:
            loss = forward_loss(model, batch, precision, CPU)  # the loop's path: token_loss_sum
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(input_ids=ids, attention_mask=mask).logits
                loss = loss_fn(logits, labels)
        (loss / int((labels[:, 1:] != -100).sum())).backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    want, want_grads = run(reference)
    got, got_grads = run(None)
    assert want_grads.keys() == got_grads.keys() and len(got_grads) > 10
    tol = {"rtol": 1e-5, "atol": 1e-6} if precision == "fp32" else {"rtol": 2e-2, "atol": 1e-4}
    torch.testing.assert_close(got, want, **tol)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **tol, msg=name)
