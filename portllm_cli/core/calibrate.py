"""Choose the scale a patch is ported with from a few labelled examples: no optimizer, no gradients.

``portllm port --calibrate TASK=FILE`` scores the evolved model with the patch merged at each
scale lambda of a grid (W + lambda * s * B @ A, the merge ``port`` writes) by the log-likelihood of
the gold answers of FILE, read through the same task recipes as ``finetune`` and ``eval``, and
ports with the best lambda. The model is loaded once; for each lambda the targeted weights are
rebuilt from copies of the originals kept aside, and the originals are put back (and checked bit for
bit) at the end.

Scores, per example, computed the way lm-eval scores a request (the context and the continuation
tokenized as ``encode(context + continuation)`` split at ``len(encode(context))``):

* ``loglik``: log P(gold continuation | context), summed over its tokens (nats).
* ``choice`` (choice tasks): the same, normalised over the task's choices,
  ``loglik(gold) - logsumexp_j loglik(choice_j)``: the log-likelihood of the gold answer under the
  task's own decision rule (lm-eval picks the choice of highest log-likelihood).
* ``accuracy`` (choice tasks): argmax_j loglik(choice_j) == gold, as lm-eval's ``acc``.

The metric that chooses (``auto``, the default) is ``choice`` for choice tasks and ``loglik`` for
the others. ``choice`` is a proper scoring rule for the classifier the task scores: with labels
drawn from a model in the patch's family its expected value is highest at that model's scale
(Gibbs' inequality; tests/test_calibrate.py builds such a case). ``loglik`` also rewards moving
probability onto the answer words as such, whichever is right, and can pick another scale there.

The grid's values are scored, and so is lambda = 0 (the evolved model alone) as a reference; the
chosen lambda is the grid value with the highest mean score, ties going to the value nearest 1.
Only the global scale is searched (one lambda for every module).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from portllm_cli.core.progress import ProgressFn, no_progress
from portllm_cli.errors import InvalidInputError, NotFoundError, PortllmError, UsageError

if TYPE_CHECKING:
    import torch

    from portllm_cli.patch.format import Patch

DEFAULT_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
METRICS = ("auto", "loglik", "choice")
MAX_GRID = 64
FEW_EXAMPLES = 32  # fewer than this: the choice is noisy, say so
BATCH_SIZE = 16
MAX_LENGTH = 2048  # tokens per scored sequence at most (contexts are cut from the left)


# -- arguments --------------------------------------------------------------------------------
def parse_spec(spec: str) -> tuple[str, Path]:
    """``TASK=FILE`` -> (task, path); the task must be a recipe with answers to score."""
    from portllm_cli.core import tasks as recipes

    task, sep, path = (spec or "").partition("=")
    task, path = task.strip(), path.strip()
    if not sep or not task or not path:
        raise UsageError(f"--calibrate {spec!r}: expected TASK=FILE", hint="e.g. --calibrate sst2=calibration.jsonl")
    recipe = recipes.get_recipe(task)
    if recipe.kind == "text":
        raise UsageError(f"--calibrate {spec!r}: task {recipe.name} has no answers to score",
                         hint="calibrate on the patch's own task: sst2, boolq, ..., gsm8k or completion")
    return recipe.name, Path(os.path.expanduser(path))


def _number(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise UsageError(f"--calibrate-grid: {text!r} is not a number ({what})") from None
    if not math.isfinite(v):
        raise UsageError(f"--calibrate-grid: {text!r} is not a finite number")
    return v


def parse_grid(text: str | None) -> list[float]:
    """``0.5,1,1.5`` (a list) or ``0.25:2:0.25`` (start:stop:step, stop included) -> sorted scales.

    Every value finite and non-zero (0 is the evolved model alone, always scored as the reference),
    no duplicates, at most MAX_GRID values.
    """
    if text is None:
        return list(DEFAULT_GRID)
    text = text.strip()
    if not text:
        raise UsageError("--calibrate-grid is empty", hint="e.g. --calibrate-grid 0.5,1,1.5 or 0.25:2:0.25")
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3 or "," in text:
            raise UsageError(f"--calibrate-grid {text!r}: a range is START:STOP:STEP")
        start, stop, step = (_number(p.strip(), "range") for p in parts)
        if step <= 0 or stop < start:
            raise UsageError(f"--calibrate-grid {text!r}: needs STEP > 0 and STOP >= START")
        n = int(math.floor((stop - start) / step + 1e-9)) + 1
        if n > MAX_GRID:
            raise UsageError(f"--calibrate-grid {text!r}: {n} values, at most {MAX_GRID}")
        values = [round(start + i * step, 12) for i in range(n)]
    else:
        values = [_number(p.strip(), "list") for p in text.split(",") if p.strip()]
        if len(values) > MAX_GRID:
            raise UsageError(f"--calibrate-grid: {len(values)} values, at most {MAX_GRID}")
    if any(v == 0 for v in values):
        raise UsageError("--calibrate-grid: 0 is not a scale to port with (the evolved model alone is always "
                         "scored as the reference)")
    if len(set(values)) != len(values):
        raise UsageError(f"--calibrate-grid {text!r}: a value is repeated")
    if not values:
        raise UsageError("--calibrate-grid is empty")
    return sorted(values)


def check_metric(metric: str, kind: str | None = None) -> str:
    """A metric name; with the data's ``kind`` ("choice"/"generate"), ``auto`` resolved and
    ``choice`` refused for a task without choices."""
    metric = str(getattr(metric, "value", metric))
    if metric not in METRICS:
        raise UsageError(f"--calibrate-metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if kind is not None:
        if metric == "auto":
            return "choice" if kind == "choice" else "loglik"
        if metric == "choice" and kind != "choice":
            raise UsageError("--calibrate-metric choice needs a task with choices (sst2, boolq, ...)",
                             hint="use --calibrate-metric loglik")
    return metric


# -- data ------------------------------------------------------------------------------------
@dataclass
class CalibrationData:
    task: str
    path: Path
    sha256: str  # of the whole file, as `finetune` records its training data
    rows_in_file: int
    examples: list[Any]  # core.tasks.Example, the first `limit` rows
    kind: str  # "choice" or "generate"

    def fingerprint(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve()), "sha256": self.sha256, "rows_in_file": self.rows_in_file,
                "rows_used": len(self.examples)}


def load_data(task: str, path: Path, *, limit: int | None = None) -> CalibrationData:
    """The first ``limit`` rows of a local file through the task's recipe; fails before any model loads."""
    from portllm_cli.core import tasks as recipes
    from portllm_cli.io.hashing import sha256_file

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"--calibrate-limit must be a positive number of rows, got {limit!r}")
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"--calibrate {task}={path}: no such file")
    recipe = recipes.get_recipe(task)
    rows = recipes.load_rows(recipe, path, split="eval")
    used = rows if limit is None else rows[:limit]
    examples = recipes.read_examples(recipe, used, path)
    kind = "choice" if recipe.kind == "choice" else "generate"
    return CalibrationData(recipe.name, path, sha256_file(path), len(rows), examples, kind)


def _data_records(doc: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(where, sha256) of every data fingerprint in a manifest: any object under a key "data"
    (finetune writes source.data; other tools may nest theirs) that carries a sha256."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            here = f"{where}.{k}" if where else str(k)
            if k == "data" and isinstance(v, dict) and isinstance(v.get("sha256"), str):
                yield here, v["sha256"].removeprefix("sha256:")
            yield from _data_records(v, here)
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _data_records(v, f"{where}[{i}]")


def reused_training_data(manifest: dict[str, Any] | None, sha256: str) -> list[str]:
    """Where in the patch's manifest a training-data record has this sha256 (empty: none does)."""
    return sorted({w for w, h in _data_records(manifest or {}) if h.lower() == sha256.lower()})


# -- scoring ---------------------------------------------------------------------------------
@dataclass
class _Request:
    example: int
    choice: int  # index into the example's choices (0 for a generation task)
    context: list[int]
    continuation: list[int]


@dataclass
class _Sequence:
    """One forward pass: ``ids``, and for each request scored on it the position whose logits
    predict its first continuation token."""

    ids: list[int]
    reads: list[tuple[int, int, list[int]]]  # (request index, first position, continuation tokens)


def build_requests(examples: list[Any], tok: Any, *, max_length: int = MAX_LENGTH) -> list[_Request]:
    """Every (example, choice) as token ids, split into context and continuation as lm-eval does."""
    from portllm_cli.core.tasks import Example
    from portllm_cli.core.train import encode_example

    fallback = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    out = []
    for i, ex in enumerate(examples):
        pairs = (list(zip(ex.contexts, ex.choices)) if ex.choices is not None else [(ex.prompt, ex.target)])
        for j, (ctx, cont) in enumerate(pairs):
            ids, labels = encode_example(tok, Example(prompt=ctx, choices=None, label=None, target=cont), max_length)
            n_ctx = sum(1 for lab in labels if lab == -100)
            context, continuation = ids[:n_ctx], ids[n_ctx:]
            if not continuation:
                raise InvalidInputError(f"calibration example {i + 1}: the answer {cont!r} has no tokens")
            if not context:  # lm-eval scores an empty context after the end-of-text token
                if fallback is None:
                    raise InvalidInputError(f"calibration example {i + 1}: empty prompt and no BOS/EOS token")
                context = [fallback]
            out.append(_Request(i, j, context, continuation))
    return out


def plan_sequences(requests: list[_Request]) -> list[_Sequence]:
    """Requests as forward passes: one-token continuations of the same context share one pass."""
    seqs: list[_Sequence] = []
    shared: dict[tuple[int, ...], _Sequence] = {}
    for k, rq in enumerate(requests):
        pos = len(rq.context) - 1
        if len(rq.continuation) == 1:
            key = tuple(rq.context)
            seq = shared.get(key)
            if seq is None:
                seq = shared[key] = _Sequence(list(rq.context), [])
                seqs.append(seq)
            seq.reads.append((k, pos, list(rq.continuation)))
        else:
            seqs.append(_Sequence(rq.context + rq.continuation[:-1], [(k, pos, list(rq.continuation))]))
    return sorted(seqs, key=lambda s: -len(s.ids))  # similar lengths batch together


def score_requests(model: Any, seqs: list[_Sequence], n_requests: int, *, pad_id: int, batch_size: int = BATCH_SIZE,
                   tick: Any = None) -> list[float]:
    """log P(continuation | context) of every request, summed over its tokens, in float64."""
    import torch

    import inspect

    device = next(model.parameters()).device
    takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    out = [math.nan] * n_requests
    with torch.inference_mode():
        for b in range(0, len(seqs), batch_size):
            batch = seqs[b:b + batch_size]
            width = max(len(s.ids) for s in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, s in enumerate(batch):
                ids[i, : len(s.ids)] = torch.tensor(s.ids)
                mask[i, : len(s.ids)] = 1
            rows_b, rows_p, targets, owners = [], [], [], []
            for i, s in enumerate(batch):
                for k, pos, cont in s.reads:
                    for t, token in enumerate(cont):
                        rows_b.append(i)
                        rows_p.append(pos + t)
                        targets.append(token)
                        owners.append(k)
            # only the last positions of the batch go through the LM head (rows in a batch have
            # similar lengths): logits for the whole vocabulary at every prompt token would not fit
            keep = width - min(rows_p)
            inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            if takes_keep:
                logits = model(**inputs, logits_to_keep=keep).logits
                offset = width - logits.shape[1]
            else:
                logits = model(**inputs).logits
                offset = 0
            bi = torch.tensor(rows_b, device=logits.device)
            pi = torch.tensor(rows_p, device=logits.device) - offset
            logits = logits[bi, pi]
            logp = torch.log_softmax(logits.float(), dim=-1)
            picked = logp[torch.arange(len(targets), device=logp.device), torch.tensor(targets, device=logp.device)]
            for k, v in zip(owners, picked.double().cpu().tolist()):
                out[k] = v if math.isnan(out[k]) else out[k] + v
            if tick is not None:
                tick(len(batch))
    return out


@dataclass
class ScaleScore:
    scale: float
    loglik: float  # mean over examples of log P(gold | context)
    choice_loglik: float | None  # mean over examples of the gold's log-probability among the choices
    accuracy: float | None
    per_example: list[float] = field(default_factory=list, repr=False)  # the metric's per-example values

    def value(self, metric: str) -> float:
        v = self.loglik if metric == "loglik" else self.choice_loglik
        if v is None:
            raise UsageError("--calibrate-metric choice needs a task with choices (sst2, boolq, ...)")
        return v

    def as_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "loglik": self.loglik, "choice_loglik": self.choice_loglik,
                "accuracy": self.accuracy}


def summarize(scale: float, examples: list[Any], requests: list[_Request], lls: list[float], metric: str) -> ScaleScore:
    by: dict[int, dict[int, float]] = {}
    for rq, v in zip(requests, lls):
        by.setdefault(rq.example, {})[rq.choice] = v
    gold_ll, choice_ll, correct = [], [], []
    for i, ex in enumerate(examples):
        row = by[i]
        if ex.choices is None:
            gold_ll.append(row[0])
            continue
        vals = [row[j] for j in range(len(ex.choices))]
        g = int(ex.label)
        gold_ll.append(vals[g])
        top = max(vals)
        lse = top + math.log(sum(math.exp(v - top) for v in vals))
        choice_ll.append(vals[g] - lse)
        correct.append(vals.index(top) == g)
    n = len(examples)
    has_choices = bool(choice_ll)
    per = gold_ll if metric == "loglik" or not has_choices else choice_ll
    return ScaleScore(
        scale=scale, loglik=sum(gold_ll) / n, choice_loglik=(sum(choice_ll) / n) if has_choices else None,
        accuracy=(sum(correct) / n) if has_choices else None, per_example=per,
    )


# -- the patch in memory, at any scale ---------------------------------------------------------
class ScaledPatch:
    """The targeted weights of a loaded model set to the patch merged at any scale, always from the
    originals kept aside (one copy per storage: tied weights get every edit, rounded once). What is
    merged is ``core.plan``'s plan on the live model at that scale, the merge is ``core.merge``'s:
    the same as `port` writes and `eval` patches with."""

    def __init__(self, model: Any, patch: "Patch", *, old: Any = None, policy: Any = None) -> None:
        import dataclasses

        from portllm_cli.core.layout import Layout
        from portllm_cli.core.merge import Workspace
        from portllm_cli.core.plan import Policy, build_plan

        self._model, self._patch, self._old = model, patch, old
        self._policy = policy or Policy()
        self._layout = Layout.live(model)
        self._ws = Workspace()
        self._replace = dataclasses.replace
        plan = build_plan(patch, self._layout, policy=self._policy, old=old)  # exit 3 before any scoring
        params = dict(model.state_dict(keep_vars=True))
        self._groups: dict[int, tuple[str, Any, "torch.Tensor"]] = {}
        for key in plan.edits:
            name = key.partition("[")[0]
            p = params[name]
            self._groups.setdefault(p.data_ptr(), (name, p, p.detach().to("cpu", copy=True)))
        self._params = params

    def set(self, scale: float) -> None:
        import torch

        from portllm_cli.core.merge import merge_in_place
        from portllm_cli.core.plan import build_plan

        with torch.no_grad():
            for _, p, orig in self._groups.values():
                p.copy_(orig)
            if scale == 0:
                return
            plan = build_plan(self._patch, self._layout, policy=self._replace(self._policy, scale=scale), old=self._old)
            for key, edits in plan.edits.items():
                name, _, expert = key.partition("[")
                p = self._params[name]
                merge_in_place(p.data[int(expert[:-1])] if expert else p.data, edits, self._ws)

    def restore(self) -> None:
        import torch

        self.set(0.0)
        bad = [key for key, p, orig in self._groups.values() if not torch.equal(p.detach().cpu(), orig)]
        if bad:
            raise PortllmError(f"internal error: {len(bad)} weights were not restored bitwise ({bad[0]})")


# -- the whole calibration --------------------------------------------------------------------
@dataclass
class CalibrationResult:
    task: str
    data: dict[str, Any]  # fingerprint: path, sha256, rows_in_file, rows_used
    metric: str
    grid: list[float]
    scores: list[ScaleScore]  # one per grid value, in grid order
    reference: ScaleScore  # scale 0: the evolved model alone
    scale: float  # the chosen one
    seconds: float
    device: str
    warnings: list[str] = field(default_factory=list)

    def score_at(self, scale: float) -> ScaleScore | None:
        return next((s for s in self.scores if s.scale == scale), None)

    def as_dict(self) -> dict[str, Any]:
        """The one ``calibration`` object of the manifest, the port record and --json."""
        return {
            "scale": self.scale,
            "task": self.task,
            "metric": self.metric,
            "grid": list(self.grid),
            "data": dict(self.data),
            "scores": [s.as_dict() for s in self.scores],
            "reference": self.reference.as_dict(),
            "method": "one global scale, grid search by the mean log-likelihood of the gold answers; no gradients",
            "device": self.device,
            "seconds": round(self.seconds, 3),
        }


def choose(scores: list[ScaleScore], metric: str) -> ScaleScore:
    """The best mean score; ties to the scale nearest 1, then the smaller."""
    return max(scores, key=lambda s: (s.value(metric), -abs(s.scale - 1.0), -s.scale))


def calibrate_loaded(
    model: Any,
    tok: Any,
    patch: "Patch",
    data: CalibrationData,
    *,
    grid: list[float],
    metric: str = "auto",
    batch_size: int = BATCH_SIZE,
    old: Any = None,
    policy: Any = None,
    progress: ProgressFn | None = None,
) -> CalibrationResult:
    """Score a model already in memory with the patch at every scale of the grid (and at 0).

    ``old`` and ``policy`` are ``core.plan``'s (the old base, for the parts of a patch that need it;
    --dora / --modules-to-save); the scale replaces the policy's."""
    t0 = time.perf_counter()
    metric = check_metric(metric, data.kind)
    progress = progress or no_progress
    requests = build_requests(data.examples, tok, max_length=min(MAX_LENGTH, _context_window(model)))
    seqs = plan_sequences(requests)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    scales = [0.0] + list(grid)
    total = len(scales) * len(seqs)
    done = 0
    results: dict[float, ScaleScore] = {}
    sp = ScaledPatch(model, patch, old=old, policy=policy)
    try:
        for scale in scales:
            label = f"calibrate · scale {scale:g}"

            def tick(n: int, _label: str = label) -> None:
                nonlocal done
                done += n
                progress(_label, done, total)

            progress(label, done, total)
            sp.set(scale)
            lls = score_requests(model, seqs, len(requests), pad_id=pad, batch_size=batch_size, tick=tick)
            results[scale] = summarize(scale, data.examples, requests, lls, metric)
    finally:
        sp.restore()
    scores = [results[s] for s in grid]
    best = choose(scores, metric)
    ref = results[0.0]
    warnings = []
    if len(data.examples) < FEW_EXAMPLES:
        warnings.append(f"calibrating on {len(data.examples)} examples: the chosen scale is noisy "
                        f"(a few dozen to a few hundred are meant)")
    if ref.value(metric) >= best.value(metric):
        warnings.append(f"the evolved model alone scores {ref.value(metric):.4f} on the calibration data, no less "
                        f"than the patch at its best scale ({best.scale:g}: {best.value(metric):.4f})")
    if best.scale in (grid[0], grid[-1]) and len(grid) > 1:
        warnings.append(f"the chosen scale {best.scale:g} is at the edge of the grid "
                        f"({grid[0]:g}..{grid[-1]:g}); a wider --calibrate-grid may score better")
    dev = str(next(model.parameters()).device)
    return CalibrationResult(data.task, data.fingerprint(), metric, list(grid), scores, ref, best.scale,
                             time.perf_counter() - t0, dev, warnings)


class _no_transformers_bars:
    """transformers draws a 'Loading weights' bar on stderr; ours is the only one (and none under --json)."""

    def __enter__(self) -> None:
        from transformers.utils import logging as tlog

        self._was = tlog.is_progress_bar_enabled()
        tlog.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as tlog

        if self._was:
            tlog.enable_progress_bar()


def _context_window(model: Any) -> int:
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 1 else MAX_LENGTH


def calibrate(
    patch: "Patch",
    model_path: Path,
    data: CalibrationData,
    *,
    grid: list[float],
    old: Any = None,
    policy: Any = None,
    metric: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = BATCH_SIZE,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
) -> CalibrationResult:
    """Load the evolved model once, score the grid, free the model; see the module docstring."""
    from portllm_cli.core.evaluate import _free_memory, load_model
    from portllm_cli.core.models import resolve_device

    progress = progress or no_progress
    progress("calibrate · loading the model", 0, None)
    with _no_transformers_bars():
        model, tok = load_model(Path(model_path), dtype=dtype, device=resolve_device(device),
                                trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    try:
        return calibrate_loaded(model, tok, patch, data, grid=grid, metric=metric, batch_size=batch_size,
                                old=old, policy=policy, progress=progress)
    finally:
        del model, tok
        _free_memory()


def calibrate_for_port(
    patch: "Patch",
    target: Any,  # resolve.Resolved
    spec: str,
    out: Path,
    *,
    grid: list[float],
    limit: int | None = None,
    metric: str = "auto",
    device: str = "auto",
    overwrite: bool = False,
    allow_pickle: bool = False,
    merging: bool = True,
    dora: str = "absolute",
    modules_to_save: str = "delta",
    base: Any = None,
    progress: ProgressFn | None = None,
) -> CalibrationResult:
    """What `portllm port --calibrate` does before it ports: every check that can fail fast (the
    patch fits the target, --out is free, the data reads), then the calibration itself.

    The result's warnings include a reuse of the patch's own training data (same sha256).
    """
    from portllm_cli.core.plan import Policy, prepare_patch
    from portllm_cli.core.port import plan_port
    from portllm_cli.io.atomic import check_output

    task, path = parse_spec(spec)
    metric = check_metric(metric)
    policy = Policy(1.0, dora, modules_to_save).check()
    patch, old = prepare_patch(patch, policy=policy, base=base, allow_pickle=allow_pickle)
    if patch.full or patch.tokens:
        raise UsageError("--calibrate scales low-rank factors; this patch also carries whole tensors or token rows",
                         hint="port it without --calibrate (at scale 1)")
    plan_port(patch, target, allow_pickle=allow_pickle, merging=merging, policy=policy, old=old)  # exit 3 before any work
    check_output(Path(out), overwrite=overwrite, inputs=(target.path, patch.path, path))
    data = load_data(task, path, limit=limit)
    metric = check_metric(metric, data.kind)
    reused = reused_training_data(patch.manifest, data.sha256)
    result = calibrate(patch, target.path, data, grid=grid, metric=metric, device=device,
                       allow_pickle=allow_pickle, old=old, policy=policy, progress=progress)
    if reused:
        result.warnings.insert(0, f"the calibration file {path} is the patch's own training data (same sha256 as "
                                  f"{', '.join(reused)} in its manifest): the chosen scale fits the training set, "
                                  "not new data")
    return result
