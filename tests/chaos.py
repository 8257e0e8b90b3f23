"""xPyD chaos: prefill and decoder processes, decoders pulling continuously with notices,
while a driver SIGKILLs and restarts random processes on a fixed seed.

Every worker is its own ``python tests/chaos.py worker ...`` process (optionally inside a
network namespace, started through ``ip netns exec``), speaking JSON lines: commands on its
stdin, events on its stdout. Killing one therefore never corrupts a channel the others use.

What the driver checks, throughout and at the end (``Chaos.run`` returns the counts and
raises ``ChaosFailure`` on the first broken invariant):
- no decoder ever accepts a wrong byte: every block a successful pull landed is compared
  with what the prefill's current incarnation holds (destination blocks are poisoned first);
- every failure is a documented status, within ``llm.SyncKvCacheWaitTime`` (plus a margin);
- no process hangs (each decoder reports progress at least every few seconds) or exits
  unless it was killed;
- restarted prefills are linked again and served, restarted decoders pull again;
- at the end every surviving process unregisters and finalizes cleanly: no lease held on a
  prefill's cache, nothing in flight, exit status 0.

``python tests/chaos.py soak --minutes 10`` (``make soak``) runs the same chaos for longer and
prints its counts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_TENSORS = 2
NUM_BLOCKS = 32
BLOCK_SHAPE = (4, 64)  # 512 B per block and tensor (fp16)
POISON = 1234.0  # never drawn by randn: a block still holding it was not written
WAIT_MS = 2000
# A failure may take SyncKvCacheWaitTime, plus the scheduling of two busy cores.
FAILURE_MARGIN_S = 1.5
# A restarted process that lived this long after it was ready must have been served (a
# prefill) or have pulled (a decoder): a decoder may first spend SyncKvCacheWaitTime on a
# pull from the dead incarnation, then relinks (a fraction of a second).
SERVED_WITHIN_S = WAIT_MS / 1000 + 2.0
# A prefill's resident memory, fds and threads are first measured once it has served this
# long (connections, pools and caches that live once per process exist by then), then at its end.
BASELINE_AFTER_S = 5.0
# Statuses a transfer may end with when its peer dies or restarts (API.md, section 6).
PULL_STATUSES = {"LLM_TIMEOUT", "LLM_LINK_FAILED", "LLM_NOT_YET_LINK", "LLM_KV_CACHE_NOT_EXIST"}
LINK_STATUSES = {"LLM_SUCCESS", "LLM_ALREADY_LINK", "LLM_LINK_FAILED", "LLM_TIMEOUT"}


def contents(cluster_id: int, generation: int):
    """What incarnation ``generation`` of prefill ``cluster_id`` holds: fp16 noise seeded by both."""
    import torch

    gen = torch.Generator().manual_seed(cluster_id * 100_003 + generation)
    return [torch.randn(NUM_BLOCKS, *BLOCK_SHAPE, generator=gen).half() for _ in range(NUM_TENSORS)]


def emit(event: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def commands_from_stdin() -> queue.Queue:
    """Commands arrive on stdin, read by a thread; EOF (the driver gone) is a stop."""
    commands: queue.Queue = queue.Queue()

    def read() -> None:
        for line in sys.stdin:
            commands.put(json.loads(line))
        commands.put({"op": "stop", "eof": True})

    threading.Thread(target=read, daemon=True).start()
    return commands


def resources(pid: int) -> dict:
    """Resident memory (KiB), open fds and threads of ``pid``, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return {
        "rss_kib": int(status["VmRSS"].split()[0]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(status["Threads"]),
    }


# --- workers -------------------------------------------------------------------------------


def prefill_main(args: argparse.Namespace) -> int:
    import torch_kvreg as kv

    kv.initialize(
        cluster_id=args.cluster_id,
        role=kv.LlmRole.PROMPT,
        options={"llm.ListenIpInfo": f"{args.host}:0", "llm.SyncKvCacheWaitTime": str(WAIT_MS)},
    )
    tensors = contents(args.cluster_id, args.generation)
    cache = kv.register_kv_cache(tensors, kv.RegisterCfg(remote_accessible=True))
    commands = commands_from_stdin()
    notices: collections.Counter[int] = collections.Counter()
    bad_notices = 0
    emit("ready", address=kv.listen_address(), cache_id=cache.cache_id, pid=os.getpid())
    while True:
        try:
            command = commands.get(timeout=0.2)
        except queue.Empty:
            command = None
        for sender, message in kv.get_notifications():
            text = message.decode(errors="replace")
            # "d<cluster>:<seq>": a decoder's pull of this incarnation's blocks
            if sender is None or not text.startswith(f"d{sender}:"):
                bad_notices += 1
                emit("bad_notice", sender=sender, text=text[:80])
            notices[sender] += 1
        if command is None:
            continue
        if command["op"] == "stats":
            emit("stats", notices=sum(notices.values()), bad_notices=bad_notices, **resources(os.getpid()))
        elif command["op"] == "stop":
            # Decoders have unlinked: every lease they held is back within their linger time.
            engine = kv.remote.current_engine()
            deadline = time.monotonic() + 5
            while engine is not None and (engine.holds.leases or any(engine.holds.in_flight.values())):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            leases = len(engine.holds.leases) if engine is not None else 0
            in_flight = sum(engine.holds.in_flight.values()) if engine is not None else 0
            started = time.monotonic()
            kv.unregister_kv_cache(cache)
            kv.finalize()
            emit(
                "stopped",
                **resources(os.getpid()),
                leases=leases,
                in_flight=in_flight,
                teardown_s=time.monotonic() - started,
                notices=sum(notices.values()),
                bad_notices=bad_notices,
            )
            return 0


class Source:
    """A prefill as a decoder knows it: where it listens, which incarnation, what it holds."""

    def __init__(self, command: dict):
        self.cluster_id = command["cluster_id"]
        self.host, self.port = command["host"], command["port"]
        self.generation, self.cache_id = command["generation"], command["cache_id"]
        self.expected = contents(self.cluster_id, self.generation)
        self.linked = False
        self.retry_at = 0.0


def decoder_main(args: argparse.Namespace) -> int:
    import torch

    import torch_kvreg as kv

    kv.initialize(
        cluster_id=args.cluster_id, role=kv.LlmRole.DECODER, options={"llm.SyncKvCacheWaitTime": str(WAIT_MS)}
    )
    mine = [torch.zeros(NUM_BLOCKS, *BLOCK_SHAPE, dtype=torch.float16) for _ in range(NUM_TENSORS)]
    cache = kv.register_kv_cache(mine)
    rng = random.Random(args.seed)
    commands = commands_from_stdin()
    sources: dict[int, Source] = {}
    counts: collections.Counter[str] = collections.Counter()
    served: collections.Counter[str] = collections.Counter()  # "cluster/generation" -> good pulls
    seq = 0
    last_report = time.monotonic()
    emit("ready", pid=os.getpid())

    def violation(what: str) -> None:
        counts["violations"] += 1
        emit("violation", what=what)

    def unlink(source: Source) -> None:
        code = kv.unlink_clusters([kv.ClusterInfo(source.cluster_id, source.host, source.port)], force=True)[1][0]
        if code.name not in ("LLM_SUCCESS", "LLM_NOT_YET_LINK"):
            violation(f"unlink of {source.cluster_id} gave {code.name}")
        source.linked = False

    while True:
        try:
            command = commands.get_nowait() if sources else commands.get(timeout=0.5)
        except queue.Empty:
            command = None
        if command is not None:
            if command["op"] == "peer":  # a prefill (re)started: forget its last incarnation
                old = sources.get(command["cluster_id"])
                if old is not None and old.linked:
                    unlink(old)
                sources[command["cluster_id"]] = Source(command)
            elif command["op"] == "stop":
                for source in sources.values():
                    if source.linked:
                        code = kv.unlink_clusters([kv.ClusterInfo(source.cluster_id, source.host, source.port)])[1][0]
                        counts[f"unlink:{code.name}"] += 1
                kv.unregister_kv_cache(cache)
                kv.finalize()
                emit("stopped", counts=dict(counts), served=dict(served))
                return 0
        now = time.monotonic()
        if now - last_report > 0.5:
            emit("progress", counts=dict(counts), served=dict(served))
            last_report = now
        for source in sources.values():  # link whoever is not linked (again)
            if not source.linked and now >= source.retry_at:
                started = time.monotonic()
                code = kv.link_clusters(
                    [kv.ClusterInfo(source.cluster_id, source.host, source.port)], timeout_ms=WAIT_MS
                )[1][0]
                took = time.monotonic() - started
                counts[f"link:{code.name}"] += 1
                if code.name not in LINK_STATUSES:
                    violation(f"link to {source.cluster_id} gave {code.name}")
                if took > WAIT_MS / 1000 + FAILURE_MARGIN_S:
                    violation(f"link to {source.cluster_id} took {took:.2f} s")
                if code.name == "LLM_SUCCESS":
                    source.linked = True
                elif code.name == "LLM_ALREADY_LINK":  # a dead link not noticed yet
                    unlink(source)
                else:
                    source.retry_at = time.monotonic() + 0.2
        linked = [s for s in sources.values() if s.linked]
        if not linked:
            time.sleep(0.05)
            continue
        source = rng.choice(linked)
        count = rng.randint(1, 6)
        src_blocks = rng.sample(range(NUM_BLOCKS), count)
        dst_blocks = rng.sample(range(NUM_BLOCKS), count)
        for t in mine:
            t[dst_blocks] = POISON
        seq += 1
        blocking = rng.random() < 0.5
        index = kv.CacheIndex(source.cluster_id, source.cache_id)
        started = time.monotonic()
        try:
            if blocking:
                kv.pull_kv_blocks(index, cache, src_blocks, dst_blocks, notify=f"d{args.cluster_id}:{seq}")
            else:
                kv.pull_kv_blocks_async(index, cache, src_blocks, dst_blocks, notify=f"d{args.cluster_id}:{seq}").wait()
        except kv.LLMException as exc:
            took = time.monotonic() - started
            name = exc.status_code.name
            counts[f"pull:{name}"] += 1
            if name not in PULL_STATUSES:
                violation(f"pull from {source.cluster_id} failed with {name}: {exc}")
            if took > WAIT_MS / 1000 + FAILURE_MARGIN_S:
                violation(f"a failed pull from {source.cluster_id} took {took:.2f} s ({name})")
            unlink(source)  # relinked on a later turn (or when the driver names its successor)
            source.retry_at = time.monotonic() + 0.1
            continue
        except Exception as exc:  # anything but an LLMException is a bug
            violation(f"pull raised {exc!r}")
            continue
        counts["pull:LLM_SUCCESS"] += 1
        for t, want in zip(mine, source.expected):
            if not (torch.equal(t[dst_blocks], want[src_blocks])):
                violation(f"wrong bytes from {source.cluster_id} generation {source.generation}")
                break
        else:
            served[f"{source.cluster_id}/{source.generation}"] += 1
        if rng.random() < 0.02:  # now and then, the destination cache registered again
            kv.unregister_kv_cache(cache)
            cache = kv.register_kv_cache(mine)
            counts["reregistered"] += 1


def worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="chaos.py worker")
    parser.add_argument("--role", choices=("prefill", "decoder"), required=True)
    parser.add_argument("--cluster-id", type=int, required=True)
    parser.add_argument("--generation", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    return (prefill_main if args.role == "prefill" else decoder_main)(args)


# --- the driver ----------------------------------------------------------------------------


class ChaosFailure(AssertionError):
    pass


class Process:
    """One worker incarnation: its Popen, and a thread turning its stdout into events."""

    def __init__(self, role: str, cluster_id: int, generation: int, seed: int, host: str, netns: str | None, env):
        self.role, self.cluster_id, self.generation = role, cluster_id, generation
        command = [sys.executable, os.path.join(HERE, "chaos.py"), "worker", "--role", role]
        command += ["--cluster-id", str(cluster_id), "--generation", str(generation), "--seed", str(seed)]
        command += ["--host", host]
        if netns is not None:
            command = ["ip", "netns", "exec", netns, *command]
        self.popen = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.events: queue.Queue = queue.Queue()
        self.killed = False
        self.started = self.ready_at = time.monotonic()
        self.ready: dict | None = None
        self.baseline: dict | None = None  # a prefill's resources once warm (BASELINE_AFTER_S)
        self.asked_baseline = False
        self.last_progress = time.monotonic()
        self.latest: dict = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if line.startswith("{"):
                self.events.put(json.loads(line))
        self.events.put({"event": "eof"})

    @property
    def name(self) -> str:
        return f"{self.role} {self.cluster_id} (generation {self.generation}, pid {self.popen.pid})"

    def send(self, **command) -> None:
        try:
            assert self.popen.stdin is not None
            self.popen.stdin.write(json.dumps(command) + "\n")
            self.popen.stdin.flush()
        except (BrokenPipeError, ValueError):  # it died meanwhile (killed: checked elsewhere)
            pass

    def kill(self) -> None:
        self.killed = True
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)
        with contextlib.suppress(OSError):
            assert self.popen.stdin is not None
            self.popen.stdin.close()


class Chaos:
    """``prefills`` prefill and ``decoders`` decoder processes under a seeded killer."""

    def __init__(self, prefills=2, decoders=4, seed=0, netns_pair=None, log=None, steady=1):
        self.rng = random.Random(seed)
        self.seed = seed
        self.pair = netns_pair
        self.log = log or (lambda line: None)
        self.prefills: dict[int, Process] = {}
        self.decoders: dict[int, Process] = {}
        self.num_prefills, self.num_decoders = prefills, decoders
        # Prefills 1..steady are never killed: they live through every decoder's restarts,
        # and what they gain (memory, fds, threads) is the leak measure.
        self.steady = steady
        self.generations: collections.Counter[int] = collections.Counter()
        self.counts: collections.Counter[str] = collections.Counter()
        self.decoder_counts: collections.Counter[str] = collections.Counter()  # summed over incarnations
        self.served: collections.Counter[str] = collections.Counter()
        self.restarted: list[tuple[str, int, int]] = []  # (role, cluster id, generation)
        self.start_time = time.monotonic()
        self.running = False  # the chaos phase: processes that get ready are restarts
        self.bad_notices: list[dict] = []
        self.incarnation_pulls: dict[tuple[int, int], int] = {}  # (decoder, generation) -> good pulls
        self.lifetimes: dict[tuple[str, int, int], tuple[float, float]] = {}  # (ready, killed) times
        self.restart_at: dict[tuple[str, int], float] = {}  # killed, restarted at that time

    # where each role runs
    def _place(self, role: str) -> tuple[str, str | None, dict | None]:
        if self.pair is None:
            return "127.0.0.1", None, None
        side = "a" if role == "prefill" else "b"
        address = self.pair.addr_a if side == "a" else self.pair.addr_b
        return address, (self.pair.a if side == "a" else self.pair.b), self.pair.env(side)

    def _start(self, role: str, cluster_id: int) -> Process:
        generation = self.generations[cluster_id]
        self.generations[cluster_id] += 1
        host, ns, env = self._place(role)
        process = Process(role, cluster_id, generation, self.seed * 1000 + cluster_id * 10 + generation, host, ns, env)
        (self.prefills if role == "prefill" else self.decoders)[cluster_id] = process
        return process

    def _await_ready(self, process: Process, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while process.ready is None:
            try:
                event = process.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise ChaosFailure(f"{process.name} did not start within {timeout_s:.0f} s") from None
            self._handle(process, event)
        process.last_progress = time.monotonic()

    def _introduce(self, prefill: Process, decoders) -> None:
        assert prefill.ready is not None
        host, port = prefill.ready["address"].rsplit(":", 1)
        for decoder in decoders:
            decoder.send(
                op="peer",
                cluster_id=prefill.cluster_id,
                host=host,
                port=int(port),
                generation=prefill.generation,
                cache_id=prefill.ready["cache_id"],
            )

    def _handle(self, process: Process, event: dict) -> None:
        kind = event["event"]
        if kind == "ready":
            process.ready = event
            process.ready_at = process.last_progress = time.monotonic()
            if self.running:  # a restarted process: introduce it (decoders pull from prefills)
                self.restarted.append((process.role, process.cluster_id, process.generation))
                if process.role == "prefill":
                    self._introduce(process, [d for d in self.decoders.values() if not d.killed])
                else:
                    for prefill in self.prefills.values():
                        if prefill.ready is not None and not prefill.killed:
                            self._introduce(prefill, [process])
        elif kind == "violation":
            raise ChaosFailure(f"{process.name}: {event['what']}")
        elif kind in ("progress", "stopped") and process.role == "decoder":
            process.last_progress = time.monotonic()
            process.latest = event
        elif kind == "stats":
            process.baseline = event
        elif kind == "bad_notice":
            self.bad_notices.append(event)
        elif kind == "eof" and not process.killed and process.latest.get("event") != "stopped":
            raise ChaosFailure(f"{process.name} exited on its own (status {process.popen.wait()})")

    def _absorb(self, process: Process) -> None:
        """Adds what a finished (killed or stopped) decoder incarnation reported."""
        if process.role == "decoder":
            pulls = process.latest.get("counts", {}).get("pull:LLM_SUCCESS", 0)
            self.incarnation_pulls[(process.cluster_id, process.generation)] = pulls
            self.decoder_counts.update(process.latest.get("counts", {}))
            self.served.update(process.latest.get("served", {}))

    def _pump(self, processes) -> None:
        for process in processes:
            while True:
                try:
                    event = process.events.get_nowait()
                except queue.Empty:
                    break
                if process.killed:
                    if event["event"] in ("progress", "stopped"):
                        process.latest = event
                    continue
                self._handle(process, event)

    def _check_alive(self) -> None:
        now = time.monotonic()
        for process in list(self.prefills.values()) + list(self.decoders.values()):
            if process.killed:
                continue
            if process.popen.poll() is not None:
                raise ChaosFailure(f"{process.name} exited on its own (status {process.popen.returncode})")
            if process.ready is None:
                if now - process.started > 240:
                    raise ChaosFailure(f"{process.name} did not start within 240 s")
                continue
            if process.role == "decoder" and now - process.last_progress > WAIT_MS / 1000 * 2 + 5:
                raise ChaosFailure(f"{process.name} made no progress for {now - process.last_progress:.1f} s (a hang)")

    def run(self, duration_s: float) -> dict:
        try:
            return self._run(duration_s)
        finally:
            for process in list(self.prefills.values()) + list(self.decoders.values()):
                if process.popen.poll() is None:
                    process.kill()

    def _run(self, duration_s: float) -> dict:
        for cluster_id in range(1, self.num_prefills + 1):
            self._start("prefill", cluster_id)
        for cluster_id in range(101, 101 + self.num_decoders):
            self._start("decoder", cluster_id)
        for process in list(self.prefills.values()) + list(self.decoders.values()):
            self._await_ready(process)
        for prefill in self.prefills.values():
            self._introduce(prefill, self.decoders.values())
        self.log(f"{self.num_prefills}P/{self.num_decoders}D up; chaos for {duration_s:.0f} s")
        self.running = True
        chaos_start = time.monotonic()
        next_kill = chaos_start + self.rng.uniform(0.3, 1.0)
        while time.monotonic() - chaos_start < duration_s:
            self._pump(list(self.prefills.values()) + list(self.decoders.values()))
            self._check_alive()
            now = time.monotonic()
            for prefill in self.prefills.values():
                if (
                    prefill.ready is not None
                    and not prefill.asked_baseline
                    and now - prefill.ready_at > BASELINE_AFTER_S
                ):
                    prefill.send(op="stats")
                    prefill.asked_baseline = True
            for (role, cluster_id), when in list(self.restart_at.items()):
                if now >= when:
                    del self.restart_at[(role, cluster_id)]
                    self._start(role, cluster_id)
            if now >= next_kill:
                self._kill()
                next_kill = now + self.rng.uniform(0.5, 2.0)
            time.sleep(0.02)
        # the last restarts: every role at full strength again before the end
        for role, cluster_id in list(self.restart_at):
            self._start(role, cluster_id)
        self.restart_at.clear()
        for process in list(self.prefills.values()) + list(self.decoders.values()):
            self._await_ready(process)
        return self._finish()

    def _kill(self) -> None:
        """SIGKILLs a random live process (it may be partway through anything: starting, a
        link, a pull, a notice, a registration) and schedules its restart."""
        # mostly processes at work; now and then one still starting
        starting = self.rng.random() < 0.1
        candidates = [
            p
            for p in list(self.prefills.values()) + list(self.decoders.values())
            if not p.killed
            and (p.ready is None) == starting
            and not (p.role == "prefill" and p.cluster_id <= self.steady)
        ]
        if not starting and not self.counts["killed:prefill"]:
            # the first kill at work is a prefill's: every run has one to restart and serve
            candidates = [p for p in candidates if p.role == "prefill"] or candidates
        if not candidates:
            return
        victim = self.rng.choice(candidates)
        victim.kill()
        if victim.ready is not None:
            self.lifetimes[(victim.role, victim.cluster_id, victim.generation)] = (
                victim.ready_at - self.start_time,
                time.monotonic() - self.start_time,
            )
        self._pump([victim])
        self._absorb(victim)
        self.counts[f"killed:{victim.role}"] += 1
        if victim.ready is None:
            self.counts["killed:while_starting"] += 1
        self.log(f"{time.monotonic() - self.start_time:7.1f} s  killed {victim.name}")
        self.restart_at[(victim.role, victim.cluster_id)] = time.monotonic() + self.rng.uniform(0, 1.0)

    def _finish(self) -> dict:
        # Give every restarted peer a moment to be linked and served, then stop decoders
        # first (they unlink), then prefills (no lease may be left).
        settle_until = time.monotonic() + SERVED_WITHIN_S + 1  # the last incarnations are all checked
        while time.monotonic() < settle_until:
            self._pump(list(self.prefills.values()) + list(self.decoders.values()))
            self._check_alive()
            time.sleep(0.05)
        for decoder in self.decoders.values():
            decoder.send(op="stop")
        for decoder in self.decoders.values():
            self._await_stopped(decoder)
            self._absorb(decoder)
        prefill_reports = []
        for prefill in self.prefills.values():
            prefill.send(op="stop")
        growth: dict[str, int] = {}
        for prefill in self.prefills.values():
            report = self._await_stopped(prefill)
            prefill_reports.append(report)
            if prefill.baseline is not None:  # what the longest-lived prefills gained
                for key in ("rss_kib", "fds", "threads"):
                    growth[key] = max(growth.get(key, -(1 << 40)), report[key] - prefill.baseline[key])
        for report in prefill_reports:
            if report["leases"] or report["in_flight"]:
                raise ChaosFailure(f"a prefill still held {report['leases']} leases, {report['in_flight']} in flight")
            if report["bad_notices"]:
                raise ChaosFailure(
                    f"a prefill received {report['bad_notices']} malformed notices: {self.bad_notices[:3]}"
                )
        counts = collections.Counter(self.counts)
        counts.update(self.decoder_counts)
        counts["notices"] = sum(r["notices"] for r in prefill_reports)
        # Restarted peers were linked again and served: every incarnation that lived
        # SERVED_WITHIN_S after it was ready (the last ones all did: the settle time).
        end = time.monotonic() - self.start_time
        for role, cluster_id, generation in self.restarted:
            ready, killed = self.lifetimes.get((role, cluster_id, generation), (None, end))
            if ready is None:  # alive at the end
                process = (self.prefills if role == "prefill" else self.decoders)[cluster_id]
                ready = process.ready_at - self.start_time
            if killed - ready < SERVED_WITHIN_S:
                continue
            if role == "prefill":
                served = self.served.get(f"{cluster_id}/{generation}", 0)
            else:
                served = self.incarnation_pulls.get((cluster_id, generation), 0)
            if served == 0:
                raise ChaosFailure(
                    f"{role} {cluster_id} generation {generation} lived {killed - ready:.1f} s after its restart "
                    f"and was never served (served: {dict(self.served)}, decoders: {dict(self.decoder_counts)})"
                )
            counts[f"restarted_and_served:{role}"] += 1
        counts["served_incarnations"] = len(self.served)
        self.growth = growth
        return {**counts, **{f"prefill_growth:{k}": v for k, v in growth.items()}}

    def _await_stopped(self, process: Process, timeout_s: float = 60) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                event = process.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise ChaosFailure(f"{process.name} did not stop within {timeout_s:.0f} s (a hang)") from None
            if event["event"] == "stopped":
                process.latest = event
                status = process.popen.wait(timeout=30)
                if status != 0:
                    raise ChaosFailure(f"{process.name} exited with status {status} after stopping")
                return event
            if event["event"] == "eof":
                raise ChaosFailure(f"{process.name} exited while stopping (status {process.popen.wait()})")
            self._handle(process, event)


def soak(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="chaos.py soak")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--prefills", type=int, default=2)
    parser.add_argument("--decoders", type=int, default=4)
    parser.add_argument("--netns", action="store_true", help="prefills and decoders in two network namespaces")
    args = parser.parse_args(argv)
    pair = None
    if args.netns:
        sys.path.insert(0, HERE)
        import netns

        pair = netns.NetnsPair().up()
    started = time.monotonic()
    try:
        chaos = Chaos(args.prefills, args.decoders, args.seed, pair, log=lambda line: print(line, flush=True))
        counts = chaos.run(args.minutes * 60)
    finally:
        if pair is not None:
            pair.down()
    print(json.dumps({"seconds": round(time.monotonic() - started), **counts}, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(worker(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "soak":
        sys.exit(soak(sys.argv[2:]))
    sys.exit("usage: chaos.py worker ... | chaos.py soak [--minutes M]")
