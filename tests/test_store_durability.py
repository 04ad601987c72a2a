"""Issue 16 in the store itself: durable security writes, the store epoch, TLS and ACL credentials.

Every test runs real ``redis-server`` processes (``tests/redis_server.py``) on loopback. The STS-level
scenarios (two ``sts serve`` replicas, Sentinel failover, FLUSHALL, load) are in
``test_store_durability_http.py`` and ``test_store_durability_load.py``.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sts.config import StoreSettings, load_settings, store_settings
from sts.errors import ConfigError
from sts.store import (
    RedisOptions,
    StoreLost,
    StoreUnavailable,
    SubjectRevocation,
    TaskRecord,
    TaskTarget,
    tolerating_store_loss,
)
from sts.store.epoch import CLOCK_SKEW_SECONDS, EPOCH_KEY, GEN_KEY, KILLS_KEY, EpochRecord
from sts.store.factory import open_store
from sts.store.redis_connect import parse_sentinel_url
from sts.store.redis_durable import DurableRedisStore
from sts.store.redis_store import RedisStore
from tests.redis_server import HOST, RedisServer

AGENT = "spiffe://example.org/agent/researcher"
KILLED = "spiffe://example.org/agent/compromised"
ADMIN = "spiffe://example.org/ops/sts-admin"


def store_on(url: str, events: list[dict[str, Any]] | None = None, **options: Any) -> DurableRedisStore:
    opened = open_store(url, redis=RedisOptions(**options), report=None if events is None else events.append)
    assert isinstance(opened, DurableRedisStore)
    return opened


def wait_until(condition: Any, timeout: float = 3.0, step: float = 0.02) -> float:
    """Seconds until ``condition()`` holds; fails after ``timeout``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        time.sleep(step)
    return time.monotonic() - started


def kill(store: DurableRedisStore, spiffe_id: str = KILLED) -> None:
    now = int(time.time())
    store.revoke_subject(SubjectRevocation(spiffe_id, now, None, ADMIN, "compromised"), keep_until=None)


def a_task(task_id: str = "task-1") -> TaskRecord:
    now = int(time.time())
    return TaskRecord(
        id=task_id,
        creator=ADMIN,
        assignee=AGENT,
        targets=(TaskTarget("tool:web-search", frozenset({"invoke"})),),
        purpose="research",
        created_at=now,
        deadline=now + 600,
    )


@pytest.fixture
def single(tmp_path: Path) -> Iterator[RedisServer]:
    """One Redis with appendonly yes; every start empty (a pod whose volume did not survive)."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    """A primary and its replica, both with appendonly yes."""
    primary = RedisServer(tmp_path / "primary", keep_data=True)
    replica = RedisServer(tmp_path / "replica", keep_data=True, replica_of=primary)
    with primary, replica:
        replica.wait_replicated()
        yield primary, replica


# ------------------------------------------------------------------------------- durable security writes


def test_security_writes_are_on_the_replica_when_answered(pair: tuple[RedisServer, RedisServer]) -> None:
    primary, replica = pair
    store = store_on(primary.url)
    assert store.check_durability() is None
    store.create_task(a_task())
    store.revoke_jti("jti-1", expires_at=int(time.time()) + 300)
    kill(store)
    store.complete_task("task-1", at=int(time.time()), by=ADMIN)
    assert store.durability() == "replica"
    # WAIT 1 answered before we did: the replica has every security write at this very moment.
    on_replica = replica.client()
    assert on_replica.get("sts:jti:jti-1") is not None
    assert on_replica.get(f"sts:subject:{KILLED}") is not None
    assert on_replica.get("sts:task-done:task-1") is not None
    assert int(on_replica.get(GEN_KEY) or 0) >= 3
    store.close()


def test_a_write_no_replica_confirms_is_not_acknowledged(tmp_path: Path) -> None:
    primary = RedisServer(tmp_path / "primary", appendonly=False)
    replica = RedisServer(tmp_path / "replica", appendonly=False, replica_of=primary)
    with primary, replica:
        replica.wait_replicated()
        store = store_on(primary.url)
        assert store.check_durability() is None  # a replica: WAIT will make writes durable
        kill(store)  # confirmed by the replica within store.redis.wait_timeout
        replica.stop()  # no replica left, and no AOF on the primary
        with pytest.raises(StoreUnavailable) as refused:
            store.revoke_jti("jti-2", expires_at=int(time.time()) + 300)
        assert "store.redis.require_durability" in str(refused.value.detail)
        assert store.check_durability() is not None
        lenient = store_on(primary.url, wait_timeout=0.2, require_durability=False)
        lenient.revoke_jti("jti-3", expires_at=int(time.time()) + 300)  # warned about, accepted
        store.close()
        lenient.close()


def test_without_a_replica_the_aof_makes_writes_durable(single: RedisServer) -> None:
    store = store_on(single.url)
    assert store.check_durability() is None
    kill(store)
    assert store.durability() == "aof"
    assert store.condition().warnings == ()
    store.close()


def test_start_check_names_the_redis_setting(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", appendonly=False) as server:
        store = store_on(server.url)
        problem = store.check_durability()
        assert problem is not None
        assert "no replica" in problem
        assert "appendonly yes" in problem
        store.close()


def test_an_evicting_redis_is_refused(tmp_path: Path) -> None:
    extra = ["--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"]
    with RedisServer(tmp_path / "redis", extra=extra) as server:
        store = store_on(server.url)
        problem = store.check_durability()
        assert problem is not None and "maxmemory-policy noeviction" in problem
        assert any("may lose revocations" in w for w in store.condition().warnings)
        store.close()


def test_an_unreachable_redis_is_checked_later(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer(tmp_path / "redis")
    store = store_on(server.url)  # never started
    with caplog.at_level(logging.WARNING):
        assert store.check_durability() is None
    assert "checked again once it answers" in caplog.text
    store.close()


# ------------------------------------------------------------------------------- the store epoch


def test_flushall_is_a_loss_every_store_sees_within_a_second(single: RedisServer) -> None:
    events: list[dict[str, Any]] = []
    one, two = store_on(single.url, events), store_on(single.url, events)
    kill(one)
    for store in (one, two):
        assert store.subject_revocation(AGENT) is None  # both know the epoch now
    assert two.subject_revocation(KILLED) is not None
    time.sleep(0.7)  # the monitors have mirrored the kill list
    issued_at = int(time.time())

    single.client().flushall()
    flushed = time.monotonic()
    wait_until(lambda: one.condition().lost and two.condition().lost, timeout=1.0)
    print(f"both stores saw the FLUSHALL after {time.monotonic() - flushed:.3f} s")

    for store in (one, two):
        with pytest.raises(StoreLost):
            store.subject_revocation(AGENT)
        with pytest.raises(StoreLost):
            store.issuance_checks(AGENT)  # what every exchange reads: refused as the kill switch is
        with pytest.raises(StoreLost):
            store.count_in_window(f"rate:{AGENT}", window=1, now=time.time())
        with pytest.raises(StoreLost):
            store.lease_in_window(f"rate:{AGENT}", want=1, limit=20, window=1, now=time.time())
        # Every token issued before is cut off (introspection: inactive), whatever the store now holds.
        state = store.token_state("jti-any", None, AGENT)
        assert state.subject_revocation is not None and state.subject_revocation.revoked_at >= issued_at
        with tolerating_store_loss():  # what the acknowledging admin's authentication reads
            assert store.subject_revocation(AGENT) is None
            assert store.subject_revocation(KILLED) is not None  # re-asserted from memory
    condition = one.condition()
    assert condition.lost_gauge == 1
    assert condition.loss is not None and condition.loss.cause == "vanished"
    assert "sts admin store-loss ack" in condition.warnings[0]
    losses = [e for e in events if e["event"] == "store_loss"]
    assert len(losses) == 2 and sum(e["detected_here"] for e in losses) == 1
    assert sum(e["reasserted_kill_switches"] for e in losses) >= 1

    loss = one.acknowledge_loss(by=ADMIN, reason="flushed by mistake", at=int(time.time()))
    assert loss is not None and loss.acknowledged_by == ADMIN
    assert one.acknowledge_loss(by=ADMIN, reason="again", at=int(time.time())) is None
    wait_until(lambda: not two.condition().lost, timeout=CLOCK_SKEW_SECONDS + 3)
    assert int(time.time()) > loss.not_before  # a token issued now lives
    for store in (one, two):
        assert store.count_in_window(f"rate:{AGENT}", window=1, now=time.time()) >= 1
        assert store.lease_in_window(f"rate:{AGENT}", want=1, limit=10**6, window=1, now=time.time()) == 1
        assert store.subject_revocation(AGENT) is None
        assert store.subject_revocation(KILLED) is not None  # killed workloads stay killed
        state = store.token_state("jti-any", None, AGENT)
        revocation = state.subject_revocation
        assert revocation is not None and revocation.until is not None  # not blocking: new tokens live
        assert issued_at <= revocation.revoked_at < int(time.time())
    one.close()
    two.close()


def test_a_redis_restarted_without_its_data_is_a_loss(single: RedisServer) -> None:
    store = store_on(single.url)
    store.revoke_jti("jti-1", expires_at=int(time.time()) + 300)
    assert store.subject_revocation(AGENT) is None
    single.restart()  # appendonly yes, but an empty volume
    wait_until(lambda: store.condition().lost)
    assert store.condition().loss is not None
    store.close()


def test_a_redis_restarted_from_its_aof_is_not_a_loss(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", keep_data=True) as server:
        store = store_on(server.url)
        store.revoke_jti("jti-1", expires_at=int(time.time()) + 300)
        kill(store)
        server.restart()
        assert store.subject_revocation(KILLED) is not None
        assert store.token_state("jti-1", None, AGENT).jti_revoked
        time.sleep(0.7)
        assert not store.condition().lost
        store.close()


def test_a_replaced_redis_is_a_loss(single: RedisServer) -> None:
    store = store_on(single.url)
    assert store.subject_revocation(AGENT) is None
    before = store.condition().epoch
    foreign = EpochRecord("f" * 32, time.time(), None, None, None, ()).to_json()
    single.client().set(EPOCH_KEY, foreign)  # another STS deployment's store behind the same address
    with pytest.raises(StoreLost):
        store.subject_revocation(AGENT)
    loss = store.condition().loss
    assert loss is not None and loss.cause == "replaced" and loss.previous == before
    record = EpochRecord.parse(single.client().get(EPOCH_KEY) or b"")
    assert record is not None and {before, "f" * 32} <= set(record.lineage)
    store.close()


def test_a_rolled_back_store_is_a_loss(single: RedisServer) -> None:
    store = store_on(single.url)
    assert store.subject_revocation(AGENT) is None
    kill(store)
    store.revoke_jti("jti-1", expires_at=int(time.time()) + 300)
    # An older copy of the same store (a backup, a replica that missed writes): same epoch, fewer writes.
    single.client().set(GEN_KEY, 1)
    wait_until(lambda: store.condition().lost)
    loss = store.condition().loss
    assert loss is not None and loss.cause == "rolled back"
    store.close()


def test_every_process_converges_on_one_epoch(single: RedisServer) -> None:
    knew = [store_on(single.url) for _ in range(2)]
    for store in knew:
        assert store.subject_revocation(AGENT) is None
    lost = knew[0].condition().epoch
    single.client().flushall()
    fresh = store_on(single.url)  # started after the flush: to it an empty store is a new one
    assert fresh.subject_revocation(AGENT) is None
    genesis = fresh.condition().epoch
    stores = [*knew, fresh]
    wait_until(lambda: len({s.condition().epoch for s in stores}) == 1 and all(s.condition().lost for s in stores))
    record = EpochRecord.parse(single.client().get(EPOCH_KEY) or b"")
    assert record is not None and record.loss is not None
    assert {lost, genesis} <= set(record.lineage)
    time.sleep(1.2)  # and it stays that way: nobody replaces a record that names its own epoch
    assert {s.condition().epoch for s in stores} == {record.id}
    for store in stores:
        store.close()


def test_a_process_started_during_a_loss_refuses_too(single: RedisServer) -> None:
    one = store_on(single.url)
    assert one.subject_revocation(AGENT) is None
    single.client().flushall()
    wait_until(lambda: one.condition().lost)
    late = store_on(single.url)
    with pytest.raises(StoreLost):
        late.subject_revocation(AGENT)
    one.acknowledge_loss(by=ADMIN, reason="ok", at=int(time.time()))
    wait_until(lambda: not late.condition().lost, timeout=CLOCK_SKEW_SECONDS + 3)
    assert late.subject_revocation(AGENT) is None
    one.close()
    late.close()


def test_genesis_on_an_empty_store_ends_older_tokens(single: RedisServer) -> None:
    store = store_on(single.url)
    assert store.subject_revocation(AGENT) is None
    condition = store.condition()
    assert not condition.lost and condition.loss is None
    assert 0 < condition.not_before < time.time() - 1
    state = store.token_state("jti", None, AGENT)
    assert state.subject_revocation is not None and state.subject_revocation.revoked_at == condition.not_before
    store.close()


def test_genesis_over_existing_data_indexes_its_kill_switches(single: RedisServer) -> None:
    # The store of an STS before issue 16: kill switches, no epoch.
    old = RedisStore(single.url)
    old.revoke_subject(SubjectRevocation(KILLED, int(time.time()), None, ADMIN, "x"), keep_until=None)
    old.close()
    store = store_on(single.url)
    assert store.subject_revocation(KILLED) is not None
    assert store.condition().not_before == 0  # an upgrade: tokens issued before stay valid
    assert single.client().hexists(KILLS_KEY, KILLED)
    store.close()


def test_single_use_keys_from_before_a_loss_are_replays(single: RedisServer) -> None:
    store = store_on(single.url)
    assert store.subject_revocation(AGENT) is None
    before = int(time.time())
    single.client().flushall()
    wait_until(lambda: store.condition().lost)
    # A DPoP proof made before the loss (remembered until iat + 120 s) may have been used: refused.
    assert not store.use_once("dpop:proof-from-before", expires_at=before + 120)
    assert store.use_once("dpop:a-new-proof", expires_at=store.condition().not_before + 121)
    store.close()


def test_the_epoch_check_costs_no_round_trip(single: RedisServer) -> None:
    """A micro-benchmark: the epoch rides in the MGET of the kill-switch read and introspection."""
    plain, durable = RedisStore(single.url), store_on(single.url)
    for store in (plain, durable):
        store.subject_revocation(AGENT)
        store.token_state("jti", "task-1", AGENT)
    stats = single.client()
    stats.config_resetstat()
    rounds = 2000
    timings = {}
    for name, store in (("RedisStore", plain), ("DurableRedisStore", durable)):
        started = time.perf_counter()
        for _ in range(rounds):
            store.subject_revocation(AGENT)
        timings[f"{name}.subject_revocation"] = (time.perf_counter() - started) / rounds * 1e6
        started = time.perf_counter()
        for _ in range(rounds):
            store.token_state("jti", "task-1", AGENT)
        timings[f"{name}.token_state"] = (time.perf_counter() - started) / rounds * 1e6
    calls = {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.info("commandstats").items()
    }
    print("\nµs per call (loopback, one client): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"commands the server ran: {calls}")
    # One command per call for both; the monitor adds its own few (mget every 0.5 s, role, config).
    assert rounds <= calls.get("get", 0) < rounds + 50  # the plain store's GET of the kill switch
    assert calls["mget"] >= 3 * rounds  # plain token_state, durable subject_revocation and token_state
    assert calls["mget"] < 3 * rounds + 50
    plain.close()
    durable.close()


# ------------------------------------------------------------------------------- reaching Redis


def test_a_url_naming_a_replica_is_refused(pair: tuple[RedisServer, RedisServer]) -> None:
    _, replica = pair
    store = store_on(replica.url)
    with pytest.raises(StoreUnavailable) as refused:
        store.subject_revocation(AGENT)
    assert "not the primary" in str(refused.value.detail)
    store.close()


STS_ACL = "on ~sts:* resetchannels -@all +@read +@write +@scripting +@transaction +@connection +info +role +wait +config|get +ping"


def test_acl_user_with_a_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text("first-secret\n")
    acl = ["--user", "default", "off", "--user", "sts", *STS_ACL.split(), ">first-secret", ">second-secret"]
    with RedisServer(tmp_path / "redis", extra=acl) as server:
        store = store_on(server.url, username="sts", password_file=secret)
        assert store.check_durability() is None  # INFO, ROLE and CONFIG GET are in the ACL above
        kill(store)
        assert store.subject_revocation(KILLED) is not None
        assert store.condition().durability == "aof"
        secret.write_text("second-secret\n")  # a rotated Secret: read again on the next connection
        store._redis.connection_pool.disconnect()
        assert store.subject_revocation(KILLED) is not None
        secret.write_text("wrong\n")
        store._redis.connection_pool.disconnect()
        with pytest.raises(StoreUnavailable):
            store.subject_revocation(KILLED)
        store.close()


def _tls_files(directory: Path) -> tuple[Path, Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test redis CA")])
    now = datetime.datetime.now(datetime.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
        .issuer_name(name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = directory / "ca.pem", directory / "redis.pem", directory / "redis.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return ca_file, cert_file, key_file


def test_tls_with_a_ca_file(tmp_path: Path) -> None:
    ca, cert, key = _tls_files(tmp_path / "tls")
    tls_port = RedisServer(tmp_path / "unused").port
    tls = [
        "--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--port", "0",
    ]  # fmt: skip
    server = RedisServer(tmp_path / "redis", port=tls_port, extra=tls)  # the last --port wins: TLS only
    server.tls = True
    with server:
        url = f"rediss://{HOST}:{tls_port}/0"
        store = store_on(url, tls_ca_file=ca)
        assert store.check_durability() is None
        kill(store)
        assert store.subject_revocation(KILLED) is not None
        store.close()
        untrusted = store_on(url)  # the system CAs do not know this one
        with pytest.raises(StoreUnavailable):
            untrusted.subject_revocation(KILLED)
        untrusted.close()


# ------------------------------------------------------------------------------- URLs and settings


def test_sentinel_url_grammar() -> None:
    parsed = parse_sentinel_url("redis+sentinel://sts:pw@s1:26380,s2,[::1]:26381/prod/2")
    assert parsed.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert (parsed.master, parsed.db, parsed.tls, parsed.username, parsed.password) == ("prod", 2, False, "sts", "pw")
    assert parse_sentinel_url("rediss+sentinel://s1").master is None
    assert parse_sentinel_url("rediss+sentinel://s1").tls
    for bad, message in (
        ("redis+sentinel:///mymaster/0", "no Sentinel host"),
        ("redis+sentinel://s1:port/m", "valid port"),
        ("redis+sentinel://s1/m/zero", "must be a number"),
        ("redis+sentinel://s1/m/0/x", "path"),
        ("redis+sentinel://s1/m?x=1", "no query"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_sentinel_url(bad)
        with pytest.raises(ValueError, match=message):
            open_store(bad)


def _settings(tmp_path: Path, store: str, environ: dict[str, str] | None = None) -> StoreSettings:
    config = tmp_path / "sts.yaml"
    config.write_text(f"store: {store}\n")
    return store_settings(load_settings(config, environ=environ or {}))


def test_store_redis_settings(tmp_path: Path) -> None:
    default = _settings(tmp_path, "{url: 'redis://r:6379/0'}")
    assert default == "redis://r:6379/0" and default.url == "redis://r:6379/0"
    assert default.redis.require_durability and default.redis.wait_timeout == 2
    assert default.redis.master_name == "mymaster"
    listed = _settings(
        tmp_path,
        "{redis: {sentinels: ['s1:26379', s2], master_name: prod, username: sts, password_file: pw,"
        " tls_ca_file: ca.pem, require_durability: false, wait_timeout: 3s}}",
    )
    assert listed == "redis+sentinel://s1:26379,s2/prod/0"
    assert listed.redis.password_file == tmp_path / "pw"
    assert listed.redis.tls_ca_file == tmp_path / "ca.pem"
    assert (listed.redis.username, listed.redis.require_durability, listed.redis.wait_timeout) == ("sts", False, 3)
    tls = _settings(tmp_path, "{url: 'rediss+sentinel:///prod/1', redis: {sentinels: [s1]}}")
    assert tls == "rediss+sentinel://s1/prod/1"
    assert _settings(tmp_path, "{url: 'redis+sentinel://a,b/m/0'}") == "redis+sentinel://a,b/m/0"


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("{url: 'redis://r/0', redis: {sentinels: [s1]}}", "give the Sentinels once"),
        ("{url: 'redis+sentinel://s9/m/0', redis: {sentinels: [s1]}}", "give the Sentinels once"),
        ("{redis: {sentinels: ['s1:x']}}", r"'store.redis.sentinels\[0\]' must be host:port"),
        ("{redis: {master_name: 'a b'}}", "'store.redis.master_name' must be a Sentinel master name"),
        ("{redis: {wait_timeout: 2m}}", "at most 60 seconds"),
        ("{redis: {require_durability: 'yes'}}", "must be true or false"),
        ("{redis: {pasword_file: x}}", "did you mean 'password_file'"),
        ("{url: 'redis://:pw@r/0', redis: {password_file: x}}", "give it once"),
        ("{url: 'redis+sentinel:///m/0'}", "must name the Sentinels"),
    ],
)
def test_store_redis_settings_refused(tmp_path: Path, store: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _settings(tmp_path, store)


def test_a_password_in_the_configuration_file_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sts.config"):
        _settings(tmp_path, "{url: 'redis://:secret@r/0'}")
    assert "store.redis.password_file" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sts.config"):  # from a Secret: fine
        _settings(tmp_path, "{}", environ={"STS_STORE_URL": "redis://:secret@r/0"})
    assert "password" not in caplog.text


def test_the_epoch_record_is_json_anyone_can_read(single: RedisServer) -> None:
    store = store_on(single.url)
    store.subject_revocation(AGENT)
    record = json.loads(single.client().get(EPOCH_KEY) or b"{}")
    assert set(record) == {"id", "created_at", "not_before", "loss", "acknowledged", "lineage"}
    assert record["id"] == store.condition().epoch
    store.close()


def test_closing_stops_the_monitor(single: RedisServer) -> None:
    store = store_on(single.url)
    store.ping()
    monitor = store._monitor
    assert monitor is not None and monitor.is_alive()
    store.close()
    assert not monitor.is_alive()


# ------------------------------------------------------------------------------- the Helm chart


SENTINEL_VALUES: dict[str, Any] = {
    "replicaCount": 3,
    "config": {"issuer": "https://sts.example.org"},
    "signingKeys": {"existingSecret": "sts-signing-keys"},
    "audit": {"stdout": True},
    "redis": {
        "sentinels": ["redis-sentinel-0.redis:26379", "redis-sentinel-1.redis:26379", "redis-sentinel-2.redis"],
        "masterName": "sts",
        "tls": True,
        "caSecret": "redis-ca",
        "username": "sts",
        "passwordSecret": "sts-redis",
        "sentinelPasswordSecretKey": "sentinel-password",
        "requireDurability": False,
        "waitTimeout": 3,
    },
}


def test_the_chart_passes_the_redis_settings(tmp_path: Path) -> None:
    import jsonschema
    import yaml

    from tests.test_deploy import CHART, NAMESPACE, RELEASE, helm, load_pod_config, load_yaml, merge_values

    values = merge_values(load_yaml(CHART / "values.yaml"), SENTINEL_VALUES)
    jsonschema.Draft7Validator(json.loads((CHART / "values.schema.json").read_text())).validate(values)
    overrides = tmp_path / "values.yaml"
    overrides.write_text(yaml.safe_dump(SENTINEL_VALUES))
    lint = helm(tmp_path, "lint", "--strict", str(CHART), "-f", str(overrides))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    rendered = helm(tmp_path, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "-f", str(overrides))
    assert rendered.returncode == 0, rendered.stderr
    documents = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    config = yaml.safe_load(next(d for d in documents if d["kind"] == "ConfigMap")["data"]["config.yaml"])
    assert config["store"] == {
        "url": "rediss+sentinel:///sts/0",
        "redis": {
            "sentinels": SENTINEL_VALUES["redis"]["sentinels"],
            "master_name": "sts",
            "username": "sts",
            "password_file": "/run/sts/redis/password",
            "sentinel_password_file": "/run/sts/redis/sentinel-password",
            "tls_ca_file": "/run/sts/redis-ca/ca.pem",
            "require_durability": False,
            "wait_timeout": 3,
        },
    }
    settings = load_pod_config(config, values["policies"], tmp_path, secret_store_url=False)
    stored = store_settings(settings)
    assert stored == "rediss+sentinel://redis-sentinel-0.redis:26379,redis-sentinel-1.redis:26379,redis-sentinel-2.redis/sts/0"
    assert stored.redis.password_file == Path("/run/sts/redis/password")
    pod = next(d for d in documents if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["redis-auth"] == "/run/sts/redis" and mounts["redis-ca"] == "/run/sts/redis-ca"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert [i["path"] for i in volumes["redis-auth"]["secret"]["items"]] == ["password", "sentinel-password"]
    for bad, message in (
        ({"redis": {"url": "redis://r/0"}}, "not both"),
        ({"replicaCount": 1, "redis": {"sentinels": [], "tls": True}}, "redis.tls applies to redis.sentinels"),
    ):
        wrong = tmp_path / "wrong.yaml"
        wrong.write_text(yaml.safe_dump(merge_values(SENTINEL_VALUES, bad)))
        refused = helm(tmp_path, "template", RELEASE, str(CHART), "-f", str(wrong), "--skip-schema-validation")
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr
