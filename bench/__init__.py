"""Benchmark harness for the token exchange server (issue 7): ``python -m bench [--quick] [--peer]``.

Modules: ``ours`` (config, SVID pool, our server as ``sts serve`` starts it), ``load`` (wrk driver and
its Lua script), ``inprocess`` (crypto ceiling, per-stage costs, profile), ``servers`` (granian vs
gunicorn with the same app), ``pyspy`` (GIL samples of the live workers), ``peer`` (authgent-server in
a throwaway venv), ``run`` (the CLI, the table and ``bench/results/latest.json``). Nothing here is
imported by ``sts``; see bench/README.md.
"""
