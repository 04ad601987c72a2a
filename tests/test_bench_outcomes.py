"""The bench's check of a peer's answers when they cannot be matched to requests by id (Keycloak).

A server that does not echo ``X-Request-Id`` is loaded with wrk matching answers by status and body;
``bench.load.outcome_errors`` then compares, per outcome, answers with requests sent. A valid request
refused, or a refused one let through, must count as an error, whichever order wrk saw them in.
"""

from __future__ import annotations

from bench.load import outcome_errors
from bench.ours import PoolRequest

POOL = [
    PoolRequest("v1", "valid", 200, '"access_token"', "a"),
    PoolRequest("r1", "refused:expired", 400, '"invalid_client"', "b"),
    PoolRequest("r2", "refused:wrong_audience", 400, '"invalid_client"', "c"),
    PoolRequest("r3", "refused:no_client", 401, '"invalid_client"', "d"),
]


def test_every_answer_as_sent_is_no_error() -> None:
    sent = {"valid": 900, "refused:expired": 50, "refused:wrong_audience": 30, "refused:no_client": 20}
    # Kinds with one outcome are counted under the first of them: only the outcome's total matters.
    answered = {"valid": 900, "refused:expired": 80, "refused:no_client": 20}
    assert outcome_errors(POOL, answered, sent, in_flight=4) == 0


def test_requests_in_flight_at_the_end_are_allowed_up_to_two_per_connection() -> None:
    sent = {"valid": 908, "refused:expired": 80, "refused:no_client": 20}
    answered = {"valid": 900, "refused:expired": 80, "refused:no_client": 20}
    assert outcome_errors(POOL, answered, sent, in_flight=4) == 0
    assert outcome_errors(POOL, answered, sent, in_flight=3) == 2


def test_a_refused_request_answered_with_a_token_is_an_error() -> None:
    sent = {"valid": 900, "refused:expired": 80, "refused:no_client": 20}
    answered = {"valid": 905, "refused:expired": 75, "refused:no_client": 20}
    assert outcome_errors(POOL, answered, sent, in_flight=64) == 5


def test_a_valid_request_refused_is_an_error() -> None:
    sent = {"valid": 900, "refused:expired": 80, "refused:no_client": 20}
    answered = {"valid": 897, "refused:expired": 80, "refused:no_client": 23}
    assert outcome_errors(POOL, answered, sent, in_flight=64) == 3


def test_figures_by_n_keys_each_figure_by_n_as_the_json_does() -> None:
    from bench.load import LoadResult, Summary, figures_by_n

    def run(valid: int) -> LoadResult:
        return LoadResult(64, 10.0, valid + 10, valid, 10, 0, 1.0, 2.0, 3.0, 4.0, 0.1, 1.5)

    figures = figures_by_n({64: Summary((run(1000), run(3000), run(2000)))})
    assert figures["exchanges_per_s"] == {"64": 200.0}  # the median run
    assert figures["p99_ms"] == {"64": 3.0}
    assert set(figures) == {
        "exchanges_per_s",
        "p50_ms",
        "p99_ms",
        "error_rate",
        "server_cpu_us_per_request",
        "load",
    }


def test_peer_ratios_are_keyed_by_n_and_the_peer_figures_stay_so() -> None:
    """The authgent result spreads figures_by_n as they are (each keyed by N) beside the ratios; a
    loop variable once replaced them with the last N's scalars and the printed table failed."""
    from bench.load import LoadResult, Summary, figures_by_n
    from bench.run import ratios_by_n

    def run(n: int, valid: int, p99: float) -> LoadResult:
        return LoadResult(n, 10.0, valid, valid, 0, 0, 1.0, 2.0, p99, 4.0, 0.1, 1.5)

    theirs = figures_by_n({1: Summary((run(1, 300, 4.0),)), 64: Summary((run(64, 500, 0.0),))})
    ours = {"exchanges_per_s": {"1": 600.0, "64": 2500.0, "16": 1.0}, "p99_ms": {"1": 2.0, "64": 60.0, "16": 1.0}}
    assert ratios_by_n(ours, theirs) == {
        "1": {"exchanges_per_s": 20.0, "p99": 0.5},
        "64": {"exchanges_per_s": 50.0, "p99": None},  # theirs p99 0: no ratio, not a division error
    }
    assert theirs["exchanges_per_s"] == {"1": 30.0, "64": 50.0}
