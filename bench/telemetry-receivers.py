#!/usr/bin/env python3
"""Receivers for the telemetry benchmark (bench/run.sh PHASES=telemetry), on
loopback: an RFC 5425 syslog-over-TLS listener that reads and counts what
it gets, and an HTTPS webhook that answers 204. Runs until killed; prints
its counts on SIGTERM.

    telemetry-receivers.py CERT KEY SYSLOG_PORT WEBHOOK_PORT
"""

from __future__ import annotations

import http.server
import signal
import socket
import ssl
import sys
import threading

cert, key, syslog_port, webhook_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
counts = {"syslog_bytes": 0, "webhook_posts": 0}
lock = threading.Lock()


def syslog_conn(conn: socket.socket) -> None:
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            while chunk := tls.recv(65536):
                with lock:
                    counts["syslog_bytes"] += len(chunk)
    except OSError:
        pass


def syslog_listener() -> None:
    with socket.create_server(("127.0.0.1", syslog_port)) as srv:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=syslog_conn, args=(conn,), daemon=True).start()


class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with lock:
            counts["webhook_posts"] += 1
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


def stop(*_):
    print(f"RECEIVERS syslog_bytes={counts['syslog_bytes']} webhook_posts={counts['webhook_posts']}", flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
threading.Thread(target=syslog_listener, daemon=True).start()
hook = http.server.ThreadingHTTPServer(("127.0.0.1", webhook_port), Hook)
hook.daemon_threads = True
hook.socket = ctx.wrap_socket(hook.socket, server_side=True)
hook.serve_forever()
