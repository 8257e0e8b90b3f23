"""The LLMException family, and the translation of native errors into it."""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast


class LLMStatusCode(enum.IntEnum):
    """Status codes, values exactly as LLM-DataDist's ``LLMStatusCode``.

    >>> LLMStatusCode.LLM_PARAM_INVALID == 0x5010B005
    True
    """

    LLM_SUCCESS = 0x0
    LLM_FAILED = 0xFFFFFFFF
    LLM_WAIT_PROC_TIMEOUT = 0x5010B001
    LLM_KV_CACHE_NOT_EXIST = 0x5010B002
    LLM_PARAM_INVALID = 0x5010B005
    LLM_NOT_YET_LINK = 0x5010B007
    LLM_ALREADY_LINK = 0x5010B008
    LLM_LINK_FAILED = 0x5010B009
    LLM_UNLINK_FAILED = 0x5010B00A
    LLM_NOTIFY_PROMPT_UNLINK_FAILED = 0x5010B00B
    LLM_CLUSTER_NUM_EXCEED_LIMIT = 0x5010B00C
    LLM_PROCESSING_LINK = 0x5010B00D
    LLM_DEVICE_OUT_OF_MEMORY = 0x5010B00E
    LLM_EXIST_LINK = 0x5010B018
    LLM_FEATURE_NOT_ENABLED = 0x5010B019
    LLM_TIMEOUT = 0x5010B01A
    LLM_LINK_BUSY = 0x5010B01B
    LLM_OUT_OF_MEMORY = 0x5010B01C


class LLMException(RuntimeError):
    """An error with an LLM-DataDist status code; ``str(e)`` starts with the status name.

    >>> e = LLMException(LLMStatusCode.LLM_FAILED, "boom")
    >>> (e.status_code, str(e))
    (<LLMStatusCode.LLM_FAILED: 4294967295>, 'LLM_FAILED: boom')
    """

    # The destination blocks a failed transfer names as not (correctly) written, when it
    # knows them (a verified transfer's mismatched blocks); None: unknown, assume all.
    failed_blocks: list[int] | None = None

    def __init__(self, status_code: LLMStatusCode, message: str):
        self.status_code = LLMStatusCode(status_code)
        self.detail = message
        self.message = f"{self.status_code.name}: {message}"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.message


class LLMParamInvalidError(LLMException, ValueError):
    """LLM_PARAM_INVALID: a bad argument value."""


class LLMTypeError(LLMException, TypeError):
    """LLM_PARAM_INVALID: an argument of the wrong type."""


class LLMIndexError(LLMException, IndexError):
    """LLM_PARAM_INVALID: a block or batch index out of range."""


class LLMKVCacheNotExistError(LLMException, KeyError):
    """LLM_KV_CACHE_NOT_EXIST: no live cache has this id."""


def make_error(status: LLMStatusCode, message: str, kind: type | None = None) -> LLMException:
    """The LLMException subclass for ``status`` (and, for LLM_PARAM_INVALID, ``kind``).

    >>> type(make_error(LLMStatusCode.LLM_PARAM_INVALID, "x", IndexError)).__name__
    'LLMIndexError'
    """
    status = LLMStatusCode(status)
    if status == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST:
        return LLMKVCacheNotExistError(status, message)
    if status == LLMStatusCode.LLM_PARAM_INVALID:
        if kind is not None and issubclass(kind, IndexError):
            return LLMIndexError(status, message)
        if kind is not None and issubclass(kind, TypeError):
            return LLMTypeError(status, message)
        return LLMParamInvalidError(status, message)
    return LLMException(status, message)


def param_invalid(message: str) -> LLMParamInvalidError:
    return LLMParamInvalidError(LLMStatusCode.LLM_PARAM_INVALID, message)


def wrong_type(message: str) -> LLMTypeError:
    return LLMTypeError(LLMStatusCode.LLM_PARAM_INVALID, message)


# The exact types the native module raises a failed check as; it sets `status_code` and
# `detail` on them (csrc/bindings.cpp set_python_error).
_NATIVE_TYPES = (RuntimeError, ValueError, IndexError, TypeError)


def raw_error(kind: type[Exception], status: LLMStatusCode, detail: str) -> Exception:
    """The error a raw op raises from Python (a fake kernel): the built-in ``kind``, carrying
    its status as the native module's errors do.

    >>> error = raw_error(ValueError, LLMStatusCode.LLM_PARAM_INVALID, "bad")
    >>> type(error).__name__, str(error), translate(error).status_code.name
    ('ValueError', 'LLM_PARAM_INVALID: bad', 'LLM_PARAM_INVALID')
    """
    if kind not in _NATIVE_TYPES:
        raise TypeError(f"raw ops raise {', '.join(t.__name__ for t in _NATIVE_TYPES)}, not {kind.__name__}")
    status = LLMStatusCode(status)
    error: Exception = kind(f"{status.name}: {detail}")
    vars(error).update(status_code=int(status), detail=detail)
    return error


def translate(exc: BaseException) -> LLMException | None:
    """The LLMException for an error of the native module or a raw op (the status it carries
    as a value), or None if it carries none; the message is never parsed.

    >>> error = ValueError("LLM_PARAM_INVALID: bad")
    >>> translate(error) is None  # the text alone is no status
    True
    >>> error.status_code, error.detail = 0x5010B005, "bad"
    >>> translate(error)
    LLMParamInvalidError('LLM_PARAM_INVALID: bad')
    """
    if isinstance(exc, LLMException):
        return exc
    status = getattr(exc, "status_code", None)
    detail = getattr(exc, "detail", None)
    if type(exc) not in _NATIVE_TYPES or not isinstance(status, int) or not isinstance(detail, str):
        return None
    try:
        status = LLMStatusCode(status)
    except ValueError:
        return None
    return make_error(status, detail, type(exc))


F = TypeVar("F", bound=Callable)


def raises_llm(fn: F) -> F:
    """Decorator: errors from the raw ops come out as the LLMException family."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as exc:
            translated = translate(exc)
            if translated is None or translated is exc:
                raise
            raise translated from None

    return cast(F, wrapper)
