"""One-line protection for the servers and task runners people use.

Each module works with one framework and is imported only when named:
``import allocpolicy`` never imports this package, and this package imports
no framework. Install a framework's extra to get a tested version of it
(``pip install 'allocpolicy[flask]'``).

====================================  =====================================================  ===========
module                                what it protects                                        extra
====================================  =====================================================  ===========
``allocpolicy.integrations.wsgi``     any WSGI application (Django, Flask, ...), one task     ``wsgi``
                                      boundary per request
``allocpolicy.integrations.flask``    Flask: the refusal survives Flask's error handling      ``flask``
``allocpolicy.integrations.asgi``     any ASGI application (Starlette, FastAPI, ...)          ``asgi``
``allocpolicy.integrations.futures``  ``concurrent.futures`` executors, one scope per task    (stdlib)
``allocpolicy.integrations.pool``     ``multiprocessing.Pool``, one scope per task            (stdlib)
``allocpolicy.integrations.dask``     Dask distributed workers: a WorkerPlugin                ``dask``
``allocpolicy.integrations.prefork``  pre-fork servers: the process budget divided among      (stdlib)
                                      workers (a gunicorn hook)
====================================  =====================================================  ===========

They use only the public API of :mod:`allocpolicy`.
"""
