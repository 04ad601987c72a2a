"""``application/x-www-form-urlencoded`` bodies, decoded strictly (RFC 6749 Appendix B).

RFC 6749 Appendix B: a name or value is its UTF-8 octets, percent-encoded, with ``+`` for a space.
The fields are split on ``&`` only and each field on its first ``=``, as the WHATWG URL standard's
*urlencoded parser* (§5.1) and ``urllib.parse.parse_qsl`` do; an empty field is skipped and a field
without ``=`` is a name with an empty value.

Why not ``parse_qsl``: it replaces percent-encoded octets that are not UTF-8 with U+FFFD, so a value the
client got wrong silently becomes a different value; here such a body is refused (``invalid_request``),
as a body that is not UTF-8 already was. Everything ``parse_qsl`` decodes without a replacement, this
decodes to the same names and values (a property test holds the two together). It is also the cheaper
of the two on the token endpoint's hot path: a field without ``%`` or ``+`` (a JWT-SVID, ``scope``) is
used as it is, and the few short percent-encoded values every request repeats (the grant and token
type URNs) are decoded once and remembered, in a bounded cache.
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import unquote_to_bytes

from sts.errors import InvalidRequest

# Percent-encoded fields at most this long are remembered (the URNs of RFC 8693 are ~60 characters);
# longer ones are decoded each time. At most CACHED_FIELDS of them, least recently used first out.
MAX_CACHED_FIELD_CHARS = 128
CACHED_FIELDS = 256


def decode_form(text: str) -> dict[str, list[str]]:
    """The fields of a urlencoded ``text`` (already decoded from UTF-8), each name's values in order.

    Raises :class:`InvalidRequest` when a percent-encoded name or value is not UTF-8.
    """
    form: dict[str, list[str]] = {}
    for field in text.split("&"):
        if not field:
            continue
        name, _, value = field.partition("=")
        name = _decode(name)
        value = _decode(value)
        values = form.get(name)
        if values is None:
            form[name] = [value]
        else:
            values.append(value)
    return form


def _decode(encoded: str) -> str:
    if "+" in encoded:
        encoded = encoded.replace("+", " ")
    if "%" not in encoded:
        return encoded
    if len(encoded) <= MAX_CACHED_FIELD_CHARS:
        return _percent_decoded_cached(encoded)
    return _percent_decoded(encoded)


def _percent_decoded(encoded: str) -> str:
    """``%XX`` to its octet, then strict UTF-8; a ``%`` not followed by two hex digits stays as it is."""
    try:
        return unquote_to_bytes(encoded).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not UTF-8 once percent-decoded") from None


_percent_decoded_cached = lru_cache(maxsize=CACHED_FIELDS)(_percent_decoded)
