"""A Django service protected with one line in MIDDLEWARE, served and queried
in one script.

In production, run the project with gunicorn under the runtime::

    allocpolicy run --policy web_policy.toml -- gunicorn mysite.wsgi

Here the script holds its settings and URLs itself, serves them on a loopback
port with waitress and sends three requests, to show what a client sees:

    allocpolicy run --policy docs/examples/web_policy.toml -- python docs/examples/web_django.py
"""

import http.client
import json
import logging
import threading

import django
from django.conf import settings
from django.http import JsonResponse
from django.urls import path

settings.configure(
    SECRET_KEY="example",
    ALLOWED_HOSTS=["127.0.0.1"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[
        # First: each request in its own instance of scope "request".
        "allocpolicy.integrations.django.AllocPolicyMiddleware",
        "django.middleware.common.CommonMiddleware",
    ],
)
django.setup()


def repeat(request):
    data = b"x" * int(request.GET["n"])  # the client chooses n
    return JsonResponse({"length": len(data)})


urlpatterns = [path("repeat", repeat)]


def main() -> None:
    from django.core.wsgi import get_wsgi_application
    from waitress.server import create_server

    logging.basicConfig(format="log: %(message)s")  # the refusals' log lines
    server = create_server(get_wsgi_application(), host="127.0.0.1", port=0, threads=4)
    threading.Thread(target=server.run, daemon=True).start()
    port = server.effective_port

    def send(method, path):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    print(send("GET", "/repeat?n=1000"))
    status, facts = send("GET", "/repeat?n=10000000000")  # 10 GB: over the budget
    print(status, facts["reason"], facts["scope"], facts["size"], facts["budget"])
    print(send("GET", "/repeat?n=2000"))  # the server goes on


if __name__ == "__main__":
    main()
