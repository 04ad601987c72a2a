"""Development SPIFFE Workload API server (SPIRE stand-in) for local runs and tests.

Speaks the real SPIFFE Workload API over gRPC on Unix sockets, one socket per registered workload,
so the unmodified py-spiffe client gets SVIDs and bundles from it. Modules, each with one job:

* :mod:`spire.registry`  the YAML registration (trust domains, workloads, TTLs), parsed strictly
* :mod:`spire.ca`        one trust domain's in-memory CA and JWT key: SVIDs, bundles, rotation
* :mod:`spire.state`     the versioned identity state every stream watches
* :mod:`spire.service`   the five RPCs and the security-header interceptor (the protobuf edge)
* :mod:`spire.server`    sockets and lifecycle: ``DevWorkloadApi`` and ``serve``
* ``spire.workload_pb2`` generated from ``spire/workload.proto`` (never edit by hand)

Nothing here is for production: keys live in memory. The package imports nothing at import time,
so ``import spire`` stays cheap; import the module you need.
"""
