"""A compiler launcher that reuses object files across source trees (setup.py puts it in
front of the C++ compiler where KVREG_OBJECT_CACHE names a folder).

The same sources are compiled with the same flags more than once in a test run: in place
for the tests, then again from the sdist unpacked elsewhere when tests/test_wheel.py builds
the wheel. Each compile is keyed by what the compiler would see: the preprocessed source
(every header expanded, so a changed or missing header changes the key or fails here) and
the flags, with the tree's own folders written as placeholders, plus the compiler's version.
A key seen before copies the stored object instead of compiling; the preprocessing run
writes the dependency file the build tool reads, as the compile would have.

An object taken from the cache names the tree it was first compiled in where the source
names itself (__FILE__ in error locations, debug information), like ccache with base_dir;
the compiler's warnings are printed by the compile that stored it, not repeated on reuse.

Environment: KVREG_OBJECT_CACHE (the folder), KVREG_REAL_CXX (the compiler, default c++),
KVREG_OBJECT_CACHE_TREE (the tree's own folders, os.pathsep-separated: written as
placeholders in the key). Invocations other than a single compile to an object file go
straight to the compiler. The folder keeps the KEEP most recently used objects.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

# Objects kept: a few builds' worth (19 sources now, a few MiB each with debug information).
KEEP = 120


def tree_relative(data: bytes, folders: list[str]) -> bytes:
    """``data`` with each of the tree's folders written as a placeholder (longest first)."""
    for i, folder in sorted(enumerate(folders), key=lambda item: -len(item[1])):
        data = data.replace(folder.encode(), b"\0tree%d" % i)
    return data


def compiler_identity(compiler: str) -> bytes:
    where = shutil.which(compiler) or compiler
    version = subprocess.run([compiler, "--version"], capture_output=True, check=True).stdout
    return os.path.realpath(where).encode() + b"\0" + version


def main(argv: list[str]) -> int:
    compiler = os.environ.get("KVREG_REAL_CXX") or "c++"
    cache = os.environ.get("KVREG_OBJECT_CACHE")
    folders = [f for f in os.environ.get("KVREG_OBJECT_CACHE_TREE", "").split(os.pathsep) if f]
    if not cache or not folders or "-c" not in argv or argv.count("-o") != 1 or "-E" in argv:
        os.execvp(compiler, [compiler, *argv])
    try:
        os.makedirs(cache, exist_ok=True)
        scratch_folder = tempfile.TemporaryDirectory(dir=cache, prefix="tmp-")
    except OSError:  # no cache to be had here: compile as if there were none
        os.execvp(compiler, [compiler, *argv])
    out = argv[argv.index("-o") + 1]
    others = [a for i, a in enumerate(argv) if a != "-o" and (i == 0 or argv[i - 1] != "-o")]
    with scratch_folder as scratch:
        preprocessed = os.path.join(scratch, "source.i")
        # Same flags, stopped after preprocessing; a dependency file (-MD/-MMD -MF) names
        # the object, as the compile's would.
        target = ["-MT", out] if "-MF" in argv else []
        done = subprocess.run([compiler, *others, *target, "-E", "-o", preprocessed])
        if done.returncode != 0:
            return done.returncode
        key = hashlib.sha256()
        key.update(compiler_identity(compiler))
        key.update(tree_relative("\0".join(others).encode(), folders))
        with open(preprocessed, "rb") as source:
            key.update(tree_relative(source.read(), folders))
        stored = os.path.join(cache, key.hexdigest() + ".o")
        if os.path.exists(stored):
            shutil.copyfile(stored, out)
            os.utime(stored)  # recently used: pruned last
            return 0
        done = subprocess.run([compiler, *argv])
        if done.returncode == 0:
            kept = os.path.join(scratch, "object.o")
            shutil.copyfile(out, kept)
            os.replace(kept, stored)  # whole or absent, also with two builds at once
            prune(cache)
        return done.returncode


def prune(cache: str, keep: int = KEEP) -> None:
    """Drops the least recently used objects beyond ``keep`` (each edit of a source adds one)."""
    objects = []
    for entry in os.scandir(cache):
        if entry.name.endswith(".o"):
            try:
                objects.append((entry.stat().st_mtime, entry.path))
            except FileNotFoundError:  # pruned by a compile beside this one
                pass
    for _, path in sorted(objects)[: max(0, len(objects) - keep)]:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
