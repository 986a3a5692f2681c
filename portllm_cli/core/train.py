"""LoRA fine-tuning that produces a portllm patch, and full continued pretraining.

Our own loop (torch + peft + accelerate, not transformers.Trainer) so that checkpoints, --resume
and Ctrl-C are exact:

* data order: epoch ``e`` visits the rows in ``randperm(n, seed=(seed, e))`` order, cut into
  micro-batches of ``batch_size``; process ``p`` of ``W`` takes micro-batches ``p, p+W, ...``;
  ``grad_accum`` micro-batches make one optimizer step.
* AdamW (weight decay 0 by default), linear decay to 0 over the run after optional warmup.
* loss on answer tokens only: labels are -100 on the prompt and on padding. Prompt and answer are
  tokenized as lm-eval does (``encode(prompt + answer)`` split at ``len(encode(prompt))``, trailing
  prompt whitespace moved to the answer), so training sees the tokens evaluation scores.
* a checkpoint (``<out>.portllm-ckpt/``) holds the trainable weights, the optimizer and scheduler
  state, every process's RNG state, the step and the data position: a resumed run takes exactly
  the steps an uninterrupted one would.
* ``accelerate launch -m portllm_cli finetune ...`` runs data-parallel unchanged; only the main
  process writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from portllm_cli.core import models as _models
from portllm_cli.core.config import FinetuneConfig
from portllm_cli.core.progress import ProgressFn, no_progress
from portllm_cli.core.tasks import Example, Recipe, data_fingerprint, get_recipe, load_rows
from portllm_cli.errors import (
    InvalidInputError,
    Interrupted,
    NotFoundError,
    OutputExistsError,
    UsageError,
)

if TYPE_CHECKING:
    import torch

CKPT_SUFFIX = ".portllm-ckpt"
CKPT_STATE = "state.json"
TRAIN_RECORD = "portllm-train.json"  # written into --full model directories


@dataclass
class FinetuneResult:
    out: Path
    steps: int
    epochs: float  # epochs completed (fractional when --max-steps ends mid-epoch)
    final_loss: float
    losses: list[float]  # mean training loss of every optimizer step
    tokens_per_s: float  # non-padding tokens through the model per second of training, all processes
    peak_memory_bytes: int
    peak_memory_kind: str  # "cuda_max_allocated" or "cpu_max_rss"
    wall_s: float
    examples: int  # training sequences (rows, or chunks for --task text)
    trainable_params: int
    full: bool
    resumed_from: int | None = None
    checkpoint_dir: Path | None = None  # kept only with keep_checkpoints
    manifest: dict[str, Any] | None = None
    device: str = "cpu"
    num_processes: int = 1
    is_main_process: bool = True

    def summary(self) -> dict[str, Any]:
        return {
            "out": str(self.out),  # the patch, or with full the model directory
            "full": self.full,
            "steps": self.steps,
            "epochs": round(self.epochs, 4),
            "final_loss": self.final_loss,
            "first_loss": self.losses[0] if self.losses else None,
            "tokens_per_s": round(self.tokens_per_s, 2),
            "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_kind": self.peak_memory_kind,
            "seconds": round(self.wall_s, 3),
            "examples": self.examples,
            "trainable_params": self.trainable_params,
            "resumed_from": self.resumed_from,
            "device": self.device,
            "num_processes": self.num_processes,
            "warnings": [],
        }


# -- tokenization -----------------------------------------------------------------------------
def encode_example(tok: Any, ex: Example, max_length: int, *, add_eos: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one example, split into prompt and answer the way lm-eval does."""
    prompt, target = ex.prompt, ex.target
    if prompt:
        n_spaces = len(prompt) - len(prompt.rstrip())
        if n_spaces:
            target = prompt[-n_spaces:] + target
            prompt = prompt[:-n_spaces]
        whole = tok.encode(prompt + target)
        ctx = tok.encode(prompt)
        n_ctx = len(ctx)
        if whole[:n_ctx] != ctx:  # a merge across the boundary: keep the lm-eval split point anyway
            n_ctx = min(n_ctx, len(whole) - 1)
        ctx_ids, ans_ids = whole[:n_ctx], whole[n_ctx:]
    else:
        ctx_ids, ans_ids = [], tok.encode(target)
    if add_eos and tok.eos_token_id is not None and (not ans_ids or ans_ids[-1] != tok.eos_token_id):
        ans_ids = ans_ids + [tok.eos_token_id]
    if len(ans_ids) >= max_length:
        ans_ids = ans_ids[:max_length] if not ctx_ids else ans_ids[: max_length - 1]
    keep_ctx = max_length - len(ans_ids)
    ctx_ids = ctx_ids[len(ctx_ids) - keep_ctx:] if keep_ctx < len(ctx_ids) else ctx_ids  # left-truncate
    ids = ctx_ids + ans_ids
    labels = [-100] * len(ctx_ids) + list(ans_ids)
    return ids, labels


def chunk_corpus(tok: Any, texts: Sequence[str], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Fixed-length chunks of the concatenated corpus (documents joined by EOS); loss on every token."""
    stream: list[int] = []
    eos = tok.eos_token_id
    for i, t in enumerate(texts):
        if i and eos is not None:
            stream.append(eos)
        stream.extend(tok.encode(t, add_special_tokens=False))
    chunks = [stream[i:i + max_length] for i in range(0, len(stream) - max_length + 1, max_length)]
    if not chunks and len(stream) >= 2:
        chunks = [stream]  # a corpus shorter than one chunk still trains
    return [(c, list(c)) for c in chunks]


def build_features(recipe: Recipe, rows: list[dict[str, Any]], tok: Any, max_length: int) -> list[tuple[list[int], list[int]]]:
    if recipe.kind == "text":
        return chunk_corpus(tok, [r["text"] for r in rows], max_length)
    add_eos = recipe.kind in ("generate", "completion")
    feats = []
    for r in rows:
        ids, labels = encode_example(tok, recipe.example(r), max_length, add_eos=add_eos)
        if any(l != -100 for l in labels):
            feats.append((ids, labels))
    return feats


def collate(feats: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, "torch.Tensor"]:
    import torch

    width = max(len(ids) for ids, _ in feats)
    input_ids = torch.full((len(feats), width), pad_id, dtype=torch.long)
    labels = torch.full((len(feats), width), -100, dtype=torch.long)
    mask = torch.zeros((len(feats), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(feats):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# -- data order -------------------------------------------------------------------------------
def epoch_groups(n: int, epoch: int, *, seed: int, batch_size: int, grad_accum: int,
                 num_processes: int = 1, process_index: int = 0) -> list[list[list[int]]]:
    """This process's optimizer steps for one epoch: each a list of micro-batches of row indices."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    micro = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    per_proc = len(micro) // num_processes if num_processes > 1 else len(micro)
    if per_proc == 0:
        raise InvalidInputError(
            f"{n} training examples make fewer batches than the {num_processes} processes",
            hint="use more data or a smaller --batch-size",
        )
    mine = micro[process_index::num_processes][:per_proc]
    return [mine[i:i + grad_accum] for i in range(0, len(mine), grad_accum)]


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


# -- checkpoints ------------------------------------------------------------------------------
def checkpoint_dir_for(out: Path) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}{CKPT_SUFFIX}"


def _trainable_state(model: Any) -> dict[str, "torch.Tensor"]:
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_to_flat(opt: Any) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
    import torch

    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().to("cpu").contiguous().clone()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, "torch.Tensor"], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = t
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_tensors() -> dict[str, "torch.Tensor"]:
    import torch

    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def _set_rng(tensors: dict[str, "torch.Tensor"]) -> None:
    import torch

    torch.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def save_checkpoint(ckpt_root: Path, *, accelerator: Any, model: Any, optimizer: Any, scheduler: Any,
                    state: dict[str, Any], rng: dict[str, "torch.Tensor"] | None = None) -> Path:
    """Write step-N/ under a temporary name, rename it into place, then drop older steps."""
    from safetensors.torch import save_file

    step = state["step"]
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    # every process keeps its own dropout RNG stream
    save_file(rng if rng is not None else _rng_tensors(), str(tmp / f"rng-{accelerator.process_index}.safetensors"))
    if accelerator.is_main_process:
        save_file(_trainable_state(accelerator.unwrap_model(model)), str(tmp / "weights.safetensors"))
        opt_t, opt_meta = _optimizer_to_flat(optimizer)
        save_file(opt_t, str(tmp / "optimizer.safetensors"))
        doc = dict(state, optimizer=opt_meta, scheduler=scheduler.state_dict())
        (tmp / CKPT_STATE).write_text(json.dumps(doc, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in ckpt_root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    steps = sorted(p for p in ckpt_root.glob("step-*") if (p / CKPT_STATE).exists())
    return steps[-1] if steps else None


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


# -- the run ----------------------------------------------------------------------------------
def _resolve_targets(model: Any, targets: Sequence[str]) -> list[str]:
    import torch

    linear_leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                            if isinstance(m, torch.nn.Linear) and n and not n.endswith("lm_head")})
    targets = [t.strip() for t in targets if t.strip()]
    if not targets:
        raise UsageError("--target-modules is empty")
    if targets == ["all-linear"]:
        return linear_leaves
    missing = [t for t in targets if t not in linear_leaves]
    if missing:
        raise UsageError(
            f"--target-modules: the model has no linear module named {', '.join(missing)}",
            hint=f"its linear modules: {', '.join(linear_leaves)}",
        )
    return targets


def _base_record(res: Any, model: Any, shapes: dict[str, list[int]]) -> dict[str, Any]:
    from portllm_cli.io.checkpoint import Checkpoint, architecture_fingerprint
    from portllm_cli.io.hashing import content_hash
    from portllm_cli.resolve import model_record

    gguf = _models.gguf_file(res.path)
    if gguf is None:
        return model_record(res, Checkpoint.open(res.path), shapes)
    cfg = model.config.to_dict()
    return {
        "model": res.record_id,
        "revision": res.revision,
        "content_hash": content_hash([res.path / gguf]),
        "fingerprint": architecture_fingerprint(cfg, shapes),
        "weights_format": "gguf",
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started its program.

    Linux's VmHWM (/proc/self/status) is the high-water mark of the process's own address space.
    getrusage's ru_maxrss is not, for a child started by fork + exec: the copy of the parent's
    memory that the fork made counts too, so a small command started by a large Python process
    reports the parent's size. getrusage is the fallback where /proc is absent (macOS: bytes).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    import resource
    import sys

    rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return rss if sys.platform == "darwin" else rss * 1024


def _peak_memory(device: str) -> tuple[int, str]:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    return peak_rss_bytes(), "cpu_max_rss"


def _make_accelerator(device: str, dtype: str) -> tuple[Any, str]:
    from accelerate import Accelerator

    dev = _models.resolve_device(device)
    mp = "no"
    if dev.startswith("cuda"):
        if dtype == "auto" and _models.bf16_supported(dev):
            mp = "bf16"
        elif dtype == "bfloat16" and _models.bf16_supported(dev):
            mp = "bf16"
        elif dtype == "float16":
            mp = "fp16"
    acc = Accelerator(mixed_precision=mp, cpu=(dev == "cpu"))
    return acc, mp


class _DeferredSigint:
    """While active, the first Ctrl-C only sets a flag; the loop stops at the next safe point.

    A second Ctrl-C interrupts at once. Only the main thread can install signal handlers;
    elsewhere this is a no-op and KeyboardInterrupt arrives as usual.
    """

    def __init__(self) -> None:
        self.hit = False
        self._old: Any = None

    def __enter__(self) -> "_DeferredSigint":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)

            def handler(signum: int, frame: Any) -> None:
                if self.hit:
                    raise KeyboardInterrupt
                self.hit = True

            signal.signal(signal.SIGINT, handler)
        return self

    def check(self) -> None:
        if self.hit:
            raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _supports_sparse_logits(model: Any) -> bool:
    """Whether forward() takes a boolean (batch, seq) ``logits_to_keep`` mask (transformers >= 5)."""
    import inspect

    try:
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401
    except ImportError:
        return False
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _answer_loss(net: Any, batch: dict[str, "torch.Tensor"], sparse: bool) -> "torch.Tensor":
    """Mean cross-entropy over the answer tokens: the same number as ``model(labels=...).loss``.

    With ``sparse`` only the positions that predict an answer token go through the LM head: a
    choice answer is 1-2 tokens of a 50-250 token sequence, and the vocabulary-wide logits of
    every position are most of the activation memory and much of the compute of a small model.
    """
    import torch

    labels = batch["labels"]
    if not sparse:
        return net(**batch).loss
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    targets = labels[:, 1:][keep[:, :-1]]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets)


def _fmt_rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def finetune(
    model: str,
    task: str,
    out: Path,
    config: FinetuneConfig | None = None,
    *,
    progress: ProgressFn | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """Train a LoRA patch (or, with ``config.full``, a whole model) on a task; write it to ``out``.

    ``config`` holds every setting (the command line builds it once); keyword ``overrides`` replace
    single fields (``finetune(m, "sst2", out, lr=3e-4, max_steps=100)``). Three phases: prepare
    (resolve the model, read and tokenize the data, load and wrap the model, restore a checkpoint),
    the training loop, and writing the patch or model.
    """
    t_start = time.perf_counter()
    cfg = FinetuneConfig.build(config, overrides)
    progress = progress or no_progress
    if os.environ.get("RANK", "0") != "0":
        progress = no_progress  # under accelerate launch only the main process draws
    run = _prepare(model, task, Path(out), cfg, progress)
    trained = _train(run, cfg, progress)
    return _write(run, trained, cfg, progress, t_start)


@dataclass
class _Run:
    """What the prepare phase hands to the loop and the writer."""

    out: Path
    recipe: Recipe
    res: Any  # Resolved model
    data_path: Path | None
    data_record: dict[str, Any]
    tok: Any
    feats: list[tuple[list[int], list[int]]]
    accelerator: Any
    dev: str
    sharded: bool
    base: Any
    orig_dtype: str | None
    settings: dict[str, Any]  # the manifest's hyperparameters
    targets: list[str]
    shapes: dict[str, list[int]]
    net: Any
    optimizer: Any
    scheduler: Any
    n_trainable: int
    sparse_logits: bool
    groups0: list[list[list[int]]]
    steps_per_epoch: int
    total_steps: int
    ckpt_root: Path
    run_hash: str
    step: int = 0
    losses: list[float] = field(default_factory=list)
    tokens_seen: int = 0
    dora_norms: dict[str, str] | None = None  # --use-dora: ||W_base|| per output feature, per module
    train_s: float = 0.0
    resumed_from: int | None = None


@dataclass
class _Trained:
    step: int
    losses: list[float]
    tokens_seen: int
    train_elapsed: float


def _prepare(model: str, task: str, out: Path, cfg: FinetuneConfig, progress: ProgressFn) -> _Run:
    """Everything before the first step: inputs checked, data tokenized, model loaded and wrapped."""
    import torch

    from portllm_cli.io.atomic import check_output
    from portllm_cli.resolve import resolve

    recipe = get_recipe(task)
    ckpt_root = checkpoint_dir_for(out)
    res = resolve(model, kind="model", revision=cfg.revision, progress=progress,
                  trust_remote_code=cfg.trust_remote_code)
    data_path = Path(cfg.data) if cfg.data is not None else None
    check_output(out, overwrite=cfg.overwrite, inputs=tuple(p for p in (res.path, data_path) if p is not None))
    if cfg.resume:
        if latest_checkpoint(ckpt_root) is None:
            raise NotFoundError(f"{ckpt_root}: no checkpoint to resume from",
                                hint="run without --resume to start from step 0")
    elif ckpt_root.exists():
        if not cfg.overwrite:
            raise OutputExistsError(
                f"{ckpt_root}: a checkpoint of an earlier run exists",
                hint="pass --resume to continue it, or --overwrite to start over",
            )

    # data first: a bad file fails in a second, before the model loads
    progress("load data", 0, 1)
    rows = load_rows(recipe, data_path, split="train", text_field=cfg.text_field, label_field=cfg.label_field,
                     label_map=dict(cfg.label_map) if cfg.label_map is not None else None)
    if data_path is not None:
        data_record: dict[str, Any] = data_fingerprint(data_path, rows=len(rows))
    else:
        data_record = {"hub_dataset": recipe.hub_dataset, "hub_config": recipe.hub_config,
                       "split": recipe.train_split, "rows": len(rows)}
    _models.check_causal_lm(res.path, cfg.trust_remote_code)
    tok = _models.load_tokenizer(res.path, cfg.trust_remote_code)
    feats = build_features(recipe, rows, tok, cfg.max_length)
    progress("load data", 1, 1)
    if not feats:
        raise InvalidInputError(f"{data_path or recipe.hub_dataset}: no training examples after tokenization "
                                "(the dataset is empty or every answer was cut off)")

    accelerator, mixed_precision = _make_accelerator(cfg.device, cfg.dtype)
    dev = str(accelerator.device)
    sharded = accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")
    if sharded and (cfg.save_every or cfg.resume):
        raise UsageError(f"--save-every/--resume are not supported under {accelerator.distributed_type.value} "
                         "(the weights are sharded); use plain data parallel, or run without them")
    torch.manual_seed(cfg.seed)
    progress("load model", 0, 1)
    base = _models.load_causal_lm(res.path, cfg.dtype, None, cfg.trust_remote_code)
    progress("load model", 1, 1)
    orig_dtype = _source_dtype(res.path)

    settings: dict[str, Any] = {
        "task": recipe.name, "rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout, "use_dora": cfg.use_dora,
        "lr": cfg.lr,
        "epochs": cfg.epochs, "max_steps": cfg.max_steps, "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum, "max_length": cfg.max_length, "seed": cfg.seed, "dtype": cfg.dtype,
        "mixed_precision": mixed_precision, "full": cfg.full, "warmup_steps": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay, "gradient_checkpointing": cfg.gradient_checkpointing,
        "num_processes": accelerator.num_processes,
    }
    dora_norms: dict[str, str] | None = None
    if cfg.full:
        targets: list[str] = []
        shapes: dict[str, list[int]] = {}
        for p in base.parameters():
            p.requires_grad_(True)
        net = base
    else:
        from peft import LoraConfig, get_peft_model

        targets = _resolve_targets(base, cfg.target_modules)
        shapes = _models.module_shapes(base, targets)
        if cfg.use_dora:  # --dora relative at port time needs ||W_base|| per output feature: recorded now
            dora_norms = _dora_base_norms(base, shapes)
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM", use_dora=cfg.use_dora)
        net = get_peft_model(base, lora)
    settings["target_modules"] = targets
    if cfg.gradient_checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(net, "config"):
            net.config.use_cache = False
    params = [p for p in net.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    sparse_logits = _supports_sparse_logits(base)
    n = len(feats)
    groups0 = epoch_groups(n, 0, seed=cfg.seed, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                           num_processes=accelerator.num_processes, process_index=accelerator.process_index)
    steps_per_epoch = len(groups0)
    total_steps = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, total_steps))
    net, optimizer = accelerator.prepare(net, optimizer)

    run_key = {"settings": settings, "data": data_record.get("sha256") or data_record, "base": str(res.path.resolve()),
               "examples": n}
    run = _Run(out, recipe, res, data_path, data_record, tok, feats, accelerator, dev, sharded, base, orig_dtype,
               settings, targets, shapes, net, optimizer, scheduler, n_trainable, sparse_logits, groups0,
               steps_per_epoch, total_steps, ckpt_root, _settings_hash(run_key), dora_norms=dora_norms)
    if not cfg.resume and ckpt_root.exists() and accelerator.is_main_process:
        shutil.rmtree(ckpt_root)  # --overwrite: a stale checkpoint of another run
    accelerator.wait_for_everyone()
    if cfg.resume:
        run.step, run.losses, run.tokens_seen, run.train_s = _restore(
            latest_checkpoint(ckpt_root), run.run_hash, accelerator, net, optimizer, scheduler)
        run.resumed_from = run.step
    return run


def _train(run: _Run, cfg: FinetuneConfig, progress: ProgressFn) -> _Trained:
    """The loop: optimizer steps until ``total_steps``, checkpoints, and an exact stop on Ctrl-C."""
    import torch

    accelerator, net, optimizer, scheduler = run.accelerator, run.net, run.optimizer, run.scheduler
    feats, n, steps_per_epoch, total_steps = run.feats, len(run.feats), run.steps_per_epoch, run.total_steps
    step, losses, tokens_seen, train_s = run.step, run.losses, run.tokens_seen, run.train_s
    pad_id = run.tok.pad_token_id
    net.train()
    label = "train"
    progress(label, step, total_steps)
    t_loop = time.perf_counter()
    rng_after_step = _rng_tensors()  # what a checkpoint of the last finished step must restore
    multi = accelerator.num_processes > 1
    # Reading a loss back from a GPU stalls its queue: on CUDA the per-step losses stay on the
    # device and are read in one go about twice a second; on CPU every step.
    flush_every_s = 0.5 if run.dev.startswith("cuda") else 0.0
    pending_loss: list[Any] = []
    pending_tokens: list[Any] = []
    last_flush = time.perf_counter()
    ep_total = math.ceil(total_steps / steps_per_epoch)

    def flush(epoch: int) -> None:
        nonlocal tokens_seen, last_flush
        if not pending_loss:
            return
        values = torch.stack(pending_loss).tolist()
        tokens_seen += int(torch.stack(pending_tokens).sum())
        first = step - len(values) + 1
        pending_loss.clear()
        pending_tokens.clear()
        for k, v in enumerate(values):
            if not math.isfinite(v):
                raise InvalidInputError(f"training diverged at step {first + k} (loss {v})",
                                        hint="lower --lr, or use --dtype float32")
        losses.extend(values)
        last_flush = time.perf_counter()
        elapsed = train_s + (last_flush - t_loop)
        rate = tokens_seen / elapsed if elapsed > 0 else 0.0
        progress(f"{label} · epoch {min(epoch + 1, ep_total)}/{ep_total} · loss {values[-1]:.3f} · "
                 f"{_fmt_rate(rate)} tok/s", step, total_steps)

    def state_now() -> dict[str, Any]:
        return {"step": step, "losses": losses, "tokens_seen": tokens_seen, "run_hash": run.run_hash,
                "train_s": train_s + (time.perf_counter() - t_loop), "total_steps": total_steps,
                "steps_per_epoch": steps_per_epoch, "settings": run.settings}

    sigint = _DeferredSigint()
    epoch = step // steps_per_epoch
    try:
        with sigint:
            while step < total_steps:
                epoch = step // steps_per_epoch
                groups = run.groups0 if epoch == 0 else epoch_groups(
                    n, epoch, seed=cfg.seed, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                    num_processes=accelerator.num_processes, process_index=accelerator.process_index)
                for group in groups[step % steps_per_epoch:]:
                    step_loss = torch.zeros((), device=accelerator.device)
                    step_tokens = torch.zeros((), device=accelerator.device, dtype=torch.long)
                    for j, idx in enumerate(group):
                        batch = {k: v.to(accelerator.device, non_blocking=True)
                                 for k, v in collate([feats[i] for i in idx], pad_id).items()}
                        sync = j == len(group) - 1
                        ctx = contextlib.nullcontext() if sync else accelerator.no_sync(net)
                        with ctx:
                            loss = _answer_loss(net, batch, run.sparse_logits)
                            accelerator.backward(loss / len(group))
                        step_loss += loss.detach().float() / len(group)
                        step_tokens += batch["attention_mask"].sum()
                        sigint.check()
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    if multi:
                        step_loss = accelerator.reduce(step_loss, reduction="mean")
                        step_tokens = accelerator.reduce(step_tokens, reduction="sum")
                    pending_loss.append(step_loss)
                    pending_tokens.append(step_tokens)
                    rng_after_step = _rng_tensors()
                    checkpoint_due = bool(cfg.save_every and step % cfg.save_every == 0 and step < total_steps)
                    if (checkpoint_due or step >= total_steps
                            or time.perf_counter() - last_flush >= flush_every_s):
                        flush(epoch)
                    sigint.check()
                    if checkpoint_due:
                        save_checkpoint(run.ckpt_root, accelerator=accelerator, model=net, optimizer=optimizer,
                                        scheduler=scheduler, state=state_now())
                    if step >= total_steps:
                        break
    except KeyboardInterrupt:
        flush(epoch)  # losses of the steps that did finish
        if accelerator.num_processes > 1:
            # processes stop at different points; a collective save could hang
            raise Interrupted(f"interrupted at step {step}/{total_steps}",
                              hint="with several processes, --save-every checkpoints are what --resume uses") from None
        # a step cut short is discarded: the checkpoint is the state right after the last full step
        save_checkpoint(run.ckpt_root, accelerator=accelerator, model=net, optimizer=optimizer,
                        scheduler=scheduler, state=state_now(), rng=rng_after_step)
        raise Interrupted(
            f"interrupted at step {step}/{total_steps}; checkpoint saved in {run.ckpt_root}",
            hint="run the same command with --resume to continue",
        ) from None
    return _Trained(step, losses, tokens_seen, train_s + (time.perf_counter() - t_loop))


def _write(run: _Run, trained: _Trained, cfg: FinetuneConfig, progress: ProgressFn, t_start: float) -> FinetuneResult:
    """The patch (or model) and its record, written atomically by the main process."""
    from portllm_cli.io.atomic import atomic_output_dir

    accelerator, net, out = run.accelerator, run.net, run.out
    step, losses, n = trained.step, trained.losses, len(run.feats)
    tokens_per_s = trained.tokens_seen / trained.train_elapsed if trained.train_elapsed > 0 else 0.0
    peak, peak_kind = _peak_memory(run.dev)
    final_loss = losses[-1] if losses else float("nan")
    unwrapped = accelerator.unwrap_model(net)
    # FSDP / DeepSpeed shard the weights: gathering the full state dict is a collective call
    gathered = accelerator.get_state_dict(net) if run.sharded else None
    result = FinetuneResult(
        out=out, steps=step, epochs=step / run.steps_per_epoch, final_loss=final_loss, losses=list(losses),
        tokens_per_s=tokens_per_s, peak_memory_bytes=peak, peak_memory_kind=peak_kind, wall_s=0.0,
        examples=n, trainable_params=run.n_trainable, full=cfg.full, resumed_from=run.resumed_from, device=run.dev,
        num_processes=accelerator.num_processes, is_main_process=accelerator.is_main_process,
    )
    training = {
        "steps": step, "epochs_completed": round(step / run.steps_per_epoch, 4),
        "steps_per_epoch": run.steps_per_epoch, "examples": n, "final_loss": final_loss,
        "first_loss": losses[0] if losses else None, "tokens_per_s": round(tokens_per_s, 2),
        "train_s": round(trained.train_elapsed, 3), "device": run.dev, "num_processes": accelerator.num_processes,
        "resumed_from": run.resumed_from,
    }
    if accelerator.is_main_process:
        progress("write", 0, 1)
        base_record = _base_record(run.res, unwrapped if cfg.full else unwrapped.get_base_model(), run.shapes)
        inputs = tuple(p for p in (run.res.path, run.data_path) if p)
        with atomic_output_dir(out, overwrite=cfg.overwrite, inputs=inputs) as tmp:
            training["wall_s"] = round(time.perf_counter() - t_start, 3)
            if cfg.full:
                _write_model(unwrapped, run.tok, tmp, run.orig_dtype if cfg.dtype == "auto" else None, gathered)
                doc = {"format": "portllm-train", "base": base_record, "task": run.recipe.name,
                       "data": run.data_record, "hyperparameters": run.settings, "training": training}
                (tmp / TRAIN_RECORD).write_text(json.dumps(doc, indent=2) + "\n")
                result.manifest = doc
            else:
                result.manifest = _write_patch(unwrapped, tmp, run, cfg, base_record, training, gathered)
        progress("write", 1, 1)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and run.ckpt_root.exists():
        if cfg.keep_checkpoints:
            result.checkpoint_dir = run.ckpt_root
        else:
            shutil.rmtree(run.ckpt_root, ignore_errors=True)
    result.wall_s = time.perf_counter() - t_start
    return result


def _restore(ckpt: Path | None, run_hash: str, accelerator: Any, net: Any, optimizer: Any, scheduler: Any):
    from safetensors.torch import load_file

    assert ckpt is not None
    try:
        doc = json.loads((ckpt / CKPT_STATE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{ckpt}: unreadable checkpoint state ({exc})") from None
    if doc.get("run_hash") != run_hash:
        raise UsageError(
            f"{ckpt}: the checkpoint was made with other settings, data or model than this run",
            hint="resume with the exact same command, or pass --overwrite without --resume to start over",
        )
    weights = load_file(str(ckpt / "weights.safetensors"))
    unwrapped = accelerator.unwrap_model(net)
    named = dict(unwrapped.named_parameters())
    import torch

    with torch.no_grad():
        for name, t in weights.items():
            if name not in named:
                raise InvalidInputError(f"{ckpt}: checkpoint tensor {name!r} has no parameter in the model")
            named[name].copy_(t.to(named[name].device, named[name].dtype))
    opt_sd = _optimizer_from_flat(load_file(str(ckpt / "optimizer.safetensors")), doc["optimizer"])
    optimizer.load_state_dict(opt_sd)
    scheduler.load_state_dict(doc["scheduler"])
    rng_file = ckpt / f"rng-{accelerator.process_index}.safetensors"
    if rng_file.exists():
        _set_rng(load_file(str(rng_file)))
    return int(doc["step"]), list(doc["losses"]), int(doc["tokens_seen"]), float(doc["train_s"])


def _source_dtype(path: Path) -> str | None:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cfg.get("dtype") or cfg.get("torch_dtype")


def _write_model(model: Any, tok: Any, out_dir: Path, orig_dtype: str | None,
                 state_dict: dict[str, Any] | None = None) -> None:
    import torch

    if orig_dtype in ("bfloat16", "float16"):
        cast = getattr(torch, orig_dtype)  # keep the source's storage dtype
        if state_dict is None:
            model = model.to(cast)
        else:
            state_dict = {k: v.to(cast) if v.is_floating_point() else v for k, v in state_dict.items()}
    if getattr(model.config, "use_cache", None) is False:
        model.config.use_cache = True
    model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    tok.save_pretrained(out_dir)


def _dora_base_norms(base: Any, shapes: dict[str, list[int]]) -> dict[str, str]:
    """||W|| per output feature of every targeted weight of the base, as `portllm extract` records
    it for a DoRA adapter (the manifest's ``dora.base_norms``, read by ``port --dora relative``)."""
    import torch

    from portllm_cli.core.plan import encode_norms, feature_norms

    out = {}
    with torch.no_grad():
        for name in sorted(shapes):
            mod = base.get_submodule(name)
            W = mod.weight.detach()
            # GPT-2's Conv1D and embeddings store (in, out): their output features are columns
            transposed = type(mod).__name__ == "Conv1D" or isinstance(mod, torch.nn.Embedding)
            out[name] = encode_norms(feature_norms(lambda r0, r1, W=W: W[r0:r1].cpu(), int(W.shape[0]), transposed))
    return out


def _write_patch(model: Any, out_dir: Path, run: _Run, cfg: FinetuneConfig, base_record: dict[str, Any],
                 training: dict[str, Any], full_state: dict[str, Any] | None = None) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    from portllm_cli.patch import format as fmt

    state = get_peft_model_state_dict(model, state_dict=full_state)
    adapter = fmt.adapter_config(base_model=run.res.record_id, rank=cfg.rank, alpha=cfg.alpha,
                                 target_modules=run.targets, dropout=cfg.dropout)
    adapter["use_dora"] = cfg.use_dora
    modules = fmt.parse_modules({k: v.detach().cpu().contiguous() for k, v in state.items()}, adapter, out_dir)
    tensors = fmt.patch_tensors(modules)
    lora = {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout, "use_rslora": False,
            "use_dora": cfg.use_dora, "target_modules": sorted(run.targets), "modules": len(modules)}
    source = {"tool": "portllm finetune", "task": run.recipe.name, "lm_eval_task": run.recipe.lm_eval_task,
              "data": run.data_record, "hyperparameters": run.settings, "training": training}
    extra = {"dora": {"base_norms": run.dora_norms}} if run.dora_norms is not None else None
    manifest = fmt.build_manifest(base=base_record, lora=lora, source=source, extra=extra)
    return fmt.write_patch_files(out_dir, tensors, adapter, manifest)


def continued_pretraining(
    model: str,
    corpus: Path,
    out: Path,
    *,
    lr: float = 3e-5,
    max_steps: int | None = None,
    epochs: int = 1,
    batch_size: int = 16,
    max_length: int = 256,
    seed: int = 0,
    progress: ProgressFn | None = None,
    **overrides: Any,
) -> FinetuneResult:
    """Full-parameter continued pretraining on a plain-text corpus: an 'evolved' model, as in the paper.

    Equivalent to ``portllm finetune --task text --data CORPUS --full --out OUT``; the defaults
    (lr 3e-5, batch 16 x 256 tokens) are those that moved SmolLM2-135M by ~2% in 1,000 steps.
    """
    return finetune(model, "text", out, progress=progress, data=corpus, full=True, lr=lr, max_steps=max_steps,
                    epochs=epochs, batch_size=batch_size, max_length=max_length, seed=seed, **overrides)
