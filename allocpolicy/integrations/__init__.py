"""Protection for the servers, task runners and frameworks people use.

One module per framework. Each is imported only by the program that uses it
(importing :mod:`allocpolicy` never imports an integration, nor the framework
it is for), and builds on two things only: the public API of
:mod:`allocpolicy` and the shared mechanisms of ``allocpolicy._core`` (the
refusal conversion, instance handles, coroutine stepping).
``tests/unit/test_layering.py`` holds every module here to that.
"""
