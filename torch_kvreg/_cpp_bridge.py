"""What the C++ API (llm_datadist.h) calls in a process where torch_kvreg is imported: links,
transfers and the listening lifecycle, which live in the Python remote layer. Every function
takes plain values and returns an LLM status int; it never raises."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from .errors import LLMException, LLMStatusCode
from .options import OPTION_LISTEN_IP_INFO, native_options

log = logging.getLogger("torch_kvreg.cpp")


def _status(fn: Callable[..., LLMStatusCode | int | None]) -> Callable[..., int]:
    @functools.wraps(fn)
    def wrapper(*args: Any) -> int:
        try:
            result = fn(*args)
        except LLMException as exc:
            return int(exc.status_code)
        except Exception as exc:  # anything else is a failure, reported, never raised into C++
            log.warning("C++ API call %s failed: %r", fn.__name__, exc)
            return int(LLMStatusCode.LLM_FAILED)
        return int(LLMStatusCode.LLM_SUCCESS if result is None else result)

    return wrapper


# Options arrive as torch_kvreg.initialize's: the C++ API read LLM-DataDist's with its copy
# of the option table (csrc/options.cpp, options.from_upstream's twin), which leaves the
# listen address to be checked here.


@_status
def initialize(cluster_id: int, role: int, options: dict[str, str]) -> None:
    from . import registry

    registry.initialize(cluster_id, role, options=options)


@_status
def finalize() -> None:
    from . import registry

    registry.finalize()


@_status
def set_role(role: int, options: dict[str, str]) -> None:
    from . import remote

    remote.serve_as(role, native_options(options, None).get(OPTION_LISTEN_IP_INFO))


@_status
def link(cluster_id: int, ip: str, port: int, timeout_ms: int) -> LLMStatusCode:
    from . import remote
    from .types import ClusterInfo

    status, statuses = remote.link_clusters([ClusterInfo(cluster_id, ip, port)], timeout_ms)
    return statuses[0]


@_status
def unlink(cluster_id: int, timeout_ms: int, force: bool) -> LLMStatusCode:
    from . import remote
    from .types import ClusterInfo

    status, statuses = remote.unlink_clusters([ClusterInfo(cluster_id, "0.0.0.0", 0)], timeout_ms, force)
    return statuses[0]


def _layers(first_stop: tuple[int, int]) -> range | None:
    first, stop = first_stop
    return None if stop == 0 else range(first, stop)


@_status
def transfer(
    pull: bool,
    blocks: bool,
    cluster_id: int,
    remote_cache_id: int,
    local_cache_id: int,
    src_blocks: list[int],
    dst_blocks: list[int],
    remote_index: int,
    local_index: int,
    size: int,
    local_layers: tuple[int, int],
    remote_layers: tuple[int, int],
    tensors_per_layer: int,
    verify: bool = False,
) -> None:
    from . import registry, remote
    from .errors import raises_llm

    local = registry.get_cache(local_cache_id)
    operation = "READ" if pull else "WRITE"
    if blocks:
        raises_llm(remote.transfer_blocks)(
            operation,
            local,
            cluster_id,
            remote_cache_id,
            src_blocks,
            dst_blocks,
            _layers(local_layers),
            _layers(remote_layers),
            tensors_per_layer,
            verify=verify,
        )
    else:
        raises_llm(remote.transfer_slice)(
            operation,
            local,
            cluster_id,
            remote_cache_id,
            remote_index,
            local_index,
            size,
            _layers(local_layers),
            _layers(remote_layers),
            tensors_per_layer,
            verify=verify,
        )
