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
        hit = self._factors.pop(key, None)
        if hit is None:
            hit = (A, B, A.to(device=device, dtype=torch.float32), B.to(device=device, dtype=torch.float32))
            while len(self._factors) >= FACTOR_CACHE:
                self._factors.pop(next(iter(self._factors)))
        self._factors[key] = hit  # holds A and B too, so their ids are not reused while cached
        return hit[2], hit[3]

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


def _one_pass(rows: "torch.Tensor", edits: Sequence[Edit]) -> "LoraEdit | None":
    """The edit to merge through the compiled kernel, where it applies: one LoRA on a linear weight
    stored in bfloat16, contiguous rows in CPU memory (the rows of nearly every port)."""
    import torch

    if len(edits) != 1 or type(edits[0]) is not LoraEdit or rows.dtype != torch.bfloat16:
        return None
    e = edits[0]
    if _transposed(e.module) or rows.device.type != "cpu" or not rows.is_contiguous():
        return None
    return e if kernels() is not None else None


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
        d = _lora_delta(one.module, r0, r1, ws, rows.device)
        out = torch.empty_like(rows) if fresh else ws.flat("out", rows.numel(), rows.dtype, rows.device).view(rows.shape)
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
