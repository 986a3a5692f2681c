"""portllm port --calibrate: the scale chosen from labelled examples, without gradients.

The reference computations here are written apart from the code under test: models merged by hand
(W + lambda * B @ A with torch) or by PEFT, log-likelihoods from the full logits of a plain
transformers forward, one sequence at a time.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from portllm_cli.cli.app import app
from portllm_cli.core import calibrate as core
from portllm_cli.io.safetensors import load_tensors
from portllm_cli.patch.format import adapter_config, build_manifest, read_patch, sha256_file, write_patch_files
from tests import tiny

runner = CliRunner()
PROMPT = "{}\nQuestion: Is this sentence positive or negative?\nAnswer:"  # lm-eval's sst2 prompt
ROWS_PER_PROMPT = 20


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_lines(res) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]


def load_lm(path: Path):
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(path)
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), tok


def dense_loglik(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context): one plain forward, full logits, lm-eval's token split."""
    whole = tok(context + continuation)["input_ids"]
    n = len(tok(context)["input_ids"])
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(float(lp[i - 1, whole[i]]) for i in range(n, len(whole)))



@pytest.fixture(scope="module")
def known(llama_dir, tmp_path_factory):
    """A case whose answer is known by construction.

    The patch is rank 1 on lm_head: it moves the logit of the first token of " negative" down and
    that of " positive" up, in proportion to a fixed direction of the final hidden state. The
    evolved model is the base minus half the patch, so porting at lambda gives base + (lambda-0.5)
    * patch, and the ideal model (base + patch) is reached at lambda = 1.5. The calibration
    labels are drawn from the ideal model in exact proportions (ROWS_PER_PROMPT rows a sentence,
    round(ROWS_PER_PROMPT * P_ideal(positive)) of them positive), so the expected cross-entropy of
    the choices is smallest at lambda = 1.5 (Gibbs' inequality).
    """
    root = tmp_path_factory.mktemp("calib-known")
    model, tok = load_lm(llama_dir)
    prompts = [PROMPT.format(s) for s, _ in tiny.SENTENCES]
    first = {}
    for c in (" negative", " positive"):
        whole = tok(prompts[0] + c)["input_ids"]
        first[c] = whole[len(tok(prompts[0])["input_ids"])]
    with torch.no_grad():
        hidden = torch.stack([model.model(torch.tensor([tok(p)["input_ids"]])).last_hidden_state[0, -1] for p in prompts])
    a = hidden.mean(0)
    a = a / a.norm()
    c = 5.5 / (2 * float((hidden @ a).mean()))  # the ideal model sits near P(positive) = 0.4: far from 0 and 1
    B = torch.zeros(model.config.vocab_size, 1)
    B[first[" negative"], 0] = -c
    B[first[" positive"], 0] = c
    A = a[None, :].clone()
    patch = root / "lm_head.patch"
    cfg = adapter_config(base_model=str(llama_dir), rank=1, alpha=1.0, target_modules=["lm_head"], dropout=0.0)
    manifest = build_manifest(base={"model": str(llama_dir), "revision": None, "content_hash": None,
                                    "fingerprint": None},
                              lora={"rank": 1, "alpha": 1.0, "target_modules": ["lm_head"], "modules": 1},
                              source={"tool": "test", "data": {"path": "train.jsonl", "sha256": "0" * 64}})
    write_patch_files(patch, {"base_model.model.lm_head.lora_A.weight": A.contiguous(),
                              "base_model.model.lm_head.lora_B.weight": B.contiguous()}, cfg, manifest)
    sd = load_tensors(llama_dir / "model.safetensors")
    delta = (B.double() @ A.double())

    def with_lm_head(mu: float) -> dict[str, torch.Tensor]:
        out = dict(sd)
        out["lm_head.weight"] = (sd["lm_head.weight"].double() + mu * delta).float()
        return out

    evolved = tiny.copy_model(llama_dir, root / "evolved", with_lm_head(-0.5))
    ideal = tiny.copy_model(llama_dir, root / "ideal", with_lm_head(1.0))
    m_ideal, _ = load_lm(ideal)
    rows = []
    for (sentence, _), p in zip(tiny.SENTENCES, prompts):
        ll = [dense_loglik(m_ideal, tok, p, ch) for ch in (" negative", " positive")]
        p_pos = 1 / (1 + math.exp(ll[0] - ll[1]))
        n_pos = round(ROWS_PER_PROMPT * p_pos)
        assert 2 <= n_pos <= ROWS_PER_PROMPT - 2  # the construction is not saturated
        rows += [{"sentence": sentence, "label": 1}] * n_pos + [{"sentence": sentence, "label": 0}] * (ROWS_PER_PROMPT - n_pos)
    data = root / "calibration.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"patch": patch, "evolved": evolved, "data": data, "base": llama_dir, "delta": delta, "root": root}


@pytest.mark.parametrize("metric", [None, "choice"])  # auto is choice for a choice task
def test_picks_the_known_scale(known, tmp_path, metric):
    out = tmp_path / "o"
    res = run("port", "-p", known["patch"], "--to", known["evolved"], "-o", out, "--calibrate",
              f"sst2={known['data']}", "--calibrate-grid", "0.5:2.5:0.25", "--json",
              *(["--calibrate-metric", metric] if metric else []))
    assert res.exit_code == 0, res.stderr
    cal = json.loads(res.stdout)["calibration"]
    assert cal["scale"] == 1.5 and cal["metric"] == "choice"
    curve = [s["choice_loglik"] for s in cal["scores"]]
    peak = curve.index(max(curve))
    assert cal["scores"][peak]["scale"] == 1.5
    # one peak: rising before it, falling after it
    assert all(x < y for x, y in zip(curve[:peak], curve[1:peak + 1]))
    assert all(x > y for x, y in zip(curve[peak:], curve[peak + 1:]))
    # the port itself: the evolved model plus 1.5 x the patch, i.e. the ideal lm_head (one float32 rounding)
    got = load_tensors(out / "model.safetensors")["lm_head.weight"]
    ev = load_tensors(known["evolved"] / "model.safetensors")["lm_head.weight"]
    assert torch.allclose(got.double(), ev.double() + 1.5 * known["delta"], atol=1e-6)


def test_scores_equal_an_independent_computation(known):
    """Every score at every scale, against PEFT-free dense scoring of a hand-merged model."""
    patch = read_patch(known["patch"])
    data = core.load_data("sst2", known["data"], limit=24)  # 24 rows: prompts of both labels, batches of 16 + 8
    model, tok = load_lm(known["evolved"])
    res = core.calibrate_loaded(model, tok, patch, data, grid=[0.75, 1.5, 2.25],
                                metric="loglik")
    lm = model.lm_head.weight.detach().clone()
    assert torch.equal(lm, load_tensors(known["evolved"] / "model.safetensors")["lm_head.weight"])  # restored
    for s in [res.reference] + res.scores:
        with torch.no_grad():
            model.lm_head.weight.copy_((lm.double() + s.scale * known["delta"]).float())
        gold, choice, correct = [], [], []
        for ex in data.examples:
            ll = [dense_loglik(model, tok, ex.prompt, ch) for ch in ex.choices]
            gold.append(ll[ex.label])
            choice.append(ll[ex.label] - math.log(sum(math.exp(v) for v in ll)))
            correct.append(max(range(len(ll)), key=ll.__getitem__) == ex.label)
        assert s.loglik == pytest.approx(sum(gold) / len(gold), abs=1e-4), s.scale
        assert s.choice_loglik == pytest.approx(sum(choice) / len(choice), abs=1e-4), s.scale
        assert s.accuracy == pytest.approx(sum(correct) / len(correct))
    with torch.no_grad():
        model.lm_head.weight.copy_(lm)


def test_scores_against_peft_on_attention_and_a_generation_task(llama_dir, llama_evolved_dir, tmp_path):
    """q_proj/v_proj patch, the gsm8k recipe (a multi-token answer): scores against PEFT merged at
    each scale (lora scaling multiplied by lambda) and dense scoring."""
    from peft import PeftModel

    lora = tmp_path / "lora"
    tiny.make_lora(llama_dir, lora, rank=4, alpha=16.0, seed=3)
    rows = [{"question": f"what is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}\n#### {2 * i}"} for i in range(5)]
    f = tmp_path / "gsm.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = core.load_data("gsm8k", f)
    model, tok = load_lm(llama_evolved_dir)
    patch = read_patch(lora, verify=False)
    res = core.calibrate_loaded(model, tok, patch, data, grid=[0.5, 2.0], batch_size=2)  # auto: loglik
    assert res.scores[0].choice_loglik is None and res.scores[0].accuracy is None
    for s in res.scores:
        base, _ = load_lm(llama_evolved_dir)
        pm = PeftModel.from_pretrained(base, lora)
        for mod in pm.modules():
            if hasattr(mod, "scaling") and isinstance(getattr(mod, "scaling"), dict) and "default" in mod.scaling:
                mod.scaling["default"] *= s.scale
        merged = pm.merge_and_unload().eval()
        want = [dense_loglik(merged, tok, ex.prompt, ex.target) for ex in data.examples]
        assert s.loglik == pytest.approx(sum(want) / len(want), abs=1e-4)
    assert res.metric == "loglik" and res.scale == max(res.scores, key=lambda s: s.loglik).scale


def test_record_manifest_and_json(known, tmp_path):
    out, ada = tmp_path / "merged", tmp_path / "adapter"
    args = ["--to", known["evolved"], "--calibrate", f"sst2={known['data']}", "--calibrate-grid", "1,1.5,2",
            "--calibrate-limit", "100", "--json"]
    r1 = run("port", "-p", known["patch"], "-o", out, *args)
    assert r1.exit_code == 0, r1.stderr
    doc = json.loads(r1.stdout)
    record = json.loads((out / "portllm_port.json").read_text())
    cal = doc["calibration"]
    assert record["calibration"] == cal and record["scale"] == cal["scale"] == doc["scale"] == 1.5
    assert cal["grid"] == [1.0, 1.5, 2.0] and [s["scale"] for s in cal["scores"]] == cal["grid"]
    assert cal["data"]["sha256"] == sha256_file(known["data"]) and cal["data"]["rows_used"] == 100
    assert cal["data"]["rows_in_file"] == ROWS_PER_PROMPT * len(tiny.SENTENCES)
    assert cal["task"] == "sst2" and cal["metric"] == "choice" and cal["reference"]["scale"] == 0.0
    assert set(cal["scores"][0]) == {"scale", "loglik", "choice_loglik", "accuracy"}
    # the same port without calibration, at the chosen scale: the same bytes
    plain = tmp_path / "plain"
    r = run("port", "-p", known["patch"], "--to", known["evolved"], "-o", plain, "--scale", "1.5")
    assert r.exit_code == 0, r.stderr
    assert (out / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    # --as-adapter: lambda folded into B, the calibration object in the manifest
    r2 = run("port", "-p", known["patch"], "-o", ada, "--as-adapter", *args)
    assert r2.exit_code == 0, r2.stderr
    man = json.loads((ada / "portllm.json").read_text())
    assert man["calibration"] == json.loads(r2.stdout)["calibration"]
    assert man["calibration"]["scale"] == 1.5 and man["ports"][-1]["scale"] == 1.5
    src, dst = read_patch(known["patch"]).modules["lm_head"], read_patch(ada).modules["lm_head"]
    assert torch.equal(dst.A, src.A) and torch.equal(dst.B, (src.B * 1.5).to(src.B.dtype))
    # porting the retargeted adapter again without --calibrate drops the old calibration
    again = tmp_path / "again"
    r3 = run("port", "-p", ada, "--to", known["evolved"], "-o", again, "--as-adapter")
    assert r3.exit_code == 0, r3.stderr
    assert "calibration" not in json.loads((again / "portllm.json").read_text())


def test_warns_when_calibrating_on_the_training_data(known, tmp_path):
    p = tmp_path / "p"
    shutil.copytree(known["patch"], p)
    man = json.loads((p / "portllm.json").read_text())
    man["source"]["data"]["sha256"] = sha256_file(known["data"])  # as finetune records its data
    (p / "portllm.json").write_text(json.dumps(man))
    r = run("port", "-p", p, "--to", known["evolved"], "-o", tmp_path / "o", "--calibrate", f"sst2={known['data']}",
            "--calibrate-limit", "40", "--json")
    assert r.exit_code == 0, r.stderr
    warnings = json.loads(r.stdout)["warnings"]
    assert any("training data" in w and "source.data" in w for w in warnings)
    r = run("port", "-p", known["patch"], "--to", known["evolved"], "-o", tmp_path / "o2", "--calibrate",
            f"sst2={known['data']}", "--calibrate-limit", "40")
    assert r.exit_code == 0 and "training data" not in r.stderr


def test_reused_training_data_walks_the_manifest():
    man = {"source": {"data": {"sha256": "AB" * 32, "rows": 3}}, "ports": [{"training": {"data": {"sha256": "cd" * 32}}}]}
    assert core.reused_training_data(man, "ab" * 32) == ["source.data"]
    assert core.reused_training_data(man, "cd" * 32) == ["ports[0].training.data"]
    assert core.reused_training_data(man, "ef" * 32) == [] and core.reused_training_data(None, "ab") == []


@pytest.mark.parametrize("text,want", [
    (None, list(core.DEFAULT_GRID)), ("1.5, 0.5,1", [0.5, 1.0, 1.5]), ("0.25:1:0.25", [0.25, 0.5, 0.75, 1.0]),
    ("-1,1", [-1.0, 1.0]), ("0.1:0.3:0.1", [0.1, 0.2, 0.3]),
])
def test_grid_parsing(text, want):
    assert core.parse_grid(text) == pytest.approx(want)


def _refusal(res, code: int, out: Path, *words: str) -> None:
    assert res.exit_code == code, (res.exit_code, res.stderr)
    lines = error_lines(res)
    assert len(lines) == 1, res.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert res.stdout == "" and not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))  # no temporary leftovers


@pytest.mark.parametrize("extra,code,words", [
    (["--calibrate", "sst2=DATA", "--scale", "1"], 2, ["--scale", "--calibrate"]),
    (["--calibrate-grid", "1,2"], 2, ["--calibrate-grid"]),
    (["--calibrate-limit", "5"], 2, ["--calibrate-limit"]),
    (["--device", "cpu"], 2, ["--device"]),
    (["--calibrate", "sst2"], 2, ["TASK=FILE"]),
    (["--calibrate", "nosuchtask=DATA"], 2, ["unknown task"]),
    (["--calibrate", "text=DATA"], 2, ["no answers"]),
    (["--calibrate", "sst2=DATA", "--calibrate-grid", "0,1"], 2, ["0"]),
    (["--calibrate", "sst2=DATA", "--calibrate-grid", "1,x"], 2, ["not a number"]),
    (["--calibrate", "sst2=DATA", "--calibrate-grid", "2:1:0.5"], 2, ["STEP"]),
    (["--calibrate", "sst2=DATA", "--calibrate-grid", "1,1"], 2, ["repeated"]),
    (["--calibrate", "sst2=DATA", "--calibrate-grid", "nan,1"], 2, ["finite"]),
    (["--calibrate", "sst2=DATA", "--calibrate-limit", "0"], 2, ["--calibrate-limit"]),
    (["--calibrate", "gsm8k=DATA", "--calibrate-metric", "choice"], 2, ["choice"]),
    (["--calibrate", "sst2=MISSING"], 1, ["no such file"]),
    (["--calibrate", "sst2=BAD"], 1, ["label"]),
])
def test_refusals(known, tmp_path, extra, code, words):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"sentence": "x", "label": "maybe"}) + "\n")
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    subst = {"DATA": str(known["data"]), "MISSING": str(tmp_path / "missing.jsonl"), "BAD": str(bad)}
    extra = [e.replace("gsm8k=DATA", f"gsm8k={gsm}") for e in extra]
    extra = [next((e.replace(k, v) for k, v in subst.items() if e.endswith("=" + k)), e) for e in extra]
    out = tmp_path / "o"
    res = run("port", "-p", known["patch"], "--to", known["evolved"], "-o", out, *extra)
    _refusal(res, code, out, *words)


def test_existing_out_and_incompatible_target_fail_before_scoring(known, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(core, "calibrate", boom)
    out = tmp_path / "o"
    out.mkdir()
    res = run("port", "-p", known["patch"], "--to", known["evolved"], "-o", out, "--calibrate", f"sst2={known['data']}")
    assert res.exit_code == 1 and len(error_lines(res)) == 1 and "already exists" in res.stderr
    assert list(out.iterdir()) == []
    # a target without lm_head of that shape: exit 3 before any scoring
    other = tmp_path / "other"
    sd = load_tensors(known["evolved"] / "model.safetensors")
    sd["lm_head.weight"] = sd["lm_head.weight"][:, :16].contiguous()
    tiny.copy_model(known["evolved"], other, sd)
    out2 = tmp_path / "o2"
    res = run("port", "-p", known["patch"], "--to", other, "-o", out2, "--calibrate", f"sst2={known['data']}")
    _refusal(res, 3, out2, "lm_head")


def test_few_examples_and_edge_of_grid_warnings(known, tmp_path):
    res = run("port", "-p", known["patch"], "--to", known["evolved"], "-o", tmp_path / "o", "--calibrate",
              f"sst2={known['data']}", "--calibrate-limit", "10", "--calibrate-grid", "0.5,1", "--json")
    assert res.exit_code == 0, res.stderr
    w = json.loads(res.stdout)["warnings"]
    assert any("10 examples" in x for x in w) and any("edge of the grid" in x for x in w)
