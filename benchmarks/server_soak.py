"""Soak of `mlx_lm.server` serving the embedded demo model.

Good, malformed, overlong and abandoned chat requests mixed, from a few
clients at once.

    python benchmarks/server_soak.py [--requests 500] [--concurrency 4] [--seed 0]
        [--mix good=70,malformed=15,overlong=5,abandoned=10] [--overlong-digits 100000]
        [--timeout 60] [--json PATH] [--server-log PATH]

Starts `python -m mlx_lm server --model <demo> --host 127.0.0.1 --port <free>`
(its default settings; --server-args adds flags), waits until it answers,
warms it with 3 good requests, then sends --requests POSTs to
/v1/chat/completions from --concurrency client threads, and stops the
server at the end whatever happens (error, Ctrl-C). Every address is
127.0.0.1; the clients are plain sockets with a deadline per request
(--timeout, default 60 s, connect to last byte), so nothing waits forever.

The requests, planned up front from --seed (the same plan whatever the
concurrency), in exact proportions of --mix (default 70% good, 15%
malformed, 5% overlong, 10% abandoned; largest remainders rounded):
- good: a demo problem (`demo.problem`: 3 to 8 digits) as the user message,
  max_tokens 16; one in four streamed. Correct when the answer is the digits
  sorted; any good request with another answer, or no answer, is printed.
- malformed: one of the variants in MALFORMED (invalid JSON, a body that is
  not an object, no/empty/non-list messages, a message without content or
  with an unknown role, bad max_tokens / temperature / stream values, invalid
  UTF-8, missing or invalid Content-Length, a body shorter than its
  Content-Length, whose client gives up after 3 s...), chosen at random.
- overlong: a user message of --overlong-digits digits (default 100,000),
  max_tokens 16: the server should refuse it, not hang; a client timeout is
  counted as its own outcome.
- abandoned: a good problem streamed, whose client closes the connection
  after the first `data:` chunk, after the first 8 bytes of the reply, right
  after sending, or with a reset (SO_LINGER 0) after the first chunk.

Prints: correct / wrong / failed among good requests (and each wrong or
failed one, with its request); outcomes (HTTP status, timeout, connection
error) per request kind and variant; latency deciles of good requests that
got an answer; the server's VmRSS after warm-up and at the end (and VmHWM,
its peak), from /proc/PID/status; whether at the end it still answers
GET /health and a good request (within --timeout); the exceptions in its
log; total wall time (the final good request adds up to --timeout when the
server is stuck). --json PATH writes the same figures; --server-log PATH keeps
the server's log (stdout and stderr).
A measuring script: it asserts nothing and exits 0 when it completed.
"""

import argparse
import concurrent.futures
import json
import os
import random
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlx_diffusiongemma.demo import problem

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
PATH = "/v1/chat/completions"
KINDS = ("good", "malformed", "overlong", "abandoned")
DEFAULT_MIX = "good=70,malformed=15,overlong=5,abandoned=10"
ABANDON_MODES = ("after first chunk", "after 8 bytes", "right after sending", "reset after first chunk")
SLOW_BODY_TIMEOUT = 3.0  # the client of "body shorter than Content-Length" gives up after this


def _chat(content, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], **extra}


# name -> (body bytes, extra headers or None for the usual ones); digits is a demo problem
MALFORMED = {
    "invalid JSON": lambda d: (b'{"messages": [{"role": "user", "content": "' + d.encode() + b'"}', None),
    "body a JSON list": lambda d: (json.dumps([_chat(d)]).encode(), None),
    "no messages": lambda d: (json.dumps({"max_tokens": 16}).encode(), None),
    "messages not a list": lambda d: (json.dumps({"messages": d, "max_tokens": 16}).encode(), None),
    "messages empty": lambda d: (json.dumps({"messages": [], "max_tokens": 16}).encode(), None),
    "message a string": lambda d: (json.dumps({"messages": [d], "max_tokens": 16}).encode(), None),
    "message without content": lambda d: (json.dumps({"messages": [{"role": "user"}], "max_tokens": 16}).encode(), None),
    "content null": lambda d: (json.dumps(_chat(None, max_tokens=16)).encode(), None),
    "content a number": lambda d: (json.dumps(_chat(int(d), max_tokens=16)).encode(), None),
    "unknown role": lambda d: (json.dumps({"messages": [{"role": "wizard", "content": d}], "max_tokens": 16}).encode(), None),
    "content outside the vocabulary": lambda d: (json.dumps(_chat("sort these: " + d, max_tokens=16)).encode(), None),
    "max_tokens -1": lambda d: (json.dumps(_chat(d, max_tokens=-1)).encode(), None),
    "max_tokens 0": lambda d: (json.dumps(_chat(d, max_tokens=0)).encode(), None),
    'max_tokens "x"': lambda d: (json.dumps(_chat(d, max_tokens="x")).encode(), None),
    "max_tokens 1.5": lambda d: (json.dumps(_chat(d, max_tokens=1.5)).encode(), None),
    'temperature "hot"': lambda d: (json.dumps(_chat(d, max_tokens=16, temperature="hot")).encode(), None),
    'stream "yes"': lambda d: (json.dumps(_chat(d, max_tokens=16, stream="yes")).encode(), None),
    "invalid UTF-8": lambda d: (b'{"messages": [{"role": "user", "content": "' + d.encode() + b'\xff\xfe"}]}', None),
    "no Content-Length": lambda d: (json.dumps(_chat(d, max_tokens=16)).encode(), {"Content-Type": "application/json"}),
    'Content-Length "abc"': lambda d: (json.dumps(_chat(d, max_tokens=16)).encode(),
                                       {"Content-Type": "application/json", "Content-Length": "abc"}),
    "body shorter than Content-Length": lambda d: (json.dumps(_chat(d, max_tokens=16)).encode(),
                                                   {"Content-Type": "application/json", "Content-Length": "100000"}),
}


class ClientTimeout(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _raw_request(port: int, body: bytes, headers=None, path=PATH) -> bytes:
    if headers is None:
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    head = f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"Connection: close\r\n\r\n" + body


def _split(data: bytes):
    """(status or None, headers dict, body) of what came back so far."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return None, {}, b""
    lines = head.decode("latin-1").split("\r\n")
    m = re.match(r"HTTP/\d\.\d (\d{3})", lines[0])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return (int(m.group(1)) if m else None), headers, body


def _complete(data: bytes) -> bool:
    status, headers, body = _split(data)
    if status is None:
        return False
    if headers.get("content-length", "").isdigit():
        return len(body) >= int(headers["content-length"])
    return b"data: [DONE]" in body


def _first_chunk(data: bytes) -> bool:
    return re.search(rb"(^|\n)data: [^\n]*\n\n", _split(data)[2]) is not None


def exchange(port: int, raw: bytes, timeout: float, stop=None, reset=False) -> tuple:
    """Send `raw`, read the reply until the server closes, the reply is
    complete, or `stop(data)` says to abandon it. Returns (data, abandoned);
    raises ClientTimeout past the deadline, OSError on connection errors."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            s.sendall(raw)
        except TimeoutError:
            raise ClientTimeout() from None
        data = b""
        if stop is not None and stop(data):
            return data, True
        while True:  # bounded: every recv waits at most until the deadline
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClientTimeout()
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                raise ClientTimeout() from None
            if not chunk:
                return data, False
            data += chunk
            if stop is not None and stop(data):
                return data, True
            if _complete(data):
                return data, False


def _answer(status, headers, body, stream: bool):
    """(answer text or None, problem) of a good request's reply."""
    if status != 200:
        return None, f"HTTP {status}: {body[:200]!r}"
    try:
        if not stream:
            return json.loads(body)["choices"][0]["message"]["content"], None
        text, done = "", False
        for line in body.decode().splitlines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"]
                text += (choice[0].get("delta", {}).get("content") or "") if choice else ""
        return (text, None) if done else (None, f"stream without [DONE]: {body[-200:]!r}")
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return None, f"unreadable reply ({type(e).__name__}: {e}): {body[:200]!r}"


def plan(n: int, mix: dict, seed: int, overlong_digits: int) -> list:
    """The requests, in sending order: dicts with kind, variant, raw bytes and what to check."""
    rng = random.Random(seed)
    total = sum(mix.values())
    exact = {k: n * w / total for k, w in mix.items()}
    counts = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    kinds = [k for k in KINDS for _ in range(counts.get(k, 0))]
    rng.shuffle(kinds)
    requests = []
    for i, kind in enumerate(kinds):
        digits, answer = problem(rng)
        r = {"index": i, "kind": kind, "variant": kind, "digits": digits, "answer": answer, "stream": False,
             "headers": None, "timeout": None, "abandon": None}
        if kind == "good":
            r["stream"] = rng.random() < 0.25
            r["variant"] = "good, streamed" if r["stream"] else "good"
            r["body"] = json.dumps(_chat(digits, max_tokens=16, **({"stream": True} if r["stream"] else {}))).encode()
        elif kind == "malformed":
            r["variant"] = rng.choice(sorted(MALFORMED))
            r["body"], r["headers"] = MALFORMED[r["variant"]](digits)
            if r["variant"] == "body shorter than Content-Length":
                r["timeout"] = SLOW_BODY_TIMEOUT
        elif kind == "overlong":
            r["variant"] = f"overlong ({overlong_digits} digits)"
            r["body"] = json.dumps(_chat("".join(rng.choice("0123456789") for _ in range(overlong_digits)),
                                         max_tokens=16)).encode()
        else:
            r["abandon"] = rng.choice(ABANDON_MODES)
            r["variant"] = f"abandoned {r['abandon']}"
            r["body"] = json.dumps(_chat(digits, max_tokens=16, stream=True)).encode()
        requests.append(r)
    return requests


def _shown(body: bytes) -> str:
    text = repr(body)[1:]
    return text if len(text) <= 160 else f"{text[:120]}... ({len(body)} bytes)"


def send(port: int, r: dict, timeout: float) -> dict:
    """One request's outcome: the plan entry plus outcome, status, latency, text, problem."""
    stop, reset = None, False
    if r["abandon"] == "after first chunk":
        stop = _first_chunk
    elif r["abandon"] == "reset after first chunk":
        stop, reset = _first_chunk, True
    elif r["abandon"] == "after 8 bytes":
        stop = lambda data: len(data) >= 8  # noqa: E731
    elif r["abandon"] == "right after sending":
        stop = lambda data: True  # noqa: E731
    out = {k: r[k] for k in ("index", "kind", "variant", "digits", "answer", "stream")}
    out.update(status=None, latency=None, text=None, problem=None,
               request=(r["headers"] and f"headers {r['headers']}, " or "") + f"body {_shown(r['body'])}")
    start = time.monotonic()
    try:
        data, abandoned = exchange(port, _raw_request(port, r["body"], r["headers"]), r["timeout"] or timeout,
                                   stop=stop, reset=reset)
    except ClientTimeout:
        out["outcome"] = out["problem"] = f"client timeout ({r['timeout'] or timeout:g} s)"
        return out
    except OSError as e:
        out["outcome"] = out["problem"] = f"connection error ({type(e).__name__}: {e})"
        return out
    out["latency"] = time.monotonic() - start
    status, headers, body = _split(data)
    out["status"] = status
    if abandoned:
        out["outcome"] = "closed by the client" + (f" (HTTP {status} so far)" if status else " (nothing read)")
    elif status is None:
        out["outcome"] = "closed without a reply" if not data else f"unreadable reply {data[:40]!r}"
    else:
        out["outcome"] = f"HTTP {status}"
        if status != 200:
            out["problem"] = body[:300].decode("utf-8", "replace")
        elif r["kind"] != "good":
            text, problem = _answer(status, headers, body, r["stream"])
            out["problem"] = problem or f"answered {text!r}"
    if r["kind"] == "good":
        out["text"], out["problem"] = _answer(status, headers, body, r["stream"]) if status else (None, out["outcome"])
        if out["text"] is not None and out["text"] != r["answer"]:
            out["problem"] = f"wrong answer {out['text']!r}"
    return out


def _vm(pid: int) -> dict:
    """VmRSS and VmHWM of a process, in MiB (None once it has exited)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {"VmRSS": None, "VmHWM": None}
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) / 1024 for k in ("VmRSS", "VmHWM")}


def _healthy(port: int) -> bool:
    """GET /health says 200 (the generation thread is alive). Not /v1/models:
    without a Hugging Face cache directory it sends 200, then raises."""
    try:
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(f"GET /health HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            for _ in range(64):  # read the whole short reply: closing early makes the server's write fail
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            return re.match(rb"HTTP/\d\.\d 200", data) is not None
    except OSError:
        return False


def _log_exceptions(log: str) -> dict:
    """Count of each exception ending a traceback in the server's log."""
    counts = {}
    for block in log.split("Traceback (most recent call last):")[1:]:
        last = next((line for line in block.splitlines() if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Found|Interrupt)\b", line)),
                    "(unrecognised)")
        name = last.split(":")[0]
        counts[name] = counts.get(name, 0) + 1
    return counts


def _deciles(values: list) -> list:
    values = sorted(values)
    return [values[max(-(-q * len(values) // 10) - 1, 0)] for q in range(1, 11)] if values else []


def _parse_mix(text: str) -> dict:
    mix = {}
    for part in text.split(","):
        k, _, w = part.partition("=")
        if k.strip() not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown kind {k!r}: one of {', '.join(KINDS)}")
        mix[k.strip()] = float(w)
    if sum(mix.values()) <= 0 or min(mix.values()) < 0:
        raise argparse.ArgumentTypeError("weights must be >= 0, not all 0")
    return mix


class Server:
    """mlx_lm.server on loopback, its log in a file."""

    def __init__(self, model: str, flags: list, log: Path):
        self.port = _free_port()
        self.log_path = log
        self.log = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm", "server", "--model", model, "--host", HOST, "--port", str(self.port), *flags],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
        )

    def wait(self, seconds: float = 180) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited ({self.process.returncode}):\n{self.log_path.read_text()[-3000:]}")
            if _healthy(self.port):
                return
            time.sleep(0.5)
        raise RuntimeError(f"server did not answer in {seconds:g} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.log.close()


def soak(args, server: Server, stop: threading.Event, lock: threading.Lock) -> dict:
    port = server.port
    for digits, _ in [problem(random.Random(f"warm-up {i}")) for i in range(3)]:
        exchange(port, _raw_request(port, json.dumps(_chat(digits, max_tokens=16)).encode()), args.timeout)
    rss_start = _vm(server.process.pid)
    requests = plan(args.requests, _parse_mix(args.mix), args.seed, args.overlong_digits)

    def run(r):
        if stop.is_set():
            return None
        try:
            out = send(port, r, args.timeout)
        except Exception as e:  # a bug of this client, not the server's: counted, not fatal
            out = {k: r[k] for k in ("index", "kind", "variant", "digits", "answer", "stream")}
            out.update(status=None, latency=None, text=None, request=_shown(r["body"]),
                       outcome=f"client error ({type(e).__name__})", problem=f"client error: {e!r}")
        if out["problem"] and out["kind"] == "good" and not stop.is_set():
            with lock:
                print(f"{'WRONG' if out['text'] is not None else 'FAILED'} good request #{out['index']} "
                      f"{PATH} {json.dumps(json.loads(r['body']))}: {out['problem']} (expected {out['answer']!r})",
                      flush=True)
        return out

    start = time.monotonic()
    pool = concurrent.futures.ThreadPoolExecutor(args.concurrency)
    try:
        results = list(pool.map(run, requests))
    except BaseException:  # an error or Ctrl-C: the threads skip what they have not started, and
        stop.set()  # the requests in flight fail at once rather than at their deadline
        server.stop()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    seconds = time.monotonic() - start
    healthy = server.process.poll() is None and _healthy(port)
    digits, answer = problem(random.Random("final check"))
    final = send(port, {"index": -1, "kind": "good", "variant": "final check", "digits": digits, "answer": answer,
                        "stream": False, "headers": None, "timeout": None, "abandon": None,
                        "body": json.dumps(_chat(digits, max_tokens=16)).encode()}, args.timeout)
    rss_end = _vm(server.process.pid)
    return {"requests": requests, "results": [r for r in results if r is not None], "rss_start": rss_start,
            "rss_end": rss_end, "seconds": seconds, "healthy": healthy,
            "final": final}


def report(args, run: dict, wall: float, server: Server) -> dict:
    results = run["results"]
    good = [r for r in results if r["kind"] == "good"]
    correct = [r for r in good if r["text"] == r["answer"]]
    wrong = [r for r in good if r["text"] is not None and r["text"] != r["answer"]]
    failed = [r for r in good if r["text"] is None]
    outcomes = {}
    for r in results:
        outcomes.setdefault(r["kind"], {}).setdefault(r["variant"], {}).setdefault(r["outcome"], 0)
        outcomes[r["kind"]][r["variant"]][r["outcome"]] += 1
    examples = {}  # one request and reply per (variant, outcome), non-good kinds
    for r in results:
        if r["kind"] != "good":
            examples.setdefault(f"{r['variant']} -> {r['outcome']}",
                                {"request": r["request"], "reply": (r["problem"] or "")[:200]})
    latencies = [r["latency"] for r in good if r["text"] is not None]
    log = server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
    return {
        "settings": {k: getattr(args, k) for k in ("requests", "concurrency", "seed", "mix", "overlong_digits", "timeout")},
        "sent": len(results),
        "good": {"sent": len(good), "correct": len(correct), "wrong": len(wrong), "failed (no answer)": len(failed)},
        "wrong answers": [{"index": r["index"], "digits": r["digits"], "expected": r["answer"], "answer": r["text"],
                           "streamed": r["stream"]} for r in wrong],
        "failed good requests": [{"index": r["index"], "digits": r["digits"], "outcome": r["outcome"],
                                  "problem": r["problem"]} for r in failed],
        "outcomes": outcomes,
        "example replies": examples,
        "good latency deciles s": dict(zip([f"{q}%" for q in range(10, 101, 10)], _deciles(latencies))),
        "server VmRSS MiB after warm-up": run["rss_start"]["VmRSS"],
        "server VmRSS MiB at the end": run["rss_end"]["VmRSS"],
        "server VmHWM MiB at the end": run["rss_end"]["VmHWM"],
        "server answers GET /health at the end": run["healthy"],
        "server answers a good request at the end": run["final"]["text"] == run["final"]["answer"],
        "server's final good request": f"{run['final']['outcome']}, " + (
            f"{run['final']['latency']:.3f} s" if run["final"]["latency"] is not None else "no reply"),
        "server exit code during the run": server.process.poll(),
        "tracebacks in the server log": log.count("Traceback (most recent call last)"),
        "exceptions in the server log": _log_exceptions(log),
        "soak s": run["seconds"],
        "wall s": wall,
    }


def show(figures: dict) -> None:
    def line(k, v, indent=2):
        text = f"{v:10.3f}" if isinstance(v, float) else f"{v!s:>10}"
        print(f"{' ' * indent}{k:56s} {text}")

    print(f"mlx_lm.server soak, demo model, {figures['sent']} requests "
          f"(concurrency {figures['settings']['concurrency']}, seed {figures['settings']['seed']}, "
          f"mix {figures['settings']['mix']}):")
    print("good requests:")
    for k, v in figures["good"].items():
        line(k, v)
    for w in figures["wrong answers"]:
        print(f"  WRONG #{w['index']}: {w['digits']} -> {w['answer']!r}, expected {w['expected']!r}")
    for f in figures["failed good requests"]:
        print(f"  FAILED #{f['index']}: {f['digits']}: {f['problem']}")
    print("outcomes by request kind:")
    print(f"  {'kind':10s} {'variant':36s} {'outcome':42s} {'count':>5s}")
    for kind in KINDS:
        for variant, counts in sorted(figures["outcomes"].get(kind, {}).items()):
            for outcome, n in sorted(counts.items()):
                print(f"  {kind:10s} {variant:36s} {outcome:42s} {n:5d}")
    print("example requests and replies (non-good kinds, one per variant and outcome):")
    for k, v in figures["example replies"].items():
        print(f"  {k}:\n    request {v['request']}\n    reply   {v['reply']}")
    print("good request latency, s, by decile:" + ("" if figures["good latency deciles s"] else " (no answers)"))
    for k, v in figures["good latency deciles s"].items():
        line(k, v)
    print("server:")
    for k in ("server VmRSS MiB after warm-up", "server VmRSS MiB at the end", "server VmHWM MiB at the end",
              "server answers GET /health at the end", "server answers a good request at the end",
              "server's final good request", "server exit code during the run", "tracebacks in the server log"):
        line(k.removeprefix("server ").removeprefix("server's "), figures[k])
    for name, n in figures["exceptions in the server log"].items():
        line(f"  {name}", n)
    line("soak s", figures["soak s"], 0)
    line("wall s (server start, warm-up, soak, final check)", figures["wall s"], 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", default=DEFAULT_MIX, help=f"weights of the request kinds (default {DEFAULT_MIX})")
    parser.add_argument("--overlong-digits", type=int, default=100_000)
    parser.add_argument("--timeout", type=float, default=60.0, help="client deadline per request, s")
    parser.add_argument("--model", default=None, help="model directory (default: the embedded demo)")
    parser.add_argument("--server-args", default="", help="extra mlx_lm.server flags, one string")
    parser.add_argument("--server-log", default=None, help="keep the server's log here")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    try:
        _parse_mix(args.mix)  # fail early on a bad mix
    except (argparse.ArgumentTypeError, ValueError) as e:
        parser.error(f"--mix {args.mix!r}: {e}")
    if args.model is None:
        from mlx_diffusiongemma.load import resolve
        args.model = str(resolve("demo"))

    def terminated(signum, frame):
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, terminated)  # `kill`/`timeout` stop the server too
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(args.server_log) if args.server_log else Path(tmp) / "server.log"
        start = time.monotonic()
        server = Server(args.model, shlex.split(args.server_args), log)
        stop, lock = threading.Event(), threading.Lock()
        try:
            server.wait()
            run = soak(args, server, stop, lock)
            wall = time.monotonic() - start
            figures = report(args, run, wall, server)  # before stopping: RSS, exit code, log
        except KeyboardInterrupt:
            stop.set()
            print("interrupted: stopping the server", file=sys.stderr)
            return 130
        finally:
            stop.set()
            server.stop()
    show(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
