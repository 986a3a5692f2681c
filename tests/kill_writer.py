"""A slow multi-shard writer through the real atomic_output_dir, to be killed by tests/test_kill.py.

    python -m tests.kill_writer OUT [--overwrite] [--delay SECONDS]

Prints ``step N`` (flushed) after each tensor, ``block-done`` once everything is written but
before the rename, and ``complete`` after it. SIGTERM is handled exactly as ``portllm`` does
(cli/app.py turns it into KeyboardInterrupt); KeyboardInterrupt exits 130.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

SHARDS = 3
TENSORS_PER_SHARD = 2
SHAPE = (32, 32)


def expected_tensors() -> dict[str, dict[str, float]]:
    """shard file name -> {tensor name: fill value}: the complete output, independent of the writer."""
    out = {}
    for s in range(SHARDS):
        fname = f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"
        out[fname] = {f"layers.{s}.w{t}": float(s * 10 + t) for t in range(TENSORS_PER_SHARD)}
    return out


def write(out: Path, *, overwrite: bool = False, delay: float = 0.0, say=lambda line: None) -> None:
    # Raw float32 bytes instead of torch tensors: the subprocess starts in a fraction of a second.
    from array import array

    from portllm_cli.io.atomic import atomic_output_dir
    from portllm_cli.io.safetensors import encode_header

    n = SHAPE[0] * SHAPE[1]
    step = 0
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        weight_map = {}
        for fname, tensors in expected_tensors().items():
            prefix, _ = encode_header([(name, "F32", SHAPE) for name in tensors], {"format": "pt"})
            with open(tmp / fname, "wb") as fh:
                fh.write(prefix)
                for name, value in tensors.items():
                    data = array("f", [value] * n)
                    if sys.byteorder != "little":
                        data.byteswap()  # safetensors is little-endian
                    fh.write(data.tobytes())
                    fh.flush()
                    weight_map[name] = fname
                    step += 1
                    say(f"step {step}")
                    time.sleep(delay)
        # the index last, as save_pretrained does
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (tmp / "config.json").write_text(json.dumps({"model_type": "llama"}))
        say("block-done")
        time.sleep(delay)
    say("complete")


def main(argv: list[str]) -> int:
    from portllm_cli.cli.app import _on_sigterm

    signal.signal(signal.SIGTERM, _on_sigterm)  # what portllm's main() installs
    out = Path(argv[0])
    overwrite = "--overwrite" in argv
    delay = float(argv[argv.index("--delay") + 1]) if "--delay" in argv else 0.0

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        write(out, overwrite=overwrite, delay=delay, say=say)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
