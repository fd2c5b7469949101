#!/usr/bin/env python3
"""A recording proxy for agent clients: forwards every request to moeserve unchanged,
streams the answer back, and appends one JSON line per request (method, path, the
headers the client sent, its JSON body, and the status moeserve answered) to a file.
That file is what the client really sends: the fixtures under tests/fixtures/agents are
cut from it, and the agent runs check every status was 2xx.

    python3 tests/agents/recording_proxy.py --listen 18300 --upstream http://127.0.0.1:8080 --out requests.jsonl

Standard library only, so CI needs nothing for it.
"""

import argparse
import http.client
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    up = urllib.parse.urlparse(args.upstream)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def forward(self):
            try:
                self.relay()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client hung up (a readiness probe, a cancelled stream)

        def relay(self):
            n = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(n) if n else b""
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=600)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            try:
                parsed = json.loads(body) if body else None
            except ValueError:
                parsed = body.decode("utf-8", "replace")
            record = {"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                      "body": parsed, "status": resp.status}
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in HOP:
                    self.send_header(k, v)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            answer = b""
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    break
                if resp.status >= 400:
                    answer += chunk
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            if answer:
                record["error"] = answer.decode("utf-8", "replace")[:2000]
            with lock, open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")

        do_GET = do_POST = do_DELETE = do_PUT = forward

    ThreadingHTTPServer(("127.0.0.1", args.listen), Handler).serve_forever()


if __name__ == "__main__":
    main()
