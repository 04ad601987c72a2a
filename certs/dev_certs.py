"""Development trust material: a JWT-SVID signing key and SPIFFE bundle per demo trust domain.

Writes ``certs/dev/<td>.key.pem`` (0600, never committed) and ``certs/dev/<td>.bundle.json`` (the
SPIFFE bundle format SPIRE publishes), and mints JWT-SVIDs from those keys so the example server can
be tried by hand before the development Workload API exists:

    python certs/dev_certs.py init
    python certs/dev_certs.py svid spiffe://example.org/agent/researcher --audience http://127.0.0.1:8443
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from sts.keys import thumbprint
from sts.spiffeid import SpiffeId

DEV_DIR = Path(__file__).resolve().parent / "dev"
TRUST_DOMAINS = ("example.org", "partner.test")


def _key_path(trust_domain: str) -> Path:
    return DEV_DIR / f"{trust_domain}.key.pem"


def init() -> None:
    """Create a key and bundle per trust domain unless they exist (idempotent)."""
    DEV_DIR.mkdir(mode=0o700, exist_ok=True)
    for trust_domain in TRUST_DOMAINS:
        key_path = _key_path(trust_domain)
        if not key_path.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
        key = _load(trust_domain)
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        jwk.update(use="jwt-svid", kid=thumbprint(key.public_key()))
        bundle = {"keys": [jwk], "spiffe_sequence": 1, "spiffe_refresh_hint": 300}
        (DEV_DIR / f"{trust_domain}.bundle.json").write_text(json.dumps(bundle, indent=2) + "\n")
    print(f"development bundles in {DEV_DIR}", file=sys.stderr)


def _load(trust_domain: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(_key_path(trust_domain).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SystemExit(f"{_key_path(trust_domain)} is not an EC key; delete certs/dev and run init again")
    return key


def svid(spiffe_id: str, audience: str, ttl: int) -> str:
    """A JWT-SVID shaped like SPIRE's: header alg/kid/typ, claims sub/aud/exp/iat."""
    parsed = SpiffeId.parse(spiffe_id)
    key = _load(parsed.trust_domain.name)
    now = int(time.time())
    claims = {"sub": spiffe_id, "aud": [audience], "iat": now, "exp": now + ttl}
    headers = {"kid": thumbprint(key.public_key()), "typ": "JWT"}
    return jwt.encode(claims, key, algorithm="ES256", headers=headers)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("init")
    mint = commands.add_parser("svid")
    mint.add_argument("spiffe_id")
    mint.add_argument("--audience", default="http://127.0.0.1:8443")
    mint.add_argument("--ttl", type=int, default=300)
    args = parser.parse_args()
    if args.command == "init":
        init()
    else:
        print(svid(args.spiffe_id, args.audience, args.ttl))


if __name__ == "__main__":
    main()
