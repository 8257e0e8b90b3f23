"""xPyD chaos in CI: 2 prefill and 4 decoder processes, decoders pulling continuously with
notices while a seeded driver SIGKILLs and restarts random processes (tests/chaos.py says
what is checked). Once on one host (the same-host path), once between two network
namespaces (NIXL over TCP). Bounded: about 20 s of chaos each. ``make soak`` runs it longer.
"""

import os

import pytest

import torch_kvreg as kv

import chaos
import netns

pytestmark = pytest.mark.skipif(not kv.remote.nixl_available(), reason="needs the nixl extra")

CHAOS_S = 20


def check(counts):
    # what the run reached: kills of both roles, restarted peers served, pulls and notices
    assert counts["killed:prefill"] >= 1 and counts["killed:decoder"] >= 3, counts
    assert counts.get("restarted_and_served:prefill", 0) >= 1, counts
    assert counts.get("restarted_and_served:decoder", 0) >= 1, counts
    assert counts["pull:LLM_SUCCESS"] >= 500, counts
    assert counts["notices"] >= 500, counts
    assert counts.get("reregistered", 0) >= 1, counts
    # The steady prefill lived through every decoder's death: at its end (decoders gone) it
    # holds no more fds or threads than while it served 4 decoders, and its resident memory
    # grew by less than 16 MiB (0.5-0.8 MiB measured; a leaked 32-block cache per decoder
    # death, or a NIXL agent with its endpoints, would be far more over a dozen deaths).
    assert counts["prefill_growth:fds"] <= 0, counts
    assert counts["prefill_growth:threads"] <= 0, counts
    assert counts["prefill_growth:rss_kib"] < 16 * 1024, counts


def test_chaos_on_one_host():
    check(chaos.Chaos(prefills=2, decoders=4, seed=21).run(CHAOS_S))


def test_chaos_between_two_hosts():
    why = netns.available()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the cross-host chaos, but {why}")
        pytest.skip(f"CROSS-HOST CHAOS NOT RUN: {why}")
    pair = netns.NetnsPair(tag=os.getpid() % 10000 + 1).up()
    try:
        check(chaos.Chaos(prefills=2, decoders=4, seed=22, netns_pair=pair).run(CHAOS_S))
    finally:
        pair.down()
