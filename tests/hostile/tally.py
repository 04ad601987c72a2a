"""What the hostile suite saw over the session: cases tried, refusals that were not, and server errors.

Every check in :mod:`tests.hostile.attacker` reports here through :func:`note`; the conftest's autouse
fixture says which test is running, and ``pytest_terminal_summary`` prints :func:`summary`. A test
counts as one case when it made at least one check. Imports nothing of the project.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Tally:
    current: str | None = None
    tried: set[str] = field(default_factory=set)
    accepted: set[str] = field(default_factory=set)
    server_errors: set[str] = field(default_factory=set)
    hung: set[str] = field(default_factory=set)


TALLY = Tally()


def begin(nodeid: str) -> None:
    TALLY.current = nodeid


def end() -> None:
    TALLY.current = None


def note(*, accepted: bool = False, server_error: bool = False, hung: bool = False) -> None:
    """One check of the running case: was a refusal accepted, did the server fail (5xx) or hang?"""
    case = TALLY.current or "<outside a test>"
    TALLY.tried.add(case)
    if accepted:
        TALLY.accepted.add(case)
    if server_error:
        TALLY.server_errors.add(case)
    if hung:
        TALLY.hung.add(case)


def summary() -> str:
    return (
        f"hostile suite: {len(TALLY.tried)} cases tried, {len(TALLY.accepted)} accepted wrongly, "
        f"{len(TALLY.server_errors)} 5xx, {len(TALLY.hung)} hung"
    )
