"""Benchmark `portllm port` against the PEFT merge path and a plain copy, side by side.

    python benchmarks/port_bench.py [--workdir ~/.cache/portllm/bench] [--layers 18] [--rounds 3]

Builds (once, cached under --workdir) a random bf16 Llama-shaped model of about 2.1 GB in
~500 MB safetensors shards, written tensor by tensor (no transformers needed to build it,
but it loads with transformers), and a LoRA patch on q_proj and v_proj (r=8). Then, in
rounds, measures each method in a fresh subprocess:

  cp       `cp -r MODEL OUT`
  portllm  `python -m portllm_cli port --patch PATCH --to MODEL --out OUT --quiet`
  peft     AutoModelForCausalLM.from_pretrained(dtype=bfloat16) -> PeftModel.from_pretrained
           -> merge_and_unload -> save_pretrained(max_shard_size=same)
  import torch   `python -c "import torch"`: the fixed cost included in portllm's figure
  portllm --verify   the port followed by its --verify pass

Each method runs under a small wrapper process that starts it, waits, and reads the child's
peak RSS from getrusage(RUSAGE_CHILDREN); wall time is taken around the child. Page caches
cannot be dropped here, so an untimed `cp -r` first warms the source model into the cache and
every method then reads it from memory; before each timed run `sync` flushes earlier writes
so nobody pays for another's writeback. `wall` is until the process exits; `durable` adds the
`sync` that puts its output on disk (portllm fsyncs its files itself, cp and PEFT do not).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# -- building the inputs -------------------------------------------------------------------------
def llama_config(hidden: int, inter: int, layers: int, heads: int, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "vocab_size": vocab,
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


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    specs = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.k_proj.weight", (h, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.v_proj.weight", (h, h)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def build_model(out: Path, cfg: dict, shard_bytes: int) -> None:
    import torch

    from portllm_cli.io.safetensors import SafetensorsWriter

    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specs = tensor_specs(cfg)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        n = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, group in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(tmp / fname, [(n, "BF16", s) for n, s in group], {"format": "pt"}) as w:
            for name, shape in group:
                if len(shape) == 1:
                    t = torch.ones(shape, dtype=torch.bfloat16)
                else:
                    t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
                w.write(name, t)
                weight_map[name] = fname
                total += t.numel() * 2
        print(f"  wrote {fname}", file=sys.stderr)
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    os.replace(tmp, out)


def build_patch(out: Path, model: Path, cfg: dict, rank: int = 8) -> None:
    import torch

    from portllm_cli.io.checkpoint import architecture_fingerprint
    from portllm_cli.patch.format import adapter_config, build_manifest, peft_key, write_patch_files

    h = cfg["hidden_size"]
    gen = torch.Generator().manual_seed(1)
    tensors, shapes = {}, {}
    for n in range(cfg["num_hidden_layers"]):
        for proj in ("q_proj", "v_proj"):
            module = f"model.layers.{n}.self_attn.{proj}"
            tensors[peft_key(module, "A")] = torch.randn(rank, h, generator=gen) * 0.01
            tensors[peft_key(module, "B")] = torch.randn(h, rank, generator=gen) * 0.01
            shapes[module] = [h, h]
    config = adapter_config(base_model=str(model), rank=rank, alpha=2 * rank, target_modules=["q_proj", "v_proj"])
    manifest = build_manifest(
        base={"model": str(model), "revision": None, "content_hash": None,
              "fingerprint": architecture_fingerprint(cfg, shapes)},
        lora={"r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"]},
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
def measure(cmd: list[str]) -> None:
    """Run cmd as our only child; print its wall time, durable time and peak RSS as JSON."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    os.sync()
    durable = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr.decode(errors="replace"))
        raise SystemExit(f"{cmd[:4]} failed with exit code {proc.returncode}")
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    # ru_maxrss is KiB on Linux; CPU seconds (user + system) are steadier than wall time on a
    # shared machine, so both are reported.
    print(json.dumps({"wall": wall, "durable": durable, "cpu": ru.ru_utime + ru.ru_stime, "peak_mb": ru.ru_maxrss / 1024}))


def run_measured(cmd: list[str]) -> dict:
    """A fresh wrapper process per run, so RUSAGE_CHILDREN sees exactly one method."""
    wrapper = [sys.executable, __file__, "--_measure", "--", *cmd]
    out = subprocess.run(wrapper, check=True, stdout=subprocess.PIPE, cwd=REPO).stdout.decode()
    return json.loads(out.strip().splitlines()[-1])


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0]
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, load average {load:.1f} at start"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("~/.cache/portllm/bench").expanduser())
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mb", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds; medians are reported")
    ap.add_argument("--methods", default="cp,portllm,peft,import torch",
                    help="comma-separated, run in this order each round (also: portllm --verify)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON document")
    args = ap.parse_args()

    cfg = llama_config(args.hidden, args.intermediate, args.layers, args.heads, args.vocab)
    tag = f"llama-h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}-s{args.shard_mb}"
    work = args.workdir / tag
    model, patch, outs = work / "model", work / "patch", work / "out"
    work.mkdir(parents=True, exist_ok=True)
    if not (model / "config.json").exists():
        print(f"building {model} ...", file=sys.stderr)
        build_model(model, cfg, args.shard_mb * 1_000_000)
    if not (patch / "portllm.json").exists():
        build_patch(patch, model, cfg)
    outs.mkdir(exist_ok=True)
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    shard = f"{args.shard_mb}MB"
    cmds = {
        "cp": ["cp", "-r", str(model), str(outs / "cp")],
        "portllm": [sys.executable, "-m", "portllm_cli", "port", "--patch", str(patch), "--to", str(model),
                    "--out", str(outs / "portllm"), "--quiet"],
        "portllm --verify": [sys.executable, "-m", "portllm_cli", "port", "--patch", str(patch), "--to", str(model),
                             "--out", str(outs / "portllm-verify"), "--quiet", "--verify"],  # opt-in extra row
        "peft": [sys.executable, __file__, "--_peft", str(model), str(patch), str(outs / "peft"), shard],
        # the fixed cost inside portllm's figure: the interpreter starting, importing torch, exiting
        "import torch": [sys.executable, "-c", "import torch"],
    }
    methods = [m.strip() for m in args.methods.split(",")]
    print(f"model: {size / 1e9:.2f} GB bf16 in {len(list(model.glob('*.safetensors')))} shards; "
          f"patch: q_proj,v_proj r=8 on {args.layers} layers", file=sys.stderr)
    subprocess.run(["cp", "-r", str(model), str(outs / "warm")], check=True)  # untimed: warms the page cache
    shutil.rmtree(outs / "warm")
    results: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for m in methods:
            target = outs / m.replace(" --", "-")
            shutil.rmtree(target, ignore_errors=True)
            os.sync()
            res = run_measured(cmds[m])
            res["out_bytes"] = dir_size(target) if target.exists() else 0
            results[m].append(res)
            print(f"  round {r + 1} {m:17s} wall {res['wall']:6.2f} s  durable {res['durable']:6.2f} s  "
                  f"cpu {res['cpu']:6.2f} s  peak {res['peak_mb']:7.0f} MB", file=sys.stderr)
            shutil.rmtree(target, ignore_errors=True)
    med = {m: {k: statistics.median(x[k] for x in v) for k in ("wall", "durable", "cpu", "peak_mb")} for m, v in results.items()}
    doc = {"machine": machine(), "model_bytes": size, "rounds": args.rounds, "median": med, "runs": results}
    ratios = {}
    if "portllm" in med and "peft" in med:
        ratios["peft_time_over_portllm"] = med["peft"]["wall"] / med["portllm"]["wall"]
        ratios["peft_durable_over_portllm"] = med["peft"]["durable"] / med["portllm"]["durable"]
        ratios["peft_cpu_over_portllm"] = med["peft"]["cpu"] / med["portllm"]["cpu"]
        ratios["portllm_peak_over_peft"] = med["portllm"]["peak_mb"] / med["peft"]["peak_mb"]
    if "portllm" in med and "cp" in med:
        ratios["portllm_time_over_cp"] = med["portllm"]["wall"] / med["cp"]["wall"]
        ratios["portllm_durable_over_cp"] = med["portllm"]["durable"] / med["cp"]["durable"]
    doc["ratios"] = ratios
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"\n{machine()}")
    print(f"model {size / 1e9:.2f} GB bf16, {args.rounds} rounds, medians\n")
    print("| method | wall (s) | durable (s) | CPU (s) | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for m, v in med.items():
        print(f"| {m} | {v['wall']:.2f} | {v['durable']:.2f} | {v['cpu']:.2f} | {v['peak_mb']:.0f} |")
    print()
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_measure":
        measure(sys.argv[3:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--_peft":
        peft_path(*sys.argv[2:6])
    else:
        main()
