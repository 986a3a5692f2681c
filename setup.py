"""The one compiled piece of portllm: a bf16 LoRA merge in one pass (portllm_cli/_kernels.c).

Everything else about the package is in pyproject.toml. The extension is optional: where no C
compiler (or no Python headers) is found the install goes on and portllm uses torch's operations,
the same bits, more CPU time. The compiler may not contract a multiply and an add into one fused
multiply-add: its single rounding would change bits against torch's separate scale and sum. The
FMAs of the rank-r product, which torch's matmul does use, are written out explicitly in the
source (tests/test_kernels.py checks both).
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
