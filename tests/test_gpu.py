"""CUDA paths on tiny random models: finetune, --full, eval and FSDP on one GPU.

Marked `gpu`: skipped, with the reason printed, where torch sees no CUDA device (CI). Each GPU
result is checked against the same computation on the CPU, or against an independent one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from portllm_cli.core import train
from tests import tiny

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
SENTENCES = tiny.SENTENCES
# dropout 0: the only randomness is the LoRA initialisation and the data order, both drawn on the CPU
TRAIN = dict(lr=1e-2, dropout=0.0, max_steps=8, max_length=32, batch_size=4, seed=3)


@pytest.fixture(scope="module")
def sst2_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("gpu-data") / "sst2.jsonl"
    p.write_text("".join(json.dumps({"sentence": s, "label": y}) + "\n" for s, y in SENTENCES * 2))
    return p


@pytest.fixture(scope="module")
def cpu_patch(tmp_path_factory, llama_dir, sst2_file):
    out = tmp_path_factory.mktemp("gpu-cpu") / "cpu.patch"
    return train.finetune(str(llama_dir), "sst2", out, data=sst2_file, device="cpu", dtype="float32", **TRAIN)


def _tensors(patch: Path) -> dict:
    from portllm_cli.patch.format import read_patch

    return {f"{n}.{s}": getattr(m, s) for n, m in read_patch(patch).modules.items() for s in ("A", "B")}


def _loglikelihoods(row) -> list[float]:
    return [float(x[0]) for s in sorted(row.samples["sst2"], key=lambda s: s["doc_id"]) for x in s["filtered_resps"]]


def test_finetune_cuda_float32_equals_cpu(tmp_path, llama_dir, sst2_file, cpu_patch):
    """Same seed, float32 on both sides: the GPU run learns the same LoRA factors as the CPU run."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = train.finetune(str(llama_dir), "sst2", tmp_path / "gpu.patch", data=sst2_file, device="cuda",
                         dtype="float32", **TRAIN)
    assert gpu.device.startswith("cuda")
    assert gpu.peak_memory_kind == "cuda_max_allocated" and gpu.peak_memory_bytes > 0
    assert gpu.manifest["source"]["hyperparameters"]["mixed_precision"] == "no"
    assert gpu.steps == cpu_patch.steps == 8
    assert gpu.losses == pytest.approx(cpu_patch.losses, rel=1e-3, abs=1e-4)
    a, b = _tensors(cpu_patch.out), _tensors(gpu.out)
    assert a.keys() == b.keys() and len(a) == 8
    for k in a:
        assert b[k].device.type == "cpu" and b[k].dtype == torch.float32
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)
    assert any(torch.count_nonzero(v) for k, v in b.items() if k.endswith(".B"))


def test_finetune_cuda_auto_dtype_uses_bf16_and_learns(tmp_path, llama_dir, sst2_file):
    """--dtype auto on a bf16-capable GPU trains in bf16 autocast; the patch still loads in PEFT."""
    import torch
    import transformers
    from peft import PeftModel

    r = train.finetune(str(llama_dir), "sst2", tmp_path / "bf16.patch", data=sst2_file, device="cuda",
                       **{**TRAIN, "max_steps": 24})
    expected = "bf16" if torch.cuda.is_bf16_supported() else "no"
    assert r.manifest["source"]["hyperparameters"]["mixed_precision"] == expected
    assert sum(r.losses[-4:]) < sum(r.losses[:4])
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(r.out))
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and any(torch.count_nonzero(p) for p in lora_b)


def test_continued_pretraining_cuda_writes_a_moved_model(tmp_path, llama_dir):
    import torch
    import transformers

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(s for s, _ in SENTENCES) * 20)
    r = train.continued_pretraining(str(llama_dir), corpus, tmp_path / "evolved", max_steps=3, batch_size=2,
                                    max_length=32, lr=1e-3, device="cuda")
    assert r.device.startswith("cuda") and r.steps == 3
    old = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).state_dict()
    new = transformers.AutoModelForCausalLM.from_pretrained(r.out).state_dict()
    assert old.keys() == new.keys()
    assert all(new[k].dtype == old[k].dtype for k in old)  # written back in the source dtype
    assert any(not torch.equal(new[k], old[k]) for k in old)


def test_eval_cuda_equals_cpu(tmp_path, llama_dir, sst2_file, cpu_patch):
    """The same configurations scored on the GPU and on the CPU: same accuracy, same log-likelihoods."""
    from portllm_cli.core.evaluate import evaluate

    kw = dict(data={"sst2": sst2_file}, dtype="float32", batch_size=4)
    cpu = evaluate([str(llama_dir)], [str(cpu_patch.out)], ["sst2"], device="cpu",
                   log_samples_dir=tmp_path / "cpu", **kw)
    gpu = evaluate([str(llama_dir)], [str(cpu_patch.out)], ["sst2"], device="cuda",
                   log_samples_dir=tmp_path / "gpu", **kw)
    assert [r.name for r in gpu.rows] == [r.name for r in cpu.rows]
    for c, g in zip(cpu.rows, gpu.rows):
        assert g.scores["sst2"]["value"] == c.scores["sst2"]["value"]
        assert _loglikelihoods(g) == pytest.approx(_loglikelihoods(c), rel=1e-3, abs=1e-3)


def test_fsdp_on_one_gpu(tmp_path, llama_dir, sst2_file):
    """examples/accelerate/fsdp.yaml, launched by accelerate on one GPU: the sharded path gathers a whole patch."""
    out = tmp_path / "fsdp.patch"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "examples" / "accelerate" / "fsdp.yaml"), "--num_processes", "1",
           "-m", "portllm_cli", "finetune", "-m", str(llama_dir), "-t", "sst2", "--data", str(sst2_file),
           "--out", str(out), "--max-steps", "4", "--max-length", "32", "--lr", "1e-2", "--dropout", "0", "--json"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["steps"] == 4 and doc["device"].startswith("cuda")
    tensors = _tensors(out)
    assert len(tensors) == 8
    import torch

    # gathered whole, not one process's shard: every factor has its full shape
    from portllm_cli.patch.format import read_patch

    for m in read_patch(out).modules.values():
        assert m.A.shape[0] == m.B.shape[1] == 8 and m.weight_shape[0] == m.B.shape[0]
    assert any(torch.count_nonzero(v) for k, v in tensors.items() if k.endswith(".B"))
