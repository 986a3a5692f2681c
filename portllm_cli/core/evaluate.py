"""Score base, evolved and patched models on the same tasks with lm-evaluation-harness, in one process.

Each model is loaded once. A patch is merged into the loaded weights in memory
(W' = (W.float() + scale * B @ A).to(W.dtype), exactly what ``portllm port`` writes), the model is
scored through lm-eval's Python API (``simple_evaluate`` with an ``HFLM`` wrapping the live
model), and the original tensors are copied back: only the targeted weights are kept aside, and
the restored weights are checked bitwise against those copies before the next configuration.

Local data (``--data sst2=reviews.jsonl``) goes through the same recipes as ``portllm finetune``
(portllm_cli.core.tasks) and becomes an lm-eval task on the fly. Local tasks are scored offline
(HF_HUB_OFFLINE, HF_DATASETS_OFFLINE); a built-in task loads its data with ``datasets`` from the
Hub (or HF_ENDPOINT) or its cache, as the environment allows, even in a run that mixes the two.
Everything that touches lm-eval itself lives in ``core.harness``; the settings are one
``core.config.EvalConfig``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from portllm_cli.core import harness
from portllm_cli.core.config import EvalConfig
from portllm_cli.core.progress import ProgressFn, no_progress
from portllm_cli.errors import (
    IncompatibleError,
    NotFoundError,
    PortllmError,
    UsageError,
)

if TYPE_CHECKING:
    import torch


# -- results ----------------------------------------------------------------------------------
@dataclass
class ConfigResult:
    model: str  # the --model spec as typed
    patch: str | None  # the --patch spec as typed, None for the model alone
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> {metric, value, stderr, n}
    lm_eval_results: dict[str, Any] = field(default_factory=dict)  # task -> lm-eval's own structure
    # task -> lm-eval's per-example records (only with log samples; not part of the JSON document)
    samples: dict[str, list[Any]] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return config_name(self.model, self.patch)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "patch": self.patch,
            "scores": self.scores,
            "lm_eval": self.lm_eval_results,
        }


@dataclass
class Gain:
    model: str
    patch: str
    task: str
    metric: str
    base: float | None
    patched: float | None

    @property
    def gain(self) -> float | None:
        if self.base is None or self.patched is None:
            return None
        return self.patched - self.base

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "patch": self.patch, "task": self.task, "metric": self.metric,
                "base": self.base, "patched": self.patched, "gain": self.gain}


@dataclass
class EvalReport:
    rows: list[ConfigResult]
    gains: list[Gain]
    tasks: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {model, patch, reason}
    settings: dict[str, Any] = field(default_factory=dict)
    log_samples_dir: Path | None = None
    elapsed_s: float = 0.0

    def best(self, task: str) -> list[str]:
        """Names of the best configurations on a task (the highest value; several on a tie)."""
        vals = {r.name: r.scores.get(task, {}).get("value") for r in self.rows}
        top = max((v for v in vals.values() if v is not None), default=None)
        return [] if top is None else [n for n, v in vals.items() if v == top]

    def as_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "configurations": [r.as_dict() for r in self.rows],
            "gains": [g.as_dict() for g in self.gains],
            "best": {t: self.best(t) for t in self.tasks},
            "skipped": self.skipped,
            "settings": self.settings,
            "log_samples": str(self.log_samples_dir) if self.log_samples_dir else None,
            "seconds": round(self.elapsed_s, 3),
            "warnings": [],
        }


def config_name(model: str, patch: str | None) -> str:
    return model if patch is None else f"{model}+{patch}"


# -- argument checks --------------------------------------------------------------------------
def parse_data_specs(specs: list[str]) -> tuple[dict[str, Path], Path | None]:
    """``TASK=PATH`` pairs, plus at most one bare directory holding files named by task."""
    data: dict[str, Path] = {}
    directory: Path | None = None
    for spec in specs:
        if "=" in spec:
            task, _, path = spec.partition("=")
            task = task.strip()
            if not task or not path:
                raise UsageError(f"--data {spec!r}: expected TASK=PATH")
            if task in data:
                raise UsageError(f"--data names task {task!r} twice")
            data[task] = Path(os.path.expanduser(path))
        else:
            if directory is not None:
                raise UsageError("--data: give at most one directory without TASK= (files inside are named by task)")
            directory = Path(os.path.expanduser(spec))
            if not directory.is_dir():
                raise NotFoundError(f"--data {spec}: no such directory (use TASK=PATH for a single file)")
    return data, directory


# -- configurations ---------------------------------------------------------------------------
@dataclass
class _Model:
    spec: str
    path: Path
    ckpt: Any


@dataclass
class _Patch:
    spec: str
    patch: Any  # portllm_cli.patch.format.Patch, converted (core.plan.prepare_patch)
    old: Any = None  # the old base, when the patch needs it (core.plan.OldBase)


@dataclass
class _Config:
    model: _Model
    patch: _Patch | None
    key_map: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return config_name(self.model.spec, self.patch.spec if self.patch else None)


def plan_configurations(
    models: list[_Model], patches: list[_Patch], only: list[str] | None
) -> tuple[list[_Config], list[dict[str, str]]]:
    """Each model alone, then each model with each patch that fits it; --only keeps exact names."""
    configs: list[_Config] = []
    skipped: list[dict[str, str]] = []
    fits_any: dict[str, list[str]] = {p.spec: [] for p in patches}
    for m in models:
        configs.append(_Config(m, None))
        for p in patches:
            rep = _fit(p.patch, m)
            if rep.compatible:
                configs.append(_Config(m, p, dict(rep.key_map)))
            else:
                reason = rep.errors[0] + (f" (and {len(rep.errors) - 1} more)" if len(rep.errors) > 1 else "")
                skipped.append({"model": m.spec, "patch": p.spec, "reason": reason})
                fits_any[p.spec].append(reason)
    for p in patches:
        if not any(c.patch is p for c in configs):
            raise IncompatibleError(
                f"patch {p.spec} fits none of the models: {fits_any[p.spec][0]}",
                hint="run 'portllm diff PATCH MODEL' for the full report",
            )
    if only:
        names = {c.name: c for c in configs}
        skipped_names = {config_name(s["model"], s["patch"]): s for s in skipped}
        kept = []
        for spec in only:
            if spec in names:
                if names[spec] not in kept:
                    kept.append(names[spec])
            elif spec in skipped_names:
                s = skipped_names[spec]
                raise IncompatibleError(f"--only {spec}: the patch does not fit the model: {s['reason']}")
            else:
                close = difflib.get_close_matches(spec, list(names), n=3, cutoff=0.4)
                raise UsageError(
                    f"--only {spec!r} names no configuration"
                    + (f"; did you mean {', '.join(close)}?" if close else ""),
                    hint="configurations are MODEL or MODEL+PATCH, spelled as given to --model and --patch: "
                    + ", ".join(names),
                )
        order = {id(c): i for i, c in enumerate(configs)}
        configs = sorted(kept, key=lambda c: order[id(c)])
    return configs, skipped


def _open_for_fit(path: Path, allow_pickle: bool) -> Any:
    """What a patch is checked against: the checkpoint's names and shapes, or a GGUF's own."""
    from portllm_cli.core.models import gguf_file
    from portllm_cli.io.checkpoint import Checkpoint

    name = gguf_file(path)
    if name is not None:
        from portllm_cli.core.gguf_port import open_target

        return open_target(path if path.is_file() else path / name)
    return Checkpoint.open(path, allow_pickle=allow_pickle)


def _fit(patch: Any, m: _Model) -> Any:
    from portllm_cli.core.compat import check_compatibility
    from portllm_cli.io.checkpoint import Checkpoint

    if isinstance(m.ckpt, Checkpoint):
        return check_compatibility(patch, m.ckpt)
    from portllm_cli.core.gguf_port import check_fit

    # transformers' GGUF loader names the weights as the patch's modules (module.weight)
    return check_fit(patch, m.ckpt, m.spec)[0]


# -- models -----------------------------------------------------------------------------------
def load_model(path: Path, *, dtype: str, device: str, trust_remote_code: bool, allow_pickle: bool) -> tuple[Any, Any]:
    """The model (eval mode, on ``device``) and its tokenizer, loaded as finetune and demo load them."""
    from portllm_cli.core.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    model = load_causal_lm(path, dtype, device, trust_remote_code, allow_pickle=allow_pickle)
    return model, tok


@contextlib.contextmanager
def patched(model: Any, patch: Any, key_map: dict[str, str] | None = None, *, old: Any = None,
            policy: Any = None) -> Iterator[dict[str, "torch.Tensor"]]:
    """Merge a patch into the live weights; on exit copy the originals back and check them bitwise.

    What changes is planned on the loaded model itself (``core.plan`` over ``Layout.live``), so
    this is the same merge as ``portllm port`` for every part of the patch (DoRA, biases, whole
    tensors, experts). Weights that share memory (tied) are changed and restored once.
    ``key_map`` is accepted for callers of the old signature and not needed.
    """
    import torch

    from portllm_cli.core.layout import Layout
    from portllm_cli.core.merge import Workspace, merge_in_place
    from portllm_cli.core.plan import build_plan

    plan = build_plan(patch, Layout.live(model), policy=policy, old=old)
    params = dict(model.state_dict(keep_vars=True))
    saved: dict[int, tuple[str, Any, torch.Tensor]] = {}  # storage address -> (name, param, original)
    ws = Workspace()
    try:
        with torch.no_grad():
            for key, edits in plan.edits.items():
                name, _, expert = key.partition("[")
                p = params[name]
                saved.setdefault(p.data_ptr(), (name, p, p.detach().clone()))
                target = p.data[int(expert[:-1])] if expert else p.data
                merge_in_place(target, edits, ws)  # the same merge as `portllm port`
        yield {name: orig for name, _, orig in saved.values()}
    finally:
        with torch.no_grad():
            for _, p, orig in saved.values():
                p.copy_(orig)
        bad = [name for name, p, orig in saved.values() if not torch.equal(p, orig)]
        if bad:  # later rows would be scored on the wrong weights
            raise PortllmError(f"internal error: {len(bad)} weights were not restored bitwise after a patch ({bad[0]})")


# -- scoring ----------------------------------------------------------------------------------
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:80] or "config"


def _write_samples(directory: Path, index: int, name: str, samples: dict[str, list[Any]]) -> None:
    d = directory / f"{index:02d}-{_slug(name)}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "configuration.txt").write_text(name + "\n", encoding="utf-8")
    for task, rows in samples.items():
        with open(d / f"{_slug(task)}.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, default=harness.json_default, ensure_ascii=False) + "\n")


def _gains(rows: list[ConfigResult], tasks: list[str]) -> list[Gain]:
    base = {r.model: r for r in rows if r.patch is None}
    out = []
    for r in rows:
        if r.patch is None or r.model not in base:
            continue
        for t in tasks:
            s = r.scores.get(t, {})
            b = base[r.model].scores.get(t, {})
            out.append(Gain(r.model, r.patch, t, s.get("metric") or "", b.get("value"), s.get("value")))
    return out


def score_loaded(
    model: Any,
    tokenizer: Any,
    model_name: str,
    patches: list[tuple[str | None, Any, Any]],
    plan: harness.TaskPlan,
    config: EvalConfig,
    *,
    log_samples: bool = False,
    on_task: Callable[[str, str], None] | None = None,
    policy: Any = None,
) -> list[ConfigResult]:
    """Score a model already in memory on every task of ``plan``: for each (name, patch, old base),
    with that patch merged in (None: the model alone), removed and checked bitwise before the next.
    The old base (``core.plan.prepare_patch``'s) is None unless the patch's parts need it.
    ``policy`` (``core.plan.Policy``: ``--scale``, ``--dora``, ``--modules-to-save``) is the one
    ``port`` would merge with; default ``port``'s defaults.
    ``on_task(configuration name, task)`` is called after each task."""
    lm = harness.make_lm(model, tokenizer, config.batch)
    rows = []
    for name, patch, old in patches:
        cname = config_name(model_name, name)
        ctx = patched(model, patch, old=old, policy=policy) if patch is not None else contextlib.nullcontext()
        with ctx:
            scores, sections, samples = harness.run_tasks(
                lm, plan, limit=config.limit, num_fewshot=config.num_fewshot, log_samples=log_samples,
                on_task=(lambda task, _c=cname: on_task(_c, task)) if on_task is not None else None,
            )
        rows.append(ConfigResult(model_name, name, scores, sections, samples))
    return rows


# -- the entry point --------------------------------------------------------------------------
def _clean_tasks(tasks: list[str]) -> list[str]:
    clean = []
    for t in tasks:
        t = t.strip()
        if t and t not in clean:
            clean.append(t)
    if not clean:
        raise UsageError("--tasks is empty", hint="name at least one task, e.g. --tasks sst2")
    return clean


def evaluate(
    models: list[str],
    patches: list[str],
    tasks: list[str],
    config: EvalConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    **overrides: Any,
) -> EvalReport:
    """Evaluate every model alone and with every patch that fits it, on every task.

    ``config`` holds every setting (the command line builds it once); keyword ``overrides``
    replace single fields (``evaluate([m], [p], ["sst2"], data={"sst2": path}, limit=100)``).
    """
    from portllm_cli.core.models import check_causal_lm, resolve_device, torch_dtype
    from portllm_cli.io.atomic import atomic_output_dir, check_output
    from portllm_cli.core.plan import NO_BASE_FLAG_HINT, prepare_patch
    from portllm_cli.patch.format import read_patch
    from portllm_cli.resolve import resolve

    t0 = time.perf_counter()
    report = progress or no_progress
    if not models:
        raise UsageError("give at least one --model")
    if len(set(models)) != len(models):
        raise UsageError("the same --model is given twice")
    if len(set(patches)) != len(patches):
        raise UsageError("the same --patch is given twice")
    tasks = _clean_tasks(list(tasks))
    cfg = EvalConfig.build(config, overrides)
    dev = resolve_device(cfg.device)
    torch_dtype(cfg.dtype, dev)  # a bad --dtype fails here, before anything loads
    samples_dir = Path(cfg.log_samples_dir) if cfg.log_samples_dir is not None else None
    if samples_dir is not None:
        check_output(samples_dir, overwrite=cfg.overwrite)

    loaded_models = []
    for spec in models:
        res = resolve(spec, kind="model", progress=report, allow_pickle=cfg.allow_pickle,
                      trust_remote_code=cfg.trust_remote_code)
        # the checkpoint's names and shapes are what a patch is checked against; a model evaluated
        # without patches may also be a GGUF directory, which only the loader reads
        ckpt = _open_for_fit(res.path, cfg.allow_pickle) if patches else None
        check_causal_lm(res.path, cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)  # fail before any scoring
        loaded_models.append(_Model(spec, res.path, ckpt))
    loaded_patches = []
    for spec in patches:
        res = resolve(spec, kind="patch", progress=report)
        patch, old = prepare_patch(read_patch(res.path), allow_pickle=cfg.allow_pickle, hint=NO_BASE_FLAG_HINT)
        loaded_patches.append(_Patch(spec, patch, old))
    configs, skipped = plan_configurations(loaded_models, loaded_patches, list(cfg.only) if cfg.only else None)

    with tempfile.TemporaryDirectory(prefix="portllm-eval-") as tmp, contextlib.ExitStack() as stack:
        total = len(configs) * len(tasks)
        done = 0

        def tick(name: str, task: str) -> None:
            nonlocal done
            done += 1
            report(f"eval · {name} · {task}", done, total)

        # lm-eval's built-in task index (only built when a built-in task is named) takes a while
        report("eval · reading tasks", 0, total)
        plan = harness.plan_offline(stack, tasks, dict(cfg.data), cfg.data_dir, Path(tmp))
        rows: list[ConfigResult] = []
        out_ctx = (atomic_output_dir(samples_dir, overwrite=cfg.overwrite) if samples_dir is not None
                   else contextlib.nullcontext(None))
        with out_ctx as samples_tmp, harness.quiet_lm_eval():
            for m in loaded_models:
                group = [c for c in configs if c.model is m]
                if not group:
                    continue
                report(f"eval · loading {m.spec}", done, total)
                model_obj, tok = load_model(m.path, dtype=cfg.dtype, device=dev,
                                            trust_remote_code=cfg.trust_remote_code, allow_pickle=cfg.allow_pickle)
                todo = [(c.patch.spec, c.patch.patch, c.patch.old) if c.patch else (None, None, None)
                        for c in group]
                for row in score_loaded(model_obj, tok, m.spec, todo, plan, cfg,
                                        log_samples=samples_tmp is not None, on_task=tick):
                    if samples_tmp is not None:
                        _write_samples(Path(samples_tmp), len(rows), row.name, row.samples)
                    rows.append(row)
                del model_obj, tok
                if m is not loaded_models[-1]:
                    _free_memory()  # before the next model is loaded
    settings = {
        "models": models, "patches": patches, "limit": cfg.limit, "num_fewshot": cfg.num_fewshot,
        "batch_size": cfg.batch, "device": dev, "dtype": cfg.dtype, "only": list(cfg.only) if cfg.only else None,
        "data": {t: str(lt.source.resolve()) for t, lt in plan.local.items()},
        "lm_eval_tasks": plan.lm_names,
    }
    return EvalReport(rows, _gains(rows, tasks), tasks, skipped, settings, samples_dir, time.perf_counter() - t0)


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# -- the JSON file ----------------------------------------------------------------------------
def check_report_path(path: Path, *, overwrite: bool) -> None:
    from portllm_cli.errors import OutputExistsError

    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"--output {path}: is a directory, expected a file name")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"--output {path}: already exists", hint="pass --overwrite to replace it")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise OutputExistsError(f"--output {path}: the directory {parent} does not exist")


def write_report(doc: dict[str, Any], path: Path, *, overwrite: bool = False) -> None:
    """Write the JSON document atomically: a temporary sibling, fsynced, then renamed."""
    from portllm_cli.io.atomic import write_file_atomic
    from portllm_cli.io.strict_json import dumps

    check_report_path(path, overwrite=overwrite)
    write_file_atomic(Path(path), dumps(doc, default=harness.json_default) + "\n")
