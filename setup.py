"""Only declares the optional compiled CPU scan kernel; all metadata lives in pyproject.toml.

``pip install -e .`` compiles libs/scan/csrc/scan_cpu.c (plain C: no torch or Python headers, any C11 compiler with GCC
vector extensions; gcc >= 5 or clang) into libs/scan/_cpu_kernel*.so, loaded with ctypes by libs/scan/cpu.py. If the
compilation fails for any reason (no compiler, unsupported compiler), the install still succeeds with a warning and
the exact pure-PyTorch scan is used instead (libs.scan.cpu.is_available() is False).
"""
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install: a kernel that does not compile is simply absent."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - anything at all: the extension is optional
            self._skip(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            self._skip(e)

    def _skip(self, e):
        msg = (f"WARNING: the optional CPU scan kernel (libs/scan/csrc/scan_cpu.c) was not built ({type(e).__name__}: {e}); "
               "the pure-PyTorch scan will be used.")
        self.warn(msg)
        print(msg, file=sys.stderr)


# -O3; no -ffast-math (the kernel's exp relies on IEEE rounding and NaN semantics); no -march: the kernel is compiled
# for AVX-512, AVX2+FMA and the baseline ISA in the same file and picks the best one at run time.
cflags = ["-O3", "-std=gnu11", "-fno-math-errno", "-Wno-psabi"] if sys.platform != "win32" else []
ldflags = ["-pthread"] if sys.platform != "win32" else []

setup(
    ext_modules=[
        Extension(
            "libs.scan._cpu_kernel",
            sources=["libs/scan/csrc/scan_cpu.c"],
            depends=["libs/scan/csrc/scan_kernel.inc", "libs/scan/csrc/scan_backward.inc",
                     "libs/scan/csrc/scan_simd.inc"],
            extra_compile_args=cflags,
            extra_link_args=ldflags,
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
