"""An HTTP proxy in front of an S3 server on 127.0.0.1 that injects faults, for tests.

  python tests/s3_fault_proxy.py PORT UPSTREAM_PORT STATS_FILE [--fail-every N --max-failures M] [--deny-bucket B]

--fail-every N answers every Nth request 503 SlowDown (at most M times): transient faults.
--deny-bucket B answers every request for bucket B 403 AccessDenied: a permanent fault.
--log-gets FILE appends "PATH BYTES" for every GET it serves: what a run reads.
The number of injected faults is written to STATS_FILE after each one.
"""

import argparse
import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ERROR = '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{code} (injected)</Message></Error>'


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("upstream_port", type=int)
    parser.add_argument("stats_file")
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--max-failures", type=int, default=0)
    parser.add_argument("--deny-bucket", default=None)
    parser.add_argument("--log-gets", default=None)
    args = parser.parse_args()
    lock = threading.Lock()
    state = {"requests": 0, "injected": 0}

    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):
            pass

        def _fault(self):
            with lock:
                state["requests"] += 1
                if args.deny_bucket and self.path.lstrip("/").split("/")[0].split("?")[0] == args.deny_bucket:
                    fault = (403, "AccessDenied")
                elif args.fail_every and state["requests"] % args.fail_every == 0 and state["injected"] < args.max_failures:
                    fault = (503, "SlowDown")
                else:
                    return None
                state["injected"] += 1
                with open(args.stats_file, "w") as f:
                    f.write(str(state["injected"]))
                return fault

        def _handle(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fault = self._fault()
            if fault:
                payload = b"" if self.command == "HEAD" else ERROR.format(code=fault[1]).encode()
                self.send_response(fault[0])
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            upstream = http.client.HTTPConnection("127.0.0.1", args.upstream_port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            payload = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                # HEAD keeps the upstream Content-Length: it is the object's size, not this body's
                skip = ("transfer-encoding", "connection") + (() if self.command == "HEAD" else ("content-length",))
                if key.lower() not in skip:
                    self.send_header(key, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            if args.log_gets and self.command == "GET":
                with lock, open(args.log_gets, "a") as f:
                    f.write(f"{self.path.split('?')[0]} {len(payload)}\n")
            upstream.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    ThreadingHTTPServer(("127.0.0.1", args.port), Proxy).serve_forever()


if __name__ == "__main__":
    main()
