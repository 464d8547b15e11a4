"""The benchmarks' own tools: the lean HTTP load client and the CPU watch (no stack needed)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil

from es_ray.bench.cpu_use import CpuWatch, kind
from es_ray.bench.http_load import LeanClient
from es_ray.serve.auth import API_KEY_HEADER
from es_ray.serve.schemas import SearchRequest


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Serve's uvicorn answers
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append({"path": self.path, "key": self.headers.get(API_KEY_HEADER), "body": json.loads(body),
                          "type": self.headers.get("Content-Type")})
        answer = b'{"results": []}'
        self.send_response(200 if self.path == "/v1/search" else 404)
        self.send_header("Content-Length", str(len(answer)))
        if self.path == "/close":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def test_the_lean_client_sends_the_request_es_rays_client_would_and_survives_a_closed_connection():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with LeanClient(f"http://127.0.0.1:{server.server_port}", "k-123", timeout=10) as client:
            request = SearchRequest(query="wing lift", limit=10)
            assert client.send("POST", "/v1/search", request) == 200
            assert client.send("POST", "/close", request) == 404
            assert client.send("POST", "/v1/search", request) == 200  # a new connection after the close
        assert [s["path"] for s in _Recorder.seen] == ["/v1/search", "/close", "/v1/search"]
        first = _Recorder.seen[0]
        assert first["key"] == "k-123" and first["type"] == "application/json"
        assert first["body"] == request.model_dump(mode="json", exclude_none=True)
    finally:
        server.shutdown()
        server.server_close()
    with LeanClient(f"http://127.0.0.1:{server.server_port}", None, timeout=2) as client:
        assert client.send("POST", "/v1/search", SearchRequest(query="x")) == 0  # nobody listens: 0, no raise


def test_the_cpu_watch_gives_a_busy_process_its_share_of_the_machine():
    watch = CpuWatch(every_s=0.2)
    try:
        watch.mark("start")
        deadline = time.process_time() + 0.6
        while time.process_time() < deadline:  # 0.6 CPU-s in this process
            pass
        watch.mark("end")
        measured = watch.between("start", "end", top=50)
    finally:
        watch.close()
    shares, cores = measured["machine_share"], psutil.cpu_count() or 1
    mine = shares[kind(psutil.Process())]
    # its 0.6 CPU-s at least, as a share of every core over the window (rounded to 3 decimals)
    assert mine * measured["window_s"] * cores >= 0.55
    assert mine <= 1.0 and shares["idle"] >= 0.0
