"""Build flags for C++ programs that use torch_kvreg's C++ API (``llm_datadist.h``).

    c++ -std=c++17 prog.cpp $(python -m torch_kvreg.config --cflags --libs)

The program then runs without LD_LIBRARY_PATH: the flags record where the library lives,
and the library records where torch's libraries live.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent


def include_dir() -> pathlib.Path:
    """The folder to put on the include path (it holds ``llm_datadist/llm_datadist.h``).

    >>> (include_dir() / "llm_datadist" / "llm_datadist.h").is_file()
    True
    """
    return PACKAGE / "include"


def library_dir() -> pathlib.Path:
    """The folder of ``libtorch_kvreg.so``."""
    return PACKAGE / "lib"


def cflags() -> list[str]:
    return [f"-I{include_dir()}"]


def libs() -> list[str]:
    """Link flags; LLM_FEATURE_NOT_ENABLED-style advice if the library was not built."""
    if not (library_dir() / "libtorch_kvreg.so").is_file():
        raise FileNotFoundError(
            f"{library_dir() / 'libtorch_kvreg.so'} is missing: build torch_kvreg first (make build, or pip install)"
        )
    return [f"-L{library_dir()}", "-ltorch_kvreg", f"-Wl,-rpath,{library_dir()}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_kvreg.config", description=__doc__.split("\n")[0])
    parser.add_argument("--cflags", action="store_true", help="compiler flags (include path)")
    parser.add_argument("--libs", action="store_true", help="linker flags (library, run path)")
    parser.add_argument("--includedir", action="store_true", help="the include folder alone")
    parser.add_argument("--libdir", action="store_true", help="the library folder alone")
    args = parser.parse_args(argv)
    if not any(vars(args).values()):
        parser.print_usage(sys.stderr)
        return 2
    words: list[str] = []
    try:
        if args.cflags:
            words += cflags()
        if args.libs:
            words += libs()
    except FileNotFoundError as exc:
        print(f"torch_kvreg.config: {exc}", file=sys.stderr)
        return 1
    if args.includedir:
        words.append(str(include_dir()))
    if args.libdir:
        words.append(str(library_dir()))
    sys.stdout.write(" ".join(words) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
