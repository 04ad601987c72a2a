"""SPIFFE workload-identity token exchange server (RFC 8693), its client and verifier libraries."""

from __future__ import annotations

__version__ = "0.1.0"
