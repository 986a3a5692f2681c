"""The compiled one-pass merge step (portllm_cli/_kernels.c) against torch's operations, bit for bit.

The kernel is an optional extension: where it was not built these tests skip, except the one that
checks a machine with a C compiler did build it (a broken build configuration would otherwise only
show as a slower port)."""

from __future__ import annotations

import shutil
import sysconfig

import pytest

torch = pytest.importorskip("torch")

from portllm_cli.core import merge  # noqa: E402
from portllm_cli.core.merge import DoraEdit, LoraEdit, Workspace, merge_block, merge_tensor  # noqa: E402
from portllm_cli.patch.format import LoraModule  # noqa: E402

try:
    from portllm_cli import _kernels
except ImportError:  # not built: no C compiler at install
    _kernels = None

needs_kernel = pytest.mark.skipif(_kernels is None, reason="portllm_cli._kernels was not built (no C compiler at install)")

SCALES = [1.0, 2.0, 0.75, 0.1, -3.3, 1e-30, 1e30, 5e-39]


def torch_step(w: "torch.Tensor", d: "torch.Tensor", s: float) -> "torch.Tensor":
    """What core.merge does without the kernel: widen, scale (skipped at 1.0), add, round once."""
    d = d.clone()
    if s != 1.0:
        d.mul_(s)
    block = w.float()
    block.add_(d)
    return block.to(torch.bfloat16)


def kernel_step(w: "torch.Tensor", d: "torch.Tensor", s: float) -> "torch.Tensor":
    out = torch.empty_like(w)
    _kernels.add_scaled_bf16(w.data_ptr(), d.data_ptr(), out.data_ptr(), w.numel(), s)
    return out


def assert_same_bits(got: "torch.Tensor", want: "torch.Tensor") -> None:
    """Equal bits, except that any NaN may be any NaN (torch's own conversion writes 0x7FC0 or
    0xFFFF depending on whether the element went through its vector loop)."""
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    g, w = got.view(torch.int16)[~nan], want.view(torch.int16)[~nan]
    if not torch.equal(g, w):
        i = int((g != w).nonzero()[0])
        raise AssertionError(f"{int(g.numel() - (g == w).sum())} of {g.numel()} differ; first: "
                             f"got {int(g[i]) & 0xFFFF:#06x}, torch {int(w[i]) & 0xFFFF:#06x}")


@needs_kernel
@pytest.mark.parametrize("s", SCALES)
def test_every_kind_of_bit_pattern(s):
    """Random float32 deltas over every exponent (subnormals, infinities, NaNs included) and random
    bf16 weights: the kernel's bits are torch's. 2**20 + 7 elements, so vector loops have tails."""
    g = torch.Generator().manual_seed(7)
    n = (1 << 20) + 7
    d = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    w = torch.randint(-(2**15), 2**15 - 1, (n,), generator=g, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    assert_same_bits(kernel_step(w, d, s), torch_step(w, d, s))


@needs_kernel
def test_ties_overflow_and_signed_zeros():
    """Sums exactly halfway between two bf16 values (odd and even, both signs), sums that round up
    to infinity, and the signs of zero sums."""
    bits = []
    for hi in (0x3F80, 0x3F81, 0xBF80, 0xBF81, 0x0001, 0x7F7F, 0xFF7F, 0x0080):
        for lo in (0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF):
            bits.append((hi << 16) | lo)
    r = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    zero_w = torch.zeros(len(bits), dtype=torch.bfloat16)
    for s in (1.0, 2.0, 0.5):
        assert_same_bits(kernel_step(zero_w, r, s), torch_step(zero_w, r, s))
    # -0 + -0 = -0; -0 + +0 = +0; x + (-x) = +0
    w = torch.tensor([-0.0, -0.0, 1.5, -2.0], dtype=torch.bfloat16)
    d = torch.tensor([-0.0, 0.0, -1.5, 2.0])
    got = kernel_step(w, d, 1.0)
    assert got.view(torch.int16).tolist() == torch_step(w, d, 1.0).view(torch.int16).tolist()
    assert [torch.signbit(x).item() for x in got] == [True, False, False, False]


@needs_kernel
def test_refuses_bad_arguments():
    w = torch.zeros(4, dtype=torch.bfloat16)
    d = torch.zeros(4)
    with pytest.raises(ValueError):
        _kernels.add_scaled_bf16(w.data_ptr(), d.data_ptr(), w.data_ptr(), -1, 1.0)
    with pytest.raises(ValueError):
        _kernels.add_scaled_bf16(0, d.data_ptr(), w.data_ptr(), 4, 1.0)
    _kernels.add_scaled_bf16(0, 0, 0, 0, 1.0)  # nothing to do: no buffer needed


def _module(out_dim: int, in_dim: int, rank: int, seed: int, dtype=torch.float32, **kw) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(name="m", A=torch.randn(rank, in_dim, generator=g).to(dtype),
                      B=torch.randn(out_dim, rank, generator=g).to(dtype), alpha=2.0 * rank, **kw)


@needs_kernel
@pytest.mark.parametrize("shape", [(37, 53), (128, 64), (9, 4096)])
@pytest.mark.parametrize("extra_scale", [1.0, 0.5, 0.3])
def test_merges_through_the_kernel_equal_torchs(monkeypatch, shape, extra_scale):
    """Whole merges, block by block (blocks of 8 to 37 rows), with and without the kernel: the same
    bits, and both equal to the whole-tensor sum written here."""
    out_dim, in_dim = shape
    g = torch.Generator().manual_seed(3)
    W = torch.randn(out_dim, in_dim, generator=g).to(torch.bfloat16)
    for factor_dtype in (torch.float32, torch.bfloat16):
        m = _module(out_dim, in_dim, 8, seed=out_dim, dtype=factor_dtype)
        e = [LoraEdit(m, extra_scale)]
        want = (W.float() + (m.B.float() @ m.A.float()) * (m.scale * extra_scale)).to(torch.bfloat16)
        with_kernel = merge_tensor(W, e, block_bytes=8 * in_dim * 4)
        monkeypatch.setattr(merge, "_KERNELS", [None])
        without = merge_tensor(W, e, block_bytes=8 * in_dim * 4)
        monkeypatch.undo()
        assert_same_bits(with_kernel, want)
        assert_same_bits(without, want)


def test_the_kernel_is_used_only_where_it_applies(monkeypatch):
    """One LoRA on a bf16 linear weight, contiguous CPU rows; anything else goes through torch."""
    monkeypatch.setattr(merge, "_KERNELS", [object()])  # as if built: the choice alone is tested
    rows = torch.zeros(8, 6, dtype=torch.bfloat16)
    lin = LoraEdit(_module(8, 6, 2, 0))
    assert merge._one_pass(rows, [lin]) is lin
    assert merge._one_pass(rows.float(), [lin]) is None
    assert merge._one_pass(rows.half(), [lin]) is None
    assert merge._one_pass(rows, [lin, lin]) is None
    assert merge._one_pass(torch.zeros(6, 8, dtype=torch.bfloat16).T, [lin]) is None  # not contiguous
    assert merge._one_pass(rows, [LoraEdit(_module(6, 8, 2, 0, kind="embedding"))]) is None
    assert merge._one_pass(rows, [LoraEdit(_module(6, 8, 2, 0, fan_in_fan_out=True))]) is None
    assert merge._one_pass(rows, [DoraEdit(lin.module, torch.ones(8))]) is None
    monkeypatch.setattr(merge, "_KERNELS", [None])
    assert merge._one_pass(rows, [lin]) is None


def test_portllm_no_kernel_turns_it_off(monkeypatch):
    monkeypatch.setattr(merge, "_KERNELS", [])
    monkeypatch.setenv("PORTLLM_NO_KERNEL", "1")
    assert merge.kernels() is None
    monkeypatch.setattr(merge, "_KERNELS", [])
    monkeypatch.delenv("PORTLLM_NO_KERNEL")
    assert merge.kernels() is _kernels


@needs_kernel
def test_workspace_result_is_reused_and_fresh_result_is_not():
    W = torch.randn(16, 32).to(torch.bfloat16)
    e = [LoraEdit(_module(16, 32, 4, 1))]
    ws = Workspace()
    a = merge_block(W, e, 0, ws)
    assert a.data_ptr() == merge_block(W, e, 0, ws).data_ptr()  # the workspace's buffer
    assert merge_block(W, e, 0).data_ptr() != merge_block(W, e, 0).data_ptr()


def test_a_machine_with_a_c_compiler_built_the_kernel():
    """The extension is optional so that installs without a compiler work; where one is present
    (CI), a missing module means the build configuration broke."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None or sysconfig.get_paths().get("include") is None:
        pytest.skip(f"no C compiler ({cc}) here: portllm runs on torch's operations")
    import os

    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        pytest.skip("no Python headers here: portllm runs on torch's operations")
    assert _kernels is not None, "a C compiler and Python.h are present but portllm_cli._kernels was not built"
