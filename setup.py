"""Builds torch_kvreg/lib/libtorch_kvreg.so (the core, also for C++ programs) and
torch_kvreg._C (the Python module over it).

CUDAExtension when torch was built with CUDA and nvcc is found, CppExtension otherwise.
KVREG_CUDA=0 forces the CPU build, KVREG_CUDA=1 requires the CUDA one.
KVREG_SANITIZE=1 adds AddressSanitizer and UndefinedBehaviorSanitizer.
"""

import glob
import os
import shlex
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


HERE = os.path.dirname(os.path.abspath(__file__))
CORE = "torch_kvreg.lib.libtorch_kvreg"  # the registry, ops, copies and the C++ API
CORE_FILE = "libtorch_kvreg.so"


def extensions():
    """The core library (no Python in it, so C++ programs can link it) and the Python
    module _C, which links the core: one registry per process, whoever registers."""
    here = os.path.dirname(os.path.abspath(__file__))
    # *bindings.cpp: the Python module's (bindings.cpp and the parts it calls); the rest: the core's.
    core_sources = sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "*.cpp"))
                          if not p.endswith("bindings.cpp"))
    bindings_sources = sorted(os.path.relpath(p, here)
                              for p in glob.glob(os.path.join(here, "csrc", "*bindings.cpp")))
    include = [os.path.join(here, "torch_kvreg", "include")]
    cxx = ["-O3", "-Wall", "-Wno-unused-function"]
    nvcc = ["-O3", "--expt-relaxed-constexpr"]
    link = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        # at::parallel_for is inlined into the core: without OpenMP it runs serially.
        # The OpenMP runtime is the one torch has already loaded (same soname).
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if os.environ.get("KVREG_SANITIZE") == "1":
        sanitize = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        cxx = [f for f in cxx if f != "-O3"] + ["-O1", "-g"] + sanitize
        link += ["-fsanitize=address,undefined"]
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    # The core finds torch's libraries by itself (programs without Python load it too).
    core_link = link + [f"-Wl,-rpath,{torch_lib}", f"-Wl,-soname,{CORE_FILE}"]
    bindings_link = link + ["-ltorch_kvreg", "-Wl,-rpath,$ORIGIN/lib"]
    bindings_cxx = cxx + ["-fvisibility=hidden"]
    if want_cuda():
        core_sources += sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "cuda", "*.cu")))
        macros = [("KVREG_WITH_CUDA", "1")]
        core = CUDAExtension(CORE, core_sources, include_dirs=include, define_macros=macros,
                             extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=core_link)
        bindings = CUDAExtension("torch_kvreg._C", bindings_sources, include_dirs=include, define_macros=macros,
                                 extra_compile_args={"cxx": bindings_cxx, "nvcc": nvcc},
                                 extra_link_args=bindings_link)
    else:
        core = CppExtension(CORE, core_sources, include_dirs=include, extra_compile_args={"cxx": cxx},
                            extra_link_args=core_link)
        bindings = CppExtension("torch_kvreg._C", bindings_sources, include_dirs=include,
                                extra_compile_args={"cxx": bindings_cxx}, extra_link_args=bindings_link)
    # torch_python needs a Python interpreter; the core must load without one.
    core.libraries = [name for name in core.libraries if name != "torch_python"]
    return [core, bindings]


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
    def get_ext_filename(self, fullname):
        # A plain shared library name, for -ltorch_kvreg. setuptools asks with the dotted
        # name (copying in place) and distutils with its last part (building).
        if fullname == CORE:
            return os.path.join(*CORE.split(".")[:-1], CORE_FILE)
        if fullname == CORE.rsplit(".", 1)[-1]:
            return CORE_FILE
        return super().get_ext_filename(fullname)

    def copy_extensions_to_source(self):
        os.makedirs(os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_kvreg", "lib"), exist_ok=True)
        super().copy_extensions_to_source()

    def run(self):
        # setuptools clears self.inplace while it builds (it copies the results afterwards).
        self.in_place = bool(self.inplace)
        super().run()

    def build_extensions(self):
        # Compiles go through scripts/object_cache.py, which reuses an object compiled before
        # from the same preprocessed source and flags (the test run builds the extension in
        # place, then tests/test_wheel.py the wheel from the sdist): always for a build in
        # place (into build/object-cache), for other builds where KVREG_OBJECT_CACHE names
        # the folder; KVREG_OBJECT_CACHE=0 turns it off.
        cache = os.environ.get("KVREG_OBJECT_CACHE", "")
        if cache.lower() in ("0", "off", "no", "false"):
            cache = ""
        elif not cache and self.in_place:
            cache = os.path.join(HERE, "build", "object-cache")
        launcher_source = os.path.join(HERE, "scripts", "object_cache.py")
        if not cache or not os.path.isfile(launcher_source):
            return super().build_extensions()
        os.makedirs(self.build_temp, exist_ok=True)
        launcher = os.path.join(os.path.abspath(self.build_temp), "c++-object-cache")
        with open(launcher, "w") as script:
            script.write(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(launcher_source)} "$@"\n')
        os.chmod(launcher, 0o755)
        # The tree's own folders, written as placeholders in the cache's keys.
        tree = [os.path.join(HERE, "csrc"), os.path.join(HERE, "torch_kvreg", "include"),
                os.path.abspath(self.build_temp)]
        settings = {
            "KVREG_REAL_CXX": os.environ.get("CXX", "c++"),
            "KVREG_OBJECT_CACHE": os.path.abspath(cache),
            "KVREG_OBJECT_CACHE_TREE": os.pathsep.join(tree),
            "CXX": launcher,  # torch's ninja file takes the compiler from CXX
        }
        saved = {name: os.environ.get(name) for name in settings}
        os.environ.update(settings)
        try:
            super().build_extensions()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def build_extension(self, ext):
        if ext.name == "torch_kvreg._C":  # links the core built just before it
            ext.library_dirs = [*ext.library_dirs, os.path.dirname(self.get_ext_fullpath(CORE))]
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
        ext_modules=[] if os.environ.get("KVREG_SKIP_EXT") == "1" else extensions(),
        cmdclass={"build_ext": BuildExtensionChecked},
    )
