"""The anonymous-refusal limit (``limits.anonymous_refusals_per_minute``, issue 11) on a server set to 20.

Refused requests that never authenticated are counted per source address; past the limit they get
429 with ``Retry-After``. The limit must not lock out workloads: a valid exchange from the very same
address keeps getting its token while the flood goes on.
"""

from __future__ import annotations

from tests.hostile import tally
from tests.hostile.attacker import form, http
from tests.hostile.conftest import World

LIMIT = 20


def test_flood_of_anonymous_refusals_gets_429_but_workloads_keep_working(limited: World) -> None:
    answers = [
        http("POST", f"{limited.url}/token", data=form(f"garbage-{i}", audience="tool:calc", scope="invoke"))
        for i in range(3 * LIMIT)
    ]
    statuses = [a.status for a in answers]
    tally.note(
        accepted=any(s is not None and s < 300 for s in statuses),
        server_error=any(s is not None and s >= 500 for s in statuses),
    )
    assert set(statuses) <= {400, 429}, statuses
    limited_answers = [a for a in answers if a.status == 429]
    assert len(limited_answers) >= LIMIT, statuses  # the last third at least is over any per-minute count of 20
    assert statuses[-1] == 429, statuses
    for answer in limited_answers:
        assert int(answer.headers.get("Retry-After", "0")) >= 1, answer.headers
    valid = limited.exchange()
    assert valid.status_code == 200, valid.text
    assert http("GET", f"{limited.url}/healthz").status == 200
