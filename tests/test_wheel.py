"""The package as users get it: `python -m build` makes an sdist and a wheel (the wheel
built from the sdist, so the sdist must carry everything); the wheel installed into a fresh
virtual environment (not editable, no source tree on the path) runs the quickstart and the
C++ config command, and reports the version from its metadata.

The build compiles the extension again (minutes on two cores). So that it does not add its
minutes to the suite's, it starts when the test is collected (tests/conftest.py calls
start_build), at the lowest CPU priority, and runs on the cycles the other tests leave idle;
the test waits for it."""

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import pytest

WHEEL_BUILD = pytest.StashKey["Build | None"]()
ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(
    ".git", ".venv*", "build*", "dist", "*.so", "__pycache__", ".hypothesis", ".pytest_cache", "*.egg-info"
)


class Build:
    """``python -m build`` of a copy of the tree, running in the background."""

    def __init__(self) -> None:
        self.folder = pathlib.Path(tempfile.mkdtemp(prefix="kvreg-wheel-"))
        self.source, self.dist = self.folder / "source", self.folder / "dist"
        shutil.copytree(ROOT, self.source, ignore=SKIP)
        self.log = open(self.folder / "build.log", "w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(self.dist), str(self.source)],
            cwd=self.folder,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.nice(19),
        )

    def wait(self) -> None:
        returncode = self.process.wait(timeout=1800)
        self.log.seek(0)
        assert returncode == 0, self.log.read()[-5000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_build() -> Build | None:
    """The background build (None where the build module is missing: the test skips)."""
    return Build() if importlib.util.find_spec("build") is not None else None


def run(*args, **kwargs):
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=900, **kwargs)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-3000:])
    return done.stdout


def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path, request):
    pytest.importorskip("build")
    build = request.config.stash.get(WHEEL_BUILD, None)
    if build is None:  # not started at collection (the test run by other means)
        build = start_build()
        request.addfinalizer(build.close)
    build.wait()
    dist = build.dist
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
