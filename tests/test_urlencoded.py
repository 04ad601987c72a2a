"""The urlencoded form decoder (RFC 6749 Appendix B): the same fields as ``urllib.parse.parse_qsl``
wherever that decodes without a replacement character, a refusal where it would have substituted
U+FFFD, and the real server answering a fully percent-encoded request and refusing a value that is
not UTF-8 once decoded."""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from sts.errors import InvalidRequest
from sts.web.http import FORM_CONTENT_TYPE, parse_form
from sts.web.urlencoded import CACHED_FIELDS, MAX_CACHED_FIELD_CHARS, _percent_decoded_cached, decode_form
from tests.authority import TestAuthority
from tests.conftest import RunningServer

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
AGENT = "spiffe://example.org/agent/researcher"


def parse_qsl_form(text: str) -> dict[str, list[str]]:
    """What the server used before: the standard library's parser, values grouped by name."""
    form: dict[str, list[str]] = {}
    for name, value in parse_qsl(text, keep_blank_values=True, strict_parsing=False):
        form.setdefault(name, []).append(value)
    return form


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ("", {}),
        ("&&&", {}),
        ("=", {"": [""]}),
        ("grant_type", {"grant_type": [""]}),
        ("a=1&a=2&b=", {"a": ["1", "2"], "b": [""]}),
        ("a=x=y", {"a": ["x=y"]}),  # split on the first '=' only
        ("a=1;b=2", {"a": ["1;b=2"]}),  # '&' is the only separator
        ("scope=read+write", {"scope": ["read write"]}),
        ("scope=read%2Bwrite", {"scope": ["read+write"]}),  # an encoded '+' is a plus
        ("a%3Db=c", {"a=b": ["c"]}),  # names are decoded too
        ("t=%C3%A9t%C3%A9", {"t": ["été"]}),
        ("t=été", {"t": ["été"]}),  # already UTF-8 in the body
        ("t=%zz%4", {"t": ["%zz%4"]}),  # '%' without two hex digits stays as it is
        ("t=%F0%9F%98%80", {"t": ["\U0001f600"]}),
    ],
)
def test_decodes_as_the_standard_parser_does(text: str, fields: dict[str, list[str]]) -> None:
    assert decode_form(text) == fields == parse_qsl_form(text)


@pytest.mark.parametrize(
    "text",
    [
        "subject_token=%ff%fe",  # not UTF-8 at all
        "t=%C3",  # a truncated two-octet sequence
        "t=%C3t",  # a lead octet followed by an ASCII character
        "t=%ED%A0%80",  # an encoded surrogate (not a scalar value, RFC 3629 §3)
        "t=%C0%AF",  # an overlong '/'
        "%ff=1",  # in a name
        "t=" + "%ff" * 100,  # too long for the cache: decoded and refused all the same
    ],
)
def test_refuses_what_the_standard_parser_would_replace(text: str) -> None:
    assert "\ufffd" in str(parse_qsl_form(text))  # parse_qsl would have handed on a different value
    with pytest.raises(InvalidRequest, match="not UTF-8 once percent-decoded"):
        decode_form(text)


# Pieces a urlencoded body is made of, well and badly formed, so that the generated bodies reach
# every branch: separators, plus signs, valid and broken percent sequences, non-ASCII text.
PIECES = st.one_of(
    st.sampled_from(
        ["&", "=", "+", "%", "%2", "%zz", "%41", "%2B", "%26", "%3D", "%C3%A9", "%C3", "%A9", "%ff",
         "%F0%9F%98%80", "%ED%A0%80", "%E2%80%A8", "%00", "\ufffd", "é", "grant_type", "scope"]
    ),
    st.text(max_size=6),
    st.binary(max_size=6).map(lambda octets: "".join(f"%{b:02x}" for b in octets)),
)  # fmt: skip


@settings(max_examples=500, deadline=None, database=None)
@given(st.lists(PIECES, max_size=24).map("".join))
def test_agrees_with_parse_qsl_or_refuses_what_it_would_replace(text: str) -> None:
    expected = parse_qsl_form(text)
    try:
        decoded = decode_form(text)
    except InvalidRequest:
        assert "\ufffd" in str(expected)
    else:
        assert decoded == expected


def test_the_cache_is_bounded_and_long_fields_bypass_it() -> None:
    _percent_decoded_cached.cache_clear()
    for index in range(CACHED_FIELDS * 3):
        assert decode_form(f"a=%41{index}") == {"a": [f"A{index}"]}
    info = _percent_decoded_cached.cache_info()
    assert info.currsize == CACHED_FIELDS and info.maxsize == CACHED_FIELDS
    long_value = "%41" * (MAX_CACHED_FIELD_CHARS // 3 + 1)
    assert decode_form(f"a={long_value}") == {"a": ["A" * (MAX_CACHED_FIELD_CHARS // 3 + 1)]}
    assert _percent_decoded_cached.cache_info().misses == info.misses  # not looked up, not stored
    # A refusal is not remembered as a value: the same bad field is refused again.
    for _ in range(2):
        with pytest.raises(InvalidRequest):
            decode_form("a=%ff")


def test_parse_form_refuses_a_body_that_is_not_utf8_before_decoding() -> None:
    with pytest.raises(InvalidRequest, match="not UTF-8"):
        parse_form(b"a=\xe9", FORM_CONTENT_TYPE, "")


def _every_octet_encoded(value: str) -> str:
    return "".join(f"%{octet:02X}" for octet in value.encode())


def test_the_server_answers_a_fully_percent_encoded_request(
    server: RunningServer, example_org: TestAuthority
) -> None:
    fields = {
        "grant_type": GRANT,
        "subject_token": example_org.mint(AGENT, server.issuer),
        "subject_token_type": JWT_TYPE,
        "audience": "tool:web-search",
        "scope": "invoke",
    }
    body = "&".join(f"{_every_octet_encoded(k)}={_every_octet_encoded(v)}" for k, v in fields.items())
    response = requests.post(
        f"{server.url}/token", data=body, headers={"Content-Type": FORM_CONTENT_TYPE}, timeout=10
    )
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "invoke"


def test_the_server_refuses_a_value_that_is_not_utf8_once_decoded(
    server: RunningServer, example_org: TestAuthority
) -> None:
    svid = example_org.mint(AGENT, server.issuer)
    body = f"grant_type={GRANT}&subject_token_type={JWT_TYPE}&audience=tool%3Aweb-search&subject_token=%C3{svid}"
    response = requests.post(
        f"{server.url}/token", data=body, headers={"Content-Type": FORM_CONTENT_TYPE}, timeout=10
    )
    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid_request",
        "error_description": "the request body is not UTF-8 once percent-decoded",
    }
