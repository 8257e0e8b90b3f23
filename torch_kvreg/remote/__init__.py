"""The remote layer: links and transfers between processes and hosts over NIXL (optional
extra ``torch_kvreg[nixl]``). The data path is NIXL's (UCX backend), or a direct copy
between processes of one host; the control path is a small versioned protocol
(protocol.py). The public functions are api.py's; the parts are:

- engine.py: this process as a peer (links, serving peers, starting jobs)
- control.py: links, the control server, the heartbeat; protocol.py: wire messages
- auth.py: the link secret's handshake; leases.py: who holds which cache
- agent.py: the NIXL agent, registrations and requests; same_host.py: the pid proof, routes
- jobs.py: transfers in flight as jobs; progress.py: the loop that completes them
- plan.py: segments and tensor selections; kernels.py: the torch.ops.llm remote kernels
- geometry.py: pulls and pushes between caches of different geometry
- notices.py: waiting for peers' completion notices without polling
"""

from . import kernels  # noqa: F401  (registers the remote ops' kernels)
from .api import (
    MAX_CLUSTERS,
    MAX_NOTIFY_BYTES,
    Notification,
    current_engine,
    existing_engine,
    get_engine,
    get_notifications,
    link_clusters,
    listen_address,
    nixl_available,
    pull_kv_blocks,
    pull_kv_blocks_async,
    pull_kv_cache,
    pull_kv_cache_async,
    push_kv_blocks,
    push_kv_blocks_async,
    serve_as,
    start_blocks,
    start_listening,
    start_slice,
    stop_listening,
    stop_remote,
    transfer_blocks,
    transfer_slice,
    unlink_clusters,
)
from .geometry import pull_kv_tokens, pull_kv_tokens_async, push_kv_tokens, push_kv_tokens_async
from .notices import wait_notices

__all__ = [
    "MAX_CLUSTERS",
    "MAX_NOTIFY_BYTES",
    "Notification",
    "current_engine",
    "existing_engine",
    "get_engine",
    "get_notifications",
    "wait_notices",
    "link_clusters",
    "listen_address",
    "nixl_available",
    "pull_kv_blocks",
    "pull_kv_blocks_async",
    "pull_kv_cache",
    "pull_kv_cache_async",
    "pull_kv_tokens",
    "pull_kv_tokens_async",
    "push_kv_blocks",
    "push_kv_blocks_async",
    "push_kv_tokens",
    "push_kv_tokens_async",
    "serve_as",
    "start_blocks",
    "start_listening",
    "start_slice",
    "stop_listening",
    "stop_remote",
    "transfer_blocks",
    "transfer_slice",
    "unlink_clusters",
]
