"""``portllm`` exactly as installed, with each merged shard announced on stderr and slowed down.

    python -m tests.slow_port port --patch P --to M --out O

Used by tests/test_kill.py to kill the real port command at known points: after shard N is
written it prints ``@@shard N`` on stderr and sleeps PORTLLM_TEST_SHARD_DELAY seconds (0.25).
Everything else (argument parsing, the SIGTERM handler, error mapping, exit codes) is
portllm_cli.cli.app.main unchanged.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
    from portllm_cli.cli import app
    from portllm_cli.core import port as core

    real = core._port_safetensors_shard
    delay = float(os.environ.get("PORTLLM_TEST_SHARD_DELAY", "0.25"))
    count = 0

    def announced(*args, **kwargs):
        nonlocal count
        real(*args, **kwargs)
        count += 1
        sys.stderr.write(f"@@shard {count}\n")
        sys.stderr.flush()
        time.sleep(delay)

    core._port_safetensors_shard = announced
    sys.argv[0] = "portllm"
    app.main()


if __name__ == "__main__":
    main()
