"""GGUF targets and GGUF LoRA output (issue 17), on tiny GGUF files the suite writes with the
``gguf`` package (tests/gguf_fixtures.py, as llama.cpp's converter writes them).

References are independent of portllm's GGUF code: the ``gguf`` package's reader, dequantizer
and quantizer, PEFT (merge_and_unload / logits), transformers' own GGUF loader, and, where the
``llamacpp`` extra is installed, a real llama.cpp (tests/llamacpp_oracle.py, in a child process).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import gguf_fixtures as gf
from tests import tiny

gguf = pytest.importorskip("gguf")
TOKENS = [[1, 5, 30, 100, 7, 9, 44, 3], [3, 200, 17, 64]]


run, ok = tiny.run, tiny.ok


def one_error_line(res, code: int, needle: str = "") -> None:
    assert res.exit_code == code, (res.exit_code, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines and lines[0].startswith("Error: "), res.stderr
    assert "Traceback" not in res.stderr and needle in res.stderr, res.stderr


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    """Tiny llama / qwen2 / gemma3 models (safetensors) and their F32 GGUF conversions."""
    root = tmp_path_factory.mktemp("gguf-models")
    out = {}
    for arch in ("llama", "qwen2", "gemma"):
        d = root / arch
        tiny.make_model(d, arch, tokenizer_from=tokenizer_dir, seed=11)
        g = root / f"{arch}-gguf" / f"{arch}.gguf"
        g.parent.mkdir()
        gf.write_gguf(d, g)
        out[arch] = (d, g)
    return out


LORA_KW = dict(targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"), rank=4, alpha=8.0,
               rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3.0})


@pytest.fixture(scope="module")
def loras(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("gguf-loras")
    out = {}
    for arch, (d, _) in models.items():
        out[arch] = root / arch
        tiny.make_lora(d, out[arch], seed=5, **LORA_KW)
    out["llama-rslora"] = root / "llama-rslora"
    tiny.make_lora(models["llama"][0], out["llama-rslora"], seed=6, use_rslora=True, targets=("q_proj", "k_proj"),
                   rank=4, alpha=6.0)
    return out


def peft_logits(model_dir: Path, lora_dir: Path | None) -> np.ndarray:
    import torch
    import transformers as tf
    from peft import PeftModel

    m = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if lora_dir is not None:
        m = PeftModel.from_pretrained(m, lora_dir)
    with torch.no_grad():
        return np.concatenate([m(torch.tensor([t])).logits[0].numpy() for t in TOKENS])


def gguf_logits(gguf_file: Path) -> np.ndarray:
    """transformers' own GGUF loader (it undoes llama.cpp's q/k permutation itself)."""
    import torch
    import transformers as tf

    m = tf.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    with torch.no_grad():
        return np.concatenate([m(torch.tensor([t])).logits[0].numpy() for t in TOKENS])


def read_fields(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: (f.types, [bytes(p) for p in f.parts]) for k, f in r.fields.items() if not k.startswith("GGUF.")}


def field_value(path: Path, key: str):
    f = gguf.GGUFReader(path).fields[key]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return str(bytes(f.parts[-1]), "utf-8")
    return f.parts[-1].tolist()[0]


def apply_gguf_lora(model_gguf: Path, adapter: Path, out: Path) -> Path:
    """An F32 GGUF with a GGUF LoRA applied the way llama.cpp applies it at run time
    (W + alpha/rank * B @ A, rank = lora_b's width; token_embd rows take lora_a's rows),
    written with the gguf package: an independent reader of portllm's adapter."""
    ra = gguf.GGUFReader(adapter)
    assert field_value(adapter, "general.type") == "adapter" and field_value(adapter, "adapter.type") == "lora"
    assert ra.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    alpha = field_value(adapter, "adapter.lora.alpha")
    fac = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
           for t in ra.tensors}
    rm = gguf.GGUFReader(model_gguf)
    arch = field_value(model_gguf, "general.architecture")
    assert field_value(adapter, "general.architecture") == arch
    w = gguf.GGUFWriter(out, arch)
    for key, f in rm.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment"):
            continue
        if f.types[0] == gguf.GGUFValueType.STRING:
            w.add_key_value(key, str(bytes(f.parts[-1]), "utf-8"), f.types[0])
        elif f.types[0] != gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, f.parts[-1].tolist()[0], f.types[0])
    used = set()
    for t in rm.tensors:
        W = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)]).astype(np.float32)
        a, b = fac.get(t.name + ".lora_a"), fac.get(t.name + ".lora_b")
        if a is not None:
            used.add(t.name)
            s = alpha / b.shape[1] if alpha else 1.0
            W = W + s * (a @ b.T if t.name == "token_embd.weight" else b @ a)
        w.add_tensor(t.name, np.ascontiguousarray(W, dtype=np.float32))
    assert used == {n.rsplit(".", 1)[0] for n in fac}, "adapter names a tensor the model does not have"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# -- the reader against the gguf package's ---------------------------------------------------------
def test_reader_matches_the_gguf_package(models, tmp_path):
    from portllm_cli.io.gguf import read_gguf

    d, _ = models["llama"]
    path = tmp_path / "q.gguf"
    gf.write_gguf(d, path, types={"attn_q": "Q4_1", "attn_k": "Q8_0", "attn_v": "F16", "ffn_down": "Q5_0"})
    mine = read_gguf(path)
    ref = gguf.GGUFReader(path)
    assert list(mine.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        m = mine.tensors[t.name]
        assert (m.type_name, m.begin, m.nbytes) == (t.tensor_type.name, t.data_offset, t.n_bytes)
        assert m.shape == tuple(int(x) for x in reversed(t.shape))
    assert mine.get("llama.attention.head_count") == 4 and mine.get("general.architecture") == "llama"


# -- GGUF LoRA adapters ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_gguf_lora_applied_as_llama_cpp_does_matches_peft(arch, models, loras, tmp_path):
    """Names (the gguf package's map for Llama, Qwen2 and Gemma 3), q/k permutation (Llama), rank
    and alpha patterns folded: the adapter, applied as llama.cpp applies it, gives PEFT's logits."""
    d, g = models[arch]
    doc = ok("port", "-p", loras[arch], "--to", g, "--as-adapter", "--format", "gguf", "-o", tmp_path / "a", "--verify")
    adapter = Path(doc["adapter_file"])
    assert adapter == tmp_path / "a" / "a.gguf" and doc["format"] == "gguf"
    assert doc["architecture"] == {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma3"}[arch]
    names = {t["name"] for t in doc["tensors"]}
    assert "blk.1.attn_k.weight.lora_b" in names and "blk.0.ffn_down.weight.lora_a" in names
    # only v_proj (its own alpha) needs folding: llama.cpp divides by each module's own rank (k_proj's 2)
    assert doc["modules_folded"] == 2
    merged = apply_gguf_lora(g, adapter, tmp_path / "m" / "merged.gguf") if (tmp_path / "m").mkdir() is None else None
    want = peft_logits(d, loras[arch])
    got = gguf_logits(merged)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
    assert np.abs(want - peft_logits(d, None)).max() > 0.05  # the patch changes something


def test_rslora_and_scale_are_folded(models, loras, tmp_path):
    d, g = models["llama"]
    doc = ok("port", "-p", loras["llama-rslora"], "--to", g, "--as-adapter", "--format", "gguf", "-o", tmp_path / "a",
             "--scale", "0.25")
    assert doc["modules_folded"] == 4 and doc["lora_alpha"] == 6.0
    (tmp_path / "m").mkdir()
    got = gguf_logits(apply_gguf_lora(g, Path(doc["adapter_file"]), tmp_path / "m" / "m.gguf"))
    import torch
    from peft import PeftModel
    import transformers as tf

    base = peft_logits(d, None)
    full = peft_logits(d, loras["llama-rslora"])
    # rsLoRA's alpha/sqrt(r) times --scale 0.25 differs from llama.cpp's alpha/r: folded into B;
    # the reference is PEFT with its own scaling times 0.25
    import peft

    pm = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), loras["llama-rslora"])
    for mod in pm.modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer):
            mod.scaling = {k: v * 0.25 for k, v in mod.scaling.items()}
    with torch.no_grad():
        want = np.concatenate([pm(torch.tensor([t])).logits[0].numpy() for t in TOKENS])
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
    assert np.abs(full - base).max() > np.abs(want - base).max() > 0


def test_safetensors_target_gives_the_same_adapter(models, loras, tmp_path):
    d, g = models["llama"]
    a = ok("port", "-p", loras["llama"], "--to", g, "--as-adapter", "--format", "gguf", "-o", tmp_path / "x")
    b = ok("port", "-p", loras["llama"], "--to", d, "--as-adapter", "--format", "gguf", "-o", tmp_path / "y")
    ra, rb = gguf.GGUFReader(a["adapter_file"]), gguf.GGUFReader(b["adapter_file"])
    assert [t.name for t in ra.tensors] == [t.name for t in rb.tensors]
    for x, y in zip(ra.tensors, rb.tensors):
        assert bytes(x.data) == bytes(y.data), x.name


@pytest.mark.parametrize("ftype,qtype", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_factor_types(models, loras, tmp_path, ftype, qtype):
    d, g = models["llama"]
    doc = ok("port", "-p", loras["llama"], "--to", g, "--as-adapter", "--format", "gguf", "-o", tmp_path / "a",
             "--gguf-lora-type", ftype, "--verify")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(doc["adapter_file"]).tensors}
    # lora_a rows are the model's width (32); lora_b rows are the rank (2 or 4): too short for Q8_0
    assert types["blk.0.attn_q.weight.lora_a"] == qtype
    assert types["blk.0.attn_q.weight.lora_b"] == ("F16" if qtype == "Q8_0" else qtype)
    if qtype == "Q8_0":
        assert any("F16" in w for w in doc["warnings"])
    (tmp_path / "m").mkdir()
    got = gguf_logits(apply_gguf_lora(g, Path(doc["adapter_file"]), tmp_path / "m" / "m.gguf"))
    want = peft_logits(d, loras["llama"])
    assert np.corrcoef((got - peft_logits(d, None)).ravel(), (want - peft_logits(d, None)).ravel())[0, 1] > 0.999


def test_embedding_lora(models, tmp_path, tokenizer_dir):
    d, g = models["qwen2"]
    lora = tmp_path / "lora"
    tiny.make_lora(d, lora, targets=("embed_tokens", "q_proj"), rank=4, alpha=4.0, seed=9)
    doc = ok("port", "-p", lora, "--to", g, "--as-adapter", "--format", "gguf", "-o", tmp_path / "a")
    shapes = {t["name"]: t["shape"] for t in doc["tensors"]}
    assert shapes["token_embd.weight.lora_a"] == [tiny.VOCAB, 4] and shapes["token_embd.weight.lora_b"] == [32, 4]
    (tmp_path / "m").mkdir()
    got = gguf_logits(apply_gguf_lora(g, Path(doc["adapter_file"]), tmp_path / "m" / "m.gguf"))
    np.testing.assert_allclose(got, peft_logits(d, lora), rtol=0, atol=2e-4)


# -- merged GGUF -----------------------------------------------------------------------------------
QUANT = {"attn_q": "Q4_1", "attn_k": "Q8_0", "attn_v": "F16", "attn_output": "BF16", "ffn_down": "Q5_0", "ffn_up": "Q4_0"}


@pytest.fixture(scope="module")
def quant_llama(models, tmp_path_factory):
    d, _ = models["llama"]
    g = tmp_path_factory.mktemp("qllama") / "llama-mixed.gguf"
    gf.write_gguf(d, g, types=QUANT)
    return g


def _tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _independent_merge(W_gguf: np.ndarray, hf_delta: np.ndarray, name: str, n_head=4, n_kv=2) -> np.ndarray:
    """W (dequantized GGUF rows) + PEFT's delta in the GGUF's row order (the converter's permute)."""
    if name.endswith("attn_q.weight"):
        hf_delta = gf.converter_permute(hf_delta, n_head, n_head)
    elif name.endswith("attn_k.weight"):
        hf_delta = gf.converter_permute(hf_delta, n_head, n_kv)
    return W_gguf + hf_delta


def _peft_deltas(d: Path, lora: Path) -> dict:
    """{GGUF tensor name: merged - base} from PEFT's merge_and_unload on the safetensors model."""
    import torch
    import transformers as tf
    from peft import PeftModel

    base = tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    sd0 = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, lora).merge_and_unload().state_dict()
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    out = {}
    for k, v in merged.items():
        if not torch.equal(v, sd0[k]):
            out[tmap.get_name(k.rsplit(".", 1)[0]) + ".weight"] = (v.double() - sd0[k].double()).numpy()
    return out


def test_merged_gguf_layout_and_values(models, loras, quant_llama, tmp_path):
    d, _ = models["llama"]
    doc = ok("port", "-p", loras["llama"], "--to", quant_llama, "-o", tmp_path / "out", "--verify")
    out = tmp_path / "out" / quant_llama.name
    assert doc["mode"] == "merged" and doc["files"] == [quant_llama.name] and doc["verified"]
    assert json.loads((tmp_path / "out" / "portllm_port.json").read_text())["mode"] == "merged"
    assert read_fields(out) == read_fields(quant_llama)  # metadata byte for byte
    src, dst = _tensors(quant_llama), _tensors(out)
    deltas = _peft_deltas(d, loras["llama"])
    assert list(src) == list(dst)
    want_type = {"Q4_1": "Q8_0", "Q5_0": "Q8_0", "Q4_0": "Q8_0", "Q8_0": "Q8_0", "F16": "F16", "BF16": "BF16", "F32": "F32"}
    rows = {r["name"]: r for r in doc["tensors"]}
    assert set(rows) == set(deltas)
    for name, t in src.items():
        o = dst[name]
        if name not in deltas:
            assert o.tensor_type == t.tensor_type and bytes(o.data) == bytes(t.data), name
            continue
        assert o.tensor_type.name == want_type[t.tensor_type.name] == rows[name]["written_type"], name
        W = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        exact = _independent_merge(W, deltas[name], name)
        indep = gguf.quants.dequantize(gguf.quants.quantize(exact.astype(np.float32), o.tensor_type), o.tensor_type)
        got = gguf.quants.dequantize(o.data, o.tensor_type)
        err_got, err_indep = np.linalg.norm(got - exact), np.linalg.norm(indep - exact)
        assert err_got <= err_indep * 1.01 + 1e-6, (name, err_got, err_indep)
        assert rows[name]["change_kept"] > 0.99, rows[name]


def test_merged_type_choices(models, loras, quant_llama, tmp_path):
    keep = ok("port", "-p", loras["llama"], "--to", quant_llama, "-o", tmp_path / "k", "--gguf-merged-type", "keep")
    kinds = {r["source_type"]: r["written_type"] for r in keep["tensors"]}
    assert kinds["Q4_1"] == "Q4_1" and kinds["Q5_0"] == "Q5_0"
    auto = ok("port", "-p", loras["llama"], "--to", quant_llama, "-o", tmp_path / "a")
    by_keep = {r["name"]: r for r in keep["tensors"]}
    by_auto = {r["name"]: r for r in auto["tensors"]}
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight"):  # Q4_1, Q5_0: 4-5 bits lose more of the change
        assert by_keep[name]["change_error"] > 3 * by_auto[name]["change_error"], (by_keep[name], by_auto[name])
    f16 = ok("port", "-p", loras["llama"], "--to", quant_llama, "-o", tmp_path / "f", "--gguf-merged-type", "f16")
    assert {r["written_type"] for r in f16["tensors"]} == {"F16"}
    res = run("port", "-p", loras["llama"], "--to", quant_llama, "-o", tmp_path / "x", "--gguf-merged-type", "q3")
    one_error_line(res, 2, "--gguf-merged-type")


def test_k_quant_keep_is_refused(models, loras, tmp_path, tokenizer_dir):
    # a model wide enough for Q4_K's 256-value blocks
    d = tmp_path / "wide"
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=tiny.VOCAB, tie_word_embeddings=False)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    g = tmp_path / "w.gguf"
    gf.write_gguf(d, g, types={"attn_q": "Q4_K"})  # gguf cannot quantize Q4_K: the fixture writes valid blocks itself
    lora = tmp_path / "lora"
    tiny.make_lora(d, lora, targets=("q_proj",), rank=4, alpha=8.0)
    res = run("port", "-p", lora, "--to", g, "-o", tmp_path / "o", "--gguf-merged-type", "keep")
    one_error_line(res, 1, "cannot write Q4_K")
    assert not (tmp_path / "o").exists()
    doc = ok("port", "-p", lora, "--to", g, "-o", tmp_path / "o2")
    assert {r["written_type"] for r in doc["tensors"]} == {"Q8_0"}


def test_split_in_split_out(models, loras, quant_llama, tmp_path):
    d, _ = models["llama"]
    parts = gf.write_gguf(d, tmp_path / "s" / "m.gguf", types=QUANT, split_max_tensors=8) if (tmp_path / "s").mkdir() is None else []
    assert len(parts) >= 3 and parts[0].name.endswith("-00001-of-%05d.gguf" % len(parts))
    doc = ok("port", "-p", loras["llama"], "--to", parts[0], "-o", tmp_path / "out", "--verify")
    assert doc["files"] == [p.name for p in parts]
    single = ok("port", "-p", loras["llama"], "--to", quant_llama, "-o", tmp_path / "one")
    ref = _tensors(tmp_path / "one" / quant_llama.name)
    seen = {}
    for p in parts:
        assert read_fields(tmp_path / "out" / p.name) == read_fields(p)
        seen.update(_tensors(tmp_path / "out" / p.name))
    assert set(seen) == set(ref)
    for name, t in ref.items():
        assert bytes(seen[name].data) == bytes(t.data) and seen[name].tensor_type == t.tensor_type, name
    assert single["modules_merged"] == doc["modules_merged"]


def test_misfits_exit_3(models, loras, tmp_path):
    _, g_llama = models["llama"]
    res = run("port", "-p", loras["qwen2"], "--to", models["qwen2"][1].parent / "nope.gguf", "-o", tmp_path / "o")
    assert res.exit_code == 1  # no such file
    wide = tmp_path / "wide"
    tiny.make_model(wide, "llama", seed=1)
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=tiny.VOCAB, tie_word_embeddings=False)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(wide)
    gw = tmp_path / "wide.gguf"
    gf.write_gguf(wide, gw)
    for extra in ([], ["--as-adapter"]):
        res = run("port", "-p", loras["llama"], "--to", gw, "-o", tmp_path / "o", *extra)
        one_error_line(res, 3, "patch does not fit")
        assert not (tmp_path / "o").exists()


def test_lm_head_on_tied_gguf_is_a_misfit(models, tmp_path):
    d, g = models["gemma"]  # tied embeddings: no output.weight in the GGUF
    lora = tmp_path / "lora"
    tiny.make_lora(d, lora, targets=("lm_head",), rank=2, alpha=2.0)
    res = run("port", "-p", lora, "--to", g, "--as-adapter", "-o", tmp_path / "o")
    one_error_line(res, 3, "output projection")


def _corrupt(src: Path, dst: Path, edit) -> Path:
    raw = bytearray(src.read_bytes())
    edit(raw)
    dst.write_bytes(bytes(raw))
    return dst


def test_truncated_or_lying_gguf_is_refused(models, loras, tmp_path):
    from portllm_cli.io.gguf import read_gguf

    _, g = models["llama"]
    info = read_gguf(g)
    first = next(iter(info.tensors.values()))
    name_len = len(first.name.encode())
    cases = {
        "truncated.gguf": lambda r: r.__delitem__(slice(len(r) - 100, None)),
        "header-cut.gguf": lambda r: r.__delitem__(slice(info.kv_span[0] + 40, None)),
        "kv-count.gguf": lambda r: r.__setitem__(slice(16, 24), struct.pack("<Q", 1 << 40)),
        "tensor-count.gguf": lambda r: r.__setitem__(slice(8, 16), struct.pack("<Q", 5000)),
        # the first tensor's offset (after name, n_dims, dims, type) pointed past the end
        "offset.gguf": lambda r: r.__setitem__(
            slice(info.infos_span[0] + 8 + name_len + 4 + 8 * len(first.shape) + 4,
                  info.infos_span[0] + 8 + name_len + 4 + 8 * len(first.shape) + 12), struct.pack("<Q", 1 << 30)),
        # a string length far beyond the file
        "string.gguf": lambda r: r.__setitem__(slice(info.kv_span[0], info.kv_span[0] + 8), struct.pack("<Q", 1 << 50)),
    }
    for name, edit in cases.items():
        bad = _corrupt(g, tmp_path / name, edit)
        for extra in ([], ["--as-adapter"]):
            res = run("port", "-p", loras["llama"], "--to", bad, "-o", tmp_path / "o", *extra)
            one_error_line(res, 4)
        assert not (tmp_path / "o").exists()
    res = run("port", "-p", loras["llama"], "--to", _corrupt(g, tmp_path / "x.gguf", lambda r: r.__setitem__(slice(0, 4), b"GGUX")),
              "-o", tmp_path / "o")
    one_error_line(res, 1, "not a GGUF file")


def test_out_with_gguf_suffix_and_format_checks(models, loras, tmp_path):
    _, g = models["llama"]
    one_error_line(run("port", "-p", loras["llama"], "--to", g, "--as-adapter", "-o", tmp_path / "x.gguf"), 2, "directory")
    one_error_line(run("port", "-p", loras["llama"], "--to", g, "--format", "gguf", "-o", tmp_path / "x"), 2, "--as-adapter")
    one_error_line(run("port", "-p", loras["llama"], "--to", g, "--as-adapter", "--format", "peft", "-o", tmp_path / "x"), 2)


def test_gguf_file_in_a_directory(models, loras, tmp_path):
    _, g = models["llama"]
    doc = ok("port", "-p", loras["llama"], "--to", g.parent, "--gguf-file", g.name, "--as-adapter", "-o", tmp_path / "a")
    assert doc["target"] == str(g) and Path(doc["adapter_file"]).is_file()
    doc = ok("port", "-p", loras["llama"], "--to", g.parent, "--as-adapter", "-o", tmp_path / "b")  # its one GGUF
    assert Path(doc["adapter_file"]).is_file()


def test_arch_table_agrees_with_transformers():
    """Which GGUF architectures store q/k permuted: transformers' GGUF loader undoes it exactly there."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, LlamaTensorProcessor

    from portllm_cli.core.gguf_port import ARCH_PERMUTES_QK, qk_permutation

    for arch, permutes in ARCH_PERMUTES_QK.items():
        assert (TENSOR_PROCESSORS.get(arch) is LlamaTensorProcessor) == permutes, arch
    rows = np.arange(48 * 3, dtype=np.float32).reshape(48, 3)
    perm = qk_permutation(48, 3)
    np.testing.assert_array_equal(rows[perm], gf.converter_permute(rows, 3, 3))


# -- diff and eval ---------------------------------------------------------------------------------
def test_diff_patch_against_gguf(models, loras, tmp_path):
    _, g = models["llama"]
    doc = ok("diff", loras["llama"], g)
    assert doc["verdict"] == "compatible" and doc["targeted"]["model.layers.0.self_attn.q_proj"] == "blk.0.attn_q.weight"
    d, g = models["gemma"]  # tied: no output.weight for an lm_head module
    lora = tmp_path / "lm_head"
    tiny.make_lora(d, lora, targets=("lm_head",), rank=2, alpha=2.0)
    res = run("diff", lora, g, "--json")
    assert res.exit_code == 3, res.stderr
    assert json.loads(res.stdout)["verdict"] == "incompatible"


def test_eval_scores_a_gguf_target(models, loras, tmp_path):
    from portllm_cli.core.evaluate import evaluate

    data = tmp_path / "sst2.jsonl"
    data.write_text("".join(json.dumps({"sentence": s, "label": y}) + "\n" for s, y in tiny.SENTENCES))
    d, _ = models["llama"]
    g = tmp_path / "tok" / "llama.gguf"
    g.parent.mkdir()
    gf.write_gguf(d, g, tokenizer=True)
    rep = evaluate([str(g)], [str(loras["llama"])], ["sst2"], data={"sst2": data}, batch_size=4, device="cpu")
    names = [r.name for r in rep.rows]
    assert names == [str(g), f"{g}+{loras['llama']}"]
    assert all(r.scores["sst2"]["n"] == len(tiny.SENTENCES) for r in rep.rows)


# -- a real llama.cpp as the oracle ----------------------------------------------------------------
def _have_llama_cpp() -> bool:
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from llamacpp_oracle import find_library
    finally:
        sys.path.pop(0)
    return find_library() is not None


llamacpp = pytest.mark.skipif(not _have_llama_cpp(), reason="needs llama.cpp: pip install --no-deps llama-cpp-cffi==0.4.42 cffi")


def llama_cpp_logits(model: Path, tmp: Path, *lora: Path, tokens=TOKENS) -> np.ndarray:
    (tmp / "tokens.json").write_text(json.dumps(tokens))
    out = tmp / f"logits-{len(list(tmp.glob('logits-*')))}.npy"
    cmd = [sys.executable, str(Path(__file__).parent / "llamacpp_oracle.py"), str(model), str(out), str(tmp / "tokens.json")]
    for a in lora:
        cmd += ["--lora", str(a)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return np.load(out)


@llamacpp
@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_loads_the_adapter_and_matches_peft(arch, models, loras, tmp_path):
    d, g = models[arch]
    doc = ok("port", "-p", loras[arch], "--to", g, "--as-adapter", "-o", tmp_path / "a")
    base = llama_cpp_logits(g, tmp_path)
    with_lora = llama_cpp_logits(g, tmp_path, Path(doc["adapter_file"]))
    want = peft_logits(d, loras[arch]) - peft_logits(d, None)
    got = with_lora - base
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9999
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


@llamacpp
@pytest.mark.llamacpp
def test_llama_cpp_runs_the_merged_gguf(models, loras, tmp_path):
    d, g = models["llama"]
    ok("port", "-p", loras["llama"], "--to", g, "-o", tmp_path / "m")
    doc = ok("port", "-p", loras["llama"], "--to", g, "--as-adapter", "-o", tmp_path / "a")
    merged = llama_cpp_logits(tmp_path / "m" / g.name, tmp_path)
    applied = llama_cpp_logits(g, tmp_path, Path(doc["adapter_file"]))
    np.testing.assert_allclose(merged, applied, rtol=0, atol=1e-3)


# -- the Hub ---------------------------------------------------------------------------------------
def test_gguf_to_and_from_the_hub(hub, models, loras, tmp_path):
    _, g = models["llama"]
    doc = ok("port", "-p", loras["llama"], "--to", g, "-o", tmp_path / "m", "--push-to-hub", "alice/tiny-gguf")
    assert doc["hub"]["repo_id"] == "alice/tiny-gguf"
    stored = hub.files("alice/tiny-gguf")
    assert stored[g.name] == (tmp_path / "m" / g.name).read_bytes() and "portllm_port.json" in stored
    a = ok("port", "-p", loras["llama"], "--to", "alice/tiny-gguf", "--gguf-file", g.name, "--as-adapter",
           "-o", tmp_path / "a")
    assert a["target"] == f"alice/tiny-gguf@{hub.head('alice/tiny-gguf')}" and Path(a["adapter_file"]).is_file()
    res = run("port", "-p", loras["llama"], "--to", "alice/tiny-gguf", "--gguf-file", "nope.gguf", "--as-adapter",
              "-o", tmp_path / "b")
    one_error_line(res, 1, "nope.gguf")


@llamacpp
@pytest.mark.llamacpp
def test_llama_cpp_loads_a_merged_split_set(models, loras, tmp_path):
    d, g = models["llama"]
    (tmp_path / "s").mkdir()
    parts = gf.write_gguf(d, tmp_path / "s" / "m.gguf", types=QUANT, split_max_tensors=8)
    ok("port", "-p", loras["llama"], "--to", parts[0], "-o", tmp_path / "out")
    single = tmp_path / "one" / "m.gguf"
    single.parent.mkdir()
    gf.write_gguf(d, single, types=QUANT)
    ok("port", "-p", loras["llama"], "--to", single, "-o", tmp_path / "one-out")
    split_logits = llama_cpp_logits(tmp_path / "out" / parts[0].name, tmp_path)  # llama.cpp finds the other parts
    np.testing.assert_array_equal(split_logits, llama_cpp_logits(tmp_path / "one-out" / "m.gguf", tmp_path))
