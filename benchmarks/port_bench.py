"""Benchmark `portllm port` against the PEFT merge path and a plain copy, side by side.

    python benchmarks/port_bench.py --shape llama-3.1-8b --shape llama-3.1-70b:2 --adapter qv,all-linear
    python benchmarks/port_bench.py --sweep small,llama-3.1-8b:8,llama-3.1-8b,llama-3.1-70b:2   # peak RSS vs size

Shapes (``NAME`` or ``NAME:LAYERS``; ``--layers N`` sets the layer count of shapes given without one):

  small          hidden 2048, 18 layers, vocabulary 32000 (2.1 GB; the previous default)
  llama-3.1-8b   Llama-3.1-8B's tensor shapes (hidden 4096, GQA 32/8 heads, MLP 14336, vocabulary
                 128256, 32 layers: 16.1 GB) in ~5 GB shards, like the real checkpoint
  llama-3.1-70b  Llama-3.1-70B's tensor shapes (hidden 8192, GQA 64/8, MLP 28672, vocabulary 128256);
                 80 layers would be 141 GB, so pass fewer: ``llama-3.1-70b:2`` is 7.6 GB

Each model is built once under --workdir (random bf16 values written shard by shard and tensor by
tensor, never a whole tensor in memory, with a config transformers loads), with LoRA patches of
rank --rank (float32 factors, as `portllm extract` and PEFT write them) on ``q_proj,v_proj``
(``qv``) or on all seven linear modules (``all-linear``). Then, in rounds, each method runs in a
fresh process:

  cp               `cp -r MODEL OUT && sync` (portllm fsyncs its output, cp does not)
  portllm          `portllm port --patch PATCH --to MODEL --out OUT --quiet`, one row per adapter
  portllm --verify the same with --verify (rereads every byte and recomputes every merge)
  diff             `portllm diff MODEL OUT --json` against portllm's output (rereads both)
  peft             from_pretrained(bfloat16) -> PeftModel.from_pretrained -> merge_and_unload ->
                   save_pretrained(max_shard_size=same); skipped, with a note, where the model
                   would not fit in the memory available
  import torch     `python -c "import torch"`: the floor under any portllm figure

Peak RSS is each process's own high-water mark (VmHWM, read from /proc/self/status as it exits;
for cp, sampled from /proc/PID/status while it runs), never getrusage(RUSAGE_CHILDREN), which
charges a child with the copy of its parent that fork made. *wall* is until the process exits;
*durable* adds a `sync` after it (every method is compared on durable time). Before every timed
run, `sync` flushes earlier writes and the source model is read once (untimed) so that each method
starts from the same page cache, unless --drop-caches (root) starts each one cold.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_common import cpu_name  # noqa: E402

SHAPES: dict[str, dict] = {
    "small": dict(hidden=2048, inter=5632, layers=18, heads=16, kv_heads=16, vocab=32000, shard_mb=500, llama3=False),
    "llama-3.1-8b": dict(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, vocab=128256, shard_mb=5000, llama3=True),
    "llama-3.1-70b": dict(hidden=8192, inter=28672, layers=80, heads=64, kv_heads=8, vocab=128256, shard_mb=5000, llama3=True),
}
ADAPTERS = {
    "qv": ("q_proj", "v_proj"),
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
METHODS = ("cp", "portllm", "portllm:torch", "portllm --verify", "diff", "peft", "import torch")
PEAK_TAG = "bench-peak-rss-bytes"


# -- building the inputs -------------------------------------------------------------------------
def llama_config(s: dict) -> dict:
    head_dim = s["hidden"] // s["heads"]
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden"],
        "intermediate_size": s["inter"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["kv_heads"],
        "head_dim": head_dim,
        "vocab_size": s["vocab"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    }
    if s.get("llama3"):  # Llama-3.1's own values
        cfg.update(
            max_position_embeddings=131072, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
            rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        )
    return cfg


def module_shapes(s: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear module of one layer."""
    h, i, kv = s["hidden"], s["inter"], s["kv_heads"] * (s["hidden"] // s["heads"])
    return {
        "self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i),
    }


def tensor_specs(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the model, in the order transformers' state dict has them."""
    h = s["hidden"]
    specs = [("model.embed_tokens.weight", (s["vocab"], h))]
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        specs += [(p + m + ".weight", shape) for m, shape in module_shapes(s).items()]
        specs += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (s["vocab"], h))]
    return specs


POOL_ELEMENTS = 16 << 20  # 32 MiB of random bf16 values, tiled at random offsets into every tensor


def build_model(out: Path, s: dict) -> None:
    """Write the model shard by shard, each tensor in chunks taken from a pool of random values."""
    import torch

    from portllm_cli.io.safetensors import encode_header

    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_specs(s):  # greedy by size, like save_pretrained's max_shard_size
        n = 2 * math.prod(shape)
        if shards[-1] and size + n > s["shard_mb"] * 1_000_000:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    gen = torch.Generator().manual_seed(0)
    pool = memoryview((torch.randn(POOL_ELEMENTS, generator=gen) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy()).cast("B")
    ones = memoryview(torch.ones(max(s["hidden"], 1), dtype=torch.bfloat16).view(torch.uint8).numpy()).cast("B")
    rng = random.Random(0)
    weight_map, total = {}, 0
    for k, group in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        group = sorted(group)  # safetensors stores a file's tensors sorted by name
        prefix, _ = encode_header([(n, "BF16", shape) for n, shape in group], {"format": "pt"})
        with open(tmp / fname, "wb") as fh:
            fh.write(prefix)
            for name, shape in group:
                nbytes = 2 * math.prod(shape)
                if len(shape) == 1:
                    fh.write(ones[:nbytes])
                else:
                    done = 0
                    while done < nbytes:
                        start = 2 * rng.randrange(len(pool) // 4)
                        n = min(nbytes - done, len(pool) - start)
                        fh.write(pool[start:start + n])
                        done += n
                weight_map[name] = fname
                total += nbytes
        print(f"  wrote {fname} ({(tmp / fname).stat().st_size / 1e9:.2f} GB)", file=sys.stderr, flush=True)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (tmp / "config.json").write_text(json.dumps(llama_config(s), indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    os.replace(tmp, out)


def build_patch(out: Path, model: Path, s: dict, kinds: tuple[str, ...], rank: int) -> None:
    import torch

    from portllm_cli.io.checkpoint import architecture_fingerprint
    from portllm_cli.patch.format import adapter_config, build_manifest, peft_key, write_patch_files

    gen = torch.Generator().manual_seed(1)
    tensors, shapes = {}, {}
    for n in range(s["layers"]):
        for m, (o, i) in module_shapes(s).items():
            if m.split(".")[-1] not in kinds:
                continue
            module = f"model.layers.{n}.{m}"
            tensors[peft_key(module, "A")] = torch.randn(rank, i, generator=gen) * 0.01
            tensors[peft_key(module, "B")] = torch.randn(o, rank, generator=gen) * 0.01
            shapes[module] = [o, i]
    config = adapter_config(base_model=str(model), rank=rank, alpha=2 * rank, target_modules=list(kinds))
    manifest = build_manifest(
        base={"model": str(model), "revision": None, "content_hash": None,
              "fingerprint": architecture_fingerprint(llama_config(s), shapes)},
        lora={"r": rank, "lora_alpha": 2 * rank, "target_modules": list(kinds)},
        source={"kind": "benchmark"},
    )
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    write_patch_files(tmp, tensors, config, manifest)
    os.replace(tmp, out)


# -- the PEFT path (run in its own process) --------------------------------------------------------
def peft_path(model: str, patch: str, out: str, shard: str) -> None:
    import torch
    import transformers as tf
    from peft import PeftModel

    m = tf.AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(m, patch).merge_and_unload()
    merged.save_pretrained(out, max_shard_size=shard)


# -- measuring ------------------------------------------------------------------------------------
# Python methods report their own peak resident memory as they exit (core.train.peak_rss_bytes).
_PEAK_HOOK = (
    "import atexit, sys\n"
    "def _peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            return int(line.split()[1]) * 1024\n"
    "    import resource; return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
    f"atexit.register(lambda: sys.stderr.write(f'\\n{PEAK_TAG} {{_peak()}}\\n'))\n"
)


def python_cmd(body: str, *args: str) -> list[str]:
    return [sys.executable, "-c", _PEAK_HOOK + body, *args]


def portllm_cmd(*args: str) -> list[str]:
    return python_cmd("sys.argv = ['portllm', *sys.argv[1:]]\nfrom portllm_cli.cli.app import main\nmain()\n", *args)


def _sampled_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def run_one(cmds: list[list[str]], stdout_path: Path | None = None, root: Path = REPO,
            env_extra: dict[str, str] | None = None) -> dict:
    """Run commands one after the other (as `a && b`), then `sync`. Wall, durable, CPU, peak RSS.

    ``root``: the portllm checkout the Python commands import (another one for --baseline)."""
    env = {**os.environ, "PYTHONPATH": str(root), **(env_extra or {})}
    wall = user = system = 0.0
    peak = 0
    t0 = time.perf_counter()
    for cmd in cmds:
        out = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=out, stderr=subprocess.PIPE)
            sampled = 0
            if cmd[0] != sys.executable:  # not Python: sample its high-water mark while it runs
                while True:
                    sampled = max(sampled, _sampled_hwm(proc.pid))
                    pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        break
                    time.sleep(0.01)
                err = proc.stderr.read().decode(errors="replace")
            else:
                err = proc.stderr.read().decode(errors="replace")
                _, status, ru = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        finally:
            if stdout_path:
                out.close()
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            sys.stderr.write(err[-4000:])
            raise SystemExit(f"{' '.join(cmd[:6])} ... failed with exit code {code}")
        user += ru.ru_utime
        system += ru.ru_stime
        reported = [int(line.split()[1]) for line in err.splitlines() if line.startswith(PEAK_TAG)]
        peak = max(peak, reported[-1] if reported else sampled)
    wall = time.perf_counter() - t0
    os.sync()
    durable = time.perf_counter() - t0
    return {"wall": wall, "durable": durable, "cpu": user + system, "sys": system, "peak_mb": peak / 2**20}


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def machine() -> str:
    cpu = cpu_name()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, "
            f"load average {os.getloadavg()[0]:.1f} at start")


def filesystem(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True).stdout.splitlines()[-1].split()
        return out[1]
    except (OSError, IndexError):
        return "unknown"


def warm(model: Path) -> None:
    """Read the source once so every method starts from the same page cache (untimed)."""
    for f in sorted(model.iterdir()):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# -- one shape ------------------------------------------------------------------------------------
def parse_shape(spec: str, layers: int | None) -> tuple[str, dict]:
    name, _, n = spec.partition(":")
    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    s = dict(SHAPES[name])
    if n:
        s["layers"] = int(n)
    elif layers is not None:
        s["layers"] = layers
    return f"{name}:{s['layers']}", s


def prepare(workdir: Path, tag: str, s: dict, adapters: list[str], rank: int) -> tuple[Path, dict[str, Path]]:
    work = workdir / tag.replace(":", "-l")
    model = work / "model"
    work.mkdir(parents=True, exist_ok=True)
    if not (model / "config.json").exists():
        print(f"building {model} ...", file=sys.stderr, flush=True)
        build_model(model, s)
    patches = {}
    for a in adapters:
        p = work / f"patch-{a}-r{rank}"
        if not (p / "portllm.json").exists():
            build_patch(p, model, s, ADAPTERS[a], rank)
        patches[a] = p
    return model, patches


def bench_shape(args, tag: str, s: dict, methods: list[str], adapters: list[str]) -> dict:
    model, patches = prepare(args.workdir, tag, s, adapters, args.rank)
    outs = model.parent / "out"
    shutil.rmtree(outs, ignore_errors=True)
    outs.mkdir()
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    n_shards = len(list(model.glob("*.safetensors")))
    shard = f"{s['shard_mb']}MB"
    notes = []
    need = int(size * 1.1) + (2 << 30)
    peft_ok = need < mem_available()
    if "peft" in methods and not peft_ok:
        notes.append(f"peft skipped: the model ({size / 1e9:.1f} GB) needs about {need / 1e9:.0f} GB of memory to "
                     f"merge in PEFT, {mem_available() / 1e9:.0f} GB are available")
    print(f"[{tag}] {size / 1e9:.2f} GB bf16 in {n_shards} shards; filesystem {filesystem(model)}", file=sys.stderr)

    rows: list[tuple[str, str | None]] = []  # (method, adapter)
    for m in methods:
        if m == "cp" or m == "import torch":
            rows.append((m, None))
        elif m == "peft":
            if peft_ok:
                rows += [(m, a) for a in adapters]
        elif m == "diff":
            continue  # right after portllm's row of the same adapter, whose output it reads
        else:
            for a in adapters:
                rows.append((m, a))
                if m == "portllm" and "diff" in methods:
                    rows.append(("diff", a))
                if m == "portllm" and args.baseline is not None:
                    rows.append(("portllm@baseline", a))
    if "diff" in methods and "portllm" not in methods:
        raise SystemExit("diff compares the model with portllm's output: add portllm to --methods")
    results: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for m, a in rows:
            key = m if a is None else f"{m} [{a}]"
            target = outs / key.replace(" ", "_").replace("[", "").replace("]", "")
            shutil.rmtree(target, ignore_errors=True)
            port_out = outs / f"portllm_{a}"  # what the portllm row writes
            if m == "cp":
                cmds = [["cp", "-r", str(model), str(target)]]
            elif m in ("portllm", "portllm@baseline", "portllm:torch"):
                cmds = [portllm_cmd("port", "--patch", str(patches[a]), "--to", str(model), "--out", str(target), "--quiet")]
            elif m == "portllm --verify":
                cmds = [portllm_cmd("port", "--patch", str(patches[a]), "--to", str(model), "--out", str(target),
                                    "--quiet", "--verify")]
            elif m == "diff":  # the model against portllm's output of this round (then removed)
                cmds = [portllm_cmd("diff", str(model), str(port_out), "--json")]
            elif m == "peft":
                cmds = [python_cmd(f"sys.path.insert(0, {str(REPO / 'benchmarks')!r})\nimport port_bench\n"
                                   "port_bench.peft_path(*sys.argv[1:5])\n",
                                   str(model), str(patches[a]), str(target), shard)]
            else:
                cmds = [python_cmd("import torch\n")]
            if m not in ("import torch",):
                os.sync()
                if not (args.drop_caches and drop_caches()):
                    warm(model)
            res = run_one(cmds, stdout_path=outs / "diff.json" if m == "diff" else None,
                          root=args.baseline if m == "portllm@baseline" else REPO,
                          env_extra={"PORTLLM_NO_KERNEL": "1"} if m == "portllm:torch" else None)
            if m == "diff":
                doc = json.loads((outs / "diff.json").read_text())
                res["note"] = doc.get("verdict_text")
            res["out_bytes"] = dir_size(target) if target.exists() else 0
            results.setdefault(key, []).append(res)
            print(f"  [{tag}] round {r + 1} {key:28s} wall {res['wall']:7.2f} s  durable {res['durable']:7.2f} s  "
                  f"cpu {res['cpu']:7.2f} s (sys {res['sys']:6.2f})  peak {res['peak_mb']:7.0f} MB", file=sys.stderr, flush=True)
            if not (m == "portllm" and "diff" in methods):  # portllm's output is kept for diff
                shutil.rmtree(target, ignore_errors=True)
            if m == "diff":
                shutil.rmtree(port_out, ignore_errors=True)
    shutil.rmtree(outs, ignore_errors=True)
    med = {k: {f: statistics.median(x[f] for x in v) for f in ("wall", "durable", "cpu", "peak_mb")}
           for k, v in results.items()}
    ratios: dict[str, float] = {}
    base = med.get("import torch", {}).get("peak_mb")
    for a in adapters:
        p = med.get(f"portllm [{a}]")
        if p is None:
            continue
        if "cp" in med:
            ratios[f"portllm [{a}] / cp (durable time)"] = p["durable"] / med["cp"]["durable"]
        if f"peft [{a}]" in med:
            ratios[f"peft [{a}] / portllm (durable time)"] = med[f"peft [{a}]"]["durable"] / p["durable"]
            ratios[f"portllm [{a}] / peft (peak RSS)"] = p["peak_mb"] / med[f"peft [{a}]"]["peak_mb"]
        if base is not None:
            ratios[f"portllm [{a}] peak above import torch (MB)"] = p["peak_mb"] - base
        if f"portllm:torch [{a}]" in med:
            t = med[f"portllm:torch [{a}]"]
            ratios[f"portllm [{a}] / portllm:torch (durable time)"] = p["durable"] / t["durable"]
            ratios[f"portllm [{a}] / portllm:torch (CPU time)"] = p["cpu"] / t["cpu"]
        if f"portllm@baseline [{a}]" in med:
            b = med[f"portllm@baseline [{a}]"]
            ratios[f"portllm [{a}] / baseline (durable time)"] = p["durable"] / b["durable"]
            ratios[f"portllm [{a}] / baseline (CPU time)"] = p["cpu"] / b["cpu"]
            ratios[f"portllm [{a}] / baseline (peak RSS)"] = p["peak_mb"] / b["peak_mb"]
    return {"shape": tag, "model_bytes": size, "shards": n_shards, "filesystem": filesystem(model),
            "rounds": args.rounds, "median": med, "ratios": ratios, "notes": notes, "runs": results}


def sweep(args, specs: list[str]) -> list[dict]:
    """portllm's peak RSS (all-linear adapter) against model size; import torch as the floor."""
    rows = []
    floor = run_one([python_cmd("import torch\n")])["peak_mb"]
    for spec in specs:
        tag, s = parse_shape(spec, None)
        model, patches = prepare(args.workdir, tag, s, ["all-linear"], args.rank)
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        from portllm_cli.io.checkpoint import Checkpoint

        largest = Checkpoint.open(model).largest_tensor_bytes()
        out = model.parent / "out-sweep"
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        warm(model)
        res = run_one([portllm_cmd("port", "--patch", str(patches["all-linear"]), "--to", str(model), "--out", str(out),
                                   "--quiet")])
        shutil.rmtree(out, ignore_errors=True)
        patch_bytes = (patches["all-linear"] / "adapter_model.safetensors").stat().st_size
        row = {"shape": tag, "model_bytes": size, "largest_tensor_bytes": largest, "patch_bytes": patch_bytes,
               "peak_mb": res["peak_mb"],
               "above_import_torch_mb": res["peak_mb"] - floor, "durable": res["durable"]}
        rows.append(row)
        print(f"  sweep {tag:18s} {size / 1e9:6.2f} GB  peak {res['peak_mb']:6.0f} MB "
              f"(+{res['peak_mb'] - floor:.0f} over import torch)", file=sys.stderr, flush=True)
        if args.clean:
            shutil.rmtree(model.parent, ignore_errors=True)
    return [{"import_torch_peak_mb": floor}, *rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / ".work" / "port")
    ap.add_argument("--shape", action="append", default=[],
                    help=f"NAME or NAME:LAYERS, repeatable or comma-separated; NAME in {', '.join(SHAPES)} (default small)")
    ap.add_argument("--layers", type=int, help="layers of every --shape given without :LAYERS")
    ap.add_argument("--adapter", default="qv", help="comma-separated: qv, all-linear (default qv)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1, help="timed rounds; medians are reported")
    ap.add_argument("--methods", default="cp,portllm,peft,import torch",
                    help=f"comma-separated, run in this order each round; from: {', '.join(METHODS)}")
    ap.add_argument("--sweep", default="", help="comma-separated shapes: portllm's peak RSS against model size")
    ap.add_argument("--drop-caches", action="store_true", help="start every method with a cold page cache (root)")
    ap.add_argument("--clean", action="store_true", help="delete each shape's model and patches when done with it")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON document")
    ap.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                    help="another portllm checkout (e.g. `git worktree add /tmp/before REV`): its `port` runs "
                         "next to this one's, same inputs, same rounds (row portllm@baseline)")
    args = ap.parse_args()

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "portllm_cli" / "__init__.py").is_file():
            raise SystemExit(f"--baseline {args.baseline}: not a portllm checkout (no portllm_cli/__init__.py)")
        if "portllm" not in methods:
            raise SystemExit("--baseline runs next to the portllm method: add portllm to --methods")
    adapters = [a.strip() for a in args.adapter.split(",") if a.strip()]
    for a in adapters:
        if a not in ADAPTERS:
            raise SystemExit(f"unknown adapter {a!r}; choose from {', '.join(ADAPTERS)}")
    specs = [x.strip() for s in args.shape for x in s.split(",") if x.strip()]
    if not specs and not args.sweep:
        specs = ["small"]
    header = machine()
    shapes = []
    for spec in specs:
        tag, s = parse_shape(spec, args.layers)
        shapes.append(bench_shape(args, tag, s, methods, adapters))
        if args.clean:
            shutil.rmtree(args.workdir / tag.replace(":", "-l"), ignore_errors=True)
    swept = sweep(args, [x.strip() for x in args.sweep.split(",") if x.strip()]) if args.sweep else []

    print(f"\n{header}; {filesystem(args.workdir)} filesystem; rank {args.rank} patches with float32 factors")
    for doc in shapes:
        print(f"\n### {doc['shape']}: {doc['model_bytes'] / 1e9:.2f} GB bf16 in {doc['shards']} shards, "
              f"{doc['rounds']} round(s), medians\n")
        print("| method | wall (s) | durable (s) | CPU (s) | peak RSS (MB) |")
        print("|---|---:|---:|---:|---:|")
        for k, v in doc["median"].items():
            name = "cp -r && sync" if k == "cp" else k
            print(f"| {name} | {v['wall']:.2f} | {v['durable']:.2f} | {v['cpu']:.2f} | {v['peak_mb']:.0f} |")
        print()
        for k, v in doc["ratios"].items():
            print(f"- {k}: {v:.2f}")
        for n in doc["notes"]:
            print(f"- note: {n}")
    if swept:
        print(f"\n### peak RSS against model size (portllm port, all-linear r={args.rank}); "
              f"`import torch` alone: {swept[0]['import_torch_peak_mb']:.0f} MB\n")
        print("| shape | model (GB) | largest tensor (MB) | patch (MB) | peak RSS (MB) | above import torch (MB) "
              "| durable (s) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in swept[1:]:
            print(f"| {r['shape']} | {r['model_bytes'] / 1e9:.2f} | {r['largest_tensor_bytes'] / 2**20:.0f} | "
                  f"{r['patch_bytes'] / 1e6:.0f} | {r['peak_mb']:.0f} | {r['above_import_torch_mb']:.0f} | "
                  f"{r['durable']:.2f} |")
    if args.json:
        print(json.dumps({"machine": header, "shapes": shapes, "sweep": swept}, indent=2))


if __name__ == "__main__":
    main()
