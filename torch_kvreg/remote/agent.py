"""This process's NIXL agent: how it is made, which local caches it has registered, and the
requests (descriptor lists, or indices into prepared lists) that move blocks."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .. import _C
from ..errors import LLMStatusCode, make_error
from ..types import Cache, CacheDesc
from . import plan
from .protocol import RemoteCache

# nixl_cu12's opaque handles (a transfer request, a prepared descriptor list) and its agent.
NixlHandle = Any
NixlAgent = Any

# From this many scattered blocks on, transfers index prepared per-block descriptor lists.
PREPPED_MIN_SEGMENTS = 16
# Per-block lists cover every block of every tensor of a cache, and NIXL indexes them with
# int32: caches with more descriptors than this (large, or a desc a peer claims) use
# per-request descriptor lists, whose size follows the request.
MAX_PREPPED_DESCRIPTORS = 1 << 24

# NIXL's agent runs a progress thread that, as nixl-cu12 configures it (pthrDelay 0), polls
# without pause: a whole core per process, idle or not. On a small host that starves the
# prefill's compute and this engine's own threads; with any pause UCX still progresses on
# time (the passive side of TCP transfers needs it), and this engine's progress thread
# drives its own transfers. TORCH_KVREG_NIXL_PROGRESS_DELAY_US sets it (0: busy polling).
PROGRESS_DELAY_ENV = "TORCH_KVREG_NIXL_PROGRESS_DELAY_US"
DEFAULT_PROGRESS_DELAY_US = 10
_agent_lock = threading.Lock()


def progress_delay_us() -> int:
    text = os.environ.get(PROGRESS_DELAY_ENV, str(DEFAULT_PROGRESS_DELAY_US))
    if not text.isdigit() or int(text) > 10**6:
        raise make_error(
            LLMStatusCode.LLM_PARAM_INVALID, f"{PROGRESS_DELAY_ENV} must be 0 to 1000000 (us), got {text!r}"
        )
    return int(text)


def make_agent(name: str) -> NixlAgent:
    """A NIXL agent with the UCX backend whose progress thread pauses between polls, safe to
    call from several threads."""
    from nixl_cu12 import _api, nixl_agent, nixl_agent_config, nixl_thread_sync_t  # optional extra

    delay = progress_delay_us()
    # UCX's memory events (hooks it patches into mmap and munmap when the UCX backend first
    # loads) make the first link spin in sched_yield; they serve UCX's own registration
    # cache only, and NIXL registers every cache explicitly. A user's own setting wins.
    os.environ.setdefault("UCX_MEM_EVENTS", "no")
    # nixl_agent_config has no field for the progress thread's pause, and nixl_agent sets it
    # to 0 on the native config it makes: the native config class is swapped, for this one
    # construction, for one that keeps the pause (benchmarks/RESULTS.md, 2026-11-29).
    config_class: Any = _api.nixlBind.nixlAgentConfig

    class PausingConfig(config_class):
        def __setattr__(self, field: str, value: object) -> None:
            super().__setattr__(field, delay if field == "pthrDelay" else value)

    with _agent_lock:
        _api.nixlBind.nixlAgentConfig = PausingConfig
        try:
            # Reader-writer locking inside the agent: this engine calls it from several threads
            # (callers posting, the progress thread, link threads loading peers' metadata).
            return nixl_agent(
                name, nixl_agent_config(backends=["UCX"], sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_RW)
            )
        finally:
            _api.nixlBind.nixlAgentConfig = config_class


def agent_name(loaded: object) -> str:
    """The name add_remote_agent returns (bytes or str, by NIXL version)."""
    return loaded.decode() if isinstance(loaded, bytes) else str(loaded)


class MetadataLoad:
    """A peer's agent metadata loaded into this agent: UCX makes an endpoint and, for the
    first peer of a kind, chooses its protocols (CPU-bound, tens of ms; NIXL releases the
    GIL meanwhile). A link whose transfers need no NIXL at first (a same-host peer) runs it
    on a thread of its own (``start``); the others run its steps in line (``load``,
    ``connect``, ``finish``). Whatever needs the peer's agent waits for it (``wait``).

    Loads of one peer's agent run one after the other (``after``: the one before, which a
    relink may find still running), so that an unlinked link's load, which removes the
    agent it loaded once it is done (``forget``), never removes what a later one loaded.
    """

    def __init__(self, nixl: NixlAgent, md: bytes, name: str, after: MetadataLoad | None = None):
        self.nixl, self.md, self.name, self.after = nixl, md, name, after
        self.error: str | None = None  # NIXL's refusal, once finished
        self.ms: dict[str, float] = {}  # "nixl_metadata" and "ucx_wireup": what each step took
        self.finished = threading.Event()  # loaded (or failed), and removed if forgotten meanwhile
        self.finished_at: float | None = None  # time.perf_counter() then
        self.lock = threading.Lock()
        self.done = False  # (finished, as seen under the lock)
        self.forgotten = False
        self.keep_agent = True  # (a forget's) False: remove the agent once loaded

    def start(self) -> None:
        threading.Thread(target=self.run, name="kvreg-nixl-load", daemon=True).start()

    def run(self) -> None:
        self.load()
        self.connect()
        self.finish()

    def load(self) -> None:
        if self.after is not None:
            self.after.finished.wait()
            self.after = None
        started = time.perf_counter()
        try:
            loaded = agent_name(self.nixl.add_remote_agent(self.md))
            if loaded != self.name:  # (a peer naming one agent in its hello, another in its metadata)
                with contextlib.suppress(Exception):
                    self.nixl.remove_remote_agent(loaded)
                self.error = f"its metadata names agent {loaded!r}, its hello {self.name!r}"
        except Exception as exc:  # NIXL raises its own types
            self.error = f"NIXL refused its metadata: {exc}"
        self.ms["nixl_metadata"] = (time.perf_counter() - started) * 1000.0

    def connect(self) -> None:
        """UCX's wire-up now, so that the first transfer does not pay for it."""
        started = time.perf_counter()
        if self.error is None:
            with contextlib.suppress(Exception):
                self.nixl.make_connection(self.name)
        self.ms["ucx_wireup"] = (time.perf_counter() - started) * 1000.0

    def finish(self) -> None:
        with self.lock:
            self.done = True
            remove = self.forgotten and not self.keep_agent and self.error is None
            self.md = b""  # (kept no longer than needed: a few KiB per peer)
        if remove:
            with contextlib.suppress(Exception):
                self.nixl.remove_remote_agent(self.name)
        self.finished_at = time.perf_counter()
        self.finished.set()

    def forget(self, keep_agent: bool) -> bool:
        """The link is gone. True when the agent is loaded and the caller removes it now (if it
        keeps it not); False when there is nothing to remove, or the load, still running,
        removes it itself once done (unless ``keep_agent``)."""
        with self.lock:
            if self.done:
                return self.error is None
            self.forgotten, self.keep_agent = True, keep_agent
            return False

    def wait(self, timeout_s: float, peer: object) -> None:
        """Returns once the peer's agent is loaded; LLM_TIMEOUT if that takes longer than
        ``timeout_s``, LLM_LINK_FAILED naming NIXL's refusal if it failed."""
        if not self.finished.wait(max(timeout_s, 0.0)):
            raise make_error(
                LLMStatusCode.LLM_TIMEOUT,
                f"cluster {peer}'s NIXL metadata still loading after {timeout_s * 1000:.0f} ms",
            )
        if self.error is not None:
            raise make_error(LLMStatusCode.LLM_LINK_FAILED, f"cluster {peer} cannot take NIXL transfers: {self.error}")


class MetadataLoads:
    """The loads of peers' metadata not finished yet, the latest of each peer's agent."""

    def __init__(self, nixl: NixlAgent):
        self.nixl = nixl
        self.lock = threading.Lock()
        self.running: dict[str, MetadataLoad] = {}

    def new(self, md: bytes, name: str) -> MetadataLoad:
        """A load of agent ``name``'s metadata (not started), to run after any still running."""
        with self.lock:
            self._prune()
            load = self.running[name] = MetadataLoad(self.nixl, md, name, self.running.get(name))
        return load

    def wait_all(self, timeout_s: float) -> bool:
        """Whether every load finished within ``timeout_s`` (finalize: none may use the agent
        once it is torn down)."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            loads = list(self.running.values())  # (each waits for the one before it)
        done = all(load.finished.wait(max(deadline - time.monotonic(), 0.0)) for load in loads)
        with self.lock:
            self._prune()
        return done

    def _prune(self) -> None:
        self.running = {key: load for key, load in self.running.items() if not load.finished.is_set()}


def preppable(desc: CacheDesc) -> bool:
    return desc.num_tensors * desc.shape[0] <= MAX_PREPPED_DESCRIPTORS


def per_block_rows(addrs: Sequence[int], desc: CacheDesc) -> np.ndarray:
    """One descriptor row per block of every tensor, tensor-major: a prepared list's order."""
    offsets = np.arange(desc.shape[0], dtype=np.uint64) * np.uint64(desc.block_nbytes)
    lengths = np.full(desc.shape[0], desc.block_nbytes, dtype=np.uint64)
    return plan.descriptors(addrs, plan.device_id(desc), offsets, lengths)


class Registrations:
    """The local caches registered with the agent, and their prepared per-block lists."""

    def __init__(self, agent: NixlAgent):
        self.agent = agent
        self.lock = threading.Lock()  # held across NIXL's call: a cache is registered once
        self.regs: dict[int, object] = {}  # cache id -> NIXL registration descriptors
        self.preps: dict[int, object] = {}  # cache id -> prepared per-block list

    def register(self, cache: Cache) -> None:
        desc = cache.cache_desc
        rows = [(addr, desc.tensor_nbytes, plan.device_id(desc), "") for addr in cache.tensor_addrs]
        with self.lock:
            if cache.cache_id in self.regs:  # ids are never reused while the engine lives
                return
            try:
                self.regs[cache.cache_id] = self.agent.register_memory(rows, plan.mem_type(desc))
            except Exception as exc:  # NIXL raises its own types
                raise make_error(
                    LLMStatusCode.LLM_FAILED, f"NIXL could not register cache {cache.cache_id}: {exc}"
                ) from None

    def __contains__(self, cache_id: int) -> bool:
        return cache_id in self.regs

    def deregister(self, cache_ids: Sequence[int]) -> None:
        with self.lock:
            dropped = [(self.regs.pop(i, None), self.preps.pop(i, None)) for i in cache_ids]
        for reg, prep in dropped:
            if prep is not None:
                with contextlib.suppress(Exception):
                    self.agent.release_dlist_handle(prep)
            if reg is not None:
                with contextlib.suppress(Exception):
                    self.agent.deregister_memory(reg)

    def stale(self, keep: set[int]) -> list[int]:
        """Registered caches the native registry no longer has (unregistered through the raw
        op, say), other than those in ``keep``."""
        live = set(_C.cache_ids())
        with self.lock:
            return [i for i in self.regs if i not in live and i not in keep]

    def prepared(self, cache: Cache) -> object:
        with self.lock:
            prep = self.preps.get(cache.cache_id)
        if prep is None:
            prep = self.agent.prep_xfer_dlist(
                "NIXL_INIT_AGENT", per_block_rows(cache.tensor_addrs, cache.cache_desc), plan.mem_type(cache.cache_desc)
            )
            with self.lock:
                self.preps[cache.cache_id] = prep
        return prep


class Request:
    """A NIXL request not made yet: each side's descriptor rows (or indices into prepared
    lists) and how to make a handle of them. Requests with equal keys (one peer, operation
    and kind of memory, or the same prepared lists) can be made into one handle."""

    __slots__ = ("key", "local_part", "remote_part", "make_handle")

    def __init__(
        self,
        key: tuple,
        local_part: np.ndarray,
        remote_part: np.ndarray,
        make_handle: Callable[[np.ndarray, np.ndarray], NixlHandle],
    ):
        self.key, self.local_part, self.remote_part, self.make_handle = key, local_part, remote_part, make_handle

    def __len__(self) -> int:
        return len(self.local_part)

    @staticmethod
    def handle_of(requests: list[Request]) -> NixlHandle:
        """One NIXL handle moving every request's descriptors (all of one key)."""
        if len(requests) == 1:
            return requests[0].make_handle(requests[0].local_part, requests[0].remote_part)
        local_part = np.concatenate([request.local_part for request in requests])
        remote_part = np.concatenate([request.remote_part for request in requests])
        if local_part.ndim == 2:
            local_part, remote_part = joined_rows(local_part, remote_part)
        return requests[0].make_handle(local_part, remote_part)


def joined_rows(local_rows: np.ndarray, remote_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(address, length, device) rows of both sides in local address order, each run of
    rows adjacent on both sides joined into one: what one request for all those blocks
    would have had (the planner joins runs within a request; this joins across them)."""
    order = np.argsort(local_rows[:, 0], kind="stable")
    local_rows, remote_rows = local_rows[order], remote_rows[order]
    lengths = local_rows[:, 1]
    joins = (
        (local_rows[1:, 0] == local_rows[:-1, 0] + lengths[:-1])
        & (remote_rows[1:, 0] == remote_rows[:-1, 0] + lengths[:-1])
        & (local_rows[1:, 2] == local_rows[:-1, 2])
        & (remote_rows[1:, 2] == remote_rows[:-1, 2])
    )
    if not joins.any():
        return local_rows, remote_rows
    starts = np.flatnonzero(np.concatenate(([True], ~joins)))
    joined = np.add.reduceat(lengths, starts)
    local_rows, remote_rows = local_rows[starts], remote_rows[starts]
    local_rows[:, 1] = joined
    remote_rows[:, 1] = joined
    return local_rows, remote_rows


def row_request(
    agent: NixlAgent,
    operation: str,
    local: Cache,
    remote: RemoteCache,
    peer: str,
    offsets: tuple[np.ndarray, np.ndarray, np.ndarray],
    selection: tuple[np.ndarray, np.ndarray],
    shifts: tuple[Sequence[int], Sequence[int]] | None = None,
) -> Request:
    """A request with one descriptor row per segment and tensor; ``offsets``: (local
    offsets, remote offsets, lengths), ``selection``: (local, remote) tensor indices,
    ``shifts``: bytes added to each selected tensor's base (local, remote)."""
    local_offsets, remote_offsets, lengths = offsets
    local_addrs = np.asarray(local.tensor_addrs, dtype=np.uint64)[selection[0]]
    remote_addrs = np.asarray(remote.addrs, dtype=np.uint64)[selection[1]]
    if shifts is not None:
        local_addrs = local_addrs + np.asarray(shifts[0], dtype=np.uint64)
        remote_addrs = remote_addrs + np.asarray(shifts[1], dtype=np.uint64)
    local_rows = plan.descriptors(local_addrs, plan.device_id(local.cache_desc), local_offsets, lengths)
    remote_rows = plan.descriptors(remote_addrs, plan.device_id(remote.desc), remote_offsets, lengths)
    local_mem, remote_mem = plan.mem_type(local.cache_desc), plan.mem_type(remote.desc)

    def make_handle(local_rows: np.ndarray, remote_rows: np.ndarray) -> NixlHandle:
        return agent.initialize_xfer(
            operation,
            agent.get_xfer_descs(local_rows, local_mem),
            agent.get_xfer_descs(remote_rows, remote_mem),
            peer,
        )

    return Request(("rows", operation, peer, local_mem, remote_mem), local_rows, remote_rows, make_handle)


def prepped_request(
    agent: NixlAgent,
    operation: str,
    prepared: tuple[object, object],
    descs: tuple[CacheDesc, CacheDesc],
    offsets: tuple[np.ndarray, np.ndarray],
    selection: tuple[np.ndarray, np.ndarray],
) -> Request:
    """A request of whole blocks as indices into prepared per-block lists (``prepared``,
    ``descs``, ``offsets`` and ``selection``: (local, remote) each)."""
    block_nbytes = descs[0].block_nbytes

    def indices(offsets: np.ndarray, num_blocks: int, selected: np.ndarray) -> np.ndarray:
        blocks = (offsets // np.uint64(block_nbytes)).astype(np.int64)
        tensors = selected[:, None] * num_blocks
        return (tensors + blocks[None, :]).reshape(-1).astype(np.int32)

    local_idx = indices(offsets[0], descs[0].shape[0], selection[0])
    remote_idx = indices(offsets[1], descs[1].shape[0], selection[1])
    local_prep, remote_prep = prepared

    def make_handle(local_idx: np.ndarray, remote_idx: np.ndarray) -> NixlHandle:
        return agent.make_prepped_xfer(operation, local_prep, local_idx, remote_prep, remote_idx)

    return Request(("prepped", operation, id(local_prep), id(remote_prep)), local_idx, remote_idx, make_handle)
