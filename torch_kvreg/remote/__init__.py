"""Transfers between processes and hosts over NIXL (optional extra ``torch_kvreg[nixl]``)."""

from __future__ import annotations

from ..errors import LLMStatusCode, make_error


def _not_enabled():
    return make_error(
        LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
        "remote transfers need NIXL: pip install 'torch_kvreg[nixl]'",
    )


def start_listening(address: str) -> None:
    raise _not_enabled()


def stop_remote() -> None:
    return None


def on_register(cache) -> None:
    return None


def on_unregister(cache_id: int) -> None:
    return None
