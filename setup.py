"""The one compiled piece of portllm: the bf16 merge step in one pass (portllm_cli/_kernels.c).

Everything else about the package is in pyproject.toml. The extension is optional: where no C
compiler (or no Python headers) is found the install goes on and portllm uses torch's operations,
the same bits, more CPU time. No fused multiply-add may be generated: its single rounding would
change bits against torch's separate multiply and add (tests/test_kernels.py checks).
"""

import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    FLAGS = ["/O2", "/fp:precise"]  # MSVC contracts only under /fp:fast or /fp:contract
else:
    FLAGS = ["-O3", "-ffp-contract=off"]

setup(
    ext_modules=[
        Extension("portllm_cli._kernels", ["portllm_cli/_kernels.c"], extra_compile_args=FLAGS, optional=True),
    ]
)
