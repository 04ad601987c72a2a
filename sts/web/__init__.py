"""HTTP layer: the translation between HTTP and the plain-Python core.

Imports point one way (checked by ``tests/test_layering.py``): ``http`` (the request model, no
framework) ← ``token_endpoint`` ← ``common`` ← the Flask blueprints ``oauth``, ``resources``, ``ops`` ←
``app`` (the Flask app and :class:`~sts.web.app.StsHttp`) ← the listeners ``asgi`` (plain, uvicorn)
and ``tls_server`` (with ``tls``, its certificates). This package imports none of its modules, so
importing one loads only what that one needs.

Views parse the request into core types, call the core, and render the result or the
:class:`~sts.errors.StsError` as an RFC 6749 §5.2 JSON error. One error handler covers the whole tree;
anything unexpected becomes ``server_error`` with a generic description and the detail only in the log.
"""
