"""The merge formula, in one place: what a patch does to one stored weight, a block of rows at a time.

Every path that changes weights goes through here: ``port`` (safetensors shards and pickle
targets), ``--verify``'s recomputation, ``eval``'s in-memory patching, and the GGUF port.

A targeted tensor is changed by one or more *edits*. An edit sees a float32 copy of rows
``[r0, r1)`` of the tensor as it is stored (row = index along dimension 0) and changes it in
place; the driver then rounds the block once to the stored dtype. For a LoRA module on a linear
weight ``W (out, in)`` the block gets ``scale * B[r0:r1] @ A``: each output row depends only on
its own row of B, so merging block by block gives the same bits as merging the whole tensor
(``tests/test_merge.py`` checks it for every layout and dtype), while the float32 working set is
bounded by the block size instead of the largest tensor.

Layouts: an embedding (``lora_embedding_A (r, num_embeddings)``, ``lora_embedding_B (dim, r)``)
and a ``fan_in_fan_out`` weight (GPT-2's Conv1D, stored ``(in, out)``) hold ``(B @ A).T``, so
their rows are columns of ``B @ A``: block ``[r0, r1)`` gets ``(B @ A[:, r0:r1]).T``.

Rounding: the sum ``W + scale * B @ A`` is formed in float32 and rounded once to the stored
dtype. PEFT's ``merge_and_unload`` on a bfloat16 model can round twice (the delta to bf16, then
the sum); see the README for why one rounding is the closer answer.

Compiled kernels (``portllm_cli._kernels``, optional): for one LoRA on a bf16 linear weight, the
widen/scale/add/round after torch's matmul runs in one pass (``add_scaled_bf16``), and where the
CPU allows, the rank-r product too (``lora_merge_bf16``: B @ A summed as an FMA chain, the order
torch.matmul uses on x86-64 with MKL), only after ``_fused_agrees`` has seen torch.matmul give the
same bits for that rank and row length. Either way the bits are torch's (``tests/test_kernels.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

if TYPE_CHECKING:
    import torch

    from portllm_cli.patch.format import LoraModule

# float32 bytes of one working block (the rows of W being merged, and the delta for them).
BLOCK_BYTES = 16 << 20


class Edit(Protocol):
    """Something that changes rows of one stored tensor. An edit may also have
    ``prepare(n_rows, read_rows, ws)``, run once before the first block (a first pass)."""

    def apply(self, block: "torch.Tensor", r0: int, r1: int, ws: "Workspace") -> None:
        """Change ``block`` (float32 rows ``[r0, r1)`` of the stored tensor) in place."""


# Modules whose float32 factors a Workspace keeps (a tensor's edits use one or two).
FACTOR_CACHE = 4


class Workspace:
    """Reusable scratch buffers: a shard holds many same-shaped weights, and a fresh multi-megabyte
    allocation per block costs a page fault per 4 KiB. One per thread; bounded: one flat buffer
    per tag, sized to the largest block, and the float32 factors of FACTOR_CACHE modules."""

    def __init__(self) -> None:
        self._flat: dict[tuple, "torch.Tensor"] = {}
        self._factors: dict[tuple, tuple["torch.Tensor", ...]] = {}

    def factors(self, m: "LoraModule", device: "torch.device") -> tuple["torch.Tensor", "torch.Tensor"]:
        """m's A and B in float32 on ``device``, converted once, not once per block: a bf16 patch's
        B is as large as several blocks. Kept for the last FACTOR_CACHE modules, keyed by the
        tensors themselves and their in-place version counters (a changed factor is reconverted)."""
        import torch

        A, B = m.A, m.B
        if A.dtype == torch.float32 and B.dtype == torch.float32 and A.device == device and B.device == device:
            return A, B
        key = (id(A), A._version, id(B), B._version, str(device))
        return self._cached(key, A, B, lambda: (A.to(device=device, dtype=torch.float32),
                                                B.to(device=device, dtype=torch.float32)))

    def fused_factors(self, m: "LoraModule") -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
        """m's A and B in float32, contiguous, in CPU memory, and A packed for the fused kernel
        (``_packed``), all converted once per module like ``factors``."""
        import torch

        A, B = self.factors(m, torch.device("cpu"))
        key = ("fused", id(A), A._version, id(B), B._version)

        def convert() -> tuple:
            Ac = A.contiguous()
            return Ac, B.contiguous(), _packed(Ac)

        return self._cached(key, A, B, convert)

    def _cached(self, key: tuple, A: "torch.Tensor", B: "torch.Tensor", make: Callable[[], tuple]) -> tuple:
        """``make()`` for this key, kept for the last FACTOR_CACHE keys. The entry holds A and B too,
        so their ids (in the key) are not reused while it is cached."""
        hit = self._factors.pop(key, None)
        if hit is None:
            hit = (A, B, *make())
            while len(self._factors) >= FACTOR_CACHE:
                self._factors.pop(next(iter(self._factors)))
        self._factors[key] = hit
        return hit[2:]

    def flat(self, tag: str, numel: int, dtype: "torch.dtype", device: "torch.device | None" = None) -> "torch.Tensor":
        """The first ``numel`` elements of this tag's buffer (grown, never shrunk): blocks of any
        row count share it, so the last, shorter block of a tensor allocates nothing."""
        import torch

        key = (tag, dtype, str(device))
        buf = self._flat.get(key)
        if buf is None or buf.numel() < numel:
            self._flat.pop(key, None)  # free the old one before allocating the larger one
            buf = self._flat[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


@dataclass(frozen=True)
class LoraEdit:
    """W += scale * module.scale * B @ A (in the stored layout of W)."""

    module: "LoraModule"
    scale: float = 1.0  # on top of the module's own alpha/r: --scale, a calibrated lambda

    @property
    def s(self) -> float:
        """The factor B @ A is multiplied by: the module's alpha/r times ``scale``."""
        return self.module.scale * self.scale

    def apply(self, block: "torch.Tensor", r0: int, r1: int, ws: Workspace) -> None:
        _lora_add(self.module, self.s, block, r0, r1, ws)


def _transposed(m: "LoraModule") -> bool:
    """Whether the stored weight holds (B @ A).T: an embedding, or a fan_in_fan_out weight."""
    return m.kind == "embedding" or m.fan_in_fan_out


def _lora_delta(m: "LoraModule", r0: int, r1: int, ws: Workspace, device: "torch.device") -> "torch.Tensor":
    """B @ A for rows [r0, r1) of the stored weight, in its layout (a view of the workspace)."""
    import torch

    A, B = ws.factors(m, device)
    if _transposed(m):
        d = ws.flat("delta", int(B.shape[0]) * (r1 - r0), torch.float32, device).view(int(B.shape[0]), r1 - r0)
        torch.matmul(B, A[:, r0:r1], out=d)
        return d.T
    d = ws.flat("delta", (r1 - r0) * int(A.shape[1]), torch.float32, device).view(r1 - r0, int(A.shape[1]))
    torch.matmul(B[r0:r1], A, out=d)
    return d


def _lora_add(m: "LoraModule", s: float, block: "torch.Tensor", r0: int, r1: int, ws: Workspace) -> None:
    """block += s * (B @ A) rows [r0, r1) in the stored layout (the LoraEdit arithmetic)."""
    d = _lora_delta(m, r0, r1, ws, block.device)
    if s != 1.0:  # x * 1.0 == x for every float32, so skipping the pass changes no bit
        d.mul_(s)
    block.add_(d)


_KERNELS: list = []  # [module or None], filled on first use


def kernels() -> "object | None":
    """The compiled one-pass merge step (``portllm_cli._kernels``), or None where it was not built
    (no C compiler at install) or ``PORTLLM_NO_KERNEL=1`` asks for torch's operations."""
    if not _KERNELS:
        import os

        mod = None
        if os.environ.get("PORTLLM_NO_KERNEL", "") in ("", "0"):
            try:
                from portllm_cli import _kernels as mod
            except ImportError:
                mod = None
        _KERNELS.append(mod)
    return _KERNELS[0]


def _packed(A: "torch.Tensor") -> "torch.Tensor":
    """A (r, n) as the fused kernel reads it: tiles of 16 columns, each tile's r rows one contiguous
    run (``packed[t, k, l] = A[k, 16 t + l]``); columns past the last whole tile are not in it."""
    r, n = int(A.shape[0]), int(A.shape[1])
    nv = n - n % 16
    return A[:, :nv].reshape(r, nv // 16, 16).transpose(0, 1).contiguous()


# (rank, row length) -> whether the fused kernel's rank-r product gave torch.matmul's bits here
_PROBES: dict[tuple[int, int], bool] = {}
# Rows of the probe: two of the AVX-512 code's 8-row tiles and three rows it takes one at a time.
PROBE_ROWS = 19


def _fused_agrees(r: int, n: int) -> bool:
    """Whether, on this machine, the fused kernel's B @ A (an FMA chain over k = 0..r-1) has exactly
    torch.matmul's bits for rank r and rows of n columns. That is what the port's bits (and their
    equality with PEFT's, which uses torch.matmul) rest on, and torch does not promise a summation
    order, so it is checked once per shape, on factors that expose any other order: random values
    (another order changes about half the sums' last bits), a zero row of B against columns of A
    that are negative throughout (the sign of an exact zero sum), and a row of products near the
    subnormal range. Where they differ, the merge keeps torch.matmul."""
    key = (r, n)
    hit = _PROBES.get(key)
    if hit is None:
        import torch

        g = torch.Generator().manual_seed(7919 * r + n)
        B = torch.randn(PROBE_ROWS, r, generator=g)
        A = torch.randn(r, n, generator=g)
        B[1] = 0.0
        A[:, ::3] = -A[:, ::3].abs()
        B[2] *= 1e-37  # products below 2**-126: subnormal, where a flush-to-zero mode would show
        want = torch.matmul(B, A)
        got = torch.empty_like(want)
        Ap = _packed(A)  # held here: the kernel gets its address only
        kernels().lora_delta_f32(B.data_ptr(), A.data_ptr(), Ap.data_ptr(), got.data_ptr(), PROBE_ROWS, r, n)
        hit = _PROBES[key] = bool(torch.equal(want.view(torch.int32), got.view(torch.int32)))
    return hit


def _fused(e: "LoraEdit", n_rows: int, row_len: int) -> bool:
    """Whether the fused kernel merges ``e`` into rows of ``row_len`` bf16 elements, ``n_rows`` at
    a time: the CPU has its instructions, the block is a matrix-matrix product for torch too (two
    rows and two columns at least; one of either takes BLAS's vector path, another order), and
    the probe agreed."""
    fused = getattr(kernels(), "lora_fused", None)  # None: a build from before the fused kernel
    if fused is None or not fused() or n_rows < 2 or row_len < 2:
        return False
    return _fused_agrees(int(e.module.A.shape[0]), row_len)


def _one_lora_bf16(edits: Sequence[Edit], dtype: "torch.dtype") -> "LoraEdit | None":
    """The edit to merge through the compiled kernels, where they apply: one LoRA on a linear
    weight stored in bfloat16 (the rows of nearly every port), and the kernels were built."""
    import torch

    if len(edits) != 1 or type(edits[0]) is not LoraEdit or dtype != torch.bfloat16 or _transposed(edits[0].module):
        return None
    return edits[0] if kernels() is not None else None


def _one_pass(rows: "torch.Tensor", edits: Sequence[Edit]) -> "LoraEdit | None":
    """``_one_lora_bf16`` for rows held in a tensor: contiguous, in CPU memory."""
    if rows.device.type != "cpu" or not rows.is_contiguous():
        return None
    return _one_lora_bf16(edits, rows.dtype)


def _merge_fused(e: "LoraEdit", w: object, offset: int, r0: int, r1: int, out: "torch.Tensor", ws: Workspace) -> None:
    """Rows [r0, r1) of a bf16 weight merged with ``e`` into ``out`` by the fused kernel; the rows
    are read from ``w`` (an address, or an object with the buffer protocol) at byte ``offset``."""
    A, B, Ap = ws.fused_factors(e.module)
    r, n = int(A.shape[0]), int(A.shape[1])
    kernels().lora_merge_bf16(w, offset, B.data_ptr() + 4 * r0 * r, A.data_ptr(), Ap.data_ptr(), out.data_ptr(),
                              r1 - r0, r, n, e.s)


# Rows per step of DoRA's first pass over a transposed weight: fixed, so that the norms (and so
# the merged bits) do not depend on the block size the merge itself uses.
NORM_ROWS = 256


@dataclass
class DoraEdit:
    """DoRA, as PEFT merges it: W' = m / ||W + s*B@A|| * (W + s*B@A), the norm taken per output
    feature (dim 1 of the (out, in) weight; a column of an embedding or a fan_in_fan_out weight).

    ``magnitude`` is m (one per output feature). With ``old_norms`` (||W_old|| per output feature,
    the base the adapter was trained on) the magnitude is first carried over relatively:
    m' = m * ||W|| / ||W_old||, W being the weight this edit changes (``--dora relative``).

    For a (out, in) weight each row holds one output feature, so the edit is row-local. For a
    transposed layout the norms run across the stored rows: ``prepare`` computes them first, in
    fixed steps of NORM_ROWS rows (float64 sums), holding one step at a time.
    """

    module: "LoraModule"
    magnitude: "torch.Tensor"
    scale: float = 1.0
    old_norms: "torch.Tensor | None" = None
    _factor: "torch.Tensor | None" = None  # transposed layouts: m' / ||W + s*B@A||, per column

    @property
    def transposed(self) -> bool:
        return _transposed(self.module)

    def prepare(self, n_rows: int, read_rows: Callable[[int, int], "torch.Tensor"], ws: Workspace) -> None:
        import torch

        if not self.transposed:
            return
        s = self.module.scale * self.scale
        cols = int(self.magnitude.shape[0])
        acc = torch.zeros(cols, dtype=torch.float64)
        base = torch.zeros(cols, dtype=torch.float64) if self.old_norms is not None else None
        for r0 in range(0, n_rows, NORM_ROWS):
            r1 = min(n_rows, r0 + NORM_ROWS)
            block = read_rows(r0, r1).to(torch.float32, copy=True)
            if base is not None:
                base += (block.to(torch.float64) ** 2).sum(0).to(base.device)
            _lora_add(self.module, s, block, r0, r1, ws)
            acc += (block.to(torch.float64) ** 2).sum(0).to(acc.device)
        norms = acc.sqrt().to(torch.float32)
        m = self.magnitude.to(torch.float32)
        if base is not None:
            m = m * (base.sqrt().to(torch.float32) / self.old_norms.to(torch.float32))
        self._factor = m / norms

    def apply(self, block: "torch.Tensor", r0: int, r1: int, ws: Workspace) -> None:
        import torch

        s = self.module.scale * self.scale
        if self.transposed:
            if self._factor is None:
                raise RuntimeError("DoraEdit.prepare was not run before apply")
            _lora_add(self.module, s, block, r0, r1, ws)
            block.mul_(self._factor.to(block.device).unsqueeze(0))
            return
        m = self.magnitude[r0:r1].to(device=block.device, dtype=torch.float32)
        if self.old_norms is not None:
            m = m * (torch.linalg.vector_norm(block, dim=1) / self.old_norms[r0:r1].to(block.device, torch.float32))
        _lora_add(self.module, s, block, r0, r1, ws)
        norms = torch.linalg.vector_norm(block, dim=1)
        block.mul_((m / norms).unsqueeze(1))


@dataclass(frozen=True)
class BiasEdit:
    """A LoRA's bias (lora_bias=True): b += scale * lora_B.bias, on a 1-D bias tensor."""

    bias: "torch.Tensor"
    scale: float

    def apply(self, block: "torch.Tensor", r0: int, r1: int, ws: Workspace) -> None:
        import torch

        block.add_(self.bias[r0:r1].to(device=block.device, dtype=torch.float32), alpha=self.scale)


@dataclass(frozen=True)
class WholeTensorEdit:
    """A tensor the adapter stores whole (modules_to_save, biases): W' = W + (saved - old), or
    W' = saved when ``old`` is None (PEFT's own behaviour: overwrite).

    ``old(r0, r1)`` reads rows of the old base's tensor; rows past its ``old_rows`` (tokens added
    to the vocabulary before training) exist only in the adapter and are copied as they are.
    """

    saved: "torch.Tensor"
    old: "Callable[[int, int], torch.Tensor] | None" = None
    old_rows: int = 0

    def apply(self, block: "torch.Tensor", r0: int, r1: int, ws: Workspace) -> None:
        import torch

        saved = self.saved[r0:r1].to(device=block.device, dtype=torch.float32)
        k = r0 if self.old is None else max(r0, min(r1, self.old_rows))
        if k > r0:
            block[: k - r0].add_(saved[: k - r0] - self.old(r0, k).to(device=block.device, dtype=torch.float32))
        if r1 > k:
            block[k - r0 :].copy_(saved[k - r0 :])


@dataclass(frozen=True)
class TokenRowsEdit:
    """Trainable token rows (trainable_token_indices): row i' = row i + (saved_i - old_i), or the
    saved row when ``old`` is None (PEFT's index_copy) or the token is past the old vocabulary."""

    indices: tuple[int, ...]
    values: "torch.Tensor"  # (len(indices), dim)
    old: "Callable[[int, int], torch.Tensor] | None" = None
    old_rows: int = 0

    def apply(self, block: "torch.Tensor", r0: int, r1: int, ws: Workspace) -> None:
        import torch

        for k, i in enumerate(self.indices):
            if not r0 <= i < r1:
                continue
            row = self.values[k].to(device=block.device, dtype=torch.float32)
            if self.old is not None and i < self.old_rows:
                block[i - r0].add_(row - self.old(i, i + 1)[0].to(device=block.device, dtype=torch.float32))
            else:
                block[i - r0].copy_(row)


# A one-row matmul takes BLAS's matrix-vector path, which sums in another order than the
# matrix-matrix kernel a whole-tensor merge (and PEFT) uses: blocks never hold a single row.
MIN_BLOCK_ROWS = 8


def block_rows(shape: Sequence[int], block_bytes: int = BLOCK_BYTES) -> int:
    """How many rows of a tensor of this shape make one float32 block (at least MIN_BLOCK_ROWS)."""
    row = 4
    for d in shape[1:]:
        row *= int(d)
    return max(MIN_BLOCK_ROWS, block_bytes // max(row, 1))


def row_blocks(n_rows: int, rows_per_block: int) -> list[tuple[int, int]]:
    """[r0, r1) spans covering n_rows; a one-row remainder joins the block before it."""
    rows_per_block = max(2, rows_per_block)
    spans = [(r0, min(n_rows, r0 + rows_per_block)) for r0 in range(0, n_rows, rows_per_block)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] == 1:
        spans[-2:] = [(spans[-2][0], n_rows)]
    return spans


def merge_block(rows: "torch.Tensor", edits: Sequence[Edit], r0: int, ws: Workspace | None = None) -> "torch.Tensor":
    """Rows ``[r0, r0 + len(rows))`` of a stored tensor with every edit applied, in the stored dtype.

    ``rows`` itself is never changed: the block is a float32 copy, edited, rounded once. Given a
    workspace, the result lives in it (no allocation per block) and is valid until the next
    merge_block with that workspace; without one it is a new tensor.
    """
    import torch

    fresh = ws is None
    ws = ws or Workspace()
    r1 = r0 + int(rows.shape[0])
    one = _one_pass(rows, edits)
    if one is not None:  # the same bits as below, in one pass over memory instead of four
        out = torch.empty_like(rows) if fresh else ws.flat("out", rows.numel(), rows.dtype, rows.device).view(rows.shape)
        if rows.dim() == 2 and _fused(one, int(rows.shape[0]), int(rows.shape[1])):  # the rank-r product too
            _merge_fused(one, rows.data_ptr(), 0, r0, r1, out, ws)
            return out
        d = _lora_delta(one.module, r0, r1, ws, rows.device)
        kernels().add_scaled_bf16(rows.data_ptr(), d.data_ptr(), out.data_ptr(), rows.numel(), one.s)
        return out
    block = ws.flat("block", rows.numel(), torch.float32, rows.device).view(rows.shape)
    block.copy_(rows)
    for e in edits:
        e.apply(block, r0, r1, ws)
    if fresh:
        return block.to(rows.dtype)
    out = ws.flat("out", rows.numel(), rows.dtype, rows.device).view(rows.shape)
    out.copy_(block)
    return out


def merge_stream(
    n_rows: int,
    read_rows: Callable[[int, int], "torch.Tensor"],
    write_rows: Callable[[int, "torch.Tensor"], None],
    edits: Sequence[Edit],
    rows_per_block: int,
    ws: Workspace | None = None,
) -> None:
    """Merge a tensor block by block: ``read_rows(r0, r1)`` gives stored rows, ``write_rows(r0, t)``
    takes the merged ones. Peak memory is one block, whatever the tensor's size.

    Both sides may reuse their buffers: what ``read_rows`` returns is used before it is called
    again, and ``t`` (a view of the workspace) must be consumed before ``write_rows`` returns."""
    ws = ws or Workspace()
    for e in edits:  # edits whose arithmetic needs a first pass over the tensor (DoRA on columns)
        prepare = getattr(e, "prepare", None)
        if prepare is not None:
            prepare(n_rows, read_rows, ws)
    for r0, r1 in row_blocks(n_rows, rows_per_block):
        write_rows(r0, merge_block(read_rows(r0, r1), edits, r0, ws))


def merge_buffer_stream(
    buffer: object,
    begin: int,
    shape: Sequence[int],
    dtype: "torch.dtype",
    edits: Sequence[Edit],
    write_rows: Callable[[int, "torch.Tensor"], None],
    rows_per_block: int,
    ws: Workspace | None = None,
) -> bool:
    """``merge_stream`` for a stored tensor lying in ``buffer`` (an object with the buffer protocol:
    a read-only mmap of a shard) from byte ``begin``, where the fused kernel merges it: each block
    of rows is read where it lies, with no copy, and merged in one pass. Returns False, having done
    nothing, where that does not apply (``merge_stream`` then does). The bits are merge_stream's."""
    if len(shape) != 2:
        return False
    n_rows, row_len = int(shape[0]), int(shape[1])
    one = _one_lora_bf16(edits, dtype)
    if one is None or n_rows < 2 or tuple(one.module.B.shape[:1]) + tuple(one.module.A.shape[1:]) != (n_rows, row_len):
        return False  # not a fused merge, or not this tensor's factors (merge_stream reports it)
    blocks = row_blocks(n_rows, rows_per_block)
    if not _fused(one, min(r1 - r0 for r0, r1 in blocks), row_len):
        return False
    ws = ws or Workspace()
    for r0, r1 in blocks:
        out = ws.flat("out", (r1 - r0) * row_len, dtype).view(r1 - r0, row_len)
        _merge_fused(one, buffer, begin + 2 * r0 * row_len, r0, r1, out, ws)
        write_rows(r0, out)
    return True


def merge_tensor(
    W: "torch.Tensor", edits: Sequence[Edit], *, block_bytes: int = BLOCK_BYTES, ws: Workspace | None = None
) -> "torch.Tensor":
    """A new tensor: W (in memory) with every edit applied, in W's dtype, merged block by block."""
    import torch

    out = torch.empty_like(W)
    if W.ndim == 0 or W.numel() == 0:
        return W.clone()

    def write(r0: int, t: "torch.Tensor") -> None:
        out[r0 : r0 + t.shape[0]] = t

    merge_stream(int(W.shape[0]), lambda a, b: W[a:b], write, edits, block_rows(W.shape, block_bytes), ws)
    return out


def merge_in_place(W: "torch.Tensor", edits: Sequence[Edit], ws: Workspace | None = None) -> None:
    """Apply edits to a live tensor (e.g. a loaded model's parameter), block by block.

    Each block is read before it is written and blocks do not overlap, so this equals
    ``W.copy_(merge_tensor(W, edits))`` without a second full-size tensor. Views of W (tied
    weights) see the change.
    """
    if W.ndim == 0 or W.numel() == 0:
        return

    def write(r0: int, t: "torch.Tensor") -> None:
        W[r0 : r0 + t.shape[0]].copy_(t)

    merge_stream(int(W.shape[0]), lambda a, b: W[a:b], write, edits, block_rows(W.shape), ws)
