"""The Flask app of the requests/s benchmark (web_requests.py).

``BENCH_PROTECT=1`` in the environment puts it behind AllocPolicy (one
scope instance per request); otherwise it is the same app, unprotected.
"""

import json
import os

from flask import Flask, Response, request

app = Flask(__name__)
if os.environ.get("BENCH_PROTECT") == "1":
    from allocpolicy.integrations.flask import AllocPolicy

    AllocPolicy(app)

ROWS = [{"id": i, "name": f"user-{i}", "score": i * 0.5} for i in range(50)]


@app.get("/work")
def work():
    """A small, typical request: read a parameter, build and serialise a
    JSON document of a few KiB."""
    n = int(request.args.get("n", 50))
    body = json.dumps({"rows": ROWS[:n], "total": sum(r["score"] for r in ROWS[:n])})
    return Response(body, mimetype="application/json")
