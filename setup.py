"""Build hook: setuptools metadata lives in setup.cfg; this only declares the Cython modules.

Five extension modules, one job each, cimporting each other through their .pxd files:
``_memory`` (driver table, allocators, Buffer), ``_arena`` (memory shared across processes),
``_cache`` (the weight cache), ``_bind``
(the AOTI C ABI, constant binding, the run call), ``_load`` (store -> buffers).
"""
from Cython.Build import cythonize
from setuptools import Extension, setup

MODULES = ("_memory", "_arena", "_cache", "_bind", "_load")

setup(
    ext_modules=cythonize(
        [Extension(f"aoti_rt.{m}", [f"aoti_rt/{m}.pyx"], extra_compile_args=["-O3"]) for m in MODULES],
        compiler_directives={"language_level": "3"},
    )
)
