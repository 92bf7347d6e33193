"""Protection for the servers, task runners and frameworks people use.

One module per framework. Each is imported only by the program that uses it
(importing :mod:`allocpolicy` never imports an integration, nor the framework
it is for), and builds on two things only: the public API of
:mod:`allocpolicy` and the shared mechanisms of ``allocpolicy._core`` (the
refusal conversion, instance handles, coroutine stepping).
``tests/unit/test_layering.py`` holds every module here to that. Install a
framework's extra to get a tested version of it (``pip install 'allocpolicy[flask]'``).

====================================  =====================================================  ===========
module                                what it protects                                        extra
====================================  =====================================================  ===========
``allocpolicy.integrations.wsgi``     any WSGI application, one task boundary per request     ``wsgi``
                                      (gunicorn, waitress)
``allocpolicy.integrations.flask``    Flask: the refusal survives Flask's error handling      ``flask``
``allocpolicy.integrations.asgi``     any ASGI application (Starlette, FastAPI, ...)          ``asgi``
``allocpolicy.integrations.futures``  ``concurrent.futures`` executors, one scope per task    (stdlib)
``allocpolicy.integrations.pool``     ``multiprocessing.Pool``, one scope per task            (stdlib)
``allocpolicy.integrations.dask``     Dask distributed workers: a WorkerPlugin                ``dask``
``allocpolicy.integrations.prefork``  pre-fork servers: the process budget divided among      (stdlib)
                                      workers (a gunicorn hook)
====================================  =====================================================  ===========
"""
