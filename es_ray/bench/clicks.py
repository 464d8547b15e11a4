"""Clickstream ingestion benchmark: click events/s accepted over HTTP.

    python -m es_ray.bench.clicks --sessions 200 --clients 4

Records sessions through `POST /v1/sessions` with the stack's API key (sessions shown by another system,
source `ingested`; 20 shown results each), then sends click events (with the key too) in
batches of --batch per request from --clients concurrent clients, every batch sent twice (the second
time they must all come back as duplicates, as a client retrying after a timeout would see); then
--single more events, one per request.
Target: at least 500 accepted events/s on this machine.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from es_ray.bench.common import DEFAULT_STATE, bench_stack, write_result
from es_ray.client import EsRayClient


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--events-per-session", type=int, default=20)
    parser.add_argument("--batch", type=int, default=20, help="events per request")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--single", type=int, default=400, help="events sent one per request afterwards")
    parser.add_argument("--state-dir", default=DEFAULT_STATE)
    args = parser.parse_args(argv)

    _, manifest = bench_stack(args.state_dir)
    run = uuid.uuid4().hex[:8]
    with EsRayClient.for_stack(manifest) as client:  # sessions of users: the key acts for them (a trusted backend)
        sessions = [client.create_session(f"bench query {s}", [f"doc-{r}" for r in range(20)],
                                          user_id=f"user-{s % 10}").session_id
                    for s in range(args.sessions)]

    requests = []
    for sid in sessions:
        events = [{"event_id": f"{run}-{sid}-{e}", "item_id": f"doc-{e % 20}", "type": "click"}
                  for e in range(args.events_per_session)]
        requests += [(sid, events[i:i + args.batch]) for i in range(0, len(events), args.batch)]

    def send(request):
        sid, events = request
        with EsRayClient.for_stack(manifest) as client:
            return client.add_events(sid, events).model_dump()

    counts = {}
    for label in ("first", "resend"):
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            answers = list(pool.map(send, requests))
        seconds = time.perf_counter() - started
        counts[label] = {"accepted": sum(a["accepted"] for a in answers),
                         "duplicates": sum(a["duplicates"] for a in answers), "seconds": round(seconds, 2),
                         "events_per_s": round(sum(len(r[1]) for r in requests) / seconds, 1)}
    # The same clients sending one event per request: what a browser reporting each click as it happens does.
    singles = [(sessions[i % len(sessions)], [{"event_id": f"{run}-single-{i}", "item_id": f"doc-{i % 20}",
                                               "type": "click"}]) for i in range(args.single)]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        answers = list(pool.map(send, singles))
    seconds = time.perf_counter() - started
    counts["one_per_request"] = {"accepted": sum(a["accepted"] for a in answers), "seconds": round(seconds, 2),
                                 "events_per_s": round(len(singles) / seconds, 1)}
    result = {"benchmark": "clicks", "sessions": args.sessions, "events": sum(len(r[1]) for r in requests),
              "batch": args.batch, "clients": args.clients, "events_per_s": counts["first"]["events_per_s"],
              "first": counts["first"], "resend": counts["resend"], "one_per_request": counts["one_per_request"]}
    out = write_result("clicks", "synthetic", result, f"python -m es_ray.bench.clicks --clients {args.clients}")
    print(json.dumps(result, indent=2), f"\nwritten to {out}")  # noqa: T201 - the benchmark's report


if __name__ == "__main__":
    main()
