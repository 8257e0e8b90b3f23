"""Builds torch_kvreg._C.

CUDAExtension when torch was built with CUDA and nvcc is found, CppExtension otherwise.
KVREG_CUDA=0 forces the CPU build, KVREG_CUDA=1 requires the CUDA one.
KVREG_SANITIZE=1 adds AddressSanitizer and UndefinedBehaviorSanitizer.
"""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME


def want_cuda() -> bool:
    flag = os.environ.get("KVREG_CUDA", "auto").lower()
    found = torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc"))
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        if not found:
            raise RuntimeError("KVREG_CUDA=1 but torch has no CUDA or nvcc was not found")
        return True
    return bool(found)


def extension():
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "*.cpp")))
    cxx = ["-O3", "-fvisibility=hidden", "-Wall", "-Wno-unused-function"]
    nvcc = ["-O3", "--expt-relaxed-constexpr"]
    link = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        # at::parallel_for is inlined into this library: without OpenMP it runs serially.
        # The OpenMP runtime is the one torch has already loaded (same soname).
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if os.environ.get("KVREG_SANITIZE") == "1":
        sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        cxx = [f for f in cxx if f != "-O3"] + ["-O1", "-g"] + sanitize
        link += ["-fsanitize=address,undefined"]
    if want_cuda():
        sources += sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "cuda", "*.cu")))
        return CUDAExtension(
            "torch_kvreg._C",
            sources,
            define_macros=[("KVREG_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension("torch_kvreg._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


# Extensions use libstdc++'s stream code from the shared library torch loads. A build whose
# compiler instantiates that code inside the extension (seen with a Python whose sysconfig
# names another GCC than the system's) crashes the first time an error message formats a
# number. Such a build is refused with advice instead of being installed.
_STATIC_LIBSTDCXX_MARKER = "_ZNSo9_M_insertIlEERSoT_"  # std::ostream::_M_insert<long>


def defines_libstdcxx_streams(path: str) -> bool | None:
    """Whether the shared library defines libstdc++'s stream code; None where nm is missing."""
    nm = shutil.which("nm")
    if nm is None:
        return None
    symbols = subprocess.run([nm, "--defined-only", path], capture_output=True, text=True, check=True).stdout
    return _STATIC_LIBSTDCXX_MARKER in symbols


class BuildExtensionChecked(BuildExtension.with_options(use_ninja=True)):
    def build_extension(self, ext):
        super().build_extension(ext)
        path = self.get_ext_fullpath(ext.name)
        if os.path.exists(path) and defines_libstdcxx_streams(path):
            os.remove(path)
            raise RuntimeError(
                f"{path} defines libstdc++'s std::ostream code itself (compiler: "
                f"{sysconfig.get_config_var('CXX')}) and would crash next to torch's libstdc++; "
                "build with the system compiler: CC=gcc CXX=g++ LDSHARED='g++ -shared'"
            )


# setuptools' build backend runs this file as __main__ too; tests import it for the check.
if __name__ == "__main__":
    setup(
        # KVREG_SKIP_EXT=1: metadata only (the Makefile builds the extension in place with
        # `setup.py build_ext --inplace`, so that ninja's build folder is reused between runs).
        ext_modules=[] if os.environ.get("KVREG_SKIP_EXT") == "1" else [extension()],
        cmdclass={"build_ext": BuildExtensionChecked},
    )
