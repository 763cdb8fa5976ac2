"""An OTLP/HTTP trace receiver for iomt's trace export test, on loopback.

Each POST to /v1/traces is decoded with the OpenTelemetry project's own protobuf definitions
(the `opentelemetry-proto` package), so a malformed export fails here as it would in a
collector (answered 400 and recorded as such). Every span received is one JSON line in the
record file: its service name, name, ids and attributes.

    python otlp_receiver.py --record FILE

Prints `listening on PORT` once ready.
"""

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


def value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--record", required=True)
    args = parser.parse_args()
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

        def answer(self, code, body=b"", content_type="application/x-protobuf"):
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path != "/v1/traces":
                write({"kind": "invalid", "reason": f"path {self.path}"})
                return self.answer(404)
            if self.headers.get("Content-Type") != "application/x-protobuf":
                write({"kind": "invalid", "reason": f"content type {self.headers.get('Content-Type')}"})
                return self.answer(415)
            request = ExportTraceServiceRequest()
            try:
                request.ParseFromString(body)
            except DecodeError as e:
                write({"kind": "invalid", "reason": str(e)})
                return self.answer(400)
            for resource_spans in request.resource_spans:
                resource = {a.key: value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        write({
                            "kind": "span",
                            "service": resource.get("service.name"),
                            "resource": resource,
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "attributes": {a.key: value(a.value) for a in span.attributes},
                        })
            self.answer(200, ExportTraceServiceResponse().SerializeToString())

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
