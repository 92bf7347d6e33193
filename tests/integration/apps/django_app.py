"""The Django app of the web tests, settings and URLs in one module:
``allocpolicy run -- gunicorn django_app:application`` (WSGI), or
``allocpolicy run -- uvicorn django_app:asgi_application`` (ASGI)."""

from __future__ import annotations

import django
from django.conf import settings
from django.http import JsonResponse, StreamingHttpResponse
from django.urls import path

import work

settings.configure(
    DEBUG=False,
    SECRET_KEY="allocpolicy-tests",
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[
        "allocpolicy.integrations.django.AllocPolicyMiddleware",
        "django.middleware.common.CommonMiddleware",
    ],
    # The uploads of the tests are larger than Django's 2.5 MB default.
    DATA_UPLOAD_MAX_MEMORY_SIZE=None,
)
django.setup()


def hello(request):
    return JsonResponse(work.hello(request.GET))


def repeat(request):
    return JsonResponse(work.repeat(request.GET))


def array(request):
    return JsonResponse(work.array(request.GET))


def image(request):
    return JsonResponse(work.image(request.body))


def echo(request):
    return JsonResponse(work.echo(request.body))


def grow(request):
    return JsonResponse(work.grow(request.GET))


def stream(request):
    return StreamingHttpResponse(work.stream(request.GET), content_type="text/plain")


def stats(request):
    return JsonResponse(work.stats(request.GET))


urlpatterns = [
    path("hello", hello),
    path("repeat", repeat),
    path("array", array),
    path("image", image),
    path("echo", echo),
    path("grow", grow),
    path("stream", stream),
    path("stats", stats),
]

from django.core.asgi import get_asgi_application  # noqa: E402  (after settings)
from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
asgi_application = get_asgi_application()
