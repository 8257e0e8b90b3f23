"""Every option key torch_kvreg reads, with the check of its value: the one table that
``torch_kvreg.initialize`` (registry.py), LLM-DataDist's Python facade (``LLMDataDist.init``
and ``switch_role``, ``LLMConfig``) and its C++ API (``LlmDataDist::Initialize`` and
``SetRole``, through csrc/options.cpp, the C++ copy that tests/test_sources_of_truth.py
proves equal to this one) all use.

Two kinds of keys share the table:

- native keys, which ``torch_kvreg.initialize`` takes, each with a ``Check`` of its value;
- upstream keys, which LLM-DataDist's facades take: each sets a native key (its ``Form``
  says how its value becomes that key's) or is accepted and ignored, as is every other key
  that starts with ``ge.``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import param_invalid, wrong_type

OPTION_DEVICE_ID = "llm.DeviceId"
OPTION_LISTEN_IP_INFO = "llm.ListenIpInfo"
OPTION_SYNC_KV_CACHE_WAIT_TIME = "llm.SyncKvCacheWaitTime"
# Peers must prove they know it before they link (torch_kvreg.remote.auth); also read from
# the environment variable below when the option is not given.
OPTION_LINK_SECRET = "llm.LinkSecret"
ENV_LINK_SECRET = "TORCH_KVREG_LINK_SECRET"
# "1": every transfer of this process is verified (torch_kvreg.verify), as with verify=True.
OPTION_VERIFY_TRANSFERS = "llm.VerifyTransfers"
# Upstream's device keys, which LLMConfig.device_id generates.
GE_DEVICE_ID = "ge.exec.deviceId"
GE_SESSION_DEVICE_ID = "ge.session_device_id"
# Upstream keys with this prefix that the table does not name are accepted and ignored.
IGNORED_PREFIX = "ge."

DEFAULT_SYNC_KV_CACHE_WAIT_TIME_MS = 1000
MAX_DEVICE_ID = 2**31 - 1
MAX_SYNC_KV_CACHE_WAIT_TIME_MS = 2**31 - 1
MAX_LINK_SECRET_BYTES = 4096


class Check(enum.Enum):
    """What the value of a native key must be."""

    DEVICE_ID = "device id"  # decimal digits, 0 to MAX_DEVICE_ID
    WAIT_MS = "wait ms"  # decimal digits, 1 to MAX_SYNC_KV_CACHE_WAIT_TIME_MS
    LISTEN_ADDRESS = "listen address"  # "ip:port", port 0 to 65535 (0: a free port)
    LINK_SECRET = "link secret"  # 1 to MAX_LINK_SECRET_BYTES bytes
    SWITCH = "switch"  # "0" (off) or "1" (on)


class Form(enum.Enum):
    """How LLM-DataDist's facades read an upstream key's value."""

    SAME = "same"  # the native key's value as it is
    DEVICE_LIST = "device list"  # "0;1", upstream's list of devices: the first is the device
    ADDRESS = "address"  # an address, or "" for none (upstream's LLMConfig default)
    IGNORED = "ignored"  # tunes Ascend resources; cannot change a result here


@dataclass(frozen=True)
class Option:
    """One key. ``check``: ``torch_kvreg.initialize`` takes it and checks its value so.
    ``form``: LLM-DataDist's facades take it, read so, and set native key ``sets`` from it
    (unless ignored). ``config``: the LLMConfig property that generates it."""

    key: str
    check: Check | None = None
    form: Form | None = None
    sets: str | None = None
    config: str | None = None


def _ignored(key: str, config: str | None = None) -> Option:
    return Option(key, form=Form.IGNORED, config=config)


OPTIONS: tuple[Option, ...] = (
    Option(OPTION_DEVICE_ID, Check.DEVICE_ID, Form.DEVICE_LIST, OPTION_DEVICE_ID),
    Option(OPTION_LISTEN_IP_INFO, Check.LISTEN_ADDRESS, Form.ADDRESS, OPTION_LISTEN_IP_INFO),
    Option(OPTION_SYNC_KV_CACHE_WAIT_TIME, Check.WAIT_MS, Form.SAME, OPTION_SYNC_KV_CACHE_WAIT_TIME, "sync_kv_timeout"),
    Option(OPTION_LINK_SECRET, Check.LINK_SECRET),
    Option(OPTION_VERIFY_TRANSFERS, Check.SWITCH, Form.SAME, OPTION_VERIFY_TRANSFERS),
    # Upstream's spelling of the listen address (lower-case l), which LLMConfig generates.
    Option("llm.listenIpInfo", form=Form.ADDRESS, sets=OPTION_LISTEN_IP_INFO, config="listen_ip_info"),
    Option(GE_DEVICE_ID, form=Form.DEVICE_LIST, sets=OPTION_DEVICE_ID),
    Option(GE_SESSION_DEVICE_ID, form=Form.DEVICE_LIST, sets=OPTION_DEVICE_ID),
    _ignored("llm.MemoryUtilization", "mem_utilization"),
    _ignored("llm.EnableCacheManager", "enable_cache_manager"),
    _ignored("llm.EnableRemoteCacheAccessible", "enable_remote_cache_accessible"),
    _ignored("llm.LocalCommRes", "local_comm_res"),
    _ignored("llm.TransferBackend", "transfer_backend"),
    _ignored("llm.LinkTotalTime", "link_total_time"),
    _ignored("llm.LinkRetryCount", "link_retry_count"),
    _ignored("llm.RdmaTrafficClass", "rdma_traffic_class"),
    _ignored("llm.RdmaServiceLevel", "rdma_service_level"),
    _ignored("llm.EnableSwitchRole", "enable_switch_role"),
    _ignored("llm.MemPoolConfig", "mem_pool_cfg"),
    _ignored("llm.HostMemPoolConfig", "host_mem_pool_cfg"),
    _ignored("llm.BufPoolCfg", "buf_pool_cfg"),
    _ignored("llm.deployResPath", "deploy_res_path"),
    _ignored("llm.OutputMaxSize", "output_max_size"),
    _ignored("llm.ClusterInfo", "cluster_info"),
    _ignored("llm.GlobalResourceConfig", "global_resource_config"),
    _ignored("ge.flowGraphMemMaxSize"),
)
# Native key -> the check of its value.
NATIVE: dict[str, Check] = {option.key: option.check for option in OPTIONS if option.check is not None}
UPSTREAM: dict[str, Option] = {option.key: option for option in OPTIONS if option.form is not None}
# Keys the native registry keeps the secret's stand-in under (to tell a second initialize
# with other options): equal secrets compare equal within this process, and nothing kept or
# shown can be turned back into the secret.
_SECRET_DIGEST_KEY = secrets.token_bytes(32)


def _digits(text: str, low: int, high: int) -> bool:
    # ASCII digits only: str.isdigit() also takes digits int() cannot read, such as "²".
    return 0 < len(text) <= len(str(high)) and text.isascii() and text.isdigit() and low <= int(text) <= high


def parse_listen_address(text: str, key: str = OPTION_LISTEN_IP_INFO) -> tuple[str, int]:
    """``"ip:port"`` as (ip, port); port 0 asks for a free port.

    >>> parse_listen_address("127.0.0.1:26000")
    ('127.0.0.1', 26000)
    """
    if not isinstance(text, str):
        raise wrong_type(f"{key} must be a str, got {type(text).__name__}")
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise param_invalid(f"{key} {text!r} is not 'ip:port'") from None
    if not sep or not _digits(port_text, 0, 65535):
        raise param_invalid(f"{key} {text!r} is not 'ip:port' with a port 0-65535")
    return host, int(port_text)


def check_value(key: str, value: str, check: Check) -> None:
    """LLM_PARAM_INVALID unless ``value`` passes ``check`` (``key`` names it in the message).

    >>> check_value("llm.SyncKvCacheWaitTime", "0", Check.WAIT_MS)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    torch_kvreg.errors.LLMParamInvalidError: LLM_PARAM_INVALID: llm.SyncKvCacheWaitTime must be ..., got '0'
    """
    if check is Check.DEVICE_ID:
        if not _digits(value, 0, MAX_DEVICE_ID):
            raise param_invalid(f"{key} must be a device id, 0 to {MAX_DEVICE_ID}, got {value!r}")
    elif check is Check.WAIT_MS:
        if not _digits(value, 1, MAX_SYNC_KV_CACHE_WAIT_TIME_MS):
            raise param_invalid(f"{key} must be a positive int of ms, got {value!r}")
    elif check is Check.LISTEN_ADDRESS:
        parse_listen_address(value, key)
    elif check is Check.SWITCH:
        if value not in ("0", "1"):
            raise param_invalid(f"{key} must be '0' or '1', got {value!r}")
    else:
        size = len(value.encode())
        if not 0 < size <= MAX_LINK_SECRET_BYTES:  # (the message never shows the secret)
            raise param_invalid(f"{key} must have 1 to {MAX_LINK_SECRET_BYTES} bytes, got {size}")


def _str_pairs(options: Mapping) -> None:
    for key, value in options.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise wrong_type(f"option {key!r}: keys and values must be str")  # never the value


def native_options(options: Mapping[str, str] | None, device_id: int | None) -> dict[str, str]:
    """``torch_kvreg.initialize``'s options, checked: every key native, every value as its
    Check says, ``llm.DeviceId`` equal to ``device_id`` when both are given, and the link
    secret taken from TORCH_KVREG_LINK_SECRET when the options have none.

    >>> native_options({"llm.SyncKvCacheWaitTime": "500"}, None)
    {'llm.SyncKvCacheWaitTime': '500'}
    """
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise wrong_type(f"options must be a mapping of str to str, got {type(options).__name__}")
    _str_pairs(options)
    checked = dict(options)
    if OPTION_LINK_SECRET not in checked and os.environ.get(ENV_LINK_SECRET):
        checked[OPTION_LINK_SECRET] = os.environ[ENV_LINK_SECRET]
    for key, value in checked.items():
        check = NATIVE.get(key)
        if check is None:
            raise param_invalid(f"unknown option {key!r}; known options are {', '.join(NATIVE)}")
        check_value(key, value, check)
    if device_id is not None and OPTION_DEVICE_ID in checked and int(checked[OPTION_DEVICE_ID]) != device_id:
        raise param_invalid(f"device_id={device_id} disagrees with {OPTION_DEVICE_ID}={checked[OPTION_DEVICE_ID]}")
    return checked


def kept(options: Mapping[str, str]) -> dict[str, str]:
    """Checked options as the native registry keeps them: the secret only as a keyed digest."""
    out = dict(options)
    if OPTION_LINK_SECRET in out:
        digest = hmac.new(_SECRET_DIGEST_KEY, out[OPTION_LINK_SECRET].encode(), hashlib.sha256).hexdigest()
        out[OPTION_LINK_SECRET] = "digest:" + digest
    return out


def from_upstream(options: object) -> dict[str, str]:
    """LLM-DataDist's option dict as ``torch_kvreg.initialize``'s: each upstream key read
    as its Form says, its value checked as the native key's; LLM_PARAM_INVALID for a key
    the table does not take or two keys that set one native key to different values.

    >>> from_upstream({"ge.exec.deviceId": "1;2", "llm.listenIpInfo": "", "llm.BufPoolCfg": "x"})
    {'llm.DeviceId': '1'}
    """
    if not isinstance(options, dict):
        raise wrong_type(f"options must be a dict of str to str, got {type(options).__name__}")
    _str_pairs(options)
    native: dict[str, str] = {}
    for key, value in options.items():
        option = UPSTREAM.get(key)
        if option is None:
            if key.startswith(IGNORED_PREFIX):
                continue
            raise param_invalid(f"unknown option {key!r}")
        if option.form is Form.IGNORED or (option.form is Form.ADDRESS and not value):
            continue
        assert option.sets is not None
        if option.form is Form.DEVICE_LIST:
            value = value.split(";")[0]
        check_value(key, value, NATIVE[option.sets])
        if native.get(option.sets, value) != value:
            raise param_invalid(f"option {key}={value!r} disagrees with {option.sets}={native[option.sets]!r}")
        native[option.sets] = value
    return native
