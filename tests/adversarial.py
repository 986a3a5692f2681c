"""Small valid inputs to break on purpose: a patch, a sharded checkpoint, raw safetensors bytes.

Built with portllm's own writers (no PEFT, no transformers) so each takes milliseconds; the
robustness and fuzz tests mutate copies of them.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")
IN_DIM, OUT_DIM, RANK = 8, 6, 2


def patch_tensors(seed: int = 0, modules=MODULES, rank: int = RANK) -> dict:
    import torch

    from portllm_cli.patch.format import peft_key

    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        out[peft_key(m, "A")] = torch.randn(rank, IN_DIM, generator=g)
        out[peft_key(m, "B")] = torch.randn(OUT_DIM, rank, generator=g)
    return out


def make_patch(out: Path, *, seed: int = 0, tensors: dict | None = None, config_overrides: dict | None = None) -> Path:
    """A valid portllm patch directory (adapter_config.json, adapter_model.safetensors, portllm.json)."""
    from portllm_cli.io.atomic import atomic_output_dir
    from portllm_cli.patch.format import adapter_config, build_manifest, write_patch_files

    tensors = patch_tensors(seed) if tensors is None else tensors
    cfg = adapter_config(base_model="tiny/base", rank=RANK, alpha=4.0, target_modules=["q_proj", "v_proj"])
    cfg.update(config_overrides or {})
    manifest = build_manifest(
        base={"model": "tiny/base", "revision": None, "content_hash": None, "fingerprint": {"model_type": "llama"}},
        lora={"rank": RANK, "alpha": 4.0, "use_rslora": False, "target_modules": ["q_proj", "v_proj"]},
        source={"kind": "test"},
    )
    with atomic_output_dir(Path(out)) as tmp:
        write_patch_files(tmp, tensors, cfg, manifest)
    return Path(out)


def reseal(patch_dir: Path) -> None:
    """Recompute the manifest's sha256 after changing the weights (a consistent, tampered patch)."""
    m = json.loads((patch_dir / "portllm.json").read_text())
    m["tensors"]["sha256"] = hashlib.sha256((patch_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
    (patch_dir / "portllm.json").write_text(json.dumps(m))


def make_checkpoint(out: Path, *, shards: int = 2, seed: int = 0) -> Path:
    """A sharded safetensors 'model' with an index and a config (enough for Checkpoint.open)."""
    import torch

    from portllm_cli.io.safetensors import save_tensors

    out = Path(out)
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {
            f"model.layers.{s}.self_attn.q_proj.weight": torch.randn(OUT_DIM, IN_DIM, generator=g),
            f"model.layers.{s}.self_attn.v_proj.weight": torch.randn(OUT_DIM, IN_DIM, generator=g),
        }
        save_tensors(out / fname, tensors)
        weight_map.update({k: fname for k in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": IN_DIM, "vocab_size": 64})
    )
    return out


def raw_safetensors(header: object, data: bytes = b"") -> bytes:
    """Bytes of a safetensors file with an arbitrary (possibly lying) header."""
    if not isinstance(header, (bytes, str)):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header)) + header + data


def split_safetensors(blob: bytes) -> tuple[bytes, bytes]:
    """(header JSON bytes, data bytes) of a well-formed file."""
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[8 : 8 + n], blob[8 + n :]


def tree_state(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) mapped to its sha256: the state of the disk."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = "dir"
    return out
