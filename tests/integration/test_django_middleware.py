"""The Django middleware's paths other than a view's refusal, in Django's real
WSGI handler under ``allocpolicy run``: a refusal in another middleware's code
(which Django has answered with its 500 page), an application middleware that
answers refusals itself, ``handler500`` reading the refusal, exceptions that are
not refusals, and settings that are wrong.

The server test (``test_web_django.py``) covers views under gunicorn.
"""

from __future__ import annotations

import json

import pytest

from runtime_run import check, run_python

pytest.importorskip("django")

POLICY = """
version = 1
[scopes.request]
on_oom = "raise"
budget = "64 MiB"
"""

APP = r'''
import io, json, sys
import django
from django.conf import settings
from django.http import JsonResponse
from django.urls import path

import allocpolicy
from allocpolicy.integrations.django import refusal, refusal_facts

SEEN_BY_HANDLER500 = []


class Bombs:
    """An application middleware whose own code is refused (path /mw-bomb)."""
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.path == "/mw-bomb":
            b"x" * (10 ** 10)
        return self.get_response(request)


class Custom:
    """An application middleware that answers refusals of /custom itself."""
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exception):
        err = refusal(request, exception)
        if request.path == "/custom" and err is not None:
            return JsonResponse({"message": "narrow the dates", **refusal_facts(err)}, status=503)
        return None


def bomb(request):
    return JsonResponse({"n": len(b"x" * (10 ** 10))})


def broken(request):
    raise ValueError("not a refusal")


def careful(request):
    try:
        b"x" * (10 ** 10)
    except MemoryError:
        return JsonResponse({"caught": True})


def server_error(request):
    SEEN_BY_HANDLER500.append(refusal(request))
    return JsonResponse({"page": "handler500"}, status=500)


urlpatterns = [path("bomb", bomb), path("custom", bomb), path("broken", broken),
               path("careful", careful), path("mw-bomb", bomb)]
handler500 = server_error

settings.configure(
    SECRET_KEY="t", ALLOWED_HOSTS=["*"], ROOT_URLCONF=__name__,
    MIDDLEWARE=["allocpolicy.integrations.django.AllocPolicyMiddleware", "__main__.Bombs", "__main__.Custom"],
    LOGGING_CONFIG=None,
)
django.setup()
from django.core.wsgi import get_wsgi_application
application = get_wsgi_application()


def get(path):
    out = {}
    def start_response(status, headers, exc_info=None):
        out["status"] = int(status.split()[0])
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80",
               "wsgi.input": io.BytesIO(), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr}
    body = b"".join(application(environ, start_response))
    return out["status"], json.loads(body)


results = {}
baseline = allocpolicy.stats().scopes["request"].live if "request" in allocpolicy.stats().scopes else 0
for p in ["/bomb", "/mw-bomb", "/custom", "/broken", "/careful"]:
    results[p] = get(p)
results["handler500"] = [refusal_facts(e) if e is not None else None for e in SEEN_BY_HANDLER500]
results["live_grown"] = allocpolicy.stats().scopes["request"].live - baseline
print(json.dumps(results))
'''


def test_refusals_outside_views_and_the_applications_own_answers(tmp_path):
    # GIVEN Django's WSGI handler with the middleware first, a middleware that
    # bombs, one that answers refusals itself, and a handler500
    out = json.loads(check(run_python(APP, POLICY, tmp_path)))
    # WHEN a view is refused: 507 with the facts
    status, facts = out["/bomb"]
    assert status == 507 and facts["scope"] == "request" and facts["size"] >= 10**10, out
    assert facts["budget"] == 64 << 20 and facts["reason"] == "budget", out
    # WHEN another middleware's code is refused: Django made its 500 page,
    # handler500 read the refusal, and the client gets the 507
    status, facts = out["/mw-bomb"]
    assert status == 507 and facts["size"] >= 10**10 and facts["scope"] == "request", out
    assert len(out["handler500"]) == 2, out  # /mw-bomb and /broken reached handler500
    assert out["handler500"][0]["size"] >= 10**10, out
    # WHEN the application answers refusals itself: its answer wins
    status, facts = out["/custom"]
    assert status == 503 and facts["message"] == "narrow the dates" and facts["size"] >= 10**10, out
    # WHEN a view fails otherwise, or catches the MemoryError itself: no 507
    assert out["/broken"] == [500, {"page": "handler500"}], out
    assert out["handler500"][1] is None, out
    assert out["/careful"] == [200, {"caught": True}], out
    # AND the request scope holds nothing more than before
    assert out["live_grown"] < 4 << 20, out


@pytest.mark.parametrize(
    "setting, message",
    [
        ("{'scop': 'request'}", "settings.ALLOCPOLICY_MIDDLEWARE: unknown key 'scop'"),
        ("{'status': 200}", "settings.ALLOCPOLICY_MIDDLEWARE: argument 'status' must be an HTTP error status"),
        ("['request']", "settings.ALLOCPOLICY_MIDDLEWARE must be a dict, not list"),
    ],
)
def test_wrong_settings_stop_the_application_at_start(tmp_path, setting, message):
    code = f"""
        import django
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured
        settings.configure(SECRET_KEY="t", ROOT_URLCONF=[], ALLOCPOLICY_MIDDLEWARE={setting},
                           MIDDLEWARE=["allocpolicy.integrations.django.AllocPolicyMiddleware"])
        django.setup()
        from django.core.wsgi import get_wsgi_application
        try:
            get_wsgi_application()
        except ImproperlyConfigured as exc:
            print(exc)
    """
    assert message in check(run_python(code, POLICY, tmp_path, preload=False))
