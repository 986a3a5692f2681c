"""JSON in and out: untrusted files parsed strictly, documents written as standard JSON.

``json.loads`` silently keeps the last of two equal keys, so ``{"r": 4, "r": 64}`` means one thing
to Python and possibly another to the tool that wrote or will read the file. Every header,
config, index and manifest portllm reads goes through :func:`loads`, which refuses duplicate keys
and turns every parser failure (bad UTF-8, bad syntax, absurd nesting, giant integers) into one
:class:`InvalidInputError`.

Going out, ``json.dumps`` writes a float NaN or infinity as the bare words ``NaN`` / ``Infinity``,
which no standard JSON parser accepts (and it never hands a float to ``default``). Every document
portllm prints or writes for scripts goes through :func:`dumps`, which turns non-finite numbers
into ``null`` first.
"""

from __future__ import annotations

import json
import math
from pathlib import PurePath
from typing import Any, Callable

from portllm_cli.errors import InvalidInputError


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def loads(data: bytes | str, *, where: object, what: str = "JSON file", allow_constants: bool = True) -> Any:
    """Parse ``data`` (from ``where``, a path or label used in messages) or raise InvalidInputError.

    ``allow_constants=False`` also refuses ``NaN``/``Infinity``, which are not JSON at all
    (the safetensors header parser in Rust rejects them; so does this one).
    """
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        kwargs: dict[str, Any] = {"object_pairs_hook": _no_duplicates}
        if not allow_constants:
            kwargs["parse_constant"] = _no_constants
        return json.loads(text, **kwargs)
    except _DuplicateKey as exc:
        raise InvalidInputError(f"{where}: malformed {what} (duplicate key {exc.key!r})") from None
    except UnicodeDecodeError:
        raise InvalidInputError(f"{where}: malformed {what} (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{where}: malformed {what} ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise InvalidInputError(f"{where}: malformed {what} (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python will convert
        first = " ".join(str(exc).split())[:120]
        raise InvalidInputError(f"{where}: malformed {what} ({first})") from None


def finite(obj: Any) -> Any:
    """A copy of a JSON-like document with NaN and infinities as None, paths as strings and
    tuples as lists; anything else is left for ``json.dumps``'s ``default``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    return obj


def _refuse(obj: Any) -> Any:
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def dumps(doc: Any, *, indent: int | None = 2, default: Callable[[Any], Any] | None = None) -> str:
    """Standard JSON text for ``doc``: non-finite numbers become null (see :func:`finite`)."""

    def fallback(obj: Any) -> Any:  # what ``default`` returns is cleaned too
        return finite((default or _refuse)(obj))

    return json.dumps(finite(doc), indent=indent, default=fallback, allow_nan=False)
