"""Whether an LLMDataDist's ``init()`` is in force: the one fact that LLMDataDist and its
CacheManager share. Both import this module and neither imports the other's."""

from __future__ import annotations

from .. import registry
from ..errors import LLMStatusCode, make_error


class Session:
    """One LLMDataDist's init: opened by ``init()``, closed by ``finalize()``. It is live while
    open and torch_kvreg is initialized (a direct ``torch_kvreg.finalize()`` ends it too).

    >>> session = Session()
    >>> session.live
    False
    """

    def __init__(self) -> None:
        self._open = False

    def open(self) -> None:
        self._open = True

    def close(self) -> None:
        self._open = False

    @property
    def opened(self) -> bool:
        """Whether ``init()`` ran and ``finalize()`` has not since (torch_kvreg aside)."""
        return self._open

    @property
    def live(self) -> bool:
        return self._open and registry.is_initialized()

    def check(self, message: str) -> None:
        """LLM_FAILED with ``message`` unless live."""
        if not self.live:
            raise make_error(LLMStatusCode.LLM_FAILED, message)
