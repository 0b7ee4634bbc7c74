"""Build hook: setuptools metadata lives in setup.cfg; this only declares the Cython module."""
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("aoti_rt._cache", ["aoti_rt/_cache.pyx"], extra_compile_args=["-O3"])],
        compiler_directives={"language_level": "3"},
    )
)
