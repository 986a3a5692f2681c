"""Every adapter variant PEFT 0.21 writes, ported by portllm and compared with PEFT itself on the
evolved model: ``PeftModel.from_pretrained(evolved, adapter).merge_and_unload()`` for merged
output, logits for ``--as-adapter``. Refusals: exit code, one ``Error:`` line, nothing written.

Tiny random models are built per module (Llama, Llama with biases, tied Llama, GPT-2's Conv1D,
Mixtral and Qwen3-MoE experts, Gemma 3 multimodal with its on-disk layout); adapters are made
with PEFT and "trained" by moving every trainable tensor a little.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests import tiny

torch = pytest.importorskip("torch")
IDS = [[1, 3, 5, 7, 22, 40, 99, 200]]


# -- helpers ------------------------------------------------------------------------------------
run, ok = tiny.run, tiny.ok


def refused(code: int, *args, words=()) -> str:
    """The command exits ``code`` with one Error line naming ``words`` and writes nothing at -o."""
    out = Path(args[list(args).index("-o") + 1])
    res = run(*args)
    assert res.exit_code == code, (res.exit_code, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, res.stderr
    for w in words:
        assert w in res.stderr, (w, res.stderr)
    assert res.stdout == ""
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return res.stderr


def tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def auto(d: Path, cls: str = "AutoModelForCausalLM"):
    import transformers as tf

    return getattr(tf, cls).from_pretrained(d, dtype=torch.float32)


def logits(model) -> "torch.Tensor":
    with torch.no_grad():
        out = model(torch.tensor(IDS))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def peft_merged(target: Path, adapter: Path, cls: str = "AutoModelForCausalLM"):
    from peft import PeftModel

    return PeftModel.from_pretrained(auto(target, cls), str(adapter)).merge_and_unload()


def peft_logits(target: Path, adapter: Path, cls: str = "AutoModelForCausalLM"):
    from peft import PeftModel

    return logits(PeftModel.from_pretrained(auto(target, cls), str(adapter)))


def make_adapter(base: Path, out: Path, *, cls: str = "AutoModelForCausalLM", train: bool = True,
                 strip_base_layer: bool = True, record_base: bool = True, seed: int = 3, **cfg) -> Path:
    """A PEFT adapter on ``base``; ``train`` moves every trainable tensor (factors, magnitudes,
    saved modules, token rows) so that none is at its initial value."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    cfg.setdefault("r", 4)
    cfg.setdefault("lora_alpha", 8)
    cfg.setdefault("init_lora_weights", False)
    model = get_peft_model(auto(base, cls), LoraConfig(**cfg))
    if train:
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05 * p.float().std().clamp_min(0.1))
    model.save_pretrained(out)
    doc = json.loads((out / "adapter_config.json").read_text())
    doc["base_model_name_or_path"] = str(base) if record_base else "/nonexistent/old-base"
    (out / "adapter_config.json").write_text(json.dumps(doc))
    if strip_base_layer:
        # PEFT's save_embedding_layers copies of the OLD base's embeddings: PEFT would load them over
        # the evolved model's, portllm drops them; the reference is PEFT on the factors alone
        t = load_file(out / "adapter_model.safetensors")
        save_file({k: v for k, v in t.items() if not k.endswith(".base_layer.weight")}, str(out / "adapter_model.safetensors"))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    """models(arch) -> (old base, evolved): each built once."""
    cache: dict = {}

    def get(arch: str):
        if arch not in cache:
            base = tmp_path_factory.mktemp(f"{arch}-base")
            tiny.make_model(base, arch, seed=0, tokenizer_from=tokenizer_dir)
            evo = tmp_path_factory.mktemp(f"{arch}-evo")
            tiny.perturb_model(base, evo, scale=0.05, seed=1)
            cache[arch] = (base, evo)
        return cache[arch]

    return get


def assert_close_all(got: dict, want: dict, keys=None, atol: float = 1e-6):
    keys = keys if keys is not None else list(got)
    for k in keys:
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=0, atol=atol, msg=k)


# -- 1a. PiSSA / OLoRA saved unconverted ------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_ported_as_peft_converts_them(models, tmp_path, init):
    """PEFT's own conversion (save_pretrained(path_initial_model_for_weight_conversion=...)) on the
    evolved model is the reference for the unconverted adapter ported against its old base."""
    from peft import LoraConfig, get_peft_model

    base, evo = models("llama")
    torch.manual_seed(0)
    pm = get_peft_model(auto(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=init, task_type="CAUSAL_LM"))
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(tmp_path / "init")  # what PEFT's docs tell users to keep
    pm.peft_config["default"].init_lora_weights = init
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.05)
    raw, conv = tmp_path / "raw", tmp_path / "converted"
    pm.save_pretrained(raw)
    pm.save_pretrained(conv, path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    for d in (raw, conv):
        doc = json.loads((d / "adapter_config.json").read_text())
        doc["base_model_name_or_path"] = str(base)
        (d / "adapter_config.json").write_text(json.dumps(doc))
    assert json.loads((raw / "adapter_config.json").read_text())["init_lora_weights"] == init

    doc = ok("port", "-p", raw, "--to", evo, "-o", tmp_path / "merged", "--verify")
    assert doc["patch_tensors"] == {"applied": 8, "total": 8}
    assert any("converted against the old base" in w for w in doc["warnings"])
    ref = peft_merged(evo, conv).state_dict()
    got = tensors(tmp_path / "merged")
    assert_close_all(got, ref)
    src = tensors(evo)
    changed = [k for k in got if not torch.equal(got[k], src[k])]
    assert len(changed) == 4  # q_proj, v_proj x 2 layers

    # what portllm did before: W + s*B@A, the top-rank part added a second time
    naive = dict(src)
    from safetensors.torch import load_file

    f = load_file(raw / "adapter_model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    A = f["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    B = f["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    naive[key] = src[key] + 2.0 * B @ A
    assert (naive[key] - ref[key]).norm() > 10 * (got[key] - ref[key]).norm() + 1e-3

    # extract converts it once: rank 2r, init_lora_weights true (what the factors now mean)
    ok("extract", raw, "-o", tmp_path / "patch")
    cfg = json.loads((tmp_path / "patch" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["init_lora_weights"] is True
    ok("port", "-p", tmp_path / "patch", "--to", evo, "-o", tmp_path / "merged2")
    again = tensors(tmp_path / "merged2")
    assert all(torch.equal(again[k], got[k]) for k in got)

    # --as-adapter: PEFT loads the converted adapter on the evolved model
    ok("port", "-p", raw, "--to", evo, "-o", tmp_path / "adapter", "--as-adapter")
    torch.testing.assert_close(peft_logits(evo, tmp_path / "adapter"), peft_logits(evo, conv), rtol=0, atol=1e-5)

    # diff reads the converted patch too
    d = ok("diff", raw, evo)
    assert d["verdict"] == "compatible"


def test_pissa_without_its_base_is_refused(models, tmp_path):
    base, evo = models("llama")
    raw = make_adapter(base, tmp_path / "raw", target_modules=["q_proj"], init_lora_weights="pissa",
                       train=False, record_base=False)
    out = tmp_path / "o"
    err = refused(1, "port", "-p", raw, "--to", evo, "-o", out, words=["old base", "pissa", "--base"])
    assert "Hint:" in err
    refused(1, "port", "-p", raw, "--to", evo, "-o", out, "--as-adapter", words=["--base"])
    refused(1, "extract", raw, "-o", out, words=["pissa", "--base"])
    refused(1, "extract", raw, "-o", out, "--no-base-check", words=["--base"])
    # with --base it goes through
    ok("port", "-p", raw, "--to", evo, "-o", out, "--base", base)


@pytest.mark.parametrize("init,words", [("pissa_niter_4", "randomized SVD"), ("corda", "CorDA"), ("loftq", "LoftQ"),
                                        ("lora_ga", "LoRA-GA")])
def test_inits_that_cannot_be_ported_are_refused(models, tmp_path, init, words):
    base, evo = models("llama")
    ad = make_adapter(base, tmp_path / "ad", target_modules=["q_proj"])
    doc = json.loads((ad / "adapter_config.json").read_text())
    doc["init_lora_weights"] = init
    (ad / "adapter_config.json").write_text(json.dumps(doc))
    out = tmp_path / "o"
    for extra in ([], ["--as-adapter"]):
        refused(1, "port", "-p", ad, "--to", evo, "-o", out, *extra, words=[words])
    refused(1, "extract", ad, "-o", out, words=[words])


@pytest.mark.parametrize("init", ["gaussian", "eva", "orthogonal", "mica"])
def test_inits_that_leave_the_base_alone_are_kept(models, tmp_path, init):
    """These PEFT inits do not touch the base: the saved factors mean W + s*B@A, and extract keeps
    init_lora_weights as it is."""
    base, evo = models("llama")
    ad = make_adapter(base, tmp_path / "ad", target_modules=["q_proj", "v_proj"])
    doc = json.loads((ad / "adapter_config.json").read_text())
    doc["init_lora_weights"] = init
    (ad / "adapter_config.json").write_text(json.dumps(doc))
    ok("port", "-p", ad, "--to", evo, "-o", tmp_path / "m")
    assert_close_all(tensors(tmp_path / "m"), peft_merged(evo, ad).state_dict())
    ok("extract", ad, "-o", tmp_path / "p")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["init_lora_weights"] == init


# -- 1b. --as-adapter names modules as PEFT sees them on the target -----------------------------------
def test_gpt2_stored_without_its_prefix(models, tmp_path):
    """GPT-2 on the Hub stores h.0.attn.c_attn.weight for transformer.h.0.attn.c_attn (Conv1D)."""
    from safetensors.torch import save_file

    base, evo = models("gpt2")
    hub = tmp_path / "gpt2-hub"
    shutil.copytree(evo, hub)
    save_file({k.removeprefix("transformer."): v for k, v in tensors(evo).items()}, str(hub / "model.safetensors"),
              metadata={"format": "pt"})
    assert "h.0.attn.c_attn.weight" in tensors(hub)
    ad = make_adapter(base, tmp_path / "ad", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)

    doc = ok("port", "-p", ad, "--to", hub, "-o", tmp_path / "merged")
    assert doc["modules_merged"] == 4
    merged = peft_merged(hub, ad).state_dict()
    got = tensors(tmp_path / "merged")
    assert_close_all(got, {k.removeprefix("transformer."): v for k, v in merged.items()}, atol=1e-6)
    assert not torch.equal(got["h.0.attn.c_attn.weight"], tensors(hub)["h.0.attn.c_attn.weight"])

    # an adapter config that says fan_in_fan_out false: PEFT sets it on Conv1D anyway, so does portllm
    flat = tmp_path / "ad-false"
    shutil.copytree(ad, flat)
    cfg = json.loads((flat / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = False
    (flat / "adapter_config.json").write_text(json.dumps(cfg))
    ok("port", "-p", flat, "--to", evo, "-o", tmp_path / "merged-false")
    assert_close_all(tensors(tmp_path / "merged-false"), peft_merged(evo, flat).state_dict())

    doc = ok("port", "-p", ad, "--to", hub, "-o", tmp_path / "adapter", "--as-adapter")
    assert doc["patch_tensors"] == {"applied": 8, "total": 8}
    served = peft_logits(hub, tmp_path / "adapter")
    torch.testing.assert_close(served, peft_logits(hub, ad), rtol=0, atol=1e-5)
    assert (served - logits(auto(hub))).abs().max() > 1e-3  # the patch does act


def test_adapter_trained_on_the_base_model_class(models, tmp_path):
    """An adapter trained on AutoModel (keys without 'model.') stays loadable on AutoModel."""
    base, evo = models("llama")
    ad = make_adapter(base, tmp_path / "ad", cls="AutoModel", target_modules=["q_proj", "v_proj"])
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors(ad)
    ok("port", "-p", ad, "--to", evo, "-o", tmp_path / "adapter", "--as-adapter")
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors(tmp_path / "adapter")
    served = peft_logits(evo, tmp_path / "adapter", "AutoModel")
    torch.testing.assert_close(served, peft_logits(evo, ad, "AutoModel"), rtol=0, atol=1e-6)
    assert (served - logits(auto(evo, "AutoModel"))).abs().max() > 1e-3
    # merged: the same change as PEFT's on the causal LM
    ok("port", "-p", ad, "--to", evo, "-o", tmp_path / "merged")
    want = peft_merged(evo, ad, "AutoModel").state_dict()
    got = tensors(tmp_path / "merged")
    assert_close_all(got, {f"model.{k}": v for k, v in want.items()}, keys=[k for k in got if k != "lm_head.weight"])


def test_landing_check_refuses_an_adapter_that_would_do_nothing(models):
    from portllm_cli.core.layout import Layout
    from portllm_cli.core.port import check_landing
    from portllm_cli.errors import IncompatibleError
    from portllm_cli.io.checkpoint import Checkpoint
    from portllm_cli.patch.format import LoraModule, Patch

    _, evo = models("llama")
    layout = Layout.of(Checkpoint.open(evo))
    m = LoraModule("layers.0.self_attn.q_proj", torch.ones(2, 32), torch.ones(32, 2), 2.0)
    bad = Patch(Path("x"), {"r": 2, "lora_alpha": 2}, {}, {m.name: m})
    with pytest.raises(IncompatibleError, match="lands on no module"):
        check_landing(bad, layout, False, "evo")  # named for the base class, checked as the head class
    assert check_landing(bad, layout, True, "evo") == 2


# -- 1c. tied embeddings stored twice ---------------------------------------------------------------
def test_tied_embeddings_stored_twice_get_the_patch_in_both(models, tmp_path):
    from safetensors.torch import save_file

    base, evo = models("llama-tied")
    twice = tmp_path / "twice"
    shutil.copytree(evo, twice)
    t = tensors(evo)
    assert "lm_head.weight" not in t
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    save_file(t, str(twice / "model.safetensors"), metadata={"format": "pt"})
    ad = make_adapter(base, tmp_path / "ad", target_modules=["embed_tokens", "q_proj"])
    doc = ok("port", "-p", ad, "--to", twice, "-o", tmp_path / "m")
    got = tensors(tmp_path / "m")
    ref = peft_merged(twice, ad).state_dict()
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"):
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6)
        assert not torch.equal(got[key], t[key]), key
    assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    assert doc["patch_tensors"]["applied"] == doc["patch_tensors"]["total"] == 6
    torch.testing.assert_close(logits(auto(tmp_path / "m")), logits(peft_merged(twice, ad)), rtol=0, atol=1e-5)


def test_lora_on_a_tied_lm_head_merges_into_the_shared_matrix(models, tmp_path):
    base, evo = models("llama-tied")
    ad = make_adapter(base, tmp_path / "ad", target_modules=["lm_head", "q_proj"])
    res = run("port", "-p", ad, "--to", evo, "-o", tmp_path / "m", "--json")
    assert res.exit_code == 0, res.stderr
    assert "lm_head.weight is tied to model.embed_tokens.weight" in res.stderr
    got = tensors(tmp_path / "m")
    ref = peft_merged(evo, ad).state_dict()
    torch.testing.assert_close(got["model.embed_tokens.weight"], ref["model.embed_tokens.weight"], rtol=0, atol=1e-6)
    assert not torch.equal(got["model.embed_tokens.weight"], tensors(evo)["model.embed_tokens.weight"])


# -- 1d. the effect check ------------------------------------------------------------------------------
def test_a_patch_that_changes_nothing_exits_3(models, tmp_path):
    base, evo = models("llama")
    ad = make_adapter(base, tmp_path / "ad", target_modules=["q_proj"], init_lora_weights=True, train=False)
    out = tmp_path / "o"
    for extra in ([], ["--as-adapter"]):
        refused(3, "port", "-p", ad, "--to", evo, "-o", out, *extra, words=["changes nothing"])


def test_the_count_is_printed(models, tmp_path):
    base, evo = models("llama")
    ad = make_adapter(base, tmp_path / "ad", target_modules=["q_proj", "v_proj"])
    res = run("port", "-p", ad, "--to", evo, "-o", tmp_path / "o")
    assert res.exit_code == 0 and "8 of 8 patch tensors applied" in res.stderr
    doc = ok("port", "-p", ad, "--to", evo, "-o", tmp_path / "o2")
    assert doc["patch_tensors"] == {"applied": 8, "total": 8}
    record = json.loads((tmp_path / "o2" / "portllm_port.json").read_text())
    assert record["patch_tensors"] == {"applied": 8, "total": 8} and len(record["changed_tensors"]) == 4


def test_every_tensor_must_land(models, tmp_path):
    """A factor the plan cannot place is an error, never dropped silently (unit level: the
    command-line reader refuses unknown keys before)."""
    from portllm_cli.core.layout import Layout
    from portllm_cli.core.plan import Location, build_plan
    from portllm_cli.errors import IncompatibleError
    from portllm_cli.io.checkpoint import Checkpoint
    from portllm_cli.patch.format import read_patch

    base, evo = models("llama")
    ad = make_adapter(base, tmp_path / "ad", target_modules=["q_proj"])
    patch = read_patch(ad)
    layout = Layout.identity(Checkpoint.open(evo))
    with pytest.raises(IncompatibleError, match="lands on no weight"):
        build_plan(patch, layout, location=Location(layout))


# -- 2. DoRA -------------------------------------------------------------------------------------------
def _dora(models, tmp_path, arch="llama", **kw):
    base, evo = models(arch)
    kw.setdefault("target_modules", ["q_proj", "v_proj", "embed_tokens"])
    return base, evo, make_adapter(base, tmp_path / "dora", use_dora=True, **kw)


@pytest.mark.parametrize("arch,targets,atol", [
    ("llama", ["q_proj", "v_proj"], 0),
    ("llama", ["embed_tokens", "q_proj"], 1e-5),  # embedding: norms per column, across the rows
    ("gpt2", ["c_attn", "c_fc"], 1e-6),  # Conv1D (fan_in_fan_out): norms across the stored rows
])
def test_dora_absolute_is_what_peft_merges(models, tmp_path, arch, targets, atol):
    kw = {"fan_in_fan_out": True} if arch == "gpt2" else {}
    base, evo, ad = _dora(models, tmp_path, arch, target_modules=targets, **kw)
    doc = ok("port", "-p", ad, "--to", evo, "-o", tmp_path / "m", "--verify")
    n = doc["modules_merged"]
    assert n == 2 * len(targets) - ("embed_tokens" in targets)
    assert doc["patch_tensors"]["applied"] == doc["patch_tensors"]["total"] == 3 * n  # A, B, magnitude
    ref = peft_merged(evo, ad).state_dict()
    got = tensors(tmp_path / "m")
    changed = [k for k in got if not torch.equal(got[k], tensors(evo)[k])]
    assert len(changed) == n
    for k in changed:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=atol)
    # --as-adapter passes DoRA through: PEFT on the evolved model gives the same logits
    ok("port", "-p", ad, "--to", evo, "-o", tmp_path / "a", "--as-adapter")
    a, o = tensors(tmp_path / "a"), tensors(ad)
    assert any("lora_magnitude_vector" in k for k in a)
    assert all(torch.equal(a[k], o[k]) for k in o)  # same names on this model, same tensors
    torch.testing.assert_close(peft_logits(evo, tmp_path / "a"), peft_logits(evo, ad), rtol=0, atol=1e-6)


def test_dora_relative(models, tmp_path):
    """m' = m * ||W_new|| / ||W_old|| per output feature, computed here apart from portllm."""
    from safetensors.torch import load_file

    base, evo, ad = _dora(models, tmp_path, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "o"
    # without the old base (nor recorded norms) it cannot be done
    nobase = tmp_path / "nobase"
    shutil.copytree(ad, nobase)
    doc = json.loads((nobase / "adapter_config.json").read_text())
    doc["base_model_name_or_path"] = "/nonexistent"
    (nobase / "adapter_config.json").write_text(json.dumps(doc))
    refused(1, "port", "-p", nobase, "--to", evo, "-o", out, "--dora", "relative", words=["norms", "--base"])
    refused(2, "port", "-p", ad, "--to", evo, "-o", out, "--dora", "sideways", words=["--dora"])

    ok("port", "-p", ad, "--to", evo, "-o", tmp_path / "rel", "--dora", "relative")
    got, new, old = tensors(tmp_path / "rel"), tensors(evo), tensors(base)
    f = load_file(ad / "adapter_model.safetensors")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    for layer in (0, 1):
        for proj in ("q_proj", "v_proj"):
            key = f"model.layers.{layer}.self_attn.{proj}.weight"
            pre = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            A, B, m = (f[f"{pre}.lora_A.weight"].double(), f[f"{pre}.lora_B.weight"].double(),
                       f[f"{pre}.lora_magnitude_vector"].double())
            Wn, Wo = new[key].double(), old[key].double()
            V = Wn + s * B @ A
            want = (m * Wn.norm(dim=1) / Wo.norm(dim=1) / V.norm(dim=1))[:, None] * V
            torch.testing.assert_close(got[key].double(), want, rtol=0, atol=1e-5)
    # relative on the old base itself is absolute
    ok("port", "-p", ad, "--to", base, "-o", tmp_path / "r0", "--dora", "relative")
    ok("port", "-p", ad, "--to", base, "-o", tmp_path / "a0")
    assert all(torch.equal(a, b) for a, b in zip(tensors(tmp_path / "r0").values(), tensors(tmp_path / "a0").values()))
    # extract records the old norms: the patch ports relatively without its base
    ok("extract", ad, "-o", tmp_path / "p")
    norms = json.loads((tmp_path / "p" / "portllm.json").read_text())["dora"]["base_norms"]
    assert set(norms) == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    moved = tmp_path / "p2"
    shutil.copytree(tmp_path / "p", moved)
    man = json.loads((moved / "portllm.json").read_text())
    man["base"]["model"] = "/nonexistent"
    (moved / "portllm.json").write_text(json.dumps(man))
    ok("port", "-p", moved, "--to", evo, "-o", tmp_path / "rel2", "--dora", "relative")
    again = tensors(tmp_path / "rel2")
    assert all(torch.equal(again[k], got[k]) for k in got)
    # --as-adapter --dora relative writes m' so that PEFT serves the relative policy
    ok("port", "-p", ad, "--to", evo, "-o", tmp_path / "ra", "--dora", "relative", "--as-adapter")
    torch.testing.assert_close(peft_logits(evo, tmp_path / "ra"), logits(auto(tmp_path / "rel")), rtol=0, atol=1e-5)


# -- 2. MoE experts (target_parameters) ----------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mixtral", "qwen3moe"])
def test_moe_experts_all_linear(models, tmp_path, arch):
    base, evo = models(arch)
    ad = make_adapter(base, tmp_path / "ad", target_modules="all-linear", r=2, lora_alpha=4)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert "gate_up_proj" in cfg["target_parameters"]
    stored = tensors(evo)
    assert any(".experts.0." in k for k in stored)  # one matrix per expert on disk
    doc = ok("port", "-p", ad, "--to", evo, "-o", tmp_path / "m", "--verify")
    assert doc["patch_tensors"]["applied"] == doc["patch_tensors"]["total"] == 14
    want = peft_merged(evo, ad).state_dict()
    got_model = auto(tmp_path / "m").state_dict()
    evo_model = auto(evo).state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got_model[k], v, rtol=0, atol=1e-6, msg=k)
    assert sum(not torch.equal(evo_model[k], got_model[k]) for k in want) == 7  # q k v o, router, 2 expert stacks
    ok("port", "-p", ad, "--to", evo, "-o", tmp_path / "a", "--as-adapter")
    served = peft_logits(evo, tmp_path / "a")
    torch.testing.assert_close(served, peft_logits(evo, ad), rtol=0, atol=1e-5)
    assert (served - logits(auto(evo))).abs().max() > 1e-3


# -- 2. lora_bias, modules_to_save, biases, trainable tokens ------------------------------------------
def test_lora_bias(models, tmp_path):
    base, evo = models("llama-bias")
    ad = make_adapter(base, tmp_path / "ad", target_modules=["q_proj", "v_proj"], lora_bias=True)
    doc = ok("port", "-p", ad, "--to", evo, "-o", tmp_path / "m")
    assert doc["patch_tensors"] == {"applied": 12, "total": 12}
    got, ref = tensors(tmp_path / "m"), peft_merged(evo, ad).state_dict()
    assert_close_all(got, ref)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.bias"], tensors(evo)["model.layers.0.self_attn.q_proj.bias"])
    ok("port", "-p", ad, "--to", evo, "-o", tmp_path / "a", "--as-adapter")
    torch.testing.assert_close(peft_logits(evo, tmp_path / "a"), peft_logits(evo, ad), rtol=0, atol=1e-6)


WHOLE = {
    "modules_to_save": dict(modules_to_save=["lm_head", "embed_tokens", "norm"]),
    "trainable_tokens": dict(trainable_token_indices=[3, 5, 7]),
    "bias_all": dict(bias="all"),
    "bias_lora_only": dict(bias="lora_only"),
}


@pytest.mark.parametrize("kind", list(WHOLE))
def test_whole_tensors(models, tmp_path, kind):
    from safetensors.torch import load_file

    base, evo = models("llama-bias")
    ad = make_adapter(base, tmp_path / "ad", target_modules=["q_proj", "v_proj"], **WHOLE[kind])
    f = load_file(ad / "adapter_model.safetensors")
    saved = {k.removeprefix("base_model.model."): v for k, v in f.items() if "lora_" not in k}
    assert saved
    new, old = tensors(evo), tensors(base)

    # copy: PEFT's own behaviour, bit for bit
    ok("port", "-p", ad, "--to", evo, "-o", tmp_path / "copy", "--modules-to-save", "copy")
    ref = peft_merged(evo, ad).state_dict()
    assert_close_all(tensors(tmp_path / "copy"), ref, atol=0)

    # delta (default): new + (saved - old), written here apart from portllm; the LoRA parts as PEFT
    doc = ok("port", "-p", ad, "--to", evo, "-o", tmp_path / "delta")
    assert doc["patch_tensors"]["applied"] == doc["patch_tensors"]["total"] == len(f)
    got = tensors(tmp_path / "delta")
    touched = set()
    for k, v in saved.items():
        if k.endswith("token_adapter.trainable_tokens_delta"):
            key = k.replace("token_adapter.trainable_tokens_delta", "weight")
            idx = [3, 5, 7]
            want = new[key].clone()
            want[idx] = (new[key][idx].double() + (v.double() - old[key][idx].double())).float()
        else:
            key = k.replace(".base_layer.bias", ".bias")
            want = (new[key].double() + (v.double() - old[key].double())).float()
        torch.testing.assert_close(got[key], want, rtol=0, atol=1e-6, msg=key)
        assert not torch.equal(got[key], new[key]) and not torch.equal(got[key], v if v.shape == got[key].shape else got[key] + 1)
        touched.add(key)
    assert_close_all(got, ref, keys=[k for k in got if k not in touched])

    # --as-adapter writes the ported tensors as PEFT stores them
    ok("port", "-p", ad, "--to", evo, "-o", tmp_path / "a", "--as-adapter")
    assert set(tensors(tmp_path / "a")) == set(f)
    torch.testing.assert_close(peft_logits(evo, tmp_path / "a"), logits(auto(tmp_path / "delta")), rtol=0, atol=1e-5)

    # without the old base: refused, the hint names --base and copy
    nobase = make_adapter(base, tmp_path / "nobase", target_modules=["q_proj"], record_base=False, **WHOLE[kind])
    for extra in ([], ["--as-adapter"]):
        refused(1, "port", "-p", nobase, "--to", evo, "-o", tmp_path / "o", *extra,
                words=["old base", "--base", "--modules-to-save copy"])
    ok("port", "-p", nobase, "--to", evo, "-o", tmp_path / "o", "--modules-to-save", "copy")


def test_added_tokens_only_in_the_adapter_are_copied(models, tmp_path):
    """Rows past the old base's vocabulary exist only in the adapter: copied as they are."""
    from portllm_cli.core.merge import WholeTensorEdit, merge_tensor

    old = torch.randn(6, 4)
    saved = torch.randn(8, 4)
    new = torch.randn(8, 4)
    got = merge_tensor(new, [WholeTensorEdit(saved, lambda a, b: old[a:b], 6)], block_bytes=3 * 16)
    torch.testing.assert_close(got[:6], new[:6] + (saved[:6] - old), rtol=0, atol=1e-6)
    assert torch.equal(got[6:], saved[6:])


# -- 2. multimodal: Gemma 3 stored as language_model.model.* -------------------------------------------
def test_gemma3_multimodal_layout(models, tmp_path):
    base, evo = models("gemma3mm")
    stored = tensors(evo)
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in stored
    ad = make_adapter(base, tmp_path / "ad", target_modules=r".*language_model.*\.(q_proj|v_proj)")
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in tensors(ad)

    d = ok("diff", ad, evo)
    assert d["verdict"] == "compatible"
    doc = ok("port", "-p", ad, "--to", evo, "-o", tmp_path / "m", "--verify")
    assert doc["modules_merged"] == 4
    want = peft_merged(evo, ad)
    got = auto(tmp_path / "m")
    gs = got.state_dict()
    for k, v in want.state_dict().items():
        torch.testing.assert_close(gs[k], v, rtol=0, atol=0, msg=k)
    torch.testing.assert_close(logits(got), logits(want), rtol=0, atol=1e-5)

    ok("port", "-p", ad, "--to", evo, "-o", tmp_path / "a", "--as-adapter")
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in tensors(tmp_path / "a")
    torch.testing.assert_close(peft_logits(evo, tmp_path / "a"), peft_logits(evo, ad), rtol=0, atol=1e-6)
    x = ok("extract", ad, "-o", tmp_path / "p")
    assert x["modules"] == 4
    man = json.loads((tmp_path / "p" / "portllm.json").read_text())
    assert "model.language_model.layers.0.self_attn.q_proj" in man["base"]["fingerprint"]["modules"]

    # a LoRA on Gemma 3's tied lm_head: merged into the shared matrix, with a warning
    ad2 = make_adapter(base, tmp_path / "ad2", target_modules=r".*language_model.*\.q_proj|lm_head")
    res = run("port", "-p", ad2, "--to", evo, "-o", tmp_path / "m2", "--json")
    assert res.exit_code == 0, res.stderr
    assert "tied to model.language_model.embed_tokens.weight" in res.stderr
    want2 = peft_merged(evo, ad2).state_dict()
    gs2 = auto(tmp_path / "m2").state_dict()
    for k, v in want2.items():
        torch.testing.assert_close(gs2[k], v, rtol=0, atol=0, msg=k)


# -- eval: the same plan on the loaded model ---------------------------------------------------------
def test_eval_patches_the_loaded_model_like_port(models, tmp_path):
    from portllm_cli.core.evaluate import patched
    from portllm_cli.core.plan import prepare_patch
    from portllm_cli.patch.format import read_patch

    base, evo = models("mixtral")
    ad = make_adapter(base, tmp_path / "ad", target_modules="all-linear", r=2, lora_alpha=4,
                      modules_to_save=["lm_head"])
    ok("port", "-p", ad, "--to", evo, "-o", tmp_path / "m")
    patch, old = prepare_patch(read_patch(ad))
    model = auto(evo)
    plain = logits(model)
    with patched(model, patch, old=old):
        inside = logits(model)
    torch.testing.assert_close(inside, logits(auto(tmp_path / "m")), rtol=0, atol=1e-6)
    assert torch.equal(logits(model), plain)  # restored
    assert math.isfinite(float(inside.abs().max()))


def test_eval_and_diff_refuse_a_pissa_adapter_without_its_base(models, tmp_path):
    base, evo = models("llama")
    raw = make_adapter(base, tmp_path / "raw", target_modules=["q_proj"], init_lora_weights="pissa",
                       train=False, record_base=False)
    data = tmp_path / "d.jsonl"
    data.write_text('{"sentence": "good", "label": 1}\n')
    for args in (["eval", "--model", evo, "--patch", raw, "--tasks", "sst2", "--data", f"sst2={data}"],
                 ["diff", raw, evo]):
        res = run(*args)
        assert res.exit_code == 1, res.stderr
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("Error:")]
        assert len(errors) == 1 and "old base" in errors[0] and "pissa" in errors[0]
        assert "--base" in res.stderr and res.stdout == ""


def test_whole_tensor_and_lora_on_one_tied_matrix_is_refused(models, tmp_path):
    """PEFT keeps a modules_to_save copy of lm_head apart from the tied embedding it LoRA-adapts;
    a checkpoint whose config ties them cannot hold both: refused, not guessed."""
    base, evo = models("llama-tied")
    ad = make_adapter(base, tmp_path / "ad", target_modules=["embed_tokens"], modules_to_save=["lm_head"])
    refused(1, "port", "-p", ad, "--to", evo, "-o", tmp_path / "o", "--modules-to-save", "copy",
            words=["tie"])
