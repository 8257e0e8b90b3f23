"""The package as users get it: `python -m build` makes an sdist and a wheel (the wheel
built from the sdist, so the sdist must carry everything); the wheel installed into a fresh
virtual environment (not editable, no source tree on the path) runs the quickstart and the
C++ config command, and reports the version from its metadata.

The wheel's compiles go through the object cache that `make` fills when it builds the
extension in place (scripts/object_cache.py, build/object-cache): a source whose
preprocessed text and flags match is not compiled again. Without a filled cache (a changed
source, a first run) it compiles, about 3 minutes on two cores."""

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(
    ".git", ".venv*", "build*", "dist", "*.so", "__pycache__", ".hypothesis", ".pytest_cache", "*.egg-info"
)


def run(*args, **kwargs):
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900, **kwargs)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
    return done.stdout


def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    pytest.importorskip("build")
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=SKIP)
    dist = tmp_path / "dist"
    cache = {"KVREG_OBJECT_CACHE": str(ROOT / "build" / "object-cache")}
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source, cwd=tmp_path, env=os.environ | cache)
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    # A fresh environment: the wheel, plus torch and numpy borrowed from this one (a path
    # entry, not a site dir, so this environment's editable install is not picked up).
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    (pathlib.Path(site) / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheels[0])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(ROOT / "examples" / "quickstart.py", elsewhere / "quickstart.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = (
        "import importlib.metadata, torch_kvreg; "
        "print(torch_kvreg.__file__); print(torch_kvreg.__version__, importlib.metadata.version('torch_kvreg'))"
    )
    where, versions = run(python, "-c", probe, cwd=elsewhere, env=env).strip().splitlines()
    assert where.startswith(site) and str(ROOT) not in where
    version = versions.split()[0]
    assert versions.split() == [version, version] and version != "0+unknown"
    assert f'version = "{version}"' in (ROOT / "pyproject.toml").read_text()
    out = run(python, "quickstart.py", cwd=elsewhere, env=env)
    assert "registered:" in out
    flags = run(python, "-m", "torch_kvreg.config", "--cflags", "--libs", cwd=elsewhere, env=env)
    assert site in flags and str(ROOT) not in flags
    include = next(f[2:] for f in flags.split() if f.startswith("-I") and "torch_kvreg" in f)
    assert (pathlib.Path(include) / "llm_datadist" / "llm_datadist.h").is_file()
    # Typed: the marker and the native module's stub are installed beside the package.
    installed = pathlib.Path(where).parent
    assert (installed / "py.typed").is_file() and (installed / "_C.pyi").is_file()
    assert (installed / "vllm" / "connector.py").is_file()  # the vLLM connector ships too
