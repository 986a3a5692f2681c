"""How far apart are two models, two patches, or a patch and a model: figures from the weights alone.

Three comparisons, chosen by what the two inputs are:

* model vs model: per tensor the relative drift ||W_B - W_A||_F / ||W_A||_F and the cosine of
  W_A and W_B, aggregated per layer, per module kind and overall from summed squared norms
  (never a mean of ratios). Tensors are streamed in row chunks, so two models are compared in
  the memory of a few chunks, not of a shard and never of a model.
* patch vs patch: per common module the residual ||D_B - D_A||_F / ||D_A||_F, the cosine and
  norm ratio of the two deltas and the principal angles between their column spaces (B
  factors) and row spaces (A factors), all from the r x in / out x r factors: the dense
  out x in delta is never formed.
* patch vs model: does the patch fit (core.compat), and how far the model's targeted weights
  have moved from the patch's recorded base when that base can be found.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from portllm_cli.core.compat import CompatReport, check_compatibility, weight_key_for
from portllm_cli.core.progress import ProgressFn
from portllm_cli.errors import IntegrityError, InvalidInputError, NotFoundError, PortllmError, UsageError
from portllm_cli.io.checkpoint import STRUCTURAL_FIELDS, Checkpoint, architecture_fingerprint
from portllm_cli.io.safetensors import DTYPES
from portllm_cli.patch.format import Patch, read_patch
from portllm_cli.spec import MODEL, PATCH, classify_dir

if TYPE_CHECKING:
    import torch

    from portllm_cli.io.shards import Buffers
    from portllm_cli.patch.format import LoraModule

# Rows are read this many elements at a time (one pread per model into a reused buffer), so the
# peak memory of a diff does not grow with the size of the largest tensor...
CHUNK_ELEMENTS = 4 << 20
# ...and reduced in float64 this many elements at a time: two 512 KiB operands that stay in the
# CPU's cache through the five passes over them (6x faster than 32 MiB operands from memory).
REDUCE_ELEMENTS = 1 << 16
# Tensors are reduced side by side, each by one thread in a fixed order: the same sums every run.
DIFF_WORKERS = max(1, min(2, os.cpu_count() or 1))

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp", "embeddings", "lm_head", "norms", "other")

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)(?:\.|$)")
_MLP_PARTS = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3", "mlp"}
_EMBED_PARTS = {"embed_tokens", "wte", "wpe", "word_embeddings", "embed_positions", "tok_embeddings", "embeddings"}


# -- naming ---------------------------------------------------------------------------------------
def layer_index(name: str) -> int | None:
    """The transformer block a tensor or module belongs to (model.layers.N. ...), else None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def module_kind(name: str) -> str:
    """Which of KINDS a tensor or module name belongs to."""
    parts = name.split(".")
    if parts and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    leaf = parts[-1] if parts else name
    if "lm_head" in parts or leaf == "output":
        return "lm_head"
    if any(p in _EMBED_PARTS for p in parts):
        return "embeddings"
    if "norm" in leaf or leaf.startswith("ln_") or leaf in ("ln", "ln_f"):
        return "norms"
    if leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
        return leaf
    if any(p in _MLP_PARTS for p in parts):
        return "mlp"
    return "other"


def _num(x: float | None) -> float | None:
    """A JSON-safe float: NaN and infinities become None."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def _n(count: int, singular: str, plural: str | None = None) -> str:
    return f"{count} {singular if count == 1 else (plural or singular + 's')}"


def _ratio(num_sq: float, den_sq: float) -> float:
    """sqrt(num_sq / den_sq); 0 when both are 0, inf when only the denominator is."""
    if den_sq > 0:
        return math.sqrt(max(num_sq, 0.0) / den_sq)
    return 0.0 if num_sq <= 0 else math.inf


def _cosine(dot: float, aa: float, bb: float) -> float | None:
    if aa > 0 and bb > 0:
        return max(-1.0, min(1.0, dot / math.sqrt(aa * bb)))
    return 1.0 if aa == 0 and bb == 0 else None


# -- model vs model ----------------------------------------------------------------------------
def pooled_layers(rows: list[Any], pool: Callable[[list[Any], str], dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with a ``layer`` grouped per layer (in layer order), each group pooled, with its layer."""
    by: dict[int, list[Any]] = {}
    for r in rows:
        if r.layer is not None:
            by.setdefault(r.layer, []).append(r)
    return [dict(pool(by[k], str(k)), layer=k) for k in sorted(by)]


def pooled_kinds(rows: list[Any], pool: Callable[[list[Any], str], dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with a ``kind`` grouped per module kind (in KINDS order), each group pooled."""
    by: dict[str, list[Any]] = {}
    for r in rows:
        by.setdefault(r.kind, []).append(r)
    return [pool(by[k], k) for k in KINDS if k in by]


@dataclass
class TensorDiff:
    """One tensor present in both models with the same shape; sums are float64 reductions."""

    name: str
    shape: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    aa: float  # ||W_A||^2
    bb: float  # ||W_B||^2
    ab: float  # <W_A, W_B>
    dd: float  # ||W_B - W_A||^2

    @property
    def layer(self) -> int | None:
        return layer_index(self.name)

    @property
    def kind(self) -> str:
        return module_kind(self.name)

    @property
    def drift(self) -> float:
        return _ratio(self.dd, self.aa)

    @property
    def cosine(self) -> float | None:
        return _cosine(self.ab, self.aa, self.bb)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layer": self.layer,
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype_a": self.dtype_a,
            "dtype_b": self.dtype_b,
            "norm_a": math.sqrt(self.aa),
            "norm_b": math.sqrt(self.bb),
            "diff_norm": math.sqrt(max(self.dd, 0.0)),
            "drift": _num(self.drift),
            "cosine": _num(self.cosine),
        }


@dataclass
class GroupDiff:
    """Tensors pooled into one figure: drift = sqrt(sum ||dW||^2 / sum ||W_A||^2)."""

    name: str
    n_tensors: int = 0
    aa: float = 0.0
    bb: float = 0.0
    ab: float = 0.0
    dd: float = 0.0

    def add(self, t: TensorDiff) -> None:
        self.n_tensors += 1
        self.aa += t.aa
        self.bb += t.bb
        self.ab += t.ab
        self.dd += t.dd

    @property
    def drift(self) -> float:
        return _ratio(self.dd, self.aa)

    @property
    def cosine(self) -> float | None:
        return _cosine(self.ab, self.aa, self.bb)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_tensors": self.n_tensors,
            "norm_a": math.sqrt(self.aa),
            "norm_b": math.sqrt(self.bb),
            "diff_norm": math.sqrt(max(self.dd, 0.0)),
            "drift": _num(self.drift),
            "cosine": _num(self.cosine),
        }


@dataclass
class ShapeMismatch:
    name: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape_a": list(self.shape_a), "shape_b": list(self.shape_b)}


@dataclass
class ModelDiff:
    a: str
    b: str
    tensors: list[TensorDiff]
    only_in_a: list[str]
    only_in_b: list[str]
    shape_mismatches: list[ShapeMismatch]
    architecture_differences: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def different_architectures(self) -> bool:
        return any(k in STRUCTURAL_FIELDS for k in self.architecture_differences)

    def _groups(self, key) -> list[GroupDiff]:
        groups: dict[Any, GroupDiff] = {}
        for t in self.tensors:
            k = key(t)
            if k is None:
                continue
            groups.setdefault(k, GroupDiff(str(k))).add(t)
        return [groups[k] for k in sorted(groups, key=lambda k: (str(type(k)), k))]

    @property
    def layers(self) -> list[GroupDiff]:
        return self._groups(lambda t: t.layer)

    @property
    def kinds(self) -> list[GroupDiff]:
        found = {g.name: g for g in self._groups(lambda t: t.kind)}
        return [found[k] for k in KINDS if k in found]

    @property
    def overall(self) -> GroupDiff:
        g = GroupDiff("overall")
        for t in self.tensors:
            g.add(t)
        return g

    @property
    def identical(self) -> bool:
        return (
            not self.architecture_differences
            and not self.only_in_a
            and not self.only_in_b
            and not self.shape_mismatches
            and all(t.dd == 0 for t in self.tensors)
        )

    @property
    def verdict(self) -> str:
        if self.identical:
            return "identical"
        if self.different_architectures:
            return "different architectures"
        return "drifted"

    @property
    def verdict_text(self) -> str:
        if self.identical:
            return f"identical ({len(self.tensors)} tensors, zero difference)"
        notes = []
        if self.only_in_a:
            notes.append(f"{_n(len(self.only_in_a), 'tensor')} only in A")
        if self.only_in_b:
            notes.append(f"{_n(len(self.only_in_b), 'tensor')} only in B")
        if self.shape_mismatches:
            notes.append(_n(len(self.shape_mismatches), "shape mismatch", "shape mismatches"))
        tail = f" ({'; '.join(notes)})" if notes else ""
        ov = self.overall
        if self.different_architectures:
            fields = ", ".join(
                f"{k} {v[0]!r} vs {v[1]!r}" for k, v in self.architecture_differences.items() if k in STRUCTURAL_FIELDS
            )
            common = f"; {ov.drift * 100:.2f}% drift over {_n(ov.n_tensors, 'common tensor')}" if ov.n_tensors else ""
            return f"different architectures: {fields}{common}{tail}"
        return f"drifted by {ov.drift * 100:.2f}% (relative Frobenius norm over {_n(ov.n_tensors, 'tensor')}){tail}"

    def largest(self, n: int | None = None) -> list[TensorDiff]:
        rows = sorted(self.tensors, key=lambda t: (-(t.drift if math.isfinite(t.drift) else 1e300), t.name))
        return rows if n is None else rows[:n]

    def as_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "verdict": self.verdict,
            "verdict_text": self.verdict_text,
            "overall": self.overall.as_dict(),
            "layers": [dict(g.as_dict(), layer=int(g.name)) for g in self.layers],
            "kinds": [g.as_dict() for g in self.kinds],
            "tensors": [t.as_dict() for t in self.largest()],
            "only_in_a": list(self.only_in_a),
            "only_in_b": list(self.only_in_b),
            "shape_mismatches": [s.as_dict() for s in self.shape_mismatches],
            "architecture_differences": {k: list(v) for k, v in self.architecture_differences.items()},
        }


def _chunk_pairs(
    ckpt_a: Checkpoint, name_a: str, ckpt_b: Checkpoint, name_b: str, chunk_elements: int | None = None,
    bufs: "Buffers | None" = None,
) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """The same rows of two same-shape tensors, block by block, read straight from their files
    into two reused buffers (each pair is used before the next is read)."""
    import torch

    from portllm_cli.io.safetensors import torch_dtype
    from portllm_cli.io.shards import Buffers, pread_into

    chunk_elements = chunk_elements or CHUNK_ELEMENTS
    path_a, info_a = ckpt_a.locations[name_a]
    path_b, info_b = ckpt_b.locations[name_b]
    if info_a is None or info_b is None or info_a.numel == 0:  # pickle weights are already mapped whole
        yield ckpt_a.tensor(name_a).reshape(-1), ckpt_b.tensor(name_b).reshape(-1)
        return
    bufs = bufs or Buffers()
    rows = info_a.shape[0] if info_a.shape else 1
    row = info_a.numel // rows
    step = max(1, chunk_elements // row)
    fa = fb = -1
    try:
        fa, fb = os.open(path_a, os.O_RDONLY), os.open(path_b, os.O_RDONLY)
        for start in range(0, rows, step):
            n = min(step, rows - start) * row
            pair = []
            for fd, info, slot in ((fa, info_a, "a"), (fb, info_b, "b")):
                size = DTYPES[info.dtype][0]
                buf = bufs.get(slot, n * size)
                pread_into(fd, memoryview(buf)[: n * size], info.begin + start * row * size)
                pair.append(torch.frombuffer(buf, dtype=torch_dtype(info.dtype), count=n))
            yield pair[0], pair[1]
    except IntegrityError:
        raise IntegrityError(f"{path_a} or {path_b}: truncated while reading tensor {name_b!r}") from None
    except OSError as exc:
        where = exc.filename or f"{path_a} or {path_b}"
        raise InvalidInputError(f"{where}: cannot read tensor {name_b!r} ({exc.strerror or exc.__class__.__name__})") from None
    finally:
        for fd in (fa, fb):
            if fd >= 0:
                os.close(fd)


class _Reducer:
    """The four float64 sums of a pair of row blocks, in two reused cache-sized buffers.

    Everything is float64 (BLAS ddot): exact enough that a zero difference reads as exactly 0
    and small drifts keep their digits. The blocks are reduced REDUCE_ELEMENTS at a time, so the
    operands stay in cache; the buffers are allocated once per thread, not per block. One per thread.
    """

    def __init__(self) -> None:
        self._a: "torch.Tensor | None" = None
        self._b: "torch.Tensor | None" = None

    def sums(self, ca: "torch.Tensor", cb: "torch.Tensor") -> tuple[float, float, float, float]:
        import torch

        if self._a is None:
            self._a, self._b = torch.empty(REDUCE_ELEMENTS, dtype=torch.float64), torch.empty(REDUCE_ELEMENTS, dtype=torch.float64)
        ca, cb = ca.reshape(-1), cb.reshape(-1)
        total = ca.numel()
        aa = bb = ab = dd = 0.0
        for s in range(0, total, REDUCE_ELEMENTS):
            n = min(REDUCE_ELEMENTS, total - s)
            a, b = self._a[:n], self._b[:n]
            a.copy_(ca[s : s + n])
            b.copy_(cb[s : s + n])
            aa += float(torch.dot(a, a))
            bb += float(torch.dot(b, b))
            ab += float(torch.dot(a, b))
            b.sub_(a)
            dd += float(torch.dot(b, b))
        return aa, bb, ab, dd


def tensor_diff(
    ckpt_a: Checkpoint, name_a: str, ckpt_b: Checkpoint, name_b: str | None = None, *, reducer: _Reducer | None = None,
    bufs: "Buffers | None" = None,
) -> TensorDiff:
    """Reduce one pair of same-shape tensors to their four float64 sums, block by block.

    The row is named by its key in B (for a patch's base vs a model: the model's key).
    """
    name_b = name_b or name_a
    reducer = reducer or _Reducer()
    aa = bb = ab = dd = 0.0
    for ca, cb in _chunk_pairs(ckpt_a, name_a, ckpt_b, name_b, bufs=bufs):
        s_aa, s_bb, s_ab, s_dd = reducer.sums(ca, cb)
        aa, bb, ab, dd = aa + s_aa, bb + s_bb, ab + s_ab, dd + s_dd
    return TensorDiff(
        name_b, tuple(ckpt_b.shape(name_b)), ckpt_a.dtype(name_a), ckpt_b.dtype(name_b), aa, bb, ab, dd
    )


def _tensor_bytes(ckpt: Checkpoint, name: str) -> int:
    info = ckpt.locations[name][1]
    return info.nbytes if info is not None else 0


def _diff_pairs(
    ckpt_a: Checkpoint, ckpt_b: Checkpoint, pairs: list[tuple[str, str]], total: int | None, progress: ProgressFn | None
) -> list[TensorDiff]:
    """tensor_diff of every pair, DIFF_WORKERS threads side by side (torch and pread release the
    GIL), each with its own buffers; results in the order of ``pairs``."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from portllm_cli.io.shards import Buffers

    local = threading.local()
    lock = threading.Lock()
    done = {"bytes": 0, "n": 0}

    def one(pair: tuple[str, str]) -> TensorDiff:
        if not hasattr(local, "reducer"):
            local.reducer, local.bufs = _Reducer(), Buffers()
        t = tensor_diff(ckpt_a, pair[0], ckpt_b, pair[1], reducer=local.reducer, bufs=local.bufs)
        with lock:
            done["bytes"] += _tensor_bytes(ckpt_a, pair[0])
            done["n"] += 1
            if progress is not None:
                progress("diff", done["bytes"] if total else done["n"], total or len(pairs))
        return t

    if DIFF_WORKERS <= 1 or len(pairs) <= 1:
        return [one(p) for p in pairs]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per worker; the blocks are too small to split further
    pool = ThreadPoolExecutor(max_workers=DIFF_WORKERS, thread_name_prefix="portllm-diff")
    try:
        return [f.result() for f in [pool.submit(one, p) for p in pairs]]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def architecture_differences(config_a: dict[str, Any], config_b: dict[str, Any]) -> dict[str, list[Any]]:
    fa, fb = architecture_fingerprint(config_a), architecture_fingerprint(config_b)
    out = {}
    for k in dict.fromkeys([*fa, *fb]):
        if fa.get(k) != fb.get(k):
            out[k] = [fa.get(k), fb.get(k)]
    return out


def diff_models(
    ckpt_a: Checkpoint,
    ckpt_b: Checkpoint,
    *,
    names: Iterable[tuple[str, str]] | None = None,
    a: str | None = None,
    b: str | None = None,
    progress: ProgressFn | None = None,
) -> ModelDiff:
    """Compare two checkpoints tensor by tensor (or only the given (name_in_a, name_in_b) pairs)."""
    if names is None:
        names_a, set_b = ckpt_a.names(), set(ckpt_b.names())
        pairs = [(n, n) for n in names_a if n in set_b]
        only_a = sorted(n for n in names_a if n not in set_b)
        only_b = sorted(set_b.difference(names_a))
        arch = architecture_differences(ckpt_a.config, ckpt_b.config)
    else:
        pairs, only_a, only_b, arch = list(names), [], [], {}
    same: list[tuple[str, str]] = []
    mismatches: list[ShapeMismatch] = []
    for na, nb in pairs:
        sa, sb = tuple(ckpt_a.shape(na)), tuple(ckpt_b.shape(nb))
        if sa == sb:
            same.append((na, nb))
        else:
            mismatches.append(ShapeMismatch(nb, sa, sb))
    total = sum(_tensor_bytes(ckpt_a, na) for na, _ in same) or None
    tensors = _diff_pairs(ckpt_a, ckpt_b, same, total, progress)
    return ModelDiff(
        a or str(ckpt_a.root), b or str(ckpt_b.root), tensors, only_a, only_b, mismatches, arch
    )


# -- patch vs patch ------------------------------------------------------------------------------
def _f64(t: "torch.Tensor") -> "torch.Tensor":
    import torch

    return t.detach().to(torch.float64)


def _basis(m: "torch.Tensor") -> "torch.Tensor":
    """Orthonormal basis of the column space of a tall factor: QR, SVD when QR shows rank loss."""
    import torch

    q, r = torch.linalg.qr(m)
    s = torch.linalg.svdvals(r)
    tol = (s.max() if s.numel() else torch.tensor(0.0, dtype=m.dtype)) * max(m.shape) * torch.finfo(m.dtype).eps
    rank = int((s > tol).sum())
    if rank == m.shape[1]:
        return q
    if rank == 0:
        return m.new_zeros((m.shape[0], 0))
    u = torch.linalg.svd(m, full_matrices=False).U
    return u[:, :rank]


def principal_angles(x: "torch.Tensor", y: "torch.Tensor") -> list[float]:
    """Principal angles (degrees, ascending) between the column spaces of two tall matrices."""
    import torch

    qx, qy = _basis(_f64(x)), _basis(_f64(y))
    if qx.shape[1] == 0 or qy.shape[1] == 0:
        return []
    s = torch.linalg.svdvals(qx.T @ qy).clamp(-1.0, 1.0)
    return sorted(math.degrees(math.acos(float(v))) for v in s)


def lowrank_norm(B: "torch.Tensor", A: "torch.Tensor", scale: float = 1.0) -> float:
    """||scale * B @ A||_F from the factors: QR of B and A^T, then the small r x r core."""
    import torch

    B, A = _f64(B), _f64(A)
    _, rb = torch.linalg.qr(B)
    _, ra = torch.linalg.qr(A.T)
    return abs(scale) * float(torch.linalg.matrix_norm(rb @ ra.T))


def lowrank_inner(Ba: "torch.Tensor", Aa: "torch.Tensor", Bb: "torch.Tensor", Ab: "torch.Tensor") -> float:
    """<Ba @ Aa, Bb @ Ab>_F = trace((Ba^T Bb)(Ab Aa^T)), never forming out x in."""
    Ba, Aa, Bb, Ab = _f64(Ba), _f64(Aa), _f64(Bb), _f64(Ab)
    return float(((Ba.T @ Bb) * (Aa @ Ab.T)).sum())


@dataclass
class ModuleDiff:
    module: str
    kind: str
    rank_a: int
    rank_b: int
    norm_a: float  # ||D_A||_F with the patch's scale
    norm_b: float
    inner: float  # <D_A, D_B>
    residual_norm: float  # ||D_B - D_A||_F
    column_angles: list[float]  # principal angles (degrees) between the B factors' column spaces
    row_angles: list[float]  # ... between the A factors' row spaces

    @property
    def layer(self) -> int | None:
        return layer_index(self.module)

    @property
    def residual(self) -> float:
        return _ratio(self.residual_norm**2, self.norm_a**2)

    @property
    def cosine(self) -> float | None:
        return _cosine(self.inner, self.norm_a**2, self.norm_b**2)

    @property
    def norm_ratio(self) -> float:
        return _ratio(self.norm_b**2, self.norm_a**2)

    @staticmethod
    def _overlap(angles: list[float], ra: int, rb: int) -> float | None:
        """Mean squared cosine of the principal angles: 1 = same subspace, 0 = orthogonal."""
        k = min(ra, rb)
        if k == 0:
            return None
        return sum(math.cos(math.radians(t)) ** 2 for t in angles) / k

    def as_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "layer": self.layer,
            "kind": self.kind,
            "rank_a": self.rank_a,
            "rank_b": self.rank_b,
            "norm_a": self.norm_a,
            "norm_b": self.norm_b,
            "residual_norm": self.residual_norm,
            "residual": _num(self.residual),
            "cosine": _num(self.cosine),
            "norm_ratio": _num(self.norm_ratio),
            "column_angles_deg": self.column_angles,
            "row_angles_deg": self.row_angles,
            "column_overlap": _num(self._overlap(self.column_angles, self.rank_a, self.rank_b)),
            "row_overlap": _num(self._overlap(self.row_angles, self.rank_a, self.rank_b)),
        }


def _equal(x: "torch.Tensor", y: "torch.Tensor") -> bool:
    import torch

    return x.shape == y.shape and torch.equal(_f64(x), _f64(y))


def _weight_factors(m: "LoraModule") -> tuple["torch.Tensor", "torch.Tensor"]:
    """(scale * B, A) in the layout of the model's weight: embeddings and fan_in_fan_out store
    the transpose, so there the delta is A^T B^T and the roles of the factors swap."""
    B, A = _f64(m.B), _f64(m.A)
    if m.kind == "embedding" or m.fan_in_fan_out:
        B, A = A.T, B.T
    return B * m.scale, A


def diff_lora_modules(ma: "LoraModule", mb: "LoraModule") -> ModuleDiff:
    """Compare two LoRA deltas of the same weight from their factors alone."""
    import torch

    Ba, Aa = _weight_factors(ma)
    Bb, Ab = _weight_factors(mb)
    # D_B - D_A = [Bb, -Ba] @ [Ab; Aa]: a rank r_a + r_b product whose norm QR gives without
    # squaring (the Gram form would lose half the digits when the two patches nearly agree).
    same = ma.scale == mb.scale and _equal(ma.A, mb.A) and _equal(ma.B, mb.B)
    residual = 0.0 if same else lowrank_norm(torch.cat([Bb, -Ba], dim=1), torch.cat([Ab, Aa], dim=0))
    return ModuleDiff(
        module=ma.name,
        kind=module_kind(ma.name),
        rank_a=ma.rank,
        rank_b=mb.rank,
        norm_a=lowrank_norm(Ba, Aa),
        norm_b=lowrank_norm(Bb, Ab),
        inner=lowrank_inner(Ba, Aa, Bb, Ab),
        residual_norm=residual,
        column_angles=principal_angles(Ba, Bb),
        row_angles=principal_angles(Aa.T, Ab.T),
    )


@dataclass
class PatchDiff:
    a: str
    b: str
    modules: list[ModuleDiff]
    only_in_a: list[str]
    only_in_b: list[str]
    shape_mismatches: list[ShapeMismatch]

    def _pool(self, rows: list[ModuleDiff], name: str) -> dict[str, Any]:
        aa = sum(m.norm_a**2 for m in rows)
        bb = sum(m.norm_b**2 for m in rows)
        ab = sum(m.inner for m in rows)
        dd = sum(m.residual_norm**2 for m in rows)
        return {
            "name": name,
            "n_modules": len(rows),
            "norm_a": math.sqrt(aa),
            "norm_b": math.sqrt(bb),
            "residual_norm": math.sqrt(dd),
            "residual": _num(_ratio(dd, aa)),
            "cosine": _num(_cosine(ab, aa, bb)),
            "norm_ratio": _num(_ratio(bb, aa)),
        }

    @property
    def overall(self) -> dict[str, Any]:
        return self._pool(self.modules, "overall")

    @property
    def layers(self) -> list[dict[str, Any]]:
        return pooled_layers(self.modules, self._pool)

    @property
    def kinds(self) -> list[dict[str, Any]]:
        return pooled_kinds(self.modules, self._pool)

    @property
    def identical(self) -> bool:
        return (
            not self.only_in_a
            and not self.only_in_b
            and not self.shape_mismatches
            and all(m.residual_norm == 0 for m in self.modules)
        )

    @property
    def verdict(self) -> str:
        if self.identical:
            return "identical"
        if self.shape_mismatches or not self.modules:
            return "incompatible"
        return "compatible"

    @property
    def verdict_text(self) -> str:
        n = len(self.modules)
        if self.identical:
            return f"identical ({n} modules, zero residual)"
        notes = []
        if self.only_in_a:
            notes.append(f"{_n(len(self.only_in_a), 'module')} only in A")
        if self.only_in_b:
            notes.append(f"{_n(len(self.only_in_b), 'module')} only in B")
        if self.shape_mismatches:
            notes.append(f"{_n(len(self.shape_mismatches), 'module')} with different weight shapes")
        tail = f" ({'; '.join(notes)})" if notes else ""
        if not self.modules:
            return f"incompatible: no module in common{tail}"
        ov = self.overall
        cos = f"{ov['cosine']:.4f}" if ov["cosine"] is not None else "n/a"
        head = "incompatible" if self.shape_mismatches else "compatible"
        res = f"{ov['residual'] * 100:.2f}%" if ov["residual"] is not None else "n/a"
        return f"{head}: residual {res}, cosine {cos} over {_n(n, 'common module')}{tail}"

    def largest(self, n: int | None = None) -> list[ModuleDiff]:
        rows = sorted(self.modules, key=lambda m: (-(m.residual if math.isfinite(m.residual) else 1e300), m.module))
        return rows if n is None else rows[:n]

    def as_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "verdict": self.verdict,
            "verdict_text": self.verdict_text,
            "overall": self.overall,
            "layers": self.layers,
            "kinds": self.kinds,
            "modules": [m.as_dict() for m in self.largest()],
            "only_in_a": list(self.only_in_a),
            "only_in_b": list(self.only_in_b),
            "shape_mismatches": [s.as_dict() for s in self.shape_mismatches],
        }


def diff_patches(
    patch_a: Patch, patch_b: Patch, *, a: str | None = None, b: str | None = None, progress: ProgressFn | None = None
) -> PatchDiff:
    names_a, names_b = set(patch_a.modules), set(patch_b.modules)
    common = sorted(names_a & names_b)
    rows, mismatches = [], []
    for i, name in enumerate(common, 1):
        ma, mb = patch_a.modules[name], patch_b.modules[name]
        if tuple(ma.weight_shape) != tuple(mb.weight_shape):
            mismatches.append(ShapeMismatch(name, tuple(ma.weight_shape), tuple(mb.weight_shape)))
        else:
            rows.append(diff_lora_modules(ma, mb))
        if progress is not None:
            progress("diff", i, len(common))
    return PatchDiff(
        a or str(patch_a.path),
        b or str(patch_b.path),
        rows,
        sorted(names_a - names_b),
        sorted(names_b - names_a),
        mismatches,
    )


# -- the patch against the drift of its weights ---------------------------------------------------
# The top-r singular subspaces of D = W_new - W_old come from randomized subspace iteration
# (Halko, Martinsson & Tropp 2011, Algorithms 4.3/4.4 and 5.1), streamed: each pass reads D once,
# a block of rows at a time, and applies D and D^T together (Y_rows = D_rows Z, Z' += D_rows^T Y_rows),
# so a pass costs one read of both tensors and memory holds one block plus the out x k and in x k
# sketches (k = r + OVERSAMPLE). POWER_ITERATIONS passes of D^T D, then one pass for Y = D Z and a
# small SVD of Y. When k reaches the smaller side of D, the sketch holds all of D and the result is
# the exact SVD.
POWER_ITERATIONS = 2
OVERSAMPLE = 10
SKETCH_SEED = 0  # the Gaussian start is fixed: the same inputs give the same figures


@dataclass
class ModuleDrift:
    """One patched module against the drift D = W_new - W_old of its weight (float64 sums)."""

    module: str
    key: str  # the weight's key in the new model
    rank: int  # the patch's rank r for this module (the size of D's top subspace compared)
    shape: tuple[int, ...]
    aa: float  # ||W_old||^2
    dd: float  # ||D||^2
    pp: float  # ||s B A||^2
    pd: float  # <s B A, D>
    column_overlap_sum: float | None  # ||Q_B^T U_r||_F^2: the patch's column space vs D's top-r left space
    row_overlap_sum: float | None  # ||Q_A^T V_r||_F^2: the patch's row space vs D's top-r right space
    overlap_dims: tuple[int, int]  # the denominators: min(rank of B, r), min(rank of A, r)
    top_energy: float  # sum of the top-r singular values of D, squared
    singular_values: list[float]  # the top-r singular values of D
    exact: bool  # the sketch held all of D (exact SVD)

    @property
    def layer(self) -> int | None:
        return layer_index(self.module)

    @property
    def kind(self) -> str:
        return module_kind(self.module)

    @property
    def drift(self) -> float:
        return _ratio(self.dd, self.aa)

    @property
    def patch_over_drift(self) -> float:
        return _ratio(self.pp, self.dd)

    @property
    def cosine(self) -> float | None:
        return _cosine(self.pd, self.pp, self.dd) if self.pp > 0 and self.dd > 0 else None

    @property
    def column_overlap(self) -> float | None:
        d = self.overlap_dims[0]
        return self.column_overlap_sum / d if self.column_overlap_sum is not None and d else None

    @property
    def row_overlap(self) -> float | None:
        d = self.overlap_dims[1]
        return self.row_overlap_sum / d if self.row_overlap_sum is not None and d else None

    @property
    def top_energy_share(self) -> float | None:
        return self.top_energy / self.dd if self.dd > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "key": self.key,
            "layer": self.layer,
            "kind": self.kind,
            "rank": self.rank,
            "shape": list(self.shape),
            "drift": _num(self.drift),
            "patch_over_drift": _num(self.patch_over_drift),
            "cosine": _num(self.cosine),
            "column_overlap": _num(self.column_overlap),
            "row_overlap": _num(self.row_overlap),
            "drift_top_r_energy": _num(self.top_energy_share),
            "drift_norm": math.sqrt(max(self.dd, 0.0)),
            "patch_norm": math.sqrt(max(self.pp, 0.0)),
            "base_norm": math.sqrt(max(self.aa, 0.0)),
            "drift_singular_values": [float(s) for s in self.singular_values],
            "exact_svd": self.exact,
        }


def _pool_drift(rows: list[ModuleDrift], name: str) -> dict[str, Any]:
    """Figures pooled over modules from their sums (never a mean of ratios): drift and
    patch/drift from summed squared norms, cosine from summed inner products, overlaps as summed
    squared projections over summed dimensions."""
    aa = sum(m.aa for m in rows)
    dd = sum(m.dd for m in rows)
    pp = sum(m.pp for m in rows)
    pd = sum(m.pd for m in rows)
    col = [m for m in rows if m.column_overlap_sum is not None]
    row = [m for m in rows if m.row_overlap_sum is not None]
    col_dims = sum(m.overlap_dims[0] for m in col)
    row_dims = sum(m.overlap_dims[1] for m in row)
    return {
        "name": name,
        "n_modules": len(rows),
        "drift": _num(_ratio(dd, aa)),
        "patch_over_drift": _num(_ratio(pp, dd)),
        "cosine": _num(_cosine(pd, pp, dd)) if pp > 0 and dd > 0 else None,
        "column_overlap": _num(sum(m.column_overlap_sum for m in col) / col_dims) if col_dims else None,
        "row_overlap": _num(sum(m.row_overlap_sum for m in row) / row_dims) if row_dims else None,
        "drift_top_r_energy": _num(sum(m.top_energy for m in rows) / dd) if dd > 0 else None,
        "drift_norm": math.sqrt(max(dd, 0.0)),
        "patch_norm": math.sqrt(max(pp, 0.0)),
    }


@dataclass
class DriftReport:
    """Every patched module against the drift of its weight, pooled per layer, per kind, overall."""

    modules: list[ModuleDrift]
    method: dict[str, Any]

    @property
    def overall(self) -> dict[str, Any]:
        return _pool_drift(self.modules, "overall")

    @property
    def layers(self) -> list[dict[str, Any]]:
        return pooled_layers(self.modules, _pool_drift)

    @property
    def kinds(self) -> list[dict[str, Any]]:
        return pooled_kinds(self.modules, _pool_drift)

    def largest(self, n: int | None = None) -> list[ModuleDrift]:
        """Modules where the drift is largest next to the patch (smallest patch/drift) first."""
        rows = sorted(self.modules, key=lambda m: (m.patch_over_drift if math.isfinite(m.patch_over_drift)
                                                   else 1e300, m.module))
        return rows if n is None else rows[:n]

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": dict(self.method),
            "overall": self.overall,
            "layers": self.layers,
            "kinds": self.kinds,
            "modules": [m.as_dict() for m in sorted(self.modules, key=lambda m: m.module)],
        }


def _drift_blocks(ckpt_a: Checkpoint, name_a: str, ckpt_b: Checkpoint, name_b: str, cols: int
                  ) -> Iterator[tuple[int, "torch.Tensor", "torch.Tensor"]]:
    """(first row, W_A rows, D rows) in float64, a block of rows at a time, in row order."""
    import torch

    start = 0
    for ca, cb in _chunk_pairs(ckpt_a, name_a, ckpt_b, name_b):
        a = ca.to(torch.float64).reshape(-1, cols)
        d = cb.to(torch.float64).reshape(-1, cols) - a
        yield start, a, d
        start += a.shape[0]


def module_drift(
    base: Checkpoint,
    base_key: str,
    ckpt: Checkpoint,
    key: str,
    module: "LoraModule",
    *,
    power_iterations: int | None = None,
    oversample: int | None = None,
) -> tuple[TensorDiff, ModuleDrift]:
    """The drift of one patched weight (base -> model) against the patch, streamed (see above).

    Returns the plain tensor figures (what diff_models computes) and the patch-against-drift ones.
    """
    import torch

    q = POWER_ITERATIONS if power_iterations is None else power_iterations
    p = OVERSAMPLE if oversample is None else oversample
    if q < 1 or p < 0:
        raise ValueError("power_iterations must be >= 1 and oversample >= 0")
    shape = tuple(ckpt.shape(key))
    rows, cols = int(shape[0]), int(math.prod(shape[1:])) if len(shape) > 1 else 1
    Bs, A = _weight_factors(module)  # (out x r) with the scale, (r x in): the delta in W's layout
    r = module.rank
    k = min(r + p, rows, cols)
    identity = cols <= k  # Z = I: the sketch D Z is D itself
    # k = the smaller side: the sketch spans all of D's row (or column) space, so the SVD is exact
    exact = k >= min(rows, cols)
    aa = bb = ab = dd = pd = 0.0

    def sums(a: "torch.Tensor", d: "torch.Tensor", start: int) -> None:
        nonlocal aa, bb, ab, dd, pd
        b = a + d
        aa += float(torch.dot(a.reshape(-1), a.reshape(-1)))
        bb += float(torch.dot(b.reshape(-1), b.reshape(-1)))
        ab += float(torch.dot(a.reshape(-1), b.reshape(-1)))
        dd += float(torch.dot(d.reshape(-1), d.reshape(-1)))
        pd += float(((d @ A.T) * Bs[start:start + d.shape[0]]).sum())  # <D, sBA> without forming sBA

    Y = torch.zeros((rows, cols if identity else k), dtype=torch.float64)
    if identity:
        for start, a, d in _drift_blocks(base, base_key, ckpt, key, cols):
            sums(a, d, start)
            Y[start:start + d.shape[0]] = d
        Z = None
    else:
        gen = torch.Generator().manual_seed(SKETCH_SEED)
        Z = torch.randn((cols, k), generator=gen, dtype=torch.float64)
        for it in range(q):
            acc = torch.zeros((cols, k), dtype=torch.float64)
            for start, a, d in _drift_blocks(base, base_key, ckpt, key, cols):
                if it == 0:
                    sums(a, d, start)
                acc += d.T @ (d @ Z)
            Z = torch.linalg.qr(acc).Q  # orthonormal between passes: D^T D squares the spread
        for start, _, d in _drift_blocks(base, base_key, ckpt, key, cols):
            Y[start:start + d.shape[0]] = d @ Z
    U, S, Wt = torch.linalg.svd(Y, full_matrices=False)
    r_eff = min(r, S.numel())
    U_r = U[:, :r_eff]
    V_r = (Wt.T if Z is None else Z @ Wt.T)[:, :r_eff]
    S_r = S[:r_eff]
    col_sum = row_sum = None
    dims = (0, 0)
    if dd > 0:
        qb, qa = _basis(Bs), _basis(A.T)
        col_sum = float(((qb.T @ U_r) ** 2).sum())
        row_sum = float(((qa.T @ V_r) ** 2).sum())
        dims = (min(qb.shape[1], r_eff), min(qa.shape[1], r_eff))
    tdiff = TensorDiff(key, shape, base.dtype(base_key), ckpt.dtype(key), aa, bb, ab, dd)
    return tdiff, ModuleDrift(
        module=module.name, key=key, rank=r, shape=shape, aa=aa, dd=dd, pp=lowrank_norm(Bs, A) ** 2, pd=pd,
        column_overlap_sum=col_sum, row_overlap_sum=row_sum, overlap_dims=dims,
        top_energy=float((S_r**2).sum()) if dd > 0 else 0.0,
        singular_values=[float(s) for s in S_r] if dd > 0 else [], exact=exact,
    )


def drift_method() -> dict[str, Any]:
    return {
        "svd": "randomized subspace iteration (Halko, Martinsson & Tropp 2011), streamed in row blocks",
        "power_iterations": POWER_ITERATIONS,
        "oversample": OVERSAMPLE,
        "seed": SKETCH_SEED,
        "top_r": "the patch's rank of each module",
        "overlap": "mean squared cosine of the principal angles: ||Q_patch^T U_r||_F^2 / min(rank, r)",
    }


# -- patch vs model ------------------------------------------------------------------------------
@dataclass
class PatchModelDiff:
    patch: str
    model: str
    compat: CompatReport
    base_spec: str | None
    base_path: str | None  # where the recorded base was found, else None
    base_note: str | None  # why the base drift is missing, or a remark about it
    drift: ModelDiff | None  # recorded base (A) vs model (B) on the targeted weights
    patch_norms: dict[str, float]  # weight key in the model -> ||D||_F of the patch
    patch_first: bool = True  # the order the user gave: patch A, model B (or the reverse)
    port: DriftReport | None = None  # the patch against the drift of each targeted weight (base found)

    @property
    def verdict(self) -> str:
        return "compatible" if self.compat.compatible else "incompatible"

    @property
    def verdict_text(self) -> str:
        if not self.compat.compatible:
            more = f" (and {len(self.compat.errors) - 1} more)" if len(self.compat.errors) > 1 else ""
            return f"incompatible: {self.compat.errors[0]}{more}"
        n = len(self.compat.key_map)
        text = f"compatible: all {_n(n, 'targeted module')} fit"
        if self.drift is not None and self.drift.tensors:
            text += f"; targeted weights drifted {self.drift.overall.drift * 100:.2f}% from the patch's base"
            if self.port is not None and self.port.modules:
                ov = self.port.overall
                figs = [("patch/drift", ov["patch_over_drift"], "{:.3g}"), ("cosine", ov["cosine"], "{:.3f}"),
                        ("column overlap", ov["column_overlap"], "{:.3f}"), ("row overlap", ov["row_overlap"], "{:.3f}")]
                text += "; " + ", ".join(f"{n} {f.format(v) if v is not None else 'n/a'}" for n, v, f in figs)
        elif self.base_note:
            text += f"; {self.base_note}"
        return text

    def drift_over_patch(self, t: TensorDiff) -> float | None:
        """||W_model - W_base|| / ||D_patch||: how big the model's move is next to the patch."""
        pn = self.patch_norms.get(t.name)
        if not pn:
            return None
        return math.sqrt(max(t.dd, 0.0)) / pn

    def as_dict(self) -> dict[str, Any]:
        drift = None
        if self.drift is not None:
            drift = self.drift.as_dict()
            by_name = {t.name: t for t in self.drift.tensors}
            for row in drift["tensors"]:
                row["patch_norm"] = self.patch_norms.get(row["name"])
                row["drift_over_patch"] = _num(self.drift_over_patch(by_name[row["name"]]))
        return {
            "patch": self.patch,
            "model": self.model,
            "verdict": self.verdict,
            "verdict_text": self.verdict_text,
            "compatibility": self.compat.as_dict(),
            "targeted": dict(self.compat.key_map),
            "base": {"spec": self.base_spec, "path": self.base_path, "note": self.base_note},
            "base_drift": drift,
            "port_figures": self.port.as_dict() if self.port is not None else None,
        }


def find_base(patch: Patch, *, allow_pickle: bool = False,
              progress: ProgressFn | None = None) -> tuple[Checkpoint | None, str | None, str | None]:
    """The patch's recorded base model when it can be had: (checkpoint, path, note)."""
    spec = patch.base_model
    if not spec:
        return None, None, "the patch records no base model"
    local = Path(os.path.expanduser(spec))
    try:
        if local.exists():
            return Checkpoint.open(local, allow_pickle=allow_pickle), str(local), None
        from portllm_cli.resolve import resolve
        from portllm_cli.spec import looks_like_repo_id

        if not looks_like_repo_id(spec):
            return None, None, f"the patch's base {spec} is not on this machine"
        res = resolve(spec, kind="model", progress=progress, allow_pickle=allow_pickle)
        return Checkpoint.open(res.path, allow_pickle=allow_pickle), str(res.path), None
    except ImportError:
        return None, None, f"the patch's base {spec} is not local and Hub support is unavailable"
    except PortllmError as exc:
        return None, None, f"the patch's base {spec} could not be opened ({exc.message})"


def diff_patch_model(
    patch: Patch,
    ckpt: Checkpoint,
    *,
    base: Checkpoint | None = None,
    find_base_model: bool = True,
    allow_pickle: bool = False,
    patch_label: str | None = None,
    model_label: str | None = None,
    patch_first: bool = True,
    progress: ProgressFn | None = None,
) -> PatchModelDiff:
    """Does the patch fit the model, and how far have its targeted weights moved from its base?"""
    compat = check_compatibility(patch, ckpt)
    base_path, note = None, None
    if base is None and find_base_model:
        base, base_path, note = find_base(patch, allow_pickle=allow_pickle, progress=progress)
    elif base is not None:
        base_path = str(base.root)
    elif not find_base_model:
        note = "base lookup skipped"
    drift = None
    port = None
    norms: dict[str, float] = {}
    loc = compat.location
    for module, key in compat.key_map.items():
        m = patch.modules[module]
        if loc is None or loc.lora[module].experts == 1:
            norms[key] = lowrank_norm(m.B, m.A, m.scale)
    if base is not None and compat.key_map:
        try:  # where the base stores the targeted weights (its own layout, like the model's)
            base_keys = check_compatibility(patch, base).key_map
        except PortllmError:
            base_keys = {}
        base_names = set(base.names())
        pairs, missing = [], []
        for module, key in compat.key_map.items():
            bkey = base_keys.get(module) or weight_key_for(module, base_names)
            if bkey is None or bkey not in base_names:
                missing.append(key)
            else:
                pairs.append((bkey, key))
        drift, port = _drift_against_patch(patch, compat.key_map, base, ckpt, pairs, a=base_path,
                                           b=model_label or str(ckpt.root), progress=progress)
        drift.only_in_b = sorted(missing)  # targeted weights the base does not have
        if drift.shape_mismatches:
            note = f"{len(drift.shape_mismatches)} targeted weights have another shape in the base"
    if base is not None and note is None and drift is not None and base.root.resolve() == ckpt.root.resolve():
        note = "the model is the patch's own base"
    return PatchModelDiff(
        patch_label or str(patch.path),
        model_label or str(ckpt.root),
        compat,
        patch.base_model,
        base_path,
        note,
        drift,
        norms,
        patch_first,
        port,
    )


def _drift_against_patch(
    patch: Patch,
    key_map: dict[str, str],
    base: Checkpoint,
    ckpt: Checkpoint,
    pairs: list[tuple[str, str]],
    *,
    a: str,
    b: str,
    progress: ProgressFn | None = None,
) -> tuple[ModelDiff, DriftReport]:
    """The targeted weights, base (A) vs model (B): the plain drift figures and, from the same
    reads, each patched module against the drift of its weight (module_drift)."""
    module_of = {key: module for module, key in key_map.items()}
    same, mismatches = [], []
    for na, nb in pairs:
        sa, sb = tuple(base.shape(na)), tuple(ckpt.shape(nb))
        if sa == sb:
            same.append((na, nb))
        else:
            mismatches.append(ShapeMismatch(nb, sa, sb))
    total = sum(_tensor_bytes(base, na) for na, _ in same) or None
    done = 0
    tensors, rows = [], []
    for na, nb in same:
        t, m = module_drift(base, na, ckpt, nb, patch.modules[module_of[nb]])
        tensors.append(t)
        rows.append(m)
        done += _tensor_bytes(base, na)
        if progress is not None:
            progress("diff", done if total else len(tensors), total or len(same))
    return ModelDiff(a, b, tensors, [], [], mismatches), DriftReport(rows, drift_method())


# -- dispatch ------------------------------------------------------------------------------------
@dataclass
class DiffReport:
    """What `portllm diff A B` found; `kind` says which comparison ran."""

    kind: str  # "model-model", "patch-patch", "patch-model" or "model-patch"
    a: str
    b: str
    result: ModelDiff | PatchDiff | PatchModelDiff
    top: int | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return self.result.verdict

    @property
    def verdict_text(self) -> str:
        return self.result.verdict_text

    @property
    def incompatible(self) -> bool:
        return isinstance(self.result, PatchModelDiff) and not self.result.compat.compatible

    @property
    def layers(self) -> list[tuple[int, float]]:
        """(layer, relative difference) for the per-layer chart."""
        r = self.result
        if isinstance(r, ModelDiff):
            return [(int(g.name), g.drift) for g in r.layers]
        if isinstance(r, PatchDiff):
            return [(row["layer"], row["residual"] if row["residual"] is not None else math.inf) for row in r.layers]
        if r.drift is not None:
            return [(int(g.name), g.drift) for g in r.drift.layers]
        return []

    def as_dict(self) -> dict[str, Any]:
        doc = {"kind": self.kind, "a": self.a, "b": self.b, "verdict": self.verdict, "verdict_text": self.verdict_text}
        doc.update({k: v for k, v in self.result.as_dict().items() if k not in ("a", "b", "verdict", "verdict_text")})
        if self.top is not None:
            r = self.result
            if isinstance(r, ModelDiff):
                doc["top"] = [t.name for t in r.largest(self.top)]
            elif isinstance(r, PatchDiff):
                doc["top"] = [m.module for m in r.largest(self.top)]
            elif r.drift is not None:
                doc["top"] = [t.name for t in r.drift.largest(self.top)]
        doc["warnings"] = list(self.warnings)
        return doc


def open_input(spec: str, *, allow_pickle: bool = False, verify: bool = True,
               progress: ProgressFn | None = None) -> tuple[str, Patch | Checkpoint, str]:
    """Resolve a diff argument by what it is and open it as a patch or a model: (kind, object, display)."""
    from portllm_cli.resolve import resolve

    local = Path(os.path.expanduser(spec))
    gguf = _gguf_path(local) if local.exists() else None
    if gguf is not None:  # a GGUF model: fit only, against its own tensor names and shapes
        from portllm_cli.core.gguf_port import open_target

        return MODEL, open_target(gguf), spec
    try:
        res = resolve(spec, progress=progress, allow_pickle=allow_pickle)
    except ImportError:
        raise NotFoundError(f"{spec}: no such local directory (and Hub support is not installed)") from None
    if res.kind == PATCH:
        patch = read_patch(res.path, verify=verify)
        if patch.init != "plain":  # PiSSA / OLoRA saved unconverted: what it means is its change
            from portllm_cli.core.plan import NO_BASE_FLAG_HINT, Policy, prepare_patch

            patch, _ = prepare_patch(patch, policy=Policy(whole="copy"), allow_pickle=allow_pickle,
                                     hint=NO_BASE_FLAG_HINT)
        return PATCH, patch, res.display
    return MODEL, Checkpoint.open(res.path, allow_pickle=allow_pickle), res.display


def diff_paths(
    a: str,
    b: str,
    *,
    top: int | None = None,
    progress: ProgressFn | None = None,
    allow_pickle: bool = False,
    verify: bool = True,
    base: str | None = None,
) -> DiffReport:
    """Compare two models, two patches, or a patch and a model, detected from their files.

    ``base`` (a patch and a model only): the model the patch was trained on, instead of the one its
    manifest records; the model's drift from it is then set against the patch (module_drift).
    """
    kind_a, obj_a, disp_a = open_input(a, allow_pickle=allow_pickle, verify=verify, progress=progress)
    kind_b, obj_b, disp_b = open_input(b, allow_pickle=allow_pickle, verify=verify, progress=progress)
    base_ckpt: Checkpoint | None = None
    if base is not None:
        if {kind_a, kind_b} != {"patch", "model"}:
            raise UsageError(f"--base applies to a patch and a model; got {kind_a} {a} and {kind_b} {b}",
                             hint="portllm diff PATCH NEW_MODEL --base OLD_MODEL")
        kind_base, base_obj, disp_base = open_input(base, allow_pickle=allow_pickle, verify=verify, progress=progress)
        if kind_base != "model":
            raise UsageError(f"--base {base}: is a patch; --base is the model the patch was trained on")
        base_ckpt = base_obj  # type: ignore[assignment]
    warnings = [w for o in (obj_a, obj_b) if isinstance(o, Patch) for w in o.warnings]
    result: ModelDiff | PatchDiff | PatchModelDiff
    if not isinstance(obj_a, (Patch, Checkpoint)) or not isinstance(obj_b, (Patch, Checkpoint)):
        result = _diff_with_gguf(kind_a, obj_a, disp_a, kind_b, obj_b, disp_b)
    elif kind_a == "model" and kind_b == "model":
        result = diff_models(obj_a, obj_b, a=disp_a, b=disp_b, progress=progress)
    elif kind_a == "patch" and kind_b == "patch":
        result = diff_patches(obj_a, obj_b, a=disp_a, b=disp_b, progress=progress)
    elif kind_a == "patch":
        result = diff_patch_model(
            obj_a, obj_b, base=base_ckpt, allow_pickle=allow_pickle, patch_label=disp_a, model_label=disp_b,
            progress=progress,
        )
    else:
        result = diff_patch_model(
            obj_b, obj_a, base=base_ckpt, allow_pickle=allow_pickle, patch_label=disp_b, model_label=disp_a,
            patch_first=False, progress=progress,
        )
    return DiffReport(f"{kind_a}-{kind_b}", disp_a, disp_b, result, top, warnings)


def _gguf_path(path: Path) -> Path | None:
    """A GGUF model: a .gguf file, or a directory holding one GGUF (or split set) and no safetensors."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if path.is_dir() and classify_dir(path) != PATCH and not (path / "config.json").exists():
        from portllm_cli.core.gguf_port import gguf_in_dir

        return gguf_in_dir(path, None)
    return None


def _diff_with_gguf(kind_a: str, obj_a: Any, disp_a: str, kind_b: str, obj_b: Any, disp_b: str) -> PatchModelDiff:
    """A patch against a GGUF model: does it fit (the GGUF's own names and shapes)? Weight drift is
    measured between safetensors models only."""
    from portllm_cli.core.gguf_port import check_fit
    from portllm_cli.errors import UnsupportedError

    if kind_a == "model" and kind_b == "model":
        raise UnsupportedError("diff compares a GGUF model with a patch only, not with another model",
                               hint="diff the safetensors models, or give a patch and the GGUF")
    patch_first = kind_a == "patch"
    patch, pdisp, model, mdisp = (obj_a, disp_a, obj_b, disp_b) if patch_first else (obj_b, disp_b, obj_a, disp_a)
    compat, _ = check_fit(patch, model, mdisp)
    norms = {key: lowrank_norm(patch.modules[m].B, patch.modules[m].A, patch.modules[m].scale)
             for m, key in compat.key_map.items()}
    return PatchModelDiff(pdisp, mdisp, compat, patch.base_model, None,
                          "weight drift from the patch's base is not measured on a GGUF model", None, norms, patch_first)


def plot_layers(report: DiffReport, out: Path) -> Path:
    """A per-layer bar chart of the report as a PNG, written under a temporary name then renamed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from portllm_cli.errors import UnsupportedError

        raise UnsupportedError("--plot needs matplotlib", hint="pip install 'portllm-cli[plot]'") from None
    layers = report.layers
    if not layers:
        raise InvalidInputError(
            f"--plot: no per-layer figures to draw for this {report.kind} diff"
            + (" (the patch's base model was not found)" if report.kind in ("patch-model", "model-patch") else "")
        )
    out = Path(out)
    ylabel = "residual ||ΔB − ΔA|| / ||ΔA|| (%)" if report.kind == "patch-patch" else "drift ||W_B − W_A|| / ||W_A|| (%)"
    xs = [i for i, _ in layers]
    ys = [v * 100 if math.isfinite(v) else float("nan") for _, v in layers]
    port = report.result.port if isinstance(report.result, PatchModelDiff) else None
    port_layers = port.layers if port is not None else []
    width = max(6.0, 0.35 * len(xs) + 2)
    if port_layers:
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(width, 7), sharex=True)
    else:
        fig, ax = plt.subplots(figsize=(width, 4))
    try:
        ax.bar(xs, ys, color="#3b75af")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not port_layers:
            ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_title(f"portllm diff: {report.verdict_text}"[:110], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if port_layers:
            # the patch against the drift, per layer: figures on one 0..1 scale (patch/drift capped at 1
            # would hide it, so it gets its own axis on the right)
            lx = [g["layer"] for g in port_layers]

            def series(name: str) -> list[float]:
                return [g[name] if g[name] is not None else float("nan") for g in port_layers]

            cos = series("cosine")
            ax2.plot(lx, cos, "o-", label="cosine(sBA, D)", color="#c44e52")
            ax2.plot(lx, series("column_overlap"), "s-", label="column overlap (B vs D's top-r)", color="#55a868")
            ax2.plot(lx, series("row_overlap"), "^-", label="row overlap (A vs D's top-r)", color="#8172b2")
            ax2.set_ylim(min([0.0] + [c for c in cos if math.isfinite(c)]) - 0.05, 1.05)
            ax2.set_ylabel("cosine / overlap")
            ax2.set_xlabel("layer")
            ax2.grid(axis="y", alpha=0.3)
            ax3 = ax2.twinx()
            ax3.plot(lx, series("patch_over_drift"), "d--", label="||sBA|| / ||D|| (right axis)", color="#dd8452")
            ax3.set_ylabel("patch / drift")
            lines = ax2.get_lines() + ax3.get_lines()
            ax2.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="upper right")
            ax2.set_title("the patch against the drift of its weights", fontsize=9)
        fig.tight_layout()
        from portllm_cli.io.atomic import atomic_output_file

        with atomic_output_file(out) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return out
