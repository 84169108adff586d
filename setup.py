"""Builds compkern._C (C++ CPU kernels, pybind11 via torch.utils.cpp_extension, OpenMP)."""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# -march=native: the extension is built on the machine that runs it (pip install -e .).
# Set COMPKERN_PORTABLE=1 to build a binary that runs on any x86-64.
arch = [] if os.environ.get("COMPKERN_PORTABLE") else ["-march=native"]

setup(
    ext_modules=[
        CppExtension(
            "compkern._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args=["-O3", "-fopenmp", "-std=c++17", *arch],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)},
)
