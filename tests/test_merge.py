"""core.merge: the block-wise merge gives the same bits as the whole-tensor formula.

The reference is written apart from the code under test: ``(W.float() + s * (B.float() @ A.float())).to(W.dtype)``
on the whole tensor (transposed for embeddings and fan_in_fan_out weights), one matmul, one rounding.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from portllm_cli.core.merge import LoraEdit, block_rows, merge_in_place, merge_tensor, row_blocks  # noqa: E402
from portllm_cli.patch.format import LoraModule  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = [("linear", False), ("linear", True), ("embedding", False)]


def _whole(W, A, B, s, transposed):
    d = B.float() @ A.float()
    if transposed:
        d = d.T
    return (W.float() + d * s).to(W.dtype)


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,fifo", LAYOUTS)
@pytest.mark.parametrize("out_dim,in_dim,r", [(97, 64, 8), (64, 33, 4), (257, 129, 16), (2, 5, 1)])
def test_blockwise_equals_whole_tensor(dtype, kind, fifo, out_dim, in_dim, r):
    g = torch.Generator().manual_seed(out_dim * 1000 + in_dim)
    A = torch.randn(r, in_dim, generator=g).to(dtype)
    B = torch.randn(out_dim, r, generator=g).to(dtype)
    m = LoraModule("m", A, B, alpha=16.0, kind=kind, fan_in_fan_out=fifo)
    W = torch.randn(m.weight_shape, generator=g).to(dtype)
    transposed = kind == "embedding" or fifo
    want = _whole(W, A, B, m.scale * 0.75, transposed)
    row = 4 * W.shape[1]
    # one block; blocks that divide the rows; blocks that leave a remainder (one row, a few rows)
    for rows in {W.shape[0], 8, 10, 13, max(2, W.shape[0] - 1), 3}:
        got = merge_tensor(W, [LoraEdit(m, 0.75)], block_bytes=rows * row)
        assert torch.equal(_bits(got), _bits(want)), f"rows per block {rows}"
    live = W.clone()
    merge_in_place(live, [LoraEdit(m, 0.75)])
    assert torch.equal(_bits(live), _bits(want))


def test_source_rows_are_never_changed():
    W = torch.randn(40, 16)
    keep = W.clone()
    m = LoraModule("m", torch.randn(4, 16), torch.randn(40, 4), alpha=8.0)
    merge_tensor(W, [LoraEdit(m)], block_bytes=10 * 64)
    assert torch.equal(W, keep)


def test_row_blocks_cover_and_never_leave_one_row():
    for n in range(1, 60):
        for per in range(1, 12):
            spans = row_blocks(n, per)
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            if n > 1:
                assert all(r1 - r0 >= 2 for r0, r1 in spans)
    assert block_rows((10, 1 << 30)) >= 8


# -- the other edits: DoRA, biases, whole tensors, token rows -------------------------------------
from portllm_cli.core.merge import BiasEdit, DoraEdit, TokenRowsEdit, WholeTensorEdit  # noqa: E402


def _dora_reference(W, A, B, m, s, transposed, old_norms=None):
    """PEFT's DoRA merge written out on the whole tensor, in float64: m / ||W + s*B@A|| * (W + s*B@A),
    the norm per output feature; with old_norms the magnitude is m * ||W|| / ||W_old||."""
    W64 = W.double()
    d = (B.double() @ A.double()) * s
    V = W64 + (d.T if transposed else d)
    dim = 0 if transposed else 1
    mag = m.double()
    if old_norms is not None:
        mag = mag * W64.norm(dim=dim) / old_norms.double()
    factor = mag / V.norm(dim=dim)
    return V * (factor[None, :] if transposed else factor[:, None])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,fifo", LAYOUTS)
@pytest.mark.parametrize("relative", [False, True])
def test_dora_blockwise_is_block_size_independent(dtype, kind, fifo, relative):
    g = torch.Generator().manual_seed(7)
    out_dim, in_dim, r = 300, 40, 4
    A = torch.randn(r, in_dim, generator=g).to(dtype)
    B = torch.randn(out_dim, r, generator=g).to(dtype)
    mod = LoraModule("m", A, B, alpha=8.0, kind=kind, fan_in_fan_out=fifo)
    W = torch.randn(mod.weight_shape, generator=g).to(dtype)
    transposed = kind == "embedding" or fifo
    m = torch.rand(out_dim, generator=g) + 0.5
    old = (torch.rand(out_dim, generator=g) + 0.5) * 6 if relative else None
    row = 4 * W.shape[1]
    outs = []
    for rows in (W.shape[0], 8, 13, 100):
        outs.append(merge_tensor(W, [DoraEdit(mod, m, 0.5, old)], block_bytes=rows * row))
    for o in outs[1:]:
        assert torch.equal(_bits(o), _bits(outs[0]))
    want = _dora_reference(W, A, B, m, mod.scale * 0.5, transposed, old)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs[0].double(), want.to(dtype).double(), rtol=tol, atol=tol)
    live = W.clone()
    merge_in_place(live, [DoraEdit(mod, m, 0.5, old)])
    assert torch.equal(_bits(live), _bits(outs[0]))


def test_bias_whole_and_token_edits_against_their_formulas():
    g = torch.Generator().manual_seed(3)
    b, lb = torch.randn(50, generator=g), torch.randn(50, generator=g)
    got = merge_tensor(b, [BiasEdit(lb, 0.25)], block_bytes=4 * 8)
    assert torch.equal(got, (b + 0.25 * lb))

    new, saved, old = (torch.randn(40, 6, generator=g) for _ in range(3))
    got = merge_tensor(new, [WholeTensorEdit(saved, lambda a, c: old[a:c], 40)], block_bytes=8 * 24)
    assert torch.equal(got, new + (saved - old))
    assert torch.equal(merge_tensor(new, [WholeTensorEdit(saved)], block_bytes=8 * 24), saved)

    rows = torch.randn(3, 6, generator=g)
    idx = (2, 17, 39)
    got = merge_tensor(new, [TokenRowsEdit(idx, rows, lambda a, c: old[a:c], 30)], block_bytes=8 * 24)
    want = new.clone()
    want[2] = new[2] + (rows[0] - old[2])
    want[17] = new[17] + (rows[1] - old[17])
    want[39] = rows[2]  # past the old vocabulary: only in the adapter
    assert torch.equal(got, want)
    copied = merge_tensor(new, [TokenRowsEdit(idx, rows)], block_bytes=8 * 24)
    assert torch.equal(copied[list(idx)], rows) and torch.equal(copied[3:17], new[3:17])
