"""Tiny GGUF models for tests, written with the ``gguf`` package's own writer, as llama.cpp's
``convert_hf_to_gguf.py`` would write them (names from the package's map, q/k rows permuted for
Llama with the converter's own reshape), and an F32 copy of a GGUF for the llama.cpp oracle.

Independent of portllm's GGUF code: nothing here imports portllm_cli.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# transformers model_type -> GGUF architecture (how llama.cpp's converter registers them)
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}


def converter_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _state_dict(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def write_gguf(model_dir: Path, out: Path, *, types: dict[str, str] | None = None, default: str = "F32",
               split_max_tensors: int = 0, tokenizer: bool = False) -> list[Path]:
    """Convert a tiny safetensors model to GGUF. ``types`` maps a substring of a GGUF tensor name
    to its ggml type (e.g. {"attn_q": "Q4_1"}); 1-D tensors stay F32, as llama.cpp keeps norms."""
    import gguf

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    mt = cfg["model_type"]
    arch = ARCH[mt]
    n_layers = cfg["num_hidden_layers"]
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads")
    tmap = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_layers)
    w = gguf.GGUFWriter(out, arch, split_max_tensors=split_max_tensors)
    w.add_block_count(n_layers)
    w.add_context_length(cfg.get("max_position_embeddings", 256))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv or n_head)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    w.add_rope_freq_base(float(rope))
    w.add_vocab_size(cfg["vocab_size"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    w.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(cfg.get("sliding_window") or 16)
    if tokenizer:  # the model's byte-level BPE, as the converter stores a gpt2-style tokenizer
        tj = json.loads((Path(model_dir) / "tokenizer.json").read_text())
        vocab = tj["model"]["vocab"]
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        for added in tj.get("added_tokens", []):
            if added["id"] >= len(tokens):
                tokens.append(added["content"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([1] * len(tokens))
        w.add_token_merges(merges)
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
        w.add_pad_token_id(1)
    else:
        w.add_tokenizer_model("none")  # tests feed token ids; llama.cpp loads a model without a vocabulary
    w.add_file_type(0)
    for name, t in _state_dict(model_dir).items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        base, suffix = name.rsplit(".", 1)
        gname = tmap.get_name(base)
        assert gname is not None, name
        t = t.astype(np.float32)
        if arch == "llama" and base.endswith("q_proj"):
            t = converter_permute(t, n_head, n_head)
        if arch == "llama" and base.endswith("k_proj"):
            t = converter_permute(t, n_head, n_kv)
        if arch == "gemma3" and "norm" in gname:
            t = t + 1  # the converter stores Gemma's norms as 1 + w
        key = f"{gname}.{suffix}"
        qtype = default if t.ndim > 1 else "F32"
        for pat, ty in (types or {}).items():
            if pat in key and t.ndim > 1:
                qtype = ty
        qt = gguf.GGMLQuantizationType[qtype]
        if qtype == "F32":
            w.add_tensor(key, t)
        elif qtype == "F16":
            w.add_tensor(key, t.astype(np.float16))
        elif qtype == "Q4_K":  # the gguf package cannot quantize K-quants: blocks with plain scales
            w.add_tensor(key, _q4_k_blocks(t), raw_dtype=qt)
        else:
            w.add_tensor(key, gguf.quants.quantize(t, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if split_max_tensors:
        return sorted(Path(out).parent.glob(Path(out).stem + "-*-of-*.gguf"))
    return [Path(out)]


def _q4_k_blocks(t: np.ndarray) -> np.ndarray:
    """Valid Q4_K data for a tensor's shape (d = 1/64, dmin = 0, scales 1, random 4-bit values)."""
    rng = np.random.default_rng(0)
    n_blocks = t.size // 256
    blocks = np.zeros((n_blocks, 144), dtype=np.uint8)
    blocks[:, 0:2] = np.frombuffer(np.float16(1 / 64).tobytes(), dtype=np.uint8)
    blocks[:, 4:8] = 1  # 6-bit scales of the first four sub-blocks
    blocks[:, 12:16] = 1  # the low bits of the last four
    blocks[:, 16:] = rng.integers(0, 256, size=(n_blocks, 128), dtype=np.uint8)
    return blocks.reshape(t.shape[0], -1)


def f32_copy(src: Path, out: Path) -> Path:
    """The same model with every tensor dequantized to F32 and the metadata kept (gguf's reader
    and writer only)."""
    import gguf

    r = gguf.GGUFReader(src)
    arch = str(bytes(r.fields["general.architecture"].parts[-1]), "utf-8")
    w = gguf.GGUFWriter(out, arch)
    for key, fld in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment", "general.file_type"):
            continue
        vtype = fld.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = fld.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                val = [str(bytes(fld.parts[i]), "utf-8") for i in fld.data]
            else:
                val = [fld.parts[i].tolist()[0] for i in fld.data]
            w.add_key_value(key, val, vtype, sub_type=sub)
        elif vtype == gguf.GGUFValueType.STRING:
            w.add_key_value(key, str(bytes(fld.parts[-1]), "utf-8"), vtype)
        else:
            w.add_key_value(key, fld.parts[-1].tolist()[0], vtype)
    w.add_file_type(0)
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        w.add_tensor(t.name, np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)
