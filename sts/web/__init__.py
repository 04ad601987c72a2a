"""HTTP layer: the Flask app factory and the translation between HTTP and the plain-Python core.

Views parse the request into core types, call the core, and render the result or the
:class:`~sts.errors.StsError` as an RFC 6749 §5.2 JSON error. One error handler covers the whole tree;
anything unexpected becomes ``server_error`` with a generic description and the detail only in the log.
"""

from __future__ import annotations

from sts.web.app import create_app, create_app_from_env

__all__ = ["create_app", "create_app_from_env"]
