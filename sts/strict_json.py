"""Strict parsing of untrusted JSON, NumericDates and URIs: the one place where their edge cases are decided.

Every JWT, JWK Set and JSON body the project reads from outside goes through :func:`loads`, every
time claim through :func:`numeric_date`, every URI taken from a request or token through
:func:`split_uri`. Each refuses, as a :class:`ValueError`, what Python's own parsers accept or raise
something else for, so that no crafted value reaches arithmetic or a comparison it can break:

* JSON (RFC 8259): ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON (§6), yet ``json.loads``
  accepts them; numbers outside the range implementations agree on (§6: integers beyond
  ±(2^63 - 1), floats that overflow to infinity) are refused, the integer by its digit count before
  ``int()`` ever sees it (Python's int/str conversion limit raises for more than 4300 digits);
  duplicate member names (§4: "names SHOULD be unique"; RFC 7515 §4, RFC 7519 §4 let JWT parsers
  refuse them) and unpaired surrogate escapes (§8.2: not interoperable, and unencodable as UTF-8
  later, in a store or a log) are refused; so is nesting deeper than :data:`MAX_DEPTH` (§9 allows
  the limit), before it can become a ``RecursionError`` here or in whatever walks the value later
  (``json.dumps`` into the audit log, the policy context). A refusal names the member whose value
  was refused, when there is one, so a body's error can name the field.
* NumericDate (RFC 7519 §2): a JSON number of seconds since 1970-01-01T00:00:00Z; here also
  finite, not a boolean, and between 0 and the last second of year 9999, so that adding a leeway,
  ``int()``, ``datetime`` and every store keep working on it.
* base64url (RFC 7515 §2): :func:`b64url_decode` takes only the canonical unpadded form.
* URIs (RFC 3986 §3): ``urlsplit`` raises ``ValueError`` on a bad IPv6 literal (``http://[::1``),
  its ``port`` raises on ``:99999``, and it silently deletes tabs and newlines; :func:`split_uri`
  answers None for all of them, and for anything that is not printable ASCII.

Imports nothing of the project: each caller turns the ``ValueError`` or None into its protocol's
error (``invalid_request``, ``invalid_dpop_proof``, ``invalid_token``, ``invalid_target``, ConfigError).
"""

from __future__ import annotations

import binascii
import itertools
import json
import math
import re
from collections.abc import Callable
from typing import Any, TypeGuard
from urllib.parse import SplitResult, urlsplit

MAX_INTEGER = 2**63 - 1
"""The largest magnitude of a JSON integer accepted (a signed 64-bit integer, RFC 8259 §6)."""
_MAX_INTEGER_DIGITS = len(str(MAX_INTEGER))
MAX_DEPTH = 64
"""The deepest nesting of arrays and objects accepted (RFC 8259 §9 lets a parser limit it)."""
MAX_NUMERIC_DATE = 253_402_300_799
"""9999-12-31T23:59:59Z: the latest NumericDate accepted (RFC 7519 §2)."""
# A JSON string (skipped whole, so brackets inside it do not count) or one bracket.
_STRUCTURE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_TO_STANDARD_ALPHABET = bytes.maketrans(b"-_", b"+/")
_PADDING = {0: b"", 2: b"==", 3: b"="}
# The last character of a part of length 4k+2 carries 2 bits of data (4 zero), of 4k+3 carries 4 (2 zero).
_CANONICAL_LAST = {2: frozenset("AQgw"), 3: frozenset("AEIMQUYcgkosw048")}
_URI_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))  # RFC 3986 §2: printable ASCII, no space


class JsonError(ValueError):
    """The text is not JSON we accept; ``member`` names the object member whose value was refused.

    ``out_of_range`` is True when that value is a number the JSON grammar allows but this parser does
    not (too large): a JWT verifier may then refuse it under the rule of its claim (``exp``) rather than
    as malformed, while NaN and Infinity, which are not JSON at all, stay malformed.
    """

    def __init__(self, reason: str, member: str | None = None, *, out_of_range: bool = False) -> None:
        super().__init__(f"member '{member}': {reason}" if member is not None else reason)
        self.reason = reason
        self.member = member
        self.out_of_range = out_of_range


class _Refused:
    """A value the parser met and refused, kept until the enclosing member's name is known."""

    __slots__ = ("out_of_range", "reason")

    def __init__(self, reason: str, *, out_of_range: bool) -> None:
        next(_REFUSALS)  # tells loads() that its fast parse met something to refuse
        self.reason = reason
        self.out_of_range = out_of_range


# Tickets taken by loads() before and after its fast parse, and by every refused value: a parse that
# made no _Refused sees its second ticket follow its first. next() on a count is atomic in CPython,
# so a refusal on another thread can only cause a needless checked parse, never hide one of ours.
_REFUSALS = itertools.count()


class _Noticed(Exception):
    """The fast parse met a duplicate member name: the checked parse names it."""


def loads(data: bytes | str) -> Any:
    """Parse strict UTF-8 JSON (see the module docstring); raises only :class:`JsonError` (a ValueError).

    Most texts are JSON we accept: they are parsed once by a decoder built at import that only
    notices trouble (a duplicate name, a refused number). Anything it notices, and every error, is
    parsed again by :func:`_loads_checked`, which finds the member to name: the same answer either way.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        if not isinstance(data, bytes):
            text.encode("utf-8")  # a str may carry unpaired surrogates itself (RFC 8259 §8.2)
    except UnicodeError as e:
        raise JsonError(f"not UTF-8 text ({e})") from e
    _check_depth(text)
    before = next(_REFUSALS)
    try:
        # The C scanner alone (what JSONDecoder.decode wraps): a value that fills the whole text.
        # Whitespace around it, or anything after it, is left to the checked parse.
        value, end = _FAST_SCAN(text, 0)
    except (StopIteration, ValueError, RecursionError, _Noticed):
        return _loads_checked(text)
    # A refused number takes a ticket: if any did since ours, this text (or one parsed beside it on
    # another thread) held one, and only the checked parse can tell which member.
    if end != len(text) or next(_REFUSALS) != before + 1:
        return _loads_checked(text)
    if _SURROGATE_ESCAPE.search(text) is not None:
        _check_strings(value)
    return value


def _loads_checked(text: str) -> Any:
    """The parse that names what it refuses: every object's members checked as it is built."""
    try:
        value = json.loads(
            text,
            object_pairs_hook=_members,
            parse_int=_integer,
            parse_float=_float,
            parse_constant=_constant,
        )
    except RecursionError as e:
        # Deep nesting ("[[[[…") fits in a small token; it must be a refusal, not a server error.
        raise JsonError("JSON is nested too deeply") from e
    except JsonError:
        raise
    except ValueError as e:  # json.JSONDecodeError
        raise JsonError(f"not valid JSON ({e})") from e
    refused = _refused_in(value)
    if refused is not None:
        raise JsonError(refused.reason, out_of_range=refused.out_of_range)
    if _SURROGATE_ESCAPE.search(text) is not None:
        _check_strings(value)
    return value


def loads_object(data: bytes | str) -> dict[str, Any]:
    """:func:`loads`, and the value must be an object (a JWT header or claims set, a JWK Set, a body)."""
    value = loads(data)
    if not isinstance(value, dict):
        raise JsonError("not a JSON object")
    return value


def is_text(value: object) -> TypeGuard[str]:
    """``value`` is a str UTF-8 can encode: no unpaired surrogate (RFC 8259 §8.2, RFC 3629 §3).

    For values a body parser other than :func:`loads` may have produced (``json.loads`` turns
    ``"\\ud800"`` into one): such a string would fail later, in a store or a log, as a server error.
    """
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def numeric_date(value: object) -> float | None:
    """``value`` as seconds if it is a NumericDate we accept (RFC 7519 §2, bounds above), else None.

    ``true`` is not a number even though Python says so; NaN, infinities, negative times and times
    after year 9999 are refused. Integers of any size are compared before they are converted.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if not 0 <= value <= MAX_NUMERIC_DATE:
        return None
    return float(value)


def split_uri(text: object) -> SplitResult | None:
    """``urlsplit(text)`` when ``text`` is a URI Python splits faithfully (RFC 3986 §2, §3), else None.

    None for non-strings, anything but printable ASCII (so ``urlsplit`` has no tab or newline to
    delete), brackets that do not make an IPv6 literal, and a port that is not a number up to 65535.
    """
    if not isinstance(text, str) or not _URI_CHARS.issuperset(text):
        return None
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError for ":abc" or ":99999"
    except ValueError:
        return None
    return parts


def absolute_uri(text: object) -> bool:
    """RFC 3986 §4.3 absolute URI with an authority and without a fragment (RFC 8707 §2 ``resource``)."""
    parts = split_uri(text)
    return parts is not None and bool(parts.scheme) and bool(parts.netloc) and not parts.fragment


def b64url_decode(part: str) -> bytes:
    """RFC 7515 §2 base64url without padding, strictly: its alphabet only, and canonical (no stray bits).

    A JWS part that decodes but is not the canonical encoding of its bytes would let two different
    tokens carry one meaning; both are refused alike, as ValueError. Canonical (RFC 4648 §3.5): the
    bits of the last character beyond the last whole byte are zero, so that character is one of
    :data:`_CANONICAL_LAST` for the length's remainder.
    """
    remainder = len(part) % 4
    if remainder == 1 or "+" in part or "/" in part or "=" in part or not part.isascii():
        raise ValueError("not base64url without padding")
    if remainder and part[-1] not in _CANONICAL_LAST[remainder]:
        raise ValueError("not canonical base64url")
    # base64url's two letters become base64's ("+", "/" were refused above, so none is taken for
    # one of them); strict mode refuses any other character outside the alphabet.
    try:
        return binascii.a2b_base64(
            part.encode("ascii").translate(_TO_STANDARD_ALPHABET) + _PADDING[remainder], strict_mode=True
        )
    except binascii.Error as e:
        raise ValueError("not base64url without padding") from e


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH before parsing: deep values break every recursive consumer
    later (``json.dumps`` into the audit log, policy context), not only the parser."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return
    depth = 0
    for match in _STRUCTURE.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > MAX_DEPTH:
                raise JsonError(f"JSON is nested too deeply (more than {MAX_DEPTH} levels)")
        elif token in ("]", "}"):
            depth -= 1


def _integer(text: str) -> int | _Refused:
    if (
        len(text.removeprefix("-")) <= _MAX_INTEGER_DIGITS
    ):  # int() of a bounded text: never slow, never raises
        value = int(text)
        if -MAX_INTEGER <= value <= MAX_INTEGER:
            return value
    return _Refused(f"integer {_excerpt(text)} is beyond ±(2^63 - 1)", out_of_range=True)


def _float(text: str) -> float | _Refused:
    value = float(text)  # float() takes any number of digits: it rounds, and overflows to inf
    if not math.isfinite(value):
        return _Refused(f"number {_excerpt(text)} is too large", out_of_range=True)
    return value


def _constant(name: str) -> _Refused:
    return _Refused(f"{name} is not valid JSON", out_of_range=False)


def _excerpt(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:10]}…({len(text)} digits)"


def _members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build an object, refusing duplicate names and refused numbers in its members (named)."""
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise JsonError("duplicate JSON member name", name)
        refused = _refused_in(value)
        if refused is not None:
            raise JsonError(refused.reason, name, out_of_range=refused.out_of_range)
        result[name] = value
    return result


def _fast_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object, in C (``dict``); a duplicate name shows as fewer members than pairs."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _Noticed
    return result


# Built once (json.loads with hooks builds a decoder per call); shared by threads, as json.loads's own is.
# ``scan_once`` (the C scanner, set by JSONDecoder.__init__, not in typeshed) answers (value, end).
_FAST_SCAN: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder(
    object_pairs_hook=_fast_members, parse_int=_integer, parse_float=_float, parse_constant=_constant
).scan_once  # type: ignore[attr-defined]


def _refused_in(value: Any) -> _Refused | None:
    """The first refused number in ``value`` or in its arrays (objects inside were checked when built)."""
    if type(value) is _Refused:
        return value
    if type(value) is not list:
        return None
    pending: list[list[Any]] = [value]
    while pending:
        for item in pending.pop():
            if type(item) is _Refused:
                return item
            if type(item) is list:
                pending.append(item)
    return None


def _check_strings(value: Any) -> None:
    """Refuse unpaired surrogates (RFC 8259 §8.2) in any string or member name; only run when escaped.

    The error names the member whose value (or name) holds one, so a body's refusal names its field.
    """
    pending: list[tuple[Any, str | None]] = [(value, None)]
    while pending:
        item, member = pending.pop()
        strings: list[tuple[str, str | None]] = []
        if isinstance(item, str):
            strings = [(item, member)]
        elif isinstance(item, dict):
            strings = [(name, None) for name in item]  # a bad name is not named back
            pending.extend((child, name) for name, child in item.items())
        elif isinstance(item, list):
            pending.extend((child, member) for child in item)
        for string, where in strings:
            try:
                string.encode("utf-8")
            except UnicodeEncodeError as e:
                shown = None if where is None else where.encode("ascii", "backslashreplace").decode("ascii")
                raise JsonError("a string holds an unpaired surrogate (RFC 8259 §8.2)", shown) from e
