#!/usr/bin/env python3
"""shipping: an HTTP participant (no NATS at all), joined to txcoord transactions through
`txcoord http-bridge`. Standard library only: http.server and sqlite3.

The contract it implements (README, "HTTP participants"):

- POST {base}/prepare, /commit, /abort (2PC) and /execute, /compensate (sagas) with a JSON body
  {txn_id, step, action, payload, attempt, deadline_ms}.
- Every call carries `Idempotency-Key: <txn_id>:<step>:<kind>`: the key is the barrier. A
  call whose key was seen is answered with the stored answer and does nothing again.
- prepare answers 200 (ready), 200 {"vote": "read_only"}, or 409 {"reason": ...} (refusal);
  commit and abort answer 200 (or 410 when there is nothing left to do).

A shipment is booked for `payload.order_id` at prepare (held), shipped at commit, released
at abort; in a saga, execute ships it and compensate cancels it. The branch's state and every answer live in one SQLite file, written in one
transaction with the effect, so a restart loses nothing and repeats nothing.

Test knobs in the payload: "refuse" (a reason: answer 409), "fail_times" (answer 503 that
many times per key first), "delay_ms" (sleep before answering), "commit_delay_ms" (sleep
before answering a commit only), "read_only" (vote read-only), "malformed" ("not_json",
"huge", "redirect", "content_type": a broken answer, for the bridge's error handling).

GET /shipments returns every booking with how many times its commit was applied; GET /traces
returns the W3C `traceparent` header each idempotency key first arrived with (a tracing
backend would start the call's span under it).

Usage: shipping.py --port 8091 [--db shipping.sqlite] [--host 127.0.0.1]
                   [--tls-cert cert.pem --tls-key key.pem]   (HTTPS)
"""

import argparse
import json
import sqlite3
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()


def open_db(path):
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, status INTEGER, body TEXT)"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS shipments (branch TEXT PRIMARY KEY, order_id TEXT,"
        " state TEXT, commits INTEGER DEFAULT 0)"
    )
    db.execute("CREATE TABLE IF NOT EXISTS failures (key TEXT PRIMARY KEY, n INTEGER)")
    db.execute("CREATE TABLE IF NOT EXISTS traces (key TEXT PRIMARY KEY, traceparent TEXT)")
    return db


class Handler(BaseHTTPRequestHandler):
    db = None
    # Keep-alive: the bridge reuses its connections (every answer has a Content-Length).
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stderr.write("shipping: " + (fmt % args) + "\n")

    def answer(self, status, body, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/traces":
            with LOCK:
                rows = self.db.execute(
                    "SELECT key, traceparent FROM traces ORDER BY key"
                ).fetchall()
            return self.answer(200, [{"key": k, "traceparent": t} for k, t in rows])
        if self.path != "/shipments":
            return self.answer(404, {"error": "no such path"})
        with LOCK:
            rows = self.db.execute(
                "SELECT branch, order_id, state, commits FROM shipments ORDER BY branch"
            ).fetchall()
        self.answer(
            200,
            [{"branch": b, "order_id": o, "state": s, "commits": c} for b, o, s, c in rows],
        )

    def do_POST(self):
        kind = self.path.strip("/").split("/")[-1]
        if kind not in ("prepare", "commit", "abort", "execute", "compensate"):
            return self.answer(404, {"error": f"no such path {self.path}"})
        try:
            length = int(self.headers.get("Content-Length", "0"))
            req = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as e:
            return self.answer(400, {"error": f"body is not JSON: {e}"})
        key = self.headers.get("Idempotency-Key")
        if not key:
            return self.answer(400, {"error": "no Idempotency-Key header"})
        payload = req.get("payload") or {}
        delay = payload.get("delay_ms") or (payload.get("commit_delay_ms") if kind == "commit" else 0)
        if delay:
            time.sleep(delay / 1000.0)
        broken = payload.get("malformed")
        if broken == "not_json":
            return self.answer(200, b"<html>surprise</html>", "application/json")
        if broken == "huge":
            return self.answer(200, b'{"vote": "ready", "pad": "' + b"x" * (4 << 20) + b'"}')
        if broken == "redirect":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if broken == "content_type":
            return self.answer(200, b"ready", "text/plain")
        with LOCK:
            trace = self.headers.get("traceparent")
            if trace:
                self.db.execute(
                    "INSERT OR IGNORE INTO traces (key, traceparent) VALUES (?, ?)", (key, trace)
                )
            seen = self.db.execute(
                "SELECT status, body FROM answers WHERE key = ?", (key,)
            ).fetchone()
            if seen:
                return self.answer(seen[0], json.loads(seen[1]))
            fail_times = int(payload.get("fail_times", 0))
            if fail_times:
                row = self.db.execute("SELECT n FROM failures WHERE key = ?", (key,)).fetchone()
                n = row[0] if row else 0
                if n < fail_times:
                    self.db.execute(
                        "INSERT OR REPLACE INTO failures (key, n) VALUES (?, ?)", (key, n + 1)
                    )
                    return self.answer(503, {"error": "try again"})
            status, body = self.apply(kind, req, payload)
            return self.answer(status, body)

    def apply(self, kind, req, payload):
        """The effect and its answer, in one SQLite transaction."""
        branch = f"{req.get('txn_id')}:{req.get('step')}"
        key = self.headers.get("Idempotency-Key")
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT state FROM shipments WHERE branch = ?", (branch,)).fetchone()
            state = row[0] if row else None
            if kind == "execute":
                # Saga: book and ship at once; a compensation cancels it.
                if payload.get("refuse"):
                    status, body = 409, {"reason": payload["refuse"]}
                elif state == "cancelled":
                    status, body = 409, {"reason": "compensated before it executed"}
                else:
                    if state is None:
                        db.execute(
                            "INSERT INTO shipments (branch, order_id, state, commits) VALUES (?, ?, 'shipped', 1)",
                            (branch, str(payload.get("order_id", ""))),
                        )
                    status, body = 200, {}
            elif kind == "compensate":
                if state == "shipped":
                    db.execute("UPDATE shipments SET state = 'cancelled' WHERE branch = ?", (branch,))
                elif state is None:
                    db.execute(
                        "INSERT INTO shipments (branch, order_id, state) VALUES (?, '', 'cancelled')",
                        (branch,),
                    )
                status, body = 200, {}
            elif kind == "prepare":
                if payload.get("refuse"):
                    status, body = 409, {"reason": payload["refuse"]}
                elif payload.get("read_only"):
                    status, body = 200, {"vote": "read_only"}
                elif state == "released":
                    status, body = 409, {"reason": "aborted before prepare"}
                else:
                    if state is None:
                        db.execute(
                            "INSERT INTO shipments (branch, order_id, state) VALUES (?, ?, 'held')",
                            (branch, str(payload.get("order_id", ""))),
                        )
                    status, body = 200, {"vote": "ready"}
            elif kind == "commit":
                if state == "held":
                    db.execute(
                        "UPDATE shipments SET state = 'shipped', commits = commits + 1 WHERE branch = ?",
                        (branch,),
                    )
                    status, body = 200, {}
                else:
                    status, body = 410, {"state": state}
            else:
                if state == "held":
                    db.execute("UPDATE shipments SET state = 'released' WHERE branch = ?", (branch,))
                    status, body = 200, {}
                elif state is None:
                    # An abort first: a late prepare must refuse.
                    db.execute(
                        "INSERT INTO shipments (branch, order_id, state) VALUES (?, '', 'released')",
                        (branch,),
                    )
                    status, body = 200, {}
                else:
                    status, body = 410, {"state": state}
            db.execute(
                "INSERT INTO answers (key, status, body) VALUES (?, ?, ?)",
                (key, status, json.dumps(body)),
            )
            db.execute("COMMIT")
        except Exception:
            db.execute("ROLLBACK")
            raise
        return status, body


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8091)
    ap.add_argument("--db", default="shipping.sqlite")
    ap.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate chain")
    ap.add_argument("--tls-key", help="the certificate's PEM private key")
    args = ap.parse_args()
    Handler.db = open_db(args.db)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    scheme = "http"
    if args.tls_cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = tls.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    print(f"shipping ready on {scheme}://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
