"""Peak memory of `portllm diff MODEL_A MODEL_B` on a generated multi-shard bf16 model.

Generates (once, cached under --workdir) a Llama-shaped bf16 checkpoint of about --size-gb GB
in --shard-mb MB shards, plus a copy whose weights moved by a layer-dependent amount, then runs
`python -m portllm_cli diff A B --json` in a subprocess and reports its peak resident memory
(getrusage of a small launcher's children, cross-checked by psutil polling) next to the model size, the largest
shard and the peak of a bare interpreter that imports torch and portllm. Figures only; no
assertions.

    python benchmarks/diff_bench.py                       # ~2.2 GB, 500 MB shards
    python benchmarks/diff_bench.py --size-gb 4 --workdir /data/bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000


def layer_specs(i: int) -> list[tuple[str, tuple[int, ...]]]:
    head_dim = HIDDEN // HEADS
    p = f"model.layers.{i}."
    return [
        (p + "input_layernorm.weight", (HIDDEN,)),
        (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
        (p + "self_attn.k_proj.weight", (KV_HEADS * head_dim, HIDDEN)),
        (p + "self_attn.v_proj.weight", (KV_HEADS * head_dim, HIDDEN)),
        (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
        (p + "post_attention_layernorm.weight", (HIDDEN,)),
        (p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
        (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
        (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
    ]


def plan(size_gb: float) -> tuple[int, list[tuple[str, tuple[int, ...]]]]:
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    per_layer = sum(math.prod(s) for _, s in layer_specs(0))
    layers = max(1, math.ceil((size_gb * 1e9 / 2 - fixed) / per_layer))
    specs = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        specs += layer_specs(i)
    specs += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return layers, specs


def config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }


def generate(workdir: Path, size_gb: float, shard_mb: int) -> tuple[Path, Path]:
    import torch

    from portllm_cli.core.diff import layer_index
    from portllm_cli.io.safetensors import SafetensorsWriter

    a_dir, b_dir = workdir / "model-a", workdir / "model-b"
    stamp = {"size_gb": size_gb, "shard_mb": shard_mb, "hidden": HIDDEN, "version": 1}
    marker = workdir / "complete.json"
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return a_dir, b_dir
    marker.unlink(missing_ok=True)
    layers, specs = plan(size_gb)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in specs:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and used + nbytes > shard_mb * 1e6:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    gen = torch.Generator().manual_seed(0)
    for d in (a_dir, b_dir):
        d.mkdir(parents=True, exist_ok=True)
        for f in d.glob("*.safetensors"):
            f.unlink()
        (d / "config.json").write_text(json.dumps(config(layers), indent=2))
    weight_map = {}
    total = 0
    n = len(shards)
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        spec = [(name, "BF16", shape) for name, shape in shard]
        with SafetensorsWriter(a_dir / fname, spec, {"format": "pt"}) as wa, SafetensorsWriter(
            b_dir / fname, spec, {"format": "pt"}
        ) as wb:
            for name, shape in shard:
                if len(shape) == 1:
                    w = torch.ones(shape, dtype=torch.float32)
                else:
                    w = torch.randn(shape, generator=gen) * 0.02
                wa.write(name, w.to(torch.bfloat16))
                layer = layer_index(name)
                # the "new version": deeper layers moved more, norms and embeddings a little
                eps = 0.002 * (1 + (layer if layer is not None else 0) / 4) if len(shape) > 1 else 0.001
                w.add_(torch.randn(shape, generator=gen) * (0.02 * eps if len(shape) > 1 else eps))
                wb.write(name, w.to(torch.bfloat16))
                del w
                weight_map[name] = fname
                total += 2 * math.prod(shape)
        print(f"  wrote shard {k}/{n} ({(a_dir / fname).stat().st_size / 1e6:.0f} MB) x2", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for d in (a_dir, b_dir):
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    marker.write_text(json.dumps(stamp))
    return a_dir, b_dir


# A small fresh interpreter runs the command and reports its children's peak RSS. Measuring
# from this (large) process directly would not do: Linux carries the parent's RSS high-water
# mark into a child's ru_maxrss across fork + exec.
LAUNCHER = (
    "import resource, subprocess, sys\n"
    "with open(sys.argv[1], 'wb') as out:\n"
    "    rc = subprocess.call(sys.argv[3:], stdout=out, stderr=subprocess.DEVNULL)\n"
    "open(sys.argv[2], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(rc)\n"
)


def measure(cmd: list[str], stdout_path: Path) -> tuple[float, float, float, int]:
    """Run cmd; return (peak RSS MiB from getrusage, psutil-polled peak MiB, wall s, exit code)."""
    import psutil

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rss_file = stdout_path.with_suffix(".maxrss")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(stdout_path), str(rss_file), *cmd], env=env, cwd=REPO)
    polled = 0
    launcher = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            polled = max([polled] + [c.memory_info().rss for c in launcher.children()])
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    return int(rss_file.read_text()) / 1024, polled / 2**20, wall, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("~/.cache/portllm/bench-diff").expanduser())
    ap.add_argument("--size-gb", type=float, default=2.2)
    ap.add_argument("--shard-mb", type=int, default=500)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    import psutil  # fail early: the figures need it for the cross-check

    print(f"generating (or reusing) two {args.size_gb} GB bf16 models under {args.workdir} ...", flush=True)
    t0 = time.perf_counter()
    a_dir, b_dir = generate(args.workdir, args.size_gb, args.shard_mb)
    print(f"  ready in {time.perf_counter() - t0:.0f} s")
    shards = sorted(a_dir.glob("*.safetensors"))
    model_mb = sum(f.stat().st_size for f in shards) / 2**20
    shard_mb = max(f.stat().st_size for f in shards) / 2**20
    from portllm_cli.io.checkpoint import Checkpoint

    tensor_mb = Checkpoint.open(a_dir).largest_tensor_bytes() / 2**20

    with tempfile.TemporaryDirectory() as tmp:
        base_cmd = [sys.executable, "-c", "import torch, portllm_cli.cli.app, portllm_cli.core.diff; torch.ones(1)"]
        base_rss, base_poll, _, _ = measure(base_cmd, Path(tmp) / "base.out")
        cmd = [sys.executable, "-m", "portllm_cli", "diff", str(a_dir), str(b_dir), "--json"]
        rss, poll, wall, rc = measure(cmd, Path(tmp) / "diff.json")
        doc = json.loads((Path(tmp) / "diff.json").read_text()) if rc == 0 else {}

    print()
    print(f"machine          : {platform.machine()} {platform.system()} {platform.release()}, "
          f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB RAM, Python {platform.python_version()}")
    print(f"model            : {model_mb:,.0f} MiB bf16 in {len(shards)} shards (x2: A and B)")
    print(f"largest shard    : {shard_mb:,.0f} MiB; largest tensor {tensor_mb:,.0f} MiB")
    print(f"baseline RSS     : {base_rss:,.0f} MiB (python + torch + portllm imported; polled {base_poll:,.0f})")
    print(f"diff peak RSS    : {rss:,.0f} MiB (polled {poll:,.0f}); exit {rc}; {wall:.1f} s wall")
    print(f"above baseline   : {rss - base_rss:,.0f} MiB = {100 * (rss - base_rss) / shard_mb:.0f}% of one shard, "
          f"{100 * (rss - base_rss) / model_mb:.1f}% of one model")
    if doc:
        print(f"verdict          : {doc['verdict_text']}")
        print(f"throughput       : {2 * model_mb / wall:,.0f} MiB/s read (both models)")


if __name__ == "__main__":
    main()
