"""The GGUF port on the real SmolLM2-135M-Instruct GGUF (Q4_1), with a real llama.cpp as the oracle.

llama.cpp's logits with portllm's GGUF LoRA applied, minus its logits without it, against
transformers' logits with the same patch applied through PEFT on the dequantized model, minus
those without it. Tolerances, and why:

- on an F32 copy of the same weights the two runtimes compute the same function in float32
  (different summation orders only): correlation >= 0.99 (measured: 1.0000);
- on the Q4_1 file itself llama.cpp rounds activations to 8 bits before each 4-bit matmul (its
  Q8_1 dot products), which puts about 0.3 logit of noise on any change: correlation >= 0.9 for a
  LoRA-sized change (the test patch moves logits by about 1 on average; measured: 0.968);
- the merged GGUF (targeted tensors dequantized, merged in float32, written as Q8_0) under the
  same activation rounding, plus Q8_0's own rounding of W: >= 0.9 (measured: 0.937); written back
  as Q4_1 (--gguf-merged-type keep) it falls to about 0.45, which is why Q8_0 is the default.

Marked ``integration`` (real model; run with -m integration) and ``llamacpp`` (skipped, with the
reason printed, where the wheel is absent).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import gguf_fixtures as gf
from tests import real, tiny
from tests.test_gguf import llama_cpp_logits, llamacpp, ok

pytestmark = [pytest.mark.integration, pytest.mark.llamacpp]

PROMPTS = [
    "Review: an absolute delight from start to finish\nSentiment (positive or negative):",
    "The capital of France is",
    "def add(a, b):\n    return",
]


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    pytest.importorskip("gguf")
    from portllm_cli.demo import material as mat
    from portllm_cli.errors import PortllmError

    with real.in_real_home():
        try:
            q4 = mat.find_smollm2_gguf(real._say)
        except PortllmError as exc:
            pytest.skip(f"SmolLM2-135M-Instruct cannot be had here: {exc.message}")
    st = real.smollm2()
    root = tmp_path_factory.mktemp("smollm2-gguf")
    # the GGUF in a directory of its own (its wheel folder holds other files)
    (root / "q4").mkdir()
    q4_link = root / "q4" / q4.name
    q4_link.symlink_to(q4)
    f32 = gf.f32_copy(q4, root / "f32.gguf")
    return st, q4_link, f32, root


@pytest.fixture(scope="module")
def patch(material):
    """A LoRA on every projection with a rank and an alpha pattern; B drawn to a LoRA-sized change
    (logits move by about 1 on average)."""
    import torch
    from safetensors.torch import load_file, save_file

    st, _, _, root = material
    lora = root / "lora"
    tiny.make_lora(st, lora, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                   rank=8, alpha=16.0, rank_pattern={"v_proj": 4}, alpha_pattern={"o_proj": 4.0}, seed=0)
    f = lora / "adapter_model.safetensors"
    t = load_file(f)
    torch.manual_seed(1)
    for k in t:
        if "lora_B" in k:
            t[k] = torch.randn_like(t[k]) * 0.05
    save_file(t, f, metadata={"format": "pt"})
    return lora


@pytest.fixture(scope="module")
def tokens(material):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(material[0])
    return [tok(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def peft_delta(material, patch, tokens):
    import torch
    import transformers as tf
    from peft import PeftModel

    m = tf.AutoModelForCausalLM.from_pretrained(material[0], dtype=torch.float32)
    with torch.no_grad():
        base = np.concatenate([m(torch.tensor([t])).logits[0].numpy() for t in tokens])
        pm = PeftModel.from_pretrained(m, patch)
        with_patch = np.concatenate([pm(torch.tensor([t])).logits[0].numpy() for t in tokens])
    return with_patch - base


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@llamacpp
def test_gguf_lora_matches_peft_in_llama_cpp(material, patch, tokens, peft_delta, tmp_path):
    _, q4, f32, _ = material
    doc = ok("port", "-p", patch, "--to", q4, "--as-adapter", "--format", "gguf", "-o", tmp_path / "lora")
    adapter = Path(doc["adapter_file"])
    assert doc["modules_folded"] == 30  # o_proj's own alpha, in each of the 30 layers
    d32 = llama_cpp_logits(f32, tmp_path, adapter, tokens=tokens) - llama_cpp_logits(f32, tmp_path, tokens=tokens)
    d4 = llama_cpp_logits(q4, tmp_path, adapter, tokens=tokens) - llama_cpp_logits(q4, tmp_path, tokens=tokens)
    c32, c4 = corr(d32, peft_delta), corr(d4, peft_delta)
    print(f"[integration] logit-change correlation with PEFT: F32 copy {c32:.5f}, Q4_1 file {c4:.4f}; "
          f"change scale {np.abs(peft_delta).mean():.3f}", file=sys.stderr)
    assert c32 >= 0.99
    assert c4 >= 0.9


@llamacpp
def test_merged_gguf_in_llama_cpp(material, patch, tokens, peft_delta, tmp_path):
    _, q4, _, _ = material
    base = llama_cpp_logits(q4, tmp_path, tokens=tokens)
    auto = ok("port", "-p", patch, "--to", q4, "-o", tmp_path / "auto")
    assert {(r["source_type"], r["written_type"]) for r in auto["tensors"]} == {("Q4_1", "Q8_0")}
    merged = llama_cpp_logits(tmp_path / "auto" / q4.name, tmp_path, tokens=tokens)
    c_auto = corr(merged - base, peft_delta)
    keep = ok("port", "-p", patch, "--to", q4, "-o", tmp_path / "keep", "--gguf-merged-type", "keep")
    c_keep = corr(llama_cpp_logits(tmp_path / "keep" / q4.name, tmp_path, tokens=tokens) - base, peft_delta)
    kept = [r["change_kept"] for r in sorted(auto["tensors"], key=lambda r: r["name"])]
    kept4 = [r["change_kept"] for r in sorted(keep["tensors"], key=lambda r: r["name"])]
    print(f"[integration] merged GGUF logit-change correlation with PEFT: Q8_0 (auto) {c_auto:.4f}, "
          f"Q4_1 (keep) {c_keep:.4f}; change kept per tensor: Q8_0 min {min(kept):.4f}, Q4_1 min {min(kept4):.4f}",
          file=sys.stderr)
    assert c_auto >= 0.9
    assert all(a > k for a, k in zip(kept, kept4))  # 8 bits keep the change, 4 bits round much of it away
    assert np.median(kept) > 0.9 and np.median(kept4) < 0.5
    record = json.loads((tmp_path / "auto" / "portllm_port.json").read_text())
    assert record["gguf_merged_type"] == "auto" and len(record["tensors"]) == len(auto["tensors"])
