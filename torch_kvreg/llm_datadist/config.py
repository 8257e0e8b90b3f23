"""LLM-DataDist's configuration objects: LLMConfig (options for ``LLMDataDist.init``) and
LLMClusterInfo (a peer to link to)."""

from __future__ import annotations

import socket
from typing import Any

from ..errors import param_invalid, wrong_type
from ..options import (
    GE_DEVICE_ID,
    GE_SESSION_DEVICE_ID,
    MAX_DEVICE_ID,
    MAX_SYNC_KV_CACHE_WAIT_TIME_MS,
    OPTIONS,
    Check,
    check_value,
)

UINT16_MAX = 2**16 - 1
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
INT32_MAX = 2**31 - 1


def check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise wrong_type(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise param_invalid(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_type(name: str, value: Any, types: type | tuple[type, ...]) -> Any:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise wrong_type(f"{name} must be {names}, got {type(value).__name__}")
    return value


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def ip_to_int(ip: str | int) -> int:
    """LLM-DataDist's form of an IPv4 address: the four bytes as a little-endian int.

    >>> ip_to_int("127.0.0.1")
    16777343
    """
    if isinstance(ip, int) and not isinstance(ip, bool):
        return check_int("ip", ip, 0, UINT32_MAX)
    check_type("ip", ip, str)
    try:
        return int.from_bytes(socket.inet_aton(str(ip)), "little")
    except OSError:
        raise param_invalid(f"cannot parse ip {ip!r}") from None


def int_to_ip(value: int) -> str:
    """The dotted form of ``ip_to_int``'s int.

    >>> int_to_ip(16777343)
    '127.0.0.1'
    """
    return socket.inet_ntoa(int(value).to_bytes(4, "little"))


class LLMClusterInfo:
    """A peer cluster: its id and where to reach it (``append_remote_ip_info``).

    >>> info = LLMClusterInfo()
    >>> info.remote_cluster_id = 0
    >>> info.append_remote_ip_info("127.0.0.1", 26000)
    >>> info.remote_ip_info_list
    [(16777343, 26000)]
    """

    def __init__(self) -> None:
        self._remote_cluster_id: int | None = None
        self._remote_role_type: int | None = None
        self._local_ip_info_list: list[tuple[int, int]] = []
        self._remote_ip_info_list: list[tuple[int, int]] = []

    @property
    def remote_cluster_id(self) -> int | None:
        return self._remote_cluster_id

    @remote_cluster_id.setter
    def remote_cluster_id(self, value: int) -> None:
        self._remote_cluster_id = check_int("remote_cluster_id", value, 0, UINT64_MAX)

    @property
    def remote_role_type(self) -> int | None:
        return self._remote_role_type

    @remote_role_type.setter
    def remote_role_type(self, value: int) -> None:
        self._remote_role_type = check_type("remote_role_type", value, int)

    @property
    def local_ip_info_list(self) -> list[tuple[int, int]]:
        return self._local_ip_info_list

    @property
    def remote_ip_info_list(self) -> list[tuple[int, int]]:
        return self._remote_ip_info_list

    def append_local_ip_info(self, ip: str | int, port: int) -> None:
        self._local_ip_info_list.append((ip_to_int(ip), check_int("port", port, 0, UINT16_MAX)))

    def append_remote_ip_info(self, ip: str | int, port: int) -> None:
        self._remote_ip_info_list.append((ip_to_int(ip), check_int("port", port, 0, UINT16_MAX)))

    def __repr__(self) -> str:
        remote = [f"{int_to_ip(ip)}:{port}" for ip, port in self._remote_ip_info_list]
        return f"LLMClusterInfo(remote_cluster_id={self._remote_cluster_id}, remote={remote})"


class LLMConfig:
    """Options for ``LLMDataDist.init`` as properties; ``generate_options()`` gives the dict.

    >>> config = LLMConfig()
    >>> config.listen_ip_info = "127.0.0.1:26000"
    >>> config.sync_kv_timeout = 2000
    >>> options = config.generate_options()
    >>> options["llm.listenIpInfo"], options["llm.SyncKvCacheWaitTime"]
    ('127.0.0.1:26000', '2000')
    """

    def __init__(self) -> None:
        self._options: dict[str, str] = {}
        self._values: dict[str, Any] = {"mem_utilization": 0.95}

    # Property -> the option key it generates (torch_kvreg.options is the table of keys).
    _KEYS = {option.config: option.key for option in OPTIONS if option.config is not None}

    def generate_options(self) -> dict[str, str]:
        options = dict(self._values.get("ge_options", {}))
        device_id = self._values.get("device_id")
        if device_id is not None:
            ids = list(device_id) if isinstance(device_id, (list, tuple)) else [device_id]
            options[GE_DEVICE_ID] = ";".join(str(i) for i in ids)
            options[GE_SESSION_DEVICE_ID] = str(ids[0])
        for name, key in self._KEYS.items():
            value = self._values.get(name)
            if (
                value is None
                or value == ""
                and name
                in (
                    "listen_ip_info",
                    "deploy_res_path",
                    "buf_pool_cfg",
                    "mem_pool_cfg",
                    "host_mem_pool_cfg",
                    "cluster_info",
                )
            ):
                continue
            if name == "enable_switch_role" and not value:
                continue
            options[key] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        self._options = options
        return dict(options)

    gen_options = generate_options

    @property
    def options(self) -> dict[str, str]:
        return dict(self._options)

    def _set(self, name: str, value: Any) -> None:
        self._values[name] = value

    def _get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    @property
    def device_id(self) -> int | list[int] | None:
        return self._get("device_id")

    @device_id.setter
    def device_id(self, value: int | list[int] | tuple[int, ...]) -> None:
        ids = value if isinstance(value, (list, tuple)) else [value]
        for device in ids:
            check_int("device_id", device, 0, MAX_DEVICE_ID)
        self._set("device_id", value)

    @property
    def ge_options(self) -> dict[str, str]:
        return dict(self._get("ge_options", {}))

    @ge_options.setter
    def ge_options(self, value: dict[str, str]) -> None:
        check_type("ge_options", value, dict)
        for key, item in value.items():
            check_type("ge_options key", key, str)
            check_type("ge_options value", item, str)
        self._set("ge_options", dict(value))

    def _str_property(name: str) -> property:  # type: ignore[misc]  # used in the class body
        def getter(self: LLMConfig) -> str:
            return self._get(name, "")

        def setter(self: LLMConfig, value: str) -> None:
            self._set(name, check_type(name, value, str))

        return property(getter, setter)

    def _bool_property(name: str) -> property:  # type: ignore[misc]  # used in the class body
        def getter(self: LLMConfig) -> bool:
            return bool(self._get(name, False))

        def setter(self: LLMConfig, value: bool) -> None:
            self._set(name, check_type(name, value, bool))

        return property(getter, setter)

    listen_ip_info = _str_property("listen_ip_info")
    local_comm_res = _str_property("local_comm_res")
    mem_pool_cfg = _str_property("mem_pool_cfg")
    host_mem_pool_cfg = _str_property("host_mem_pool_cfg")
    buf_pool_cfg = _str_property("buf_pool_cfg")
    transfer_backend = _str_property("transfer_backend")
    deploy_res_path = _str_property("deploy_res_path")
    cluster_info = _str_property("cluster_info")
    global_resource_config = _str_property("global_resource_config")
    enable_cache_manager = _bool_property("enable_cache_manager")
    enable_remote_cache_accessible = _bool_property("enable_remote_cache_accessible")
    enable_switch_role = _bool_property("enable_switch_role")

    @property
    def sync_kv_timeout(self) -> int | str | None:
        return self._get("sync_kv_timeout")

    @sync_kv_timeout.setter
    def sync_kv_timeout(self, value: int | str) -> None:
        check_type("sync_kv_timeout", value, (int, str))
        if isinstance(value, str):
            check_value("sync_kv_timeout", value, Check.WAIT_MS)
        else:
            check_int("sync_kv_timeout", value, 1, MAX_SYNC_KV_CACHE_WAIT_TIME_MS)
        self._set("sync_kv_timeout", value)

    @property
    def link_total_time(self) -> int:
        return self._get("link_total_time", 0)

    @link_total_time.setter
    def link_total_time(self, value: int) -> None:
        self._set("link_total_time", check_int("link_total_time", value, 0, UINT32_MAX))

    @property
    def link_retry_count(self) -> int:
        return self._get("link_retry_count", 1)

    @link_retry_count.setter
    def link_retry_count(self, value: int) -> None:
        self._set("link_retry_count", check_int("link_retry_count", value, 1, 100))

    @property
    def rdma_traffic_class(self) -> int | None:
        return self._get("rdma_traffic_class")

    @rdma_traffic_class.setter
    def rdma_traffic_class(self, value: int) -> None:
        self._set("rdma_traffic_class", check_int("rdma_traffic_class", value, 0, UINT32_MAX))

    @property
    def rdma_service_level(self) -> int | None:
        return self._get("rdma_service_level")

    @rdma_service_level.setter
    def rdma_service_level(self, value: int) -> None:
        self._set("rdma_service_level", check_int("rdma_service_level", value, 0, UINT32_MAX))

    @property
    def mem_utilization(self) -> float:
        return self._get("mem_utilization")

    @mem_utilization.setter
    def mem_utilization(self, value: float) -> None:
        check_type("mem_utilization", value, float)
        if not 0.0 <= value <= 1.0:
            raise param_invalid(f"mem_utilization must be in [0, 1], got {value}")
        self._set("mem_utilization", value)

    @property
    def output_max_size(self) -> int | None:
        return self._get("output_max_size")

    @output_max_size.setter
    def output_max_size(self, value: int) -> None:
        self._set("output_max_size", check_type("output_max_size", value, int))


LlmConfig = LLMConfig
