"""ist_ds's ZeRO-3 linear: DeepSpeed's memory-efficient linear without saving the inputs of frozen linears."""

import pytest
import torch

pytest.importorskip("deepspeed")

from deepspeed.runtime.zero.linear import zero3_linear_wrap  # noqa: E402

from ist_ds.backends import zero3_linear  # noqa: E402
from ist_ds.backends.zero3_linear import selective_linear  # noqa: E402


def _saved_ptrs(fn, x, w, b):
    ptrs = []

    def pack(t):
        ptrs.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x, w, b)
    return out, ptrs


@pytest.mark.parametrize("weight_trains", [True, False])
@pytest.mark.parametrize("shape", [(5, 8), (2, 5, 8)])
def test_same_values_and_gradients_as_torch(weight_trains, shape):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    w0 = torch.randn(6, 8, generator=g, dtype=torch.float64)
    b0 = torch.randn(6, generator=g, dtype=torch.float64)
    results = []
    for fn in (torch.nn.functional.linear, zero3_linear_wrap, selective_linear):
        x = x0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(weight_trains)
        b = b0.clone().requires_grad_(True)
        out = fn(x, w, b)
        (out * out).sum().backward()
        results.append((out.detach(), x.grad, w.grad, b.grad))
    reference = results[0]
    for got in results[1:]:
        for a, b in zip(reference, got):
            if a is None:
                assert b is None
            else:
                torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_input_saved_only_when_the_weight_trains():
    x = torch.randn(3, 4, 8, requires_grad=True)
    frozen = torch.randn(6, 8)
    trained = torch.randn(6, 8, requires_grad=True)
    x_ptr = x.untyped_storage().data_ptr()

    _, ptrs = _saved_ptrs(zero3_linear_wrap, x, frozen, None)
    assert x_ptr in ptrs  # DeepSpeed's function keeps the input of a frozen linear
    _, ptrs = _saved_ptrs(selective_linear, x, frozen, None)
    assert x_ptr not in ptrs
    _, ptrs = _saved_ptrs(selective_linear, x, trained, None)
    assert x_ptr in ptrs


def test_install_replaces_only_deepspeeds_linear(monkeypatch):
    original = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", original)
    assert zero3_linear.install() is False  # torch's own linear (memory_efficient_linear off): left alone
    assert torch.nn.functional.linear is original

    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    assert zero3_linear.install() is True
    assert torch.nn.functional.linear is selective_linear
    assert zero3_linear.install() is True  # idempotent
    assert torch.nn.functional.linear is selective_linear
