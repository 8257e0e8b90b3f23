"""The registry's lifecycle hooks: what layers above it (the remote engine, a second
transfer backend) subscribe to, so that the registry never imports them.

The registry calls, in order of subscription: ``initialized(options)`` after ``initialize``
succeeded for the first time (the checked options; a subscriber that raises undoes the
initialize), ``registered(cache)`` after a registration (one that raises undoes it),
``unregistering(cache_id)`` before a cache leaves the registry (one that raises, e.g. with
LLM_TIMEOUT for a transfer still in flight, keeps it registered), and ``finalizing()``
before the registry is reset.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Protocol

from .types import Cache


class LifecycleSubscriber(Protocol):
    """What a subscriber implements (every method; a no-op where it has nothing to do)."""

    def initialized(self, options: Mapping[str, str]) -> None: ...

    def registered(self, cache: Cache) -> None: ...

    def unregistering(self, cache_id: int) -> None: ...

    def finalizing(self) -> None: ...


_lock = threading.Lock()
_subscribers: list[LifecycleSubscriber] = []


def subscribe(subscriber: LifecycleSubscriber) -> None:
    """Adds a subscriber (once; subscribing it again changes nothing).

    >>> class Counter:
    ...     def __init__(self): self.caches = 0
    ...     def initialized(self, options): pass
    ...     def registered(self, cache): self.caches += 1
    ...     def unregistering(self, cache_id): pass
    ...     def finalizing(self): pass
    >>> import torch, torch_kvreg
    >>> from torch_kvreg import lifecycle
    >>> counter = Counter()
    >>> lifecycle.subscribe(counter)
    >>> torch_kvreg.initialize()
    >>> _ = torch_kvreg.register_kv_cache(torch.zeros(4, 4))
    >>> counter.caches
    1
    >>> lifecycle.unsubscribe(counter)
    >>> torch_kvreg.finalize()
    """
    for method in ("initialized", "registered", "unregistering", "finalizing"):
        if not callable(getattr(subscriber, method, None)):
            raise TypeError(f"a lifecycle subscriber needs a {method}() method")
    with _lock:
        if subscriber not in _subscribers:
            _subscribers.append(subscriber)


def unsubscribe(subscriber: LifecycleSubscriber) -> None:
    """Removes a subscriber (no-op if it is not subscribed)."""
    with _lock:
        if subscriber in _subscribers:
            _subscribers.remove(subscriber)


def subscribers() -> list[LifecycleSubscriber]:
    with _lock:
        return list(_subscribers)


def initialized(options: Mapping[str, str]) -> None:
    for subscriber in subscribers():
        subscriber.initialized(options)


def registered(cache: Cache) -> None:
    for subscriber in subscribers():
        subscriber.registered(cache)


def unregistering(cache_id: int) -> None:
    for subscriber in subscribers():
        subscriber.unregistering(cache_id)


def finalizing() -> None:
    """Every subscriber hears it, even after one raised; the first error is raised last."""
    first: BaseException | None = None
    for subscriber in subscribers():
        try:
            subscriber.finalizing()
        except BaseException as exc:  # noqa: BLE001  (finalize must reach every subscriber)
            first = first or exc
    if first is not None:
        raise first
