"""Port a patch where people run models: GGUF targets (llama.cpp, Ollama, LM Studio).

Two outputs:

- **a GGUF LoRA adapter** (``port --as-adapter --format gguf``) that llama.cpp's ``--lora`` and
  Ollama's ``ADAPTER`` load: ``general.type = adapter``, ``adapter.type = lora``,
  ``adapter.lora.alpha`` (a FLOAT32: llama.cpp aborts on an integer), llama.cpp's tensor names
  (``blk.N.attn_q.weight.lora_a`` / ``.lora_b``). llama.cpp scales every module by the one
  ``alpha / rank`` (rank = the module's own B width), so wherever PEFT's scale differs (an
  alpha pattern, rsLoRA, ``--scale``) the ratio is folded into B. For architectures whose
  converter permutes q/k rows for rotary embeddings (Llama: ``convert_hf_to_gguf.py``'s
  ``permute``), B's rows of those modules are permuted the same way. The target may be a GGUF
  or a safetensors model of the same architecture: the names come from the same map.
- **a merged GGUF** (the default when the target is a GGUF): every untargeted tensor and the
  metadata copied byte for byte, in streaming; each targeted tensor dequantized a block of rows
  at a time, merged in float32 by the shared merge (core.merge), and written in its own type
  when that type holds 8 bits or more per weight (F32, F16, BF16, Q8_0), else as Q8_0 (a
  4-bit type would round away most of a LoRA-sized change). Split sets in, split sets out.

PEFT module names map to llama.cpp tensor names through the ``gguf`` package's own tensor-name
map for the architecture (``gguf.get_tensor_name_map``), never a table written here.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from portllm_cli import __version__
from portllm_cli.core.compat import CompatReport, check_vocabulary
from portllm_cli.core.config import PortConfig
from portllm_cli.core.port import PortResult
from portllm_cli.core.progress import ProgressFn, counter, no_progress
from portllm_cli.errors import IntegrityError, InvalidInputError, UnsupportedError, UsageError
from portllm_cli.io import gguf as gio
from portllm_cli.io.shards import copy_range, pwrite_all, start_writeback
from portllm_cli.patch.format import LoraModule, Patch, now_iso

if TYPE_CHECKING:
    import numpy as np

    from portllm_cli.core.port import PortPlan
    from portllm_cli.resolve import Resolved

PORT_RECORD = "portllm_port.json"

# GGUF architectures portllm ports onto, and whether llama.cpp's converter permutes their q/k
# rows (its LlamaModel.permute; transformers' GGUF loader undoes it for "llama" only, which
# tests/test_gguf.py checks against transformers' own table). Others are refused with a reason.
ARCH_PERMUTES_QK: dict[str, bool] = {
    "llama": True,
    "qwen2": False,
    "qwen3": False,
    "gemma": False,
    "gemma2": False,
    "gemma3": False,
}
# transformers model_type -> GGUF architecture where the names differ (llama.cpp converts
# Mistral as Llama; transformers' own GGUF loader uses the same aliases).
MODEL_TYPE_ALIASES = {"mistral": "llama", "gemma3_text": "gemma3"}

# Types that keep a LoRA-sized change (8 bits or more per weight): a merged tensor stays in its
# own type when it is one of these, and becomes Q8_0 otherwise.
WIDE_TYPES = ("F32", "F16", "BF16", "Q8_0")
MERGED_TYPES = ("auto", "keep", "q8_0", "f16", "bf16", "f32")
ADAPTER_TYPES = ("f32", "f16", "bf16", "q8_0")


# -- architecture and names ----------------------------------------------------------------------
def arch_for_model_type(model_type: str | None) -> str | None:
    if not model_type:
        return None
    return MODEL_TYPE_ALIASES.get(model_type, model_type)


def check_arch(arch: str | None, where: str) -> str:
    if arch not in ARCH_PERMUTES_QK:
        raise UnsupportedError(
            f"{where}: architecture {arch!r} is not one portllm maps to llama.cpp's tensors "
            f"(supported: {', '.join(sorted(ARCH_PERMUTES_QK))})",
            hint="port onto the safetensors model instead, then convert with llama.cpp's convert_hf_to_gguf.py",
        )
    return arch  # type: ignore[return-value]


def name_map(arch: str, n_blocks: int) -> Any:
    """The gguf package's PEFT/transformers -> llama.cpp tensor-name map for an architecture."""
    g = gio.gguf_package()
    for key, value in g.MODEL_ARCH_NAMES.items():
        if value == arch:
            return g.get_tensor_name_map(key, n_blocks)
    raise UnsupportedError(f"the installed gguf package does not know the architecture {arch!r}",
                           hint="pip install -U gguf")


def gguf_name(tmap: Any, module: str) -> str | None:
    """llama.cpp's tensor name for a PEFT module (e.g. model.layers.0.self_attn.q_proj ->
    blk.0.attn_q.weight), or None when the map has none."""
    base = tmap.get_name(module)
    return f"{base}.weight" if base else None


def qk_permutation(rows: int, n_head: int) -> list[int]:
    """Row order llama.cpp's converter gives q/k weights: ``permute(w, n_head)`` takes row
    ``perm[i]`` of the transformers weight to row ``i`` (rotary pairs interleaved per head)."""
    if n_head <= 0 or rows % (2 * n_head):
        raise UnsupportedError(f"cannot permute {rows} rows for {n_head} heads (rotary pairs)")
    half = rows // n_head // 2
    # reshape(n_head, 2, half).swapaxes(1, 2): new (h, j, k) <- old (h, k, j)
    return [h * 2 * half + k * half + j for h in range(n_head) for j in range(half) for k in range(2)]


@dataclass
class GgufTarget:
    """What the GGUF side needs to know about a target, GGUF or safetensors."""

    arch: str
    n_blocks: int
    n_head: int | None
    n_head_kv: int | None
    display: str

    def heads_for(self, tensor: str) -> int | None:
        if not ARCH_PERMUTES_QK.get(self.arch):
            return None
        if tensor.endswith(".attn_q.weight"):
            return self.n_head
        if tensor.endswith(".attn_k.weight"):
            return self.n_head_kv or self.n_head
        return None


def target_of_gguf(model: gio.GgufModel, display: str) -> GgufTarget:
    arch = check_arch(model.arch, display)
    n_blocks = model.arch_int("block_count")
    if n_blocks is None:
        raise InvalidInputError(f"{display}: no {arch}.block_count in the GGUF metadata")
    head = model.arch_int("attention.head_count")
    head_kv = model.arch_int("attention.head_count_kv") or head
    if ARCH_PERMUTES_QK[arch] and head is None:
        raise InvalidInputError(f"{display}: no {arch}.attention.head_count in the GGUF metadata")
    return GgufTarget(arch, n_blocks, head, head_kv, display)


def target_of_config(config: dict[str, Any], display: str) -> GgufTarget:
    from portllm_cli.io.checkpoint import text_config

    tc = text_config(config)
    arch = check_arch(arch_for_model_type(tc.get("model_type")), display)
    n_blocks = tc.get("num_hidden_layers")
    if not isinstance(n_blocks, int) or n_blocks <= 0:
        raise InvalidInputError(f"{display}: config.json has no num_hidden_layers")
    head = tc.get("num_attention_heads")
    head_kv = tc.get("num_key_value_heads") or head
    if ARCH_PERMUTES_QK[arch] and not isinstance(head, int):
        raise InvalidInputError(f"{display}: config.json has no num_attention_heads")
    return GgufTarget(arch, n_blocks, head, head_kv, display)


# -- does the patch fit a GGUF? -------------------------------------------------------------------
def require_plain_lora(patch: Patch, display: str) -> None:
    """GGUF targets and GGUF LoRAs carry plain low-rank factors: refuse every other part of an
    adapter (llama.cpp's LoRA format has no DoRA magnitudes, biases, whole tensors or expert stacks)."""
    parts = []
    if patch.init != "plain":
        parts.append(f"init_lora_weights {patch.config.get('init_lora_weights')!r} saved unconverted")
    if any(m.magnitude is not None for m in patch.modules.values()):
        parts.append("DoRA magnitudes")
    if any(m.bias is not None for m in patch.modules.values()):
        parts.append("lora_bias")
    if any(m.depth or patch.uses_parameters for m in patch.modules.values()):
        parts.append("LoRA on raw parameters (target_parameters, MoE experts)")
    if patch.full:
        parts.append("whole saved tensors (modules_to_save / bias)")
    if patch.tokens:
        parts.append("trainable token rows")
    if parts:
        raise UnsupportedError(
            f"{display}: GGUF ports carry plain LoRA factors only; this patch has {', '.join(parts)}",
            hint="port onto the safetensors (transformers) version of the model instead",
        )


def check_fit(patch: Patch, model: gio.GgufModel, display: str) -> tuple[CompatReport, GgufTarget]:
    """The fit check against a GGUF's own tensor names and shapes (same rules and messages as
    core.compat for safetensors); key_map maps each patch module to its GGUF tensor name."""
    require_plain_lora(patch, display)
    tgt = target_of_gguf(model, display)
    tmap = name_map(tgt.arch, tgt.n_blocks)
    errors: list[str] = []
    warnings: list[str] = []
    key_map: dict[str, str] = {}
    fp = ((patch.manifest or {}).get("base") or {}).get("fingerprint") or {}
    p_arch = arch_for_model_type(fp.get("model_type"))
    if p_arch and p_arch != tgt.arch:
        errors.append(f"architecture: patch was made for model_type {fp.get('model_type')!r}, "
                      f"the model is a GGUF of architecture {tgt.arch!r}")
    names = set(model.names())
    for module in sorted(patch.modules):
        m = patch.modules[module]
        key = gguf_name(tmap, module)
        if key is None:
            errors.append(f"module {module}: llama.cpp has no {tgt.arch} tensor for it")
            continue
        if key not in names:
            if key == "output.weight" and "token_embd.weight" in names:
                errors.append(f"module {module}: the GGUF ties its output projection to token_embd "
                              "(no output.weight), so llama.cpp cannot adapt it alone")
            else:
                errors.append(f"module {module}: not present in the model (no {key})")
            continue
        t = model.tensor(key)
        if m.fan_in_fan_out:
            errors.append(f"module {module}: fan_in_fan_out patches are not supported on GGUF targets")
            continue
        if tuple(t.shape) != tuple(m.weight_shape):
            errors.append(f"module {module}: patch expects weight shape {tuple(m.weight_shape)}, "
                          f"the model has {tuple(t.shape)} ({key})")
            continue
        key_map[module] = key
    emb = model.locations.get("token_embd.weight")
    check_vocabulary(patch, emb[1].shape[0] if emb else model.arch_int("vocab_size"), errors, warnings)
    return CompatReport(not errors, errors, warnings, key_map), tgt


def open_target(path: Path) -> gio.GgufModel:
    return gio.open_model(path)


# -- the merge ------------------------------------------------------------------------------------
def _gguf_module(m: LoraModule, perm: list[int] | None) -> LoraModule:
    """The module in the GGUF tensor's row order (B's rows permuted like llama.cpp's q/k)."""
    if perm is None:
        return m
    import dataclasses

    import torch

    return dataclasses.replace(m, B=m.B[torch.tensor(perm, dtype=torch.long)])


# -- quantization ---------------------------------------------------------------------------------
def _quant_supported(tid: int, direction: str) -> bool:
    """Whether the gguf package can quantize/dequantize this type (its numpy reference code)."""
    import numpy as np

    g = gio.gguf_package()
    qt = g.GGMLQuantizationType(tid)
    bs, ts = g.GGML_QUANT_SIZES[qt]
    try:
        if direction == "dequantize":
            g.quants.dequantize(np.zeros((1, ts), dtype=np.uint8), qt)
        else:
            g.quants.quantize(np.zeros((1, bs), dtype=np.float32), qt)
    except (NotImplementedError, AttributeError):
        return False
    except Exception:
        return False
    return True


def dequantize_rows(raw: bytearray, t: gio.GgufTensor, n_rows: int) -> "np.ndarray":
    import numpy as np

    g = gio.gguf_package()
    arr = np.frombuffer(raw, dtype=np.uint8).reshape(n_rows, -1)
    out = g.quants.dequantize(arr, g.GGMLQuantizationType(t.type_id))
    return np.ascontiguousarray(out, dtype=np.float32).reshape(n_rows, -1)


def quantize_rows(block: "np.ndarray", tid: int) -> bytes:
    import numpy as np

    g = gio.gguf_package()
    qt = g.GGMLQuantizationType(tid)
    if tid == 0:
        return np.ascontiguousarray(block, dtype=np.float32).tobytes()
    return np.ascontiguousarray(g.quants.quantize(np.ascontiguousarray(block, dtype=np.float32), qt)).tobytes()


def written_type(src: str, choice: str, row_len: int, name: str) -> str:
    """The type a merged tensor is written in (see the module docstring)."""
    if choice == "auto":
        out = src if src in WIDE_TYPES else "Q8_0"
    elif choice == "keep":
        out = src
    else:
        out = choice.upper()
    if out == "Q8_0" and row_len % 32:
        raise UnsupportedError(f"{name}: rows of {row_len} values cannot be stored as Q8_0 (blocks of 32)",
                               hint="use --gguf-merged-type f16")
    return out


@dataclass
class _Survival:
    """How much of the patch's change a written type kept, summed over row blocks."""

    dd: float = 0.0  # ||delta||^2 (the exact change, float32)
    rr: float = 0.0  # ||realized||^2 (written minus original, both dequantized)
    rd: float = 0.0  # <realized, delta>
    ee: float = 0.0  # ||realized - delta||^2

    def add(self, orig: "np.ndarray", merged: "np.ndarray", written: "np.ndarray") -> None:
        """One block: the source rows, the exact merge (float32) and the written rows, dequantized."""
        d = (merged - orig).ravel()
        r = (written - orig).ravel()
        e = (written - merged).ravel()
        # float32 dot products (BLAS), summed over blocks in Python floats: figures for a report
        self.dd += float(d @ d)
        self.rr += float(r @ r)
        self.rd += float(r @ d)
        self.ee += float(e @ e)

    def as_dict(self) -> dict[str, Any]:
        kept = self.rd / math.sqrt(self.rr * self.dd) if self.rr > 0 and self.dd > 0 else None
        err = math.sqrt(self.ee / self.dd) if self.dd > 0 else None
        return {"change_kept": None if kept is None else round(kept, 6),
                "change_error": None if err is None else round(err, 6)}


def merge_tensor_to(
    src_fd: int, src_path: Path, t: gio.GgufTensor, out_fd: int, out_begin: int, out_tid: int,
    module: LoraModule, scale: float, tick: Callable[[int], None],
) -> dict[str, Any]:
    """Merge one targeted tensor a block of rows at a time through the shared merge (core.merge):
    rows are dequantized to float32, merged, and quantized to ``out_tid``. Returns how much of the
    patch's change the written type kept."""
    import torch

    from portllm_cli.core.merge import LoraEdit, Workspace, block_rows, merge_stream

    cols = t.shape[-1] if len(t.shape) > 1 else 1
    out_row = gio.tensor_nbytes((1, cols), out_tid)
    surv = _Survival()
    held: dict[int, Any] = {}  # r0 -> the dequantized source rows, for the survival figures

    def read(r0: int, r1: int) -> "torch.Tensor":
        orig = dequantize_rows(gio.read_rows(src_fd, t, r0, r1, src_path), t, r1 - r0)
        held[r0] = orig
        return torch.from_numpy(orig)  # float32: merge_block copies it, merges, and keeps float32

    def write(r0: int, merged: "torch.Tensor") -> None:
        m = merged.numpy()
        n = m.shape[0]
        data = quantize_rows(m, out_tid)
        pwrite_all(out_fd, data, out_begin + r0 * out_row)
        back = dequantize_rows(bytearray(data), gio.GgufTensor("", out_tid, "", (n, cols), 0, len(data), 0), n)
        surv.add(held.pop(r0), m, back)
        tick(t.row_bytes * n)

    merge_stream(t.rows, read, write, [LoraEdit(module, scale)], block_rows((t.rows, cols)), Workspace())
    start_writeback(out_fd, out_begin, out_row * t.rows)
    return surv.as_dict()


# -- merged GGUF output ---------------------------------------------------------------------------
@dataclass
class _FilePlan:
    src: gio.GgufFile
    specs: list[gio.TensorSpec]  # header order, with the written types
    begins: dict[str, int]  # tensor -> absolute offset in the output
    header: bytes | None  # None: the layout is unchanged (copy the header too)
    size: int


def _plan_file(f: gio.GgufFile, out_types: dict[str, int]) -> _FilePlan:
    specs = []
    for name, t in f.tensors.items():
        tid = out_types.get(name, t.type_id)
        specs.append(gio.TensorSpec(name, t.shape, tid, t.nbytes if tid == t.type_id else gio.tensor_nbytes(t.shape, tid)))
    if all(s.type_id == f.tensors[s.name].type_id for s in specs):
        return _FilePlan(f, specs, {n: t.begin for n, t in f.tensors.items()}, None, f.file_size)
    # new sizes: lay the data out again in the source's data order, each tensor aligned
    by_name = {s.name: s for s in specs}
    data_order = [by_name[t.name] for t in sorted(f.tensors.values(), key=lambda t: t.begin)]
    rel = dict(zip((s.name for s in data_order), gio.layout(data_order, f.alignment)))
    with open(f.path, "rb") as fh:
        fh.seek(f.kv_span[0])
        kv = fh.read(f.kv_span[1] - f.kv_span[0])
    header = gio.encode_header(f.version, kv, f.n_kv, specs, [rel[s.name] for s in specs], f.alignment)
    end = max((rel[s.name] + s.nbytes for s in specs), default=0)
    size = len(header) + -(-end // f.alignment) * f.alignment
    return _FilePlan(f, specs, {n: len(header) + o for n, o in rel.items()}, header, size)


@dataclass
class GgufPortResult(PortResult):
    """A GGUF port's result: the port's own keys, plus the files written and per tensor what the
    written type kept of the patch's change."""

    files: list[str] = field(default_factory=list)
    tensors: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        doc = super().as_dict()
        doc["format"] = "gguf"
        doc.update(files=list(self.files), tensors=list(self.tensors), **self.extra)
        return doc


def _patch_sha(patch: Patch) -> str | None:
    try:
        return patch.weights_sha256()
    except OSError:
        return None


def plan_merged(patch: Patch, model: gio.GgufModel, display: str, merged_type: str) -> tuple[CompatReport, GgufTarget, dict[str, int]]:
    if merged_type not in MERGED_TYPES:
        raise UsageError(f"--gguf-merged-type {merged_type!r}: expected one of {', '.join(MERGED_TYPES)}")
    report, tgt = check_fit(patch, model, display)
    report.raise_if_incompatible(display)
    out_types: dict[str, int] = {}
    for module, key in sorted(report.key_map.items()):
        t = model.tensor(key)
        if not _quant_supported(t.type_id, "dequantize"):
            raise UnsupportedError(f"{display}: {key} is stored as {t.type_name}, which the gguf package cannot dequantize",
                                   hint="use --as-adapter --format gguf: llama.cpp applies the LoRA at run time")
        out = written_type(t.type_name, merged_type, t.shape[-1], key)
        tid = gio.type_id(out)
        if not _quant_supported(tid, "quantize"):
            raise UnsupportedError(
                f"{display}: {key}: the gguf package cannot write {out} (llama.cpp's quantizer for it is C only)",
                hint="use --gguf-merged-type q8_0, or --as-adapter --format gguf",
            )
        out_types[key] = tid
    return report, tgt, out_types


def port_gguf_merged(
    patch: Patch,
    target: "Resolved",
    out: Path,
    config: PortConfig | None = None,
    *,
    merged_type: str = "auto",
    progress: ProgressFn | None = None,
    **overrides: Any,
) -> GgufPortResult:
    """Write the GGUF target with the patch merged (see the module docstring). ``config`` is the
    port's (``core.config.PortConfig``: scale, overwrite, verify, patch_source), ``overrides`` its fields."""
    from portllm_cli.io.atomic import atomic_output_dir

    t0 = time.monotonic()
    cfg = PortConfig.build(config, overrides)
    scale, overwrite, verify, patch_source = cfg.scale, cfg.overwrite, cfg.verify, cfg.patch_source
    progress = progress or no_progress
    model = open_target(target.path)
    display = target.display
    report, tgt, out_types = plan_merged(patch, model, display, merged_type)
    by_key = {key: module for module, key in report.key_map.items()}
    plans = [_plan_file(f, {k: v for k, v in out_types.items() if k in f.tensors}) for f in model.files]
    tick = counter(progress, "port", model.total_bytes())
    rows: list[dict[str, Any]] = []
    warnings = list(patch.warnings) + list(report.warnings)
    with atomic_output_dir(out, overwrite=overwrite, inputs=tuple({target.path, patch.path})) as tmp:
        for fp in plans:
            rows += _write_merged_file(fp, tmp / fp.src.path.name, by_key, patch, tgt, scale, tick)
        if verify:
            for i, fp in enumerate(plans):
                _verify_merged_file(fp, tmp / fp.src.path.name, by_key, patch, tgt, scale)
                progress("verify", i + 1, len(plans))
        files = [fp.src.path.name for fp in plans]
        record = {
            "format": "portllm-port", "format_version": 1, "portllm_version": __version__, "created": now_iso(),
            "mode": "merged", "output_format": "gguf", "scale": scale, "gguf_merged_type": merged_type,
            "patch": {"source": patch_source.record_id if patch_source else str(patch.path.resolve()),
                      "sha256": _patch_sha(patch), "base": (patch.manifest or {}).get("base") or {"model": patch.base_model}},
            "target": {"model": target.record_id, "revision": target.revision, "architecture": tgt.arch,
                       "files": [f.path.name for f in model.files]},
            "merged_modules": dict(sorted(report.key_map.items())),
            "tensors": rows,
            "files": files,
        }
        (tmp / PORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        written = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
    low = [r for r in rows if r["change_kept"] is not None and r["change_kept"] < 0.9]
    if low:
        warnings.append(f"{len(low)} merged tensors kept less than 90% of the patch's change in the type they were "
                        f"written in (worst {min(r['change_kept'] for r in low):.2f}, {low[0]['name']}); "
                        "the GGUF LoRA (--as-adapter --format gguf) applies it at full precision")
    return _result(out, "merged", patch, patch_source, display, len(report.key_map), written, t0, scale, verify,
                   warnings, files=files, tensors=rows, extra={"gguf_merged_type": merged_type})


def _write_merged_file(fp: _FilePlan, dst: Path, by_key: dict[str, str], patch: Patch, tgt: GgufTarget,
                       scale: float, tick: Callable[[int], None]) -> list[dict[str, Any]]:
    f = fp.src
    rows = []
    with open(f.path, "rb", buffering=0) as src, open(dst, "wb", buffering=0) as out:
        sfd, ofd = src.fileno(), out.fileno()
        os.ftruncate(ofd, fp.size)  # padding between tensors reads as zeros, as llama.cpp writes it
        if fp.header is None:
            # unchanged layout: every byte outside the targeted tensors is copied as it is
            cursor = 0
            for t in sorted((f.tensors[k] for k in by_key if k in f.tensors), key=lambda t: t.begin):
                copy_range(sfd, ofd, cursor, t.begin - cursor, cursor)
                tick(t.begin - cursor)
                cursor = t.end
            copy_range(sfd, ofd, cursor, f.file_size - cursor, cursor)
            tick(f.file_size - cursor)
        else:
            pwrite_all(ofd, fp.header, 0)
            for name, t in f.tensors.items():
                if name not in by_key:
                    copy_range(sfd, ofd, t.begin, t.nbytes, fp.begins[name])
                    tick(t.nbytes)
        specs = {s.name: s for s in fp.specs}
        for name, t in f.tensors.items():
            if name not in by_key:
                continue
            module = by_key[name]
            m = _gguf_module(patch.modules[module], _perm_for(tgt, name, t.rows))
            tid = specs[name].type_id
            surv = merge_tensor_to(sfd, f.path, t, ofd, fp.begins[name], tid, m, scale, tick)
            rows.append({"name": name, "module": module, "file": f.path.name, "source_type": t.type_name,
                         "written_type": gio.type_table()[tid][0], **surv})
        os.fsync(ofd)
    return rows


def _perm_for(tgt: GgufTarget, name: str, rows: int) -> list[int] | None:
    heads = tgt.heads_for(name)
    return qk_permutation(rows, heads) if heads else None


def _verify_merged_file(fp: _FilePlan, dst: Path, by_key: dict[str, str], patch: Patch, tgt: GgufTarget,
                        scale: float) -> None:
    """Reread the output: valid header, the metadata bytes and every untargeted tensor equal the
    source's, every targeted tensor equals a recomputed merge."""
    import tempfile

    f = fp.src
    back = gio.read_gguf(dst)
    if list(back.tensors) != list(f.tensors):
        raise IntegrityError(f"{dst.name}: the tensor list differs from the target's after writing")
    with open(f.path, "rb", buffering=0) as src, open(dst, "rb", buffering=0) as got:
        sfd, gfd = src.fileno(), got.fileno()
        kv_src = os.pread(sfd, f.kv_span[1] - f.kv_span[0], f.kv_span[0])
        if os.pread(gfd, back.kv_span[1] - back.kv_span[0], back.kv_span[0]) != kv_src:
            raise IntegrityError(f"{dst.name}: the metadata differs from the target's after writing")
        for name, t in f.tensors.items():
            b = back.tensors[name]
            if name not in by_key:
                if b.type_id != t.type_id or not _same(sfd, t.begin, gfd, b.begin, t.nbytes):
                    raise IntegrityError(f"{dst.name}: tensor {name} differs from the target's after writing")
                continue
            m = _gguf_module(patch.modules[by_key[name]], _perm_for(tgt, name, t.rows))
            with tempfile.TemporaryFile() as scratch:
                os.ftruncate(scratch.fileno(), b.nbytes)
                merge_tensor_to(sfd, f.path, t, scratch.fileno(), 0, b.type_id, m, scale, lambda n: None)
                if not _same(scratch.fileno(), 0, gfd, b.begin, b.nbytes):
                    raise IntegrityError(f"{dst.name}: tensor {name} does not equal the recomputed merge after writing")


def _same(a_fd: int, a_off: int, b_fd: int, b_off: int, n: int, step: int = 16 << 20) -> bool:
    pos = 0
    while pos < n:
        k = min(step, n - pos)
        if os.pread(a_fd, k, a_off + pos) != os.pread(b_fd, k, b_off + pos):
            return False
        pos += k
    return True


# -- GGUF LoRA adapter output ---------------------------------------------------------------------
def llama_cpp_scale(alpha: float, rank: int) -> float:
    """The scale llama.cpp gives a module: adapter.lora.alpha / rank (1 when alpha is 0)."""
    return alpha / rank if alpha else 1.0


def adapter_tensors(
    patch: Patch, key_map: dict[str, str], tgt: GgufTarget, *, scale: float, alpha: float,
) -> tuple[list[tuple[str, "np.ndarray"]], int]:
    """(GGUF name, float32 array) for every factor, in llama.cpp's layout, and how many modules
    needed their scale folded into B."""
    import numpy as np
    import torch

    out: list[tuple[str, np.ndarray]] = []
    folded = 0
    for module in sorted(key_map, key=lambda m: _tensor_order(key_map[m])):
        key = key_map[module]
        m = patch.modules[module]
        if m.fan_in_fan_out:
            raise UnsupportedError(f"module {module}: fan_in_fan_out patches are not supported for GGUF output")
        A = m.A.to(torch.float32)
        B = m.B.to(torch.float32)
        want = m.scale * scale
        got = llama_cpp_scale(alpha, m.rank)
        if want != got:
            B = B * (want / got)  # llama.cpp's one alpha/rank, times this, is PEFT's scale
            folded += 1
        perm = _perm_for(tgt, key, int(B.shape[0])) if m.kind == "linear" else None
        if perm is not None:
            B = B[torch.tensor(perm, dtype=torch.long)]
        if m.kind == "embedding":
            # llama.cpp takes token rows of lora_a (ggml_get_rows) and multiplies by lora_b:
            # lora_a is (vocab, r), lora_b (dim, r), the transpose of PEFT's lora_embedding_A
            A = A.T
        out.append((f"{key}.lora_a", np.ascontiguousarray(A.numpy())))
        out.append((f"{key}.lora_b", np.ascontiguousarray(B.numpy())))
    return out, folded


def _tensor_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit():
        return (int(parts[1]), name)
    return (-1 if name.startswith("token_embd") else 1 << 30, name)


def write_adapter(path: Path, tensors: list[tuple[str, "np.ndarray"]], *, arch: str, alpha: float,
                  factor_type: str, meta: dict[str, str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Write a GGUF LoRA adapter file; returns the written tensors' records and any warnings."""
    import numpy as np

    if factor_type not in ADAPTER_TYPES:
        raise UsageError(f"--gguf-lora-type {factor_type!r}: expected one of {', '.join(ADAPTER_TYPES)}")
    warnings: list[str] = []
    specs, blobs, records = [], [], []
    fallback = 0
    for name, arr in tensors:
        tname = factor_type.upper()
        if tname == "Q8_0" and arr.shape[-1] % 32:
            tname, fallback = "F16", fallback + 1  # as llama.cpp's converter does
        tid = gio.type_id(tname)
        data = quantize_rows(arr.astype(np.float32).reshape(arr.shape[0], -1), tid)
        specs.append(gio.TensorSpec(name, tuple(arr.shape), tid, len(data)))
        blobs.append(data)
        records.append({"name": name, "shape": list(arr.shape), "type": tname})
    if fallback:
        warnings.append(f"{fallback} factors have rows shorter than Q8_0's blocks of 32 (the LoRA rank); "
                        "written as F16, as llama.cpp's converter does")
    kv_items: list[tuple[str, int, Any]] = [
        ("general.architecture", gio.T_STRING, arch),
        ("general.type", gio.T_STRING, "adapter"),
        ("adapter.type", gio.T_STRING, "lora"),
        ("adapter.lora.alpha", gio.T_FLOAT32, float(alpha)),  # FLOAT32: llama.cpp aborts on an integer
        ("general.alignment", gio.T_UINT32, gio.DEFAULT_ALIGNMENT),
    ]
    kv_items += [(k, gio.T_STRING, v) for k, v in sorted(meta.items())]
    kv, n_kv = gio.encode_kv(kv_items)
    offsets = gio.layout(specs, gio.DEFAULT_ALIGNMENT)
    header = gio.encode_header(3, kv, n_kv, specs, offsets, gio.DEFAULT_ALIGNMENT)
    with open(path, "wb") as fh:
        fh.write(header)
        pos = 0
        for s, off, data in zip(specs, offsets, blobs):
            fh.write(b"\0" * (off - pos))
            fh.write(data)
            pos = off + len(data)
        fh.write(b"\0" * ((-pos) % gio.DEFAULT_ALIGNMENT))
        fh.flush()
        os.fsync(fh.fileno())
    return records, warnings


def adapter_file_name(out: Path) -> str:
    return f"{Path(out).name}.gguf"


def port_gguf_adapter(
    patch: Patch,
    target: "Resolved",
    out: Path,
    config: PortConfig | None = None,
    *,
    factor_type: str = "f32",
    progress: ProgressFn | None = None,
    **overrides: Any,
) -> GgufPortResult:
    """Write the patch as a GGUF LoRA adapter for TARGET (a GGUF file or a safetensors model).
    ``config`` is the port's (``core.config.PortConfig``), ``overrides`` its fields."""
    from portllm_cli.io.atomic import atomic_output_dir

    t0 = time.monotonic()
    cfg = PortConfig.build(config, overrides)
    scale, overwrite, verify, patch_source = cfg.scale, cfg.overwrite, cfg.verify, cfg.patch_source
    allow_pickle = cfg.allow_pickle
    if factor_type not in ADAPTER_TYPES:
        raise UsageError(f"--gguf-lora-type {factor_type!r}: expected one of {', '.join(ADAPTER_TYPES)}")
    progress = progress or no_progress
    progress("adapter", 0, 3)
    warnings = list(patch.warnings)
    if is_gguf_target(target.path):
        model = open_target(target.path)
        report, tgt = check_fit(patch, model, target.display)
        report.raise_if_incompatible(target.display)
        key_map = dict(report.key_map)
        warnings += report.warnings
    else:
        from portllm_cli.core.port import plan_port

        require_plain_lora(patch, target.display)
        plan: PortPlan = plan_port(patch, target, allow_pickle=allow_pickle, merging=False)
        tgt = target_of_config(plan.ckpt.config, target.display)
        tmap = name_map(tgt.arch, tgt.n_blocks)
        key_map = {}
        for module in plan.key_map:
            key = gguf_name(tmap, module)
            if key is None:
                raise UnsupportedError(f"module {module}: llama.cpp has no {tgt.arch} tensor for it",
                                       hint="drop that module from the patch, or port it as a PEFT adapter")
            key_map[module] = key
        warnings += plan.warnings
    if not key_map:
        raise UsageError("the patch targets no module of the model")
    # one alpha for the file: the patch's own, so that modules without their own rank or alpha
    # need no folding (llama.cpp divides by each module's rank itself)
    alpha = float(patch.alpha)
    tensors, folded = adapter_tensors(patch, key_map, tgt, scale=scale, alpha=alpha)
    progress("adapter", 1, 3)
    meta = {
        "general.name": f"portllm patch for {Path(str(target.record_id)).name}",
        "portllm.version": __version__,
        "portllm.patch.sha256": _patch_sha(patch) or "",
        "portllm.patch.base": str(patch.base_model or ""),
        "portllm.target": str(target.record_id),
        "portllm.scale": repr(scale),
    }
    name = adapter_file_name(out)
    with atomic_output_dir(out, overwrite=overwrite, inputs=tuple({target.path, patch.path})) as tmp:
        records, w = write_adapter(tmp / name, tensors, arch=tgt.arch, alpha=alpha, factor_type=factor_type, meta=meta)
        warnings += w
        progress("adapter", 2, 3)
        if verify:
            _verify_adapter(tmp / name, tensors, records)
        written = (tmp / name).stat().st_size
        progress("adapter", 3, 3)
    extra = {"adapter_file": str(Path(out) / name), "architecture": tgt.arch, "lora_alpha": alpha,
             "modules_folded": folded, "gguf_lora_type": factor_type}
    return _result(out, "adapter", patch, patch_source, target.display, len(key_map), written, t0, scale, verify,
                   warnings, files=[name], tensors=records, extra=extra)


def _result(out: Path, mode: str, patch: Patch, patch_source: Any, target: str, modules: int, written: int,
            t0: float, scale: float, verified: bool, warnings: list[str], **gguf: Any) -> GgufPortResult:
    # the effect check: check_fit refuses a module that lands nowhere and require_plain_lora any part
    # that is not a factor, so both factors of every module were used
    return GgufPortResult(out, mode, patch_source.display if patch_source else str(patch.path), target, modules,
                          written, time.monotonic() - t0, scale, verified, warnings, None, 2 * modules, 2 * modules,
                          **gguf)


def _verify_adapter(path: Path, tensors: list[tuple[str, "np.ndarray"]], records: list[dict[str, Any]]) -> None:
    back = gio.read_gguf(path)
    if list(back.tensors) != [n for n, _ in tensors]:
        raise IntegrityError(f"{path.name}: the tensor list differs after writing")
    with open(path, "rb", buffering=0) as fh:
        for (name, arr), rec in zip(tensors, records):
            t = back.tensors[name]
            data = quantize_rows(arr.reshape(arr.shape[0], -1), gio.type_id(rec["type"]))
            if t.shape != tuple(arr.shape) or os.pread(fh.fileno(), t.nbytes, t.begin) != data:
                raise IntegrityError(f"{path.name}: tensor {name} differs after writing")


# -- targets --------------------------------------------------------------------------------------
def is_gguf_target(path: Path) -> bool:
    return Path(path).suffix == ".gguf" and not Path(path).is_dir()


def gguf_in_dir(path: Path, gguf_file: str | None) -> Path | None:
    """The GGUF file a --to directory stands for: --gguf-file NAME inside it, else its one GGUF
    (or split set) when it holds no safetensors; None for a safetensors model."""
    from portllm_cli.io.checkpoint import safe_member

    path = Path(path)
    if gguf_file is not None:
        f = safe_member(path, gguf_file, "--gguf-file") if path.is_dir() else None
        if f is None:
            raise UsageError(f"--gguf-file {gguf_file}: --to {path} is not a directory")
        if not f.is_file():
            raise InvalidInputError(f"{f}: no such GGUF file in {path}")
        return f
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return None
    ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
    firsts = [p for p in ggufs if not gio.SPLIT_RE.match(p.name) or gio.SPLIT_RE.match(p.name).group("no") == "00001"]
    if len(firsts) > 1:
        raise UsageError(f"{path}: holds several GGUF files ({', '.join(p.name for p in firsts[:4])})",
                         hint="name one with --gguf-file NAME")
    return firsts[0] if firsts else None
