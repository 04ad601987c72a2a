"""The development environment: ``sts dev`` (:mod:`sts.dev.environment`), ``sts demo``
(:mod:`sts.dev.story`), the demo tool and data services (:mod:`sts.dev.services`) and the demo
policies (``policies/``). Nothing here is imported by the server or the libraries.
"""
