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


# -- the fused kernel: the rank-r product in the same pass ------------------------------------------
fused_ok = _kernels is not None and getattr(_kernels, "lora_fused", lambda: False)()
needs_fused = pytest.mark.skipif(not fused_ok, reason="no fused kernel here (not x86-64, or no AVX2+FMA)")
# Every instruction set this CPU lets the fused kernel use: 2 AVX-512F, 1 AVX2 with FMA.
ISAS = list(range(_kernels._fused_isa(), 0, -1)) if fused_ok else []


@pytest.fixture(params=ISAS or [None], ids=lambda i: {2: "avx512", 1: "avx2", None: "none"}[i])
def isa(request):
    if request.param is None:
        pytest.skip("no fused kernel here (not x86-64, or no AVX2+FMA)")
    top = _kernels._fused_isa()
    _kernels._fused_isa(request.param)
    yield request.param
    _kernels._fused_isa(top)


def fused_delta(B: "torch.Tensor", A: "torch.Tensor") -> "torch.Tensor":
    d = torch.empty(B.shape[0], A.shape[1])
    Ap = merge._packed(A)
    _kernels.lora_delta_f32(B.data_ptr(), A.data_ptr(), Ap.data_ptr(), d.data_ptr(), B.shape[0], B.shape[1], A.shape[1])
    return d


def fused_merge(w: "torch.Tensor", B: "torch.Tensor", A: "torch.Tensor", s: float) -> "torch.Tensor":
    out = torch.empty_like(w)
    Ap = merge._packed(A)
    _kernels.lora_merge_bf16(w.data_ptr(), 0, B.data_ptr(), A.data_ptr(), Ap.data_ptr(), out.data_ptr(),
                             w.shape[0], B.shape[1], w.shape[1], s)
    return out


FUSED_SHAPES = [(rows, n, r) for rows in (2, 3, 8, 9, 17, 19) for n in (2, 15, 16, 17, 63, 64, 65, 100)
                for r in (2, 3, 16, 33)]


@pytest.mark.parametrize("s", [1.0, 0.37, -2.5])
def test_fused_merge_is_the_widen_scale_add_round_of_its_own_delta(isa, s):
    """Whatever order the product is summed in, the merge is bf16(float(w) + delta * s) of the delta
    the same code computes (the steps written here in torch's operations). Every row count the code
    splits differently (tiles of 8 or 4 rows, rows one at a time, four or two tiles side by side,
    the columns past the last tile), weights with every kind of bit pattern."""
    g = torch.Generator().manual_seed(11)
    nan_payload = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)  # rounds past 0xFFFF
    for i, (rows, n, r) in enumerate(FUSED_SHAPES):
        B = torch.randn(rows, r, generator=g) * 0.1
        A = torch.randn(r, n, generator=g) * 0.1
        if i % 3 == 0:  # products that are NaN (with a full payload), infinite, or overflow
            A[0, n // 2] = nan_payload
            A[-1, 0] = float("inf")
            A[r // 2, -1] = 3e38
            B[rows // 2] = 0.0  # 0 * inf: NaN
        w = torch.randint(-(2**15), 2**15 - 1, (rows, n), generator=g, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        assert_same_bits(fused_merge(w, B, A, s), torch_step(w, fused_delta(B, A), s))


def test_fused_product_is_torchs_wherever_the_probe_agrees(isa):
    """The probe's promise: for a rank and row length it accepts, the fused B @ A has torch.matmul's
    bits on other factors too, at every row count a block can have (torch's order does not depend on
    the rows). On the x86-64 machines measured it accepts every shape here; where it refuses one,
    merges keep torch.matmul and this checks nothing for it."""
    g = torch.Generator().manual_seed(12)
    merge._PROBES.clear()  # probed again with this instruction set
    accepted = 0
    for rows, n, r in FUSED_SHAPES:
        if not merge._fused_agrees(r, n):
            continue
        accepted += 1
        B = torch.randn(rows, r, generator=g)
        A = torch.randn(r, n, generator=g)
        B[0] = 0.0  # exact zero sums: their sign too
        A[:, 1::2] = -A[:, 1::2].abs()
        assert torch.equal(fused_delta(B, A).view(torch.int32), (B @ A).view(torch.int32)), (rows, n, r)
    merge._PROBES.clear()
    if _mkl_x86():  # where torch.matmul is known to sum this way, every shape must be accepted
        assert accepted == len(FUSED_SHAPES)
    elif not accepted:
        pytest.skip("torch.matmul sums in another order than the fused kernel here: it is never used")


def _mkl_x86() -> bool:
    """x86-64 with MKL (torch's CPU wheels): torch.matmul sums a small-rank product as an FMA
    chain, as the fused kernel does (measured on AVX-512 and AVX2 code)."""
    import platform

    return fused_ok and platform.machine() in ("x86_64", "AMD64") and torch.backends.mkl.is_available()


def test_the_probe_refuses_a_different_order(monkeypatch):
    """A kernel whose product differs from torch.matmul's in a single bit is refused, and a merge
    then goes through torch.matmul (the fused merge is not called); the same kernel without the
    flipped bit is accepted."""
    import ctypes

    seen = {}
    real_matmul = torch.matmul

    def spy(B, A, **kw):  # the probe's factors, for the fake kernel to multiply
        seen["B"], seen["A"] = B, A
        return real_matmul(B, A, **kw)

    class Fake:
        flip = True

        def lora_fused(self):
            return True

        def lora_delta_f32(self, B, A, Ap, d, rows, r, n):
            got = real_matmul(seen["B"], seen["A"])
            if self.flip:
                got.view(torch.int32)[rows - 1, n - 1] ^= 1
            ctypes.memmove(d, got.data_ptr(), got.numel() * 4)

        def lora_merge_bf16(self, *a):
            raise AssertionError("the fused merge must not run where the probe refused it")

        def add_scaled_bf16(self, *a):
            _kernels.add_scaled_bf16(*a)

    fake = Fake()
    monkeypatch.setattr(merge, "_KERNELS", [fake])
    monkeypatch.setattr(merge, "_PROBES", {})
    monkeypatch.setattr(torch, "matmul", spy)
    assert merge._fused_agrees(4, 40) is False
    monkeypatch.setattr(torch, "matmul", real_matmul)
    if _kernels is not None:  # a whole merge: torch.matmul, then the one-pass step
        W = torch.randn(16, 40).to(torch.bfloat16)
        m = _module(16, 40, 4, 5)
        want = (W.float() + (m.B @ m.A) * m.scale).to(torch.bfloat16)
        assert_same_bits(merge_tensor(W, [LoraEdit(m)], block_bytes=8 * 40 * 4), want)
    fake.flip = False
    monkeypatch.setattr(merge, "_PROBES", {})
    monkeypatch.setattr(torch, "matmul", spy)
    assert merge._fused_agrees(4, 40) is True


def test_the_fused_kernel_is_live_where_torch_uses_mkl():
    """On x86-64 with MKL (torch's CPU wheels) torch.matmul sums a rank-16 product as the fused
    kernel does, so ports take the fused path; were this to fail, every port here would quietly
    fall back to the slower one."""
    if not _mkl_x86():
        pytest.skip("the fused kernel is for x86-64 with MKL")
    merge._PROBES.clear()
    assert merge._fused_agrees(16, 4096) and merge._fused_agrees(16, 14336) and merge._fused_agrees(64, 8192)


def _stored(rows: int, cols: int, lead: int, seed: int) -> tuple[bytes, "torch.Tensor"]:
    """A bf16 (rows, cols) tensor stored ``lead`` bytes into a buffer, as in a safetensors shard."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
    raw = bytes(lead) + W.view(torch.int16).numpy().tobytes() + bytes(5)
    return raw, W


@needs_fused
@pytest.mark.parametrize("rows,cols,block_rows", [(64, 48, 9), (40, 17, 8), (3, 64, 8), (33, 100, 33)])
def test_merge_in_place_from_a_buffer_equals_the_stream(tmp_path, rows, cols, block_rows):
    """merge_buffer_stream reads each block where it lies (a read-only mmap of the file, at an odd
    offset) and gives merge_tensor's bits, block by block (the last block shorter)."""
    import mmap

    from portllm_cli.core.merge import merge_buffer_stream

    raw, W = _stored(rows, cols, 6, rows)
    f = tmp_path / "w.bin"
    f.write_bytes(raw)
    m = _module(rows, cols, 8, seed=cols)
    e = [LoraEdit(m, 0.5)]
    want = merge_tensor(W, e, block_bytes=block_rows * cols * 4)
    got = torch.empty_like(W)

    def write(r0, t):
        got[r0 : r0 + t.shape[0]] = t

    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert merge_buffer_stream(mm, 6, W.shape, torch.bfloat16, e, write, block_rows, Workspace())
    assert_same_bits(got, want)
    assert_same_bits(want, (W.float() + (m.B @ m.A) * (m.scale * 0.5)).to(torch.bfloat16))


@needs_fused
def test_merge_from_a_buffer_declines_what_it_does_not_do():
    """Not one LoRA on bf16 rows of a linear weight (or not this tensor's factors): False, and
    nothing written, so that merge_stream does it."""
    from portllm_cli.core.merge import merge_buffer_stream

    raw, W = _stored(16, 32, 0, 1)
    lin = LoraEdit(_module(16, 32, 4, 0))

    def write(r0, t):
        raise AssertionError("nothing may be written")

    for edits, shape, dtype in [
        ([lin], (16, 32), torch.float16),
        ([lin, lin], (16, 32), torch.bfloat16),
        ([DoraEdit(lin.module, torch.ones(16))], (16, 32), torch.bfloat16),
        ([LoraEdit(_module(32, 16, 4, 0, fan_in_fan_out=True))], (16, 32), torch.bfloat16),
        ([LoraEdit(_module(16, 31, 4, 0))], (16, 32), torch.bfloat16),  # another tensor's factors
        ([lin], (16, 2, 16), torch.bfloat16),
        ([LoraEdit(_module(1, 32, 4, 0))], (1, 32), torch.bfloat16),  # one row: BLAS's vector path
    ]:
        assert merge_buffer_stream(raw, 0, shape, dtype, edits, write, 8) is False


@needs_fused
def test_fused_kernel_refuses_rows_outside_its_buffer():
    raw, W = _stored(8, 16, 0, 2)
    B, A = torch.randn(8, 4), torch.randn(4, 16)
    Ap, out = merge._packed(A), torch.empty(8, 16, dtype=torch.bfloat16)
    args = (B.data_ptr(), A.data_ptr(), Ap.data_ptr(), out.data_ptr(), 8, 4, 16, 1.0)
    _kernels.lora_merge_bf16(raw, 0, *args)
    with pytest.raises(ValueError, match="inside the buffer"):
        _kernels.lora_merge_bf16(raw, 6, *args)  # 8 * 16 * 2 bytes from 6 end past the 5 spare bytes
    with pytest.raises(ValueError):
        _kernels.lora_merge_bf16(raw, -2, *args)
    with pytest.raises(ValueError):
        _kernels.lora_merge_bf16(raw, 0, B.data_ptr(), A.data_ptr(), Ap.data_ptr(), out.data_ptr(), 8, 0, 16, 1.0)
