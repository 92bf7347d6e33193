"""An HTTP service that exports its allocpolicy metrics for Prometheus.

Run it under the runtime, with the built-in default policy (scope ``task``:
``on_oom = "raise"``, 256 MiB per task), serving its stats to
``allocpolicy stats PID`` as well::

    allocpolicy run --stats-socket -- python examples/metrics_server.py --port 8000

Then::

    curl 'http://127.0.0.1:8000/work?mib=8'       # 200: an ordinary request
    curl 'http://127.0.0.1:8000/work?mib=1024'    # 507: over the task budget, refused alone
    curl http://127.0.0.1:8000/metrics            # allocpolicy_scope_refusals_total{...} 1.0

Every request to ``/work`` runs in ``allocpolicy.task("task")``; a refused one
is answered with 507 and logged once by an :func:`allocpolicy.on_refusal`
callback. ``/metrics`` is ``prometheus_client``'s exposition of its default
registry, where :func:`allocpolicy.metrics.prometheus.register` put the
runtime's metrics; without ``prometheus_client`` installed it falls back to
:func:`allocpolicy.metrics.prometheus_text`. The server listens on loopback
only and prints its address when it is ready.
"""

from __future__ import annotations

import argparse
import logging
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import allocpolicy
from allocpolicy import metrics

log = logging.getLogger("metrics_server")

try:
    import prometheus_client
except ImportError:  # the service still exports its metrics, as plain text
    prometheus_client = None
else:
    from allocpolicy.metrics import prometheus

    prometheus.register()


@allocpolicy.on_refusal
def log_refusal(err: allocpolicy.AllocError) -> None:
    log.warning("refused: %s bytes in scope %r (%s, budget %s)", err.size, err.scope, err.reason, err.budget)


def work(mib: int) -> int:
    """Build ``mib`` MiB and return a checksum of it: the request's real work."""
    data = bytearray(mib << 20)
    data[::4096] = b"\x01" * len(data[::4096])
    return sum(data[::4096])


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/metrics":
            if prometheus_client is not None:
                body, content_type = prometheus_client.generate_latest(), prometheus_client.CONTENT_TYPE_LATEST
            else:
                body, content_type = metrics.prometheus_text().encode(), metrics.CONTENT_TYPE
            self.reply(200, body, content_type)
        elif url.path == "/work":
            try:
                mib = int(parse_qs(url.query).get("mib", ["1"])[0])
            except ValueError:
                self.reply(400, b"mib must be a number of MiB\n")
                return
            try:
                with allocpolicy.task("task"):
                    checksum = work(mib)
            except allocpolicy.AllocError as err:
                self.reply(507, f"refused: {err}\n".encode())
            else:
                self.reply(200, f"ok: {mib} MiB, checksum {checksum}\n".encode())
        else:
            self.reply(404, b"not found\n")

    def reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        log.info("%s %s", self.address_string(), format % args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: any free port)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not allocpolicy.is_active():
        print(
            "metrics_server: the allocpolicy runtime is not active; start this example with\n"
            "    allocpolicy run --stats-socket -- python examples/metrics_server.py",
            file=sys.stderr,
        )
        return 2
    with ThreadingHTTPServer(("127.0.0.1", args.port), Handler) as server:
        host, port = server.server_address[:2]
        print(f"metrics_server: listening on http://{host}:{port}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
