"""`bench calibrate`: how accurate is this machine's client? A scripted OpenAI server whose timing is known exactly,
and the real `bench run` path (worker, `openai` backend, reducer) measuring it at each rate.

The server (`python -m harness.calibrate --port P --ttft-ms 5 --itl-ms 2`, 127.0.0.1 only) streams `max_tokens`
chunks per request: the first `ttft` after the request arrived, then one every `itl`, on a schedule fixed at arrival
(a late chunk does not delay the next). A reference must be much faster than what it judges, so it is an asyncio
Protocol with h11, without a web framework: a request arrives when its last byte is read, a chunk is stamped as it
is written, and its own lateness (the event loop wakes up to a millisecond late) is measured, not assumed. The
client's error is the client's number minus the server's, both as medians, so it also holds the loopback's and the
server's own few hundred microseconds: an upper bound.

`GET /scripted/stats[?last=N]` returns the server's side (connections that carried a completion; arrival times, TTFT
and TPOT as emitted of every request, or of the last N to arrive), `POST /scripted/reset` clears it. A request may script its stream with a `scripted` object
in its body: `{"empty_text": true}` sends every token after the first with empty text and the last with the finish
reason, as vLLM does for a random-weight model. `--token-ids honor|ignore|reject` says what the server does with
`return_token_ids`: send each chunk's ids, ignore the field, or refuse the request (HTTP 400) as a strict server would.

Servers differ in how they write, and a client must read the truth from each (`Behaviour`, BEHAVIOURS by name,
`--behaviour NAME`): TCP_NODELAY set (asyncio's default) or not (Nagle's algorithm then holds a small write while an
earlier one is unacknowledged: Python's http.server and other simple servers), several tokens' events written in one
send, keep-alive connections closed without warning after a few requests, the response headers held back until the
first token. The server's stamps are its writes, so its truth holds under each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h11

from harness.core.events import now
from harness.core.files import atomic_write
from harness.serve import sse, usage_dict

if TYPE_CHECKING:
    from harness.records import CellResult

MODEL = "scripted"
TOKEN_IDS = ("honor", "ignore", "reject")
DEFAULT_RATES = (10.0, 20.0, 40.0, 80.0, 160.0)
TTFT_TOLERANCE_MS = 1.0
TPOT_TOLERANCE = 0.01


# ---- the server ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Behaviour:
    """How the scripted server writes its responses."""
    nodelay: bool = True  # TCP_NODELAY; False: Nagle's algorithm on, as in servers that do not set it
    coalesce: int = 1  # tokens per write: their SSE events leave in one send
    keepalive_requests: int | None = None  # close each connection after this many requests, without a warning header
    late_headers: bool = False  # the response headers leave with the first token, not on arrival (slow first byte)

    def argv(self) -> list[str]:
        return ([] if self.nodelay else ["--nagle"]) + ["--coalesce", str(self.coalesce)] \
            + ([] if self.keepalive_requests is None else ["--keepalive-requests", str(self.keepalive_requests)]) \
            + (["--late-headers"] if self.late_headers else [])


# What users' servers do, each a client must measure right (bench calibrate --behaviour, tests/run/test_client_accuracy.py).
BEHAVIOURS = {
    "nodelay": Behaviour(),
    "nagle": Behaviour(nodelay=False),
    "coalesced": Behaviour(nodelay=False, coalesce=4),
    "keepalive-close": Behaviour(nodelay=False, keepalive_requests=3),
    "late-headers": Behaviour(nodelay=False, late_headers=True),
}


@dataclass
class Emission:
    """One request as the server saw it: when it arrived and when each chunk was written."""
    arrival: float
    prompt_tokens: int = 0  # as the server counts them (words, or messages)
    times: list[float] = field(default_factory=list)


class ScriptedServer:
    """The script and what the server saw; one `_ServerConnection` per client connection speaks HTTP."""

    def __init__(self, ttft_s: float, itl_s: float, token_ids: str = "honor", behaviour: Behaviour = Behaviour()):
        self.ttft_s, self.itl_s, self.token_ids, self.behaviour = ttft_s, itl_s, token_ids, behaviour
        self.peers: set[tuple] = set()  # the connections that carried a completion request
        self.emissions: list[Emission] = []

    def route(self, conn: _ServerConnection, method: str, target: str, body: bytes, t_arrival: float) -> None:
        path, _, query = target.partition("?")
        if method == "GET" and path == "/health":
            conn.respond(200, b"")
        elif method == "GET" and path == "/v1/models":
            conn.respond_json(200, {"object": "list", "data": [{"id": MODEL, "object": "model",
                                                                 "owned_by": "llmbench"}]})
        elif method == "GET" and path == "/scripted/stats":
            last = query.removeprefix("last=")
            conn.respond_json(200, self.stats(int(last) if last.isdigit() else None))
        elif method == "POST" and path == "/scripted/reset":
            self.peers.clear()
            self.emissions.clear()
            conn.respond(204, b"")
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            self.complete(conn, body, path.endswith("chat/completions"), t_arrival)
        else:
            conn.respond_json(404, {"error": {"message": f"no route {method} {path}"}})

    def complete(self, conn: _ServerConnection, raw: bytes, chat: bool, t_arrival: float) -> None:
        try:
            body = json.loads(raw)
        except ValueError:
            return conn.respond_json(400, {"error": {"message": "the body is not JSON"}})
        if "return_token_ids" in body and self.token_ids == "reject":
            return conn.respond_json(400, {"error": {"message": "Unrecognized request argument supplied: "
                                                                "return_token_ids"}})
        if not body.get("stream"):
            return conn.respond_json(400, {"error": {"message": "the scripted server only streams"}})
        self.peers.add(conn.peer)
        prompt = body.get("messages") if chat else body.get("prompt")
        # Words separated by spaces: str.split on a 128k-token prompt held the server's loop for 12 ms.
        n_in = len(prompt) if isinstance(prompt, list) else str(prompt).count(" ") + 1
        emission = Emission(arrival=t_arrival, prompt_tokens=n_in)
        self.emissions.append(emission)
        conn.task = asyncio.get_running_loop().create_task(self.stream(conn, emission, body, chat, n_in))

    async def stream(self, conn: _ServerConnection, emission: Emission, body: dict[str, Any], chat: bool,
                     n_in: int) -> None:
        n = int(body.get("max_tokens") or 16)
        empty_text = bool((body.get("scripted") or {}).get("empty_text"))
        ids = bool(body.get("return_token_ids")) and self.token_ids == "honor"
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict[str, Any], text: str | None, token: int | None) -> str:
            choice |= {"delta": {} if text is None else {"content": text}} if chat else {"text": text or ""}
            if ids and token is not None:
                choice["token_ids"] = [token]
            return sse({"id": "cmpl-scripted", "object": obj, "model": MODEL, "choices": [choice]})

        opening = ""
        if chat:
            opening = sse({"id": "cmpl-scripted", "object": obj, "model": MODEL, "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        late = self.behaviour.late_headers
        if not late:
            conn.start_stream()
            if opening:
                conn.send(opening)
        group = max(1, self.behaviour.coalesce)
        pending = ""
        for k in range(n):
            last = k == n - 1
            pending += chunk({"index": 0, "finish_reason": "length" if last and empty_text else None},
                             "" if empty_text and k > 0 else f" t{k}", k)
            if not last and (k + 1) % group:
                continue
            await asyncio.sleep(max(0.0, emission.arrival + self.ttft_s + k * self.itl_s - now()))
            if late and k < group:
                conn.start_stream()
                pending = opening + pending
            t = now()
            emission.times += [t] * (k + 1 - len(emission.times))
            conn.send(pending)
            pending = ""
        tail = "" if empty_text else chunk({"index": 0, "finish_reason": "length"}, None if chat else "", None)
        if (body.get("stream_options") or {}).get("include_usage"):
            tail += sse({"id": "cmpl-scripted", "object": obj, "model": MODEL, "choices": [],
                         "usage": usage_dict(n_in, n)})
        conn.send(tail + "data: [DONE]\n\n")
        conn.end_stream()

    def stats(self, last: int | None = None) -> dict[str, Any]:
        emissions = self.emissions[-last:] if last else self.emissions
        done = [e for e in emissions if e.times]
        return {
            "connections": len(self.peers), "requests": len(self.emissions),
            "arrivals": [e.arrival for e in emissions], "prompt_tokens": [e.prompt_tokens for e in emissions],
            "ttft_ms": [(e.times[0] - e.arrival) * 1e3 for e in done],
            "tpot_ms": [(e.times[-1] - e.times[0]) / (len(e.times) - 1) * 1e3 for e in done if len(e.times) > 1],
            # between writes: tokens written together are one chunk to the client too
            "itl_ms": [(b - a) * 1e3 for e in done for a, b in zip(e.times, e.times[1:]) if b > a],
            "behaviour": asdict(self.behaviour),
        }


class _ServerConnection(asyncio.Protocol):
    def __init__(self, server: ScriptedServer):
        self.server = server
        self.h11 = h11.Connection(h11.SERVER)
        self.transport: asyncio.Transport | None = None
        self.peer: tuple = ()
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.task: asyncio.Task | None = None
        self.answered = 0  # requests answered on this connection

    def connection_made(self, transport) -> None:
        self.transport, self.peer = transport, transport.get_extra_info("peername")
        if not self.server.behaviour.nodelay:  # asyncio sets TCP_NODELAY on every TCP socket
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)

    def data_received(self, data: bytes) -> None:
        t = now()
        self.h11.receive_data(data)
        self.process(t)

    def eof_received(self) -> bool:
        self.h11.receive_data(b"")
        return False

    def connection_lost(self, exc) -> None:
        if self.task is not None:
            self.task.cancel()

    def process(self, t: float) -> None:
        try:
            while (event := self.h11.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
                if type(event) is h11.Request:
                    self.request, self.body = event, bytearray()
                elif type(event) is h11.Data:
                    self.body += event.data
                elif type(event) is h11.EndOfMessage:
                    r = self.request
                    self.server.route(self, r.method.decode(), r.target.decode(), bytes(self.body), t)
                    return
                elif type(event) is h11.ConnectionClosed:
                    self.transport.close()
                    return
        except h11.RemoteProtocolError:
            self.transport.close()

    def respond(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        headers = [("content-type", content_type), ("content-length", str(len(body)))]
        self.transport.write(b"".join([self.h11.send(h11.Response(status_code=status, headers=headers)),
                                       self.h11.send(h11.Data(data=body)), self.h11.send(h11.EndOfMessage())]))
        self.next_cycle()

    def respond_json(self, status: int, data: dict[str, Any]) -> None:
        self.respond(status, json.dumps(data).encode(), "application/json")

    def start_stream(self) -> None:
        self.transport.write(self.h11.send(h11.Response(status_code=200,
                                                        headers=[("content-type", "text/event-stream")])))

    def send(self, text: str) -> None:
        self.transport.write(self.h11.send(h11.Data(data=text.encode())))

    def end_stream(self) -> None:
        self.transport.write(self.h11.send(h11.EndOfMessage()))
        self.task = None
        self.next_cycle()

    def next_cycle(self) -> None:
        self.answered += 1
        limit = self.server.behaviour.keepalive_requests
        if (self.h11.our_state is h11.MUST_CLOSE or self.h11.their_state is h11.MUST_CLOSE
                or (limit is not None and self.answered >= limit)):
            self.transport.close()
        else:
            self.h11.start_next_cycle()
            self.process(now())  # a request that came while this one was answered


async def serve(port: int, server: ScriptedServer) -> None:
    listener = await asyncio.get_running_loop().create_server(lambda: _ServerConnection(server), "127.0.0.1", port)
    async with listener:
        await listener.serve_forever()


@contextlib.contextmanager
def scripted_server(log_dir: Path, ttft_ms: float, itl_ms: float, token_ids: str = "honor",
                    behaviour: Behaviour = Behaviour()) -> Iterator[str]:
    """The scripted server in a process of its own (as a real server is), its log in log_dir; yields its URL."""
    import sys

    from harness.core.processes import launch

    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "harness.calibrate", "--port", str(port), "--ttft-ms", str(ttft_ms),
                "--itl-ms", str(itl_ms), "--token-ids", token_ids, *behaviour.argv()]

    log_dir.mkdir(parents=True, exist_ok=True)
    server = asyncio.run(launch("scripted_server", argv, log_dir, "/health", 60.0))
    try:
        yield server.url
    finally:
        server.stop(grace_s=5.0)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.calibrate", description="the scripted OpenAI server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ttft-ms", type=float, default=5.0)
    parser.add_argument("--itl-ms", type=float, default=2.0)
    parser.add_argument("--token-ids", choices=TOKEN_IDS, default="honor")
    parser.add_argument("--nagle", action="store_true", help="leave TCP_NODELAY unset")
    parser.add_argument("--coalesce", type=int, default=1, help="tokens written in one send")
    parser.add_argument("--keepalive-requests", type=int, default=None, help="close a connection after this many")
    parser.add_argument("--late-headers", action="store_true", help="send the headers with the first token")
    a = parser.parse_args()
    behaviour = Behaviour(not a.nagle, a.coalesce, a.keepalive_requests, a.late_headers)
    asyncio.run(serve(a.port, ScriptedServer(a.ttft_ms / 1e3, a.itl_ms / 1e3, a.token_ids, behaviour)))


# ---- the calibration ------------------------------------------------------------------------------------------------

@dataclass
class Point:
    """The client's error at one load on one server behaviour: client median minus the server's (as emitted), and
    its own numbers."""
    server: str  # the scripted server's behaviour (BEHAVIOURS)
    load: str
    nominal_rate: float | None
    offered_rate: float | None
    achieved_rate: float | None
    server_rate: float | None  # the arrival rate the server saw
    ttft_ms: float | None  # the client's TTFT p50
    ttft_error_ms: float | None
    tpot_error: float | None  # relative
    itl_error_ms: float | None
    dispatch_lag_p99_ms: float | None
    loop_lag_p99_ms: float | None
    connections: int
    requests: int
    client_limited: list[str]
    status: str

    @property
    def within(self) -> bool:
        return (self.status == "ok" and self.ttft_error_ms is not None and self.tpot_error is not None
                and abs(self.ttft_error_ms) <= TTFT_TOLERANCE_MS and abs(self.tpot_error) <= TPOT_TOLERANCE)


def point_of(cell: CellResult, server: dict[str, Any], behaviour: str) -> Point:
    from harness.config.scenario import ConcurrencyLoad, PoissonLoad, Workload
    from harness.records import Distribution, MetricValues
    from harness.results.catalogue import rate

    m = cell.metrics or MetricValues()

    def error(key: str) -> float | None:
        mine, truth = m.value(f"{key}.p50"), Distribution.of(server[key]).p50
        return None if mine is None or truth is None else mine - truth

    tpot_truth = Distribution.of(server["tpot_ms"]).p50
    load = cell.workload_spec.load if isinstance(cell.workload_spec, Workload) else None
    clients = load.clients if isinstance(load, (PoissonLoad, ConcurrencyLoad)) else 1
    return Point(
        server=behaviour,
        load=(f"rate {load.rate:g}" if isinstance(load, PoissonLoad) else f"concurrency {load.concurrency}"
              if isinstance(load, ConcurrencyLoad) else "?") + (f" × {clients} clients" if clients > 1 else ""),
        nominal_rate=m.value("nominal_rate_rps"), offered_rate=m.value("offered_rate_rps"),
        achieved_rate=m.value("achieved_rate_rps"), server_rate=rate(server["arrivals"]),
        ttft_ms=m.value("ttft_ms.p50"), ttft_error_ms=error("ttft_ms"),
        tpot_error=None if (tpot := error("tpot_ms")) is None or not tpot_truth else tpot / tpot_truth,
        itl_error_ms=error("itl_ms"), dispatch_lag_p99_ms=m.value("dispatch_lag_ms.p99"),
        loop_lag_p99_ms=m.value("loop_lag_ms.p99"), connections=server["connections"],
        requests=server["requests"], client_limited=cell.client_limited_reasons,
        status=cell.status if cell.ok else f"failed: {cell.error_line}")


def scenario_for(url: str, rates: list[float], concurrencies: list[int], clients: int, seconds: float,
                 input_tokens: int, output_tokens: int, ttft_ms: float, itl_ms: float, out: Path,
                 name: str = "calibrate"):
    from harness.config.scenario import Scenario

    e2el_s = (ttft_ms + (output_tokens - 1) * itl_ms) / 1e3
    workload = {"input_tokens": input_tokens, "output_tokens": output_tokens, "warmup_requests": 1}
    workloads = [workload | {"name": f"rate-{r:g}", "num_requests": max(50, math.ceil(r * seconds)),
                             "load": {"type": "poisson", "rate": r, "clients": clients}} for r in rates]
    workloads += [workload | {"name": f"concurrency-{c}", "num_requests": max(50, math.ceil(c * seconds / e2el_s)),
                              "load": {"type": "concurrency", "concurrency": c, "clients": min(clients, c)}}
                  for c in concurrencies]
    return Scenario.model_validate({
        "name": name, "models": {"tiny": {"synthetic": {"preset": "tiny-llama"}}},
        "backends": [{"name": "client", "kind": "openai", "url": url + "/v1", "served_model": MODEL}],
        "workloads": workloads, "output": str(out), "repetitions": 1})


def calibrate_points(url: str, out: Path, rates: list[float], concurrencies: list[int], clients: int = 1,
                     seconds: float = 5.0, ttft_ms: float = 5.0, itl_ms: float = 2.0, input_tokens: int = 32,
                     output_tokens: int = 32, console=None, behaviour: str = "nodelay") -> list[Point]:
    """Run the client against the scripted server at `url` (of that behaviour) at each rate and concurrency, one cell
    each (results in out/, as `bench run` writes them); returns the points in order. The server's truth is taken over
    each cell's measured requests only (its last ones: the warm-up came before)."""
    import httpx
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from harness.run.runner import Runner

    console = console or Console()
    points: list[Point] = []
    scenario = scenario_for(url, rates, concurrencies, clients, seconds, input_tokens, output_tokens, ttft_ms, itl_ms,
                            out, f"calibrate-{behaviour}")
    runner = Runner(scenario, "bench calibrate", out, console=console)
    order = [c.id for c in runner.cells]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        for cell in runner.cells:
            httpx.post(url + "/scripted/reset").raise_for_status()
            result = runner.run_cell(cell, progress)
            runner.store.put(result, order)
            n = scenario.workload(cell.workload).spec.num_requests
            points.append(point_of(result, httpx.get(f"{url}/scripted/stats?last={n}").json(), behaviour))
    runner.store.write_requests()
    return points


def calibrate(out: Path, rates: list[float], concurrencies: list[int], clients: int = 1, seconds: float = 5.0,
              ttft_ms: float = 5.0, itl_ms: float = 2.0, input_tokens: int = 32, output_tokens: int = 32,
              console=None, behaviours: list[str] | None = None) -> list[Point]:
    """calibrate_points against a scripted server of its own per behaviour (default: every one of BEHAVIOURS), each
    in out/BEHAVIOUR/; also writes out/calibration.json."""
    behaviours = behaviours or list(BEHAVIOURS)
    points: list[Point] = []
    for name in behaviours:
        with scripted_server(out / name / "server", ttft_ms, itl_ms, behaviour=BEHAVIOURS[name]) as url:
            points += calibrate_points(url, out / name, rates, concurrencies, clients, seconds, ttft_ms, itl_ms,
                                       input_tokens, output_tokens, console, name)
    atomic_write(out / "calibration.json", json.dumps(
        {"server": {"ttft_ms": ttft_ms, "itl_ms": itl_ms}, "behaviours": {n: asdict(BEHAVIOURS[n]) for n in behaviours},
         "tolerance": {"ttft_ms": TTFT_TOLERANCE_MS, "tpot": TPOT_TOLERANCE},
         "highest_rate_within": {n: highest_rate_within([p for p in points if p.server == n]) for n in behaviours},
         "points": [p.__dict__ | {"within": p.within} for p in points]}, indent=1))
    return points


def highest_rate_within(points: list[Point]) -> float | None:
    """The highest rate up to which every rate tried kept the client within the tolerances; None if the lowest
    did not."""
    best = None
    for p in sorted((p for p in points if p.nominal_rate is not None), key=lambda p: p.nominal_rate):
        if not p.within:
            break
        best = p.nominal_rate
    return best


def print_points(points: list[Point], console) -> None:
    from rich.markup import escape
    from rich.table import Table

    def f(v: float | None, fmt: str) -> str:
        return "–" if v is None else fmt.format(v)

    table = Table("server", "load", "offered req/s", "achieved req/s", "server saw req/s", "TTFT p50 ms",
                  "TTFT error ms", "TPOT error", "ITL error ms", "dispatch lag p99 ms", "loop lag p99 ms",
                  "connections", "within",
                  title="the client's own error (client median − the server's, as it emitted)")
    for p in points:
        table.add_row(escape(p.server), escape(p.load), f(p.offered_rate, "{:.2f}"), f(p.achieved_rate, "{:.2f}"),
                      f(p.server_rate, "{:.2f}"), f(p.ttft_ms, "{:.2f}"), f(p.ttft_error_ms, "{:+.3f}"),
                      f(None if p.tpot_error is None else p.tpot_error * 100, "{:+.2f}%"),
                      f(p.itl_error_ms, "{:+.3f}"), f(p.dispatch_lag_p99_ms, "{:.2f}"),
                      f(p.loop_lag_p99_ms, "{:.2f}"), str(p.connections),
                      "yes" if p.within else escape(p.status if p.status != "ok" else "no"))
    console.print(table)
    for p in points:
        if p.client_limited:
            console.print(f"[yellow]{escape(p.server)}, {escape(p.load)}: client limited[/yellow]: "
                          f"{escape('; '.join(p.client_limited))}")


if __name__ == "__main__":
    main()
