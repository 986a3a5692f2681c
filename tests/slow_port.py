"""``portllm`` exactly as installed, with each merged tensor announced on stderr and slowed down.

    python -m tests.slow_port port --patch P --to M --out O

Used by tests/test_kill.py to kill the real port command at known points: after the N-th
patched weight is merged it prints ``@@merge N`` on stderr and sleeps
PORTLLM_TEST_MERGE_DELAY seconds (default 0.25) while the shard copies carry on. Everything else
(argument parsing, the SIGTERM handler, error mapping, exit codes) is portllm_cli.cli.app.main
unchanged. The hook is ``portllm_cli.core.port.merge_shard_tensor``, the per-tensor step of a port.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
    from portllm_cli.cli import app
    from portllm_cli.core import port as core

    real = core.merge_shard_tensor
    delay = float(os.environ.get("PORTLLM_TEST_MERGE_DELAY", "0.25"))
    count = 0

    def announced(*args, **kwargs):
        nonlocal count
        out = real(*args, **kwargs)
        count += 1
        sys.stderr.write(f"@@merge {count}\n")
        sys.stderr.flush()
        time.sleep(delay)
        return out

    core.merge_shard_tensor = announced
    sys.argv[0] = "portllm"
    app.main()


if __name__ == "__main__":
    main()
