"""A webhook receiver for iomt's event delivery tests, on loopback.

It answers the CloudEvents abuse-protection handshake (OPTIONS) and Event Grid's
SubscriptionValidationEvent, verifies every notification's Standard Webhooks signature with
the independent `standardwebhooks` package (an invalid one is answered 401), injects faults
into the first notifications it receives, and records what it accepted.

    python receiver.py --secret whsec_... --record FILE [--fault 429:1 --fault timeout:2 ...]
        [--topic-key KEY]

With `--topic-key`, POSTs to `/api/events` are taken as publishes to an Event Grid custom
topic: the `aeg-sas-key` header must be KEY (else 401) and the body an array of events; each
is recorded as `{"kind": "topic", ...}` and not signed.

Faults apply to notifications in arrival order: `CODE` or `CODE:RETRY_AFTER_SECONDS` answers
that status; `timeout:SECONDS` waits that long before answering 200 (the sender should have
given up by then). Prints `listening on PORT` once ready. Each accepted notification is one
JSON line in the record file: its headers, its body and whether it came after a fault.
"""

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--record", required=True)
    parser.add_argument("--fault", action="append", default=[])
    parser.add_argument("--topic-key")
    args = parser.parse_args()
    verifier = Webhook(args.secret)
    faults = list(args.fault)
    lock = threading.Lock()
    record = open(args.record, "a", encoding="utf-8")

    def write(entry):
        with lock:
            record.write(json.dumps(entry) + "\n")
            record.flush()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):
            pass

        def answer(self, code, body=b"", headers=()):
            try:
                self.send_response(code)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                # The sender gave up waiting (the timeout fault).
                pass

        def do_OPTIONS(self):
            origin = self.headers.get("WebHook-Request-Origin")
            write({"kind": "options", "origin": origin})
            if not origin:
                return self.answer(400)
            self.answer(200, headers=[("WebHook-Allowed-Origin", origin), ("Allow", "POST")])

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if args.topic_key and self.path.startswith("/api/events"):
                if self.headers.get("aeg-sas-key") != args.topic_key:
                    write({"kind": "invalid", "reason": "aeg-sas-key"})
                    return self.answer(401)
                events = json.loads(body)
                if not isinstance(events, list):
                    return self.answer(400)
                write({"kind": "topic", "content_type": self.headers.get("Content-Type"), "events": events})
                return self.answer(200)
            if self.headers.get("aeg-event-type") == "SubscriptionValidation":
                event = json.loads(body)[0]
                write({"kind": "validation", "subscription": self.headers.get("aeg-subscription-name")})
                code = event["data"]["validationCode"]
                return self.answer(
                    200,
                    json.dumps({"validationResponse": code}).encode(),
                    [("Content-Type", "application/json")],
                )
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                verifier.verify(body, headers)
            except WebhookVerificationError as e:
                write({"kind": "invalid", "reason": str(e), "headers": headers})
                return self.answer(401)
            with lock:
                fault = faults.pop(0) if faults else None
            if fault is not None:
                name, _, seconds = fault.partition(":")
                if name == "timeout":
                    time.sleep(float(seconds))
                    write({"kind": "late", "headers": headers})
                    return self.answer(200)
                extra = [("Retry-After", seconds)] if seconds else []
                write({"kind": "fault", "status": int(name), "headers": headers})
                return self.answer(int(name), headers=extra)
            write({"kind": "accepted", "headers": headers, "body": body.decode("utf-8")})
            self.answer(200)

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
