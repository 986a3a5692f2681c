"""Run a GGUF model (optionally with GGUF LoRA adapters) through a real llama.cpp and save its logits.

The oracle for portllm's GGUF output: llama.cpp itself, from the PyPI wheel ``llama-cpp-cffi``
(compiled CPU libraries, no build step; install with ``pip install --no-deps llama-cpp-cffi==0.4.42
cffi``). Its C API is early-2025 llama.cpp. A malformed adapter can abort the process, so the
tests run this file in a child process:

    python tests/llamacpp_oracle.py MODEL.gguf OUT.npy TOKENS_JSON [--lora ADAPTER.gguf [--lora-scale S]]

TOKENS_JSON is a list of prompts, each a list of token ids; OUT.npy gets the logits of every
position of every prompt, concatenated (float32, shape (total_tokens, n_vocab)).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import sys


def find_library() -> str | None:
    """The CPU build inside the installed wheel, found without importing the package (its
    __init__ picks a GPU build when it sees one and loads with the default dlopen flags)."""
    spec = importlib.util.find_spec("llama")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        for f in sorted(os.listdir(d)):
            if f.startswith("_llama_cpp_cpu") and f.endswith(".so"):
                return os.path.join(d, f)
    return None


def load_library():
    path = find_library()
    if path is None:
        raise SystemExit("llama-cpp-cffi is not installed")
    # Built with a newer GCC than Debian 12's: resolve symbols lazily or the load fails.
    sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_GLOBAL)
    loader = importlib.machinery.ExtensionFileLoader("_llama_cpp_cpu", path)
    spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod.lib, mod.ffi


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("tokens")
    ap.add_argument("--lora", action="append", default=[])
    ap.add_argument("--lora-scale", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np

    lib, ffi = load_library()
    lib.llama_backend_init()
    mparams = lib.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = lib.llama_model_load_from_file(args.model.encode(), mparams)
    if model == ffi.NULL:
        raise SystemExit(f"llama.cpp could not load {args.model}")
    prompts = json.loads(open(args.tokens).read())
    n_max = max(len(p) for p in prompts)
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = max(64, n_max)
    cparams.n_batch = max(64, n_max)
    cparams.n_ubatch = max(64, n_max)
    cparams.n_threads = args.threads
    cparams.n_threads_batch = args.threads
    ctx = lib.llama_init_from_model(model, cparams)
    if ctx == ffi.NULL:
        raise SystemExit("llama.cpp could not create a context")
    for path in args.lora:
        adapter = lib.llama_adapter_lora_init(model, path.encode())
        if adapter == ffi.NULL:
            raise SystemExit(f"llama.cpp refused the adapter {path}")
        if lib.llama_set_adapter_lora(ctx, adapter, args.lora_scale) != 0:
            raise SystemExit(f"llama.cpp could not apply the adapter {path}")
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    out = []
    batch = lib.llama_batch_init(n_max, 0, 1)
    for prompt in prompts:
        lib.llama_kv_self_clear(ctx)
        batch.n_tokens = len(prompt)
        for i, tok in enumerate(prompt):
            batch.token[i] = tok
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        if lib.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        for i in range(len(prompt)):
            ptr = lib.llama_get_logits_ith(ctx, i)
            out.append(np.frombuffer(ffi.buffer(ptr, 4 * n_vocab), dtype=np.float32).copy())
    lib.llama_batch_free(batch)
    np.save(args.out, np.stack(out))


if __name__ == "__main__":
    main()
