"""A Flask service protected with one line, served and queried in one script.

In production, run the app with gunicorn (or waitress) under the runtime::

    allocpolicy run --policy web_policy.toml -- gunicorn -c gunicorn.conf.py web_flask:app

Here the script serves it on a loopback port with waitress and sends three
requests, to show what a client sees:

    allocpolicy run --policy docs/examples/web_policy.toml -- python docs/examples/web_flask.py
"""

import http.client
import json
import logging
import threading

from flask import Flask, jsonify, request

from allocpolicy.integrations.flask import AllocPolicy

app = Flask(__name__)
AllocPolicy(app)  # each request in its own instance of scope "request"


@app.get("/repeat")
def repeat():
    data = b"x" * int(request.args["n"])  # the client chooses n
    return jsonify(length=len(data))


def main() -> None:
    from waitress.server import create_server

    logging.basicConfig(format="log: %(message)s")  # the refusals' log lines
    server = create_server(app, host="127.0.0.1", port=0, threads=4)
    threading.Thread(target=server.run, daemon=True).start()
    port = server.effective_port

    def send(method, path, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    print(send("GET", "/repeat?n=1000"))
    status, facts = send("GET", "/repeat?n=10000000000")  # 10 GB: over the budget
    print(status, facts["reason"], facts["scope"], facts["size"], facts["budget"])
    print(send("GET", "/repeat?n=2000"))  # the server goes on


if __name__ == "__main__":
    main()
