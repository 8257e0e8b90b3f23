"""LLMDataDist: LLM-DataDist's entry object over torch_kvreg's lifecycle and links."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NoReturn

from .. import registry, remote
from ..errors import LLMStatusCode, make_error, param_invalid, raises_llm, wrong_type
from ..options import OPTION_LISTEN_IP_INFO, from_upstream
from ..types import ClusterInfo, LlmRole
from .cache_manager import CacheManager
from .config import INT32_MAX, UINT64_MAX, LLMClusterInfo, check_int, int_to_ip
from .session import Session

log = logging.getLogger("torch_kvreg.llm_datadist")


def _cluster_infos(clusters: object, need_address: bool) -> list[ClusterInfo]:
    if not isinstance(clusters, (list, tuple)):
        raise wrong_type(f"clusters must be a list or tuple of LLMClusterInfo, got {type(clusters).__name__}")
    infos = []
    for i, cluster in enumerate(clusters):
        if not isinstance(cluster, LLMClusterInfo):
            raise wrong_type(f"clusters[{i}] must be an LLMClusterInfo, got {type(cluster).__name__}")
        if cluster.remote_cluster_id is None:
            raise param_invalid(f"clusters[{i}].remote_cluster_id is not set")
        if cluster.remote_ip_info_list:
            ip, port = cluster.remote_ip_info_list[0]
            infos.append(ClusterInfo(cluster.remote_cluster_id, int_to_ip(ip), port))
        elif need_address:
            raise param_invalid(f"clusters[{i}] has no remote ip info; call append_remote_ip_info")
        else:
            infos.append(ClusterInfo(cluster.remote_cluster_id, "0.0.0.0", 0))
    return infos


def _timeout(timeout: int) -> int:
    check_int("timeout", timeout, -(2**31), INT32_MAX)
    if timeout <= 0:
        raise param_invalid(f"timeout must be greater than 0, got {timeout}")
    return timeout


class LLMDataDist:
    """One per process: ``LLMDataDist(role, cluster_id)``, then ``init(options)``.

    >>> from torch_kvreg.llm_datadist import LLMDataDist, LLMRole
    >>> datadist = LLMDataDist(LLMRole.PROMPT, 0)
    >>> datadist.init({"llm.SyncKvCacheWaitTime": "1000"})
    >>> datadist.cluster_id, datadist.cache_manager is not None
    (0, True)
    >>> datadist.finalize()
    """

    _instance: LLMDataDist | None = None

    def __init__(self, role: LlmRole, cluster_id: int):
        if isinstance(role, bool) or not isinstance(role, int) or role not in tuple(LlmRole):
            raise wrong_type(f"role must be an LLMRole, got {role!r}")
        self._role = LlmRole(role)
        self._cluster_id = check_int("cluster_id", cluster_id, 0, UINT64_MAX)
        self._session = Session()
        self._cache_manager: CacheManager | None = None

    @property
    def cluster_id(self) -> int:
        return self._cluster_id

    @property
    def role(self) -> LlmRole:
        return self._role

    @property
    def is_initialized(self) -> bool:
        return self._session.live

    @raises_llm
    def init(self, options: dict[str, str]) -> None:
        """Initializes torch_kvreg with upstream's options (torch_kvreg.options: the keys
        that take effect, those accepted and ignored; the README lists them)."""
        if self._session.opened:
            return
        if LLMDataDist._instance is not None:
            raise make_error(LLMStatusCode.LLM_FAILED, "Cannot init multiple LLMDataDists in one process")
        registry.initialize(self._cluster_id, self._role, options=from_upstream(options))
        self._session.open()
        self._cache_manager = CacheManager(self._session)
        LLMDataDist._instance = self
        log.info("LLMDataDist %d initialized as %s", self._cluster_id, self._role.name)

    def finalize(self) -> None:
        """Unlinks, unregisters everything, releases the process's resources; idempotent."""
        if not self._session.opened:
            return
        registry.finalize()
        self._session.close()
        LLMDataDist._instance = None

    def _check(self) -> None:
        self._session.check("LLMDataDist is not initialized; call init() first")

    @property
    def cache_manager(self) -> CacheManager:
        self._check()
        assert self._cache_manager is not None
        return self._cache_manager

    @raises_llm
    def link_clusters(
        self, clusters: Sequence[LLMClusterInfo], timeout: int = 3000
    ) -> tuple[LLMStatusCode, list[LLMStatusCode]]:
        """Links to each cluster's first remote address: (status, [status per cluster])."""
        self._check()
        timeout = _timeout(timeout)
        return remote.link_clusters(_cluster_infos(clusters, need_address=True), timeout)

    @raises_llm
    def unlink_clusters(
        self, clusters: Sequence[LLMClusterInfo], timeout: int = 3000, force: bool = False
    ) -> tuple[LLMStatusCode, list[LLMStatusCode]]:
        """Unlinks clusters (by id): (status, [status per cluster])."""
        self._check()
        timeout = _timeout(timeout)
        if not isinstance(force, bool):
            raise wrong_type(f"force must be a bool, got {type(force).__name__}")
        return remote.unlink_clusters(_cluster_infos(clusters, need_address=False), timeout, force)

    @raises_llm
    def switch_role(self, role: LlmRole, switch_options: dict[str, str] | None = None) -> None:
        """PROMPT (and MIX given ``llm.ListenIpInfo``, or upstream's spelling ``llm.listenIpInfo``)
        listens; DECODER stops listening. Links and registrations stay."""
        self._check()
        if isinstance(role, bool) or not isinstance(role, int) or role not in tuple(LlmRole):
            raise wrong_type(f"role must be an LLMRole, got {role!r}")
        role = LlmRole(role)
        options = {} if switch_options is None else switch_options
        remote.serve_as(role, from_upstream(options).get(OPTION_LISTEN_IP_INFO))
        log.info("LLMDataDist %d: %s -> %s", self._cluster_id, self._role.name, role.name)
        self._role = role

    def link(self, comm_name: str, cluster_rank_info: dict, rank_table: str) -> int:
        raise make_error(
            LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
            "link(comm_name, rank_info, rank_table) builds an HCCL communicator from an Ascend rank "
            "table; torch_kvreg links with link_clusters over NIXL",
        )

    def unlink(self, comm_id: int) -> None:
        raise make_error(
            LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "unlink(comm_id) closes an HCCL communicator; use unlink_clusters"
        )

    def query_register_mem_status(self, comm_id: int) -> NoReturn:
        raise make_error(
            LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
            "query_register_mem_status reports HCCL memory registration, which does not exist here",
        )
