"""Build hook: setuptools metadata lives in setup.cfg; this only declares the Cython modules.

Seven extension modules, one job each, cimporting each other through their .pxd files:
``_memory`` (driver table, allocators, Buffer), ``_arena`` (memory shared across processes), ``_cache`` (the weight cache), ``_bind``
(the AOTI C ABI, constant binding, the run call), ``_pieces`` (pread, BLAKE3, piece copies),
``_plan`` (the load plan and its one copy loop), ``_load`` (the copy engines and worker
threads: store -> buffers).
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

MODULES = ("_memory", "_arena", "_cache", "_bind", "_pieces", "_plan", "_load")
JOBS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ParallelBuildExt(build_ext):
    """C compiles of the modules at once, one per core (pip's install gives no ``-j``)."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.parallel:
            self.parallel = JOBS


setup(
    ext_modules=cythonize(
        [Extension(f"aoti_rt.{m}", [f"aoti_rt/{m}.pyx"], extra_compile_args=["-O3"]) for m in MODULES],
        compiler_directives={"language_level": "3"},
        nthreads=JOBS,
    ),
    cmdclass={"build_ext": ParallelBuildExt},
)
