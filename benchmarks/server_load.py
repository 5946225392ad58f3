"""Load, soak and fault benchmark of the OpenAI-compatible server (`DSparkServer`, issue #26).

Starts `DSparkServer` in-process on 127.0.0.1 (port 0) over a `DSparkEngine` with SmolLM2-135M-Instruct and the
shipped default draft in bf16 (`--dtype`), then runs bursts of C concurrent clients (threads speaking `http.client`
over loopback), every concurrency of `--concurrency` once per cycle, `--cycles` cycles. A burst sends
max(`--min-requests`, C × `--requests-per-client`) requests, dealt round-robin to its clients; each client sends its
share one after another. The requests of a burst are drawn in turn from one fixed mix, shuffled per burst:

- healthy: a short chat turn (a first turn of `--datasets` in `--eval-dir`, at most `--prompt-token-cap` chat
  tokens), `--max-tokens` tokens, streaming or not, greedy (3 in 4) or sampled (temperature 0.7, top_p 0.95);
- poison, each with the status a correct server answers: temperature 1e-50, top_k 2**63+5, max_tokens 0,
  `stream: "false"`, malformed JSON, lone-surrogate content, an unknown model (404), a body shorter than its
  Content-Length with the client's write side shut, a prompt longer than the context window (all 400 otherwise);
- leaving clients: a stream closed after its first content event, and a non-streaming request closed
  `--leave-after` seconds after it was sent; both ask `--leave-max-tokens` tokens, so they leave mid-request.

Per request: kind, HTTP status, latency (send to last byte), connection errors (resets — ConnectionResetError,
BrokenPipeError, ConnectionAbortedError, including http.client.RemoteDisconnected — apart from other errors) and,
for greedy healthy requests, whether the text equals that of the same request sent alone (a baseline taken before
the bursts, one request at a time, each sent twice to see whether alone is itself reproducible). A differing answer
is traced to its first differing token, where the target's logits of the two tokens tell whether the batch's
rounding broke a tie the other way. Per burst: process RSS and thread counts before, at peak and after (the server
runs in this process: its threads are this process's threads other than the main, client and sampler threads), the
finish reasons the engine gave (a leaving client's request must end `cancelled`), and whether the engine drained.
After the bursts, two requests alone: a healthy one (still the baseline answer?) and a valid request whose client
shuts its write side after the body (an HTTP half-close), reported apart from the checks.

Checks: 0 connection resets at the highest concurrency; 0 healthy requests lost with poison mixed in; 0 greedy
answers differing from the same request alone (and 0 other than at a rounding tie); RSS flat: at rest after each
burst (the engine loop hands freed memory back to the OS when it goes idle) within +10% of the first, and likewise
after gc and glibc's malloc_trim called by this script (the memory still in use); peak RSS is reported beside it; and, beyond those, every poison request answered with its expected status, every leaving
client's request cancelled with the engine drained, no server thread left behind.

Writes benchmarks/results/<output-name>.{json,md} (default server_load; server_load_quick with --quick).

Usage: python benchmarks/server_load.py [--concurrency 1 16 64] [--cycles 3] [--threads 1]
Smoke test (one to two minutes): python benchmarks/server_load.py --quick
"""

import argparse
import collections
import ctypes
import gc
import http.client
import importlib.metadata
import itertools
import json
import math
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import _common as common
import torch

from dspark_hf.default_draft import load_default_draft
from dspark_hf.engine import DSparkEngine
from dspark_hf.engine.server import DSparkServer
from dspark_hf.evaluation import first_divergence, load_prompt_sets
from dspark_hf.scheduling import CostTable
from dspark_hf.targets import chat_input_ids, load_target

try:
    import psutil
except ImportError:  # RSS and thread counts come from /proc/self/status instead
    psutil = None

MODEL_NAME = "smollm2"
PATH = "/v1/chat/completions"
COST_TABLE = common.RESULTS / "cost_table_smollm2_cpu_engine_rxw.json"
DATASETS = ("gsm8k", "humaneval", "mt-bench", "alpacaeval")
RESET_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
POISON_STATUS = {
    "temperature_1e-50": 400,
    "top_k_2**63+5": 400,
    "max_tokens_0": 400,
    "stream_string_false": 400,
    "malformed_json": 400,
    "lone_surrogate": 400,
    "unknown_model": 404,
    "short_body_write_shut": 400,
    "oversized_prompt": 400,
}
LEAVE_KINDS = ("leave_stream", "leave_waiting")
# One healthy request before each other kind, and one more: 12 healthy of 23.
MIX = (*itertools.chain.from_iterable(("healthy", kind) for kind in (*POISON_STATUS, *LEAVE_KINDS)), "healthy")
RSS_TOLERANCE = 1.10
REST_S = 0.5  # after a burst drains, how long the server is left idle before its RSS is read ("at rest")
POOL_SCAN = 200


@dataclass
class Plan:
    """One request: its kind (of `MIX`), the body sent and how it is sent and read."""

    kind: str
    body: bytes
    stream: bool = False
    greedy: bool = False
    prompt: int | None = None
    extra_length: int = 0  # Content-Length announces this many bytes more than are sent; the write side is shut
    half_close: bool = False  # shut the write side after the whole body


class RecordingEngine(DSparkEngine):
    """A `DSparkEngine` that counts the requests added to it and the finish reasons of those its steps finished."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.added = 0
        self.finish_reasons: collections.Counter = collections.Counter()

    def add_request(self, *args, **kwargs):
        request = super().add_request(*args, **kwargs)
        self.added += 1
        return request

    def step(self):
        finished = super().step()
        self.finish_reasons.update(r.finish_reason for r in finished)
        return finished

    @property
    def drained(self) -> bool:
        """Every request added has come back finished from a step, and none is left."""
        return sum(self.finish_reasons.values()) == self.added and not self.has_unfinished()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="Clients per burst.")
    parser.add_argument("--cycles", type=int, default=3, help="Bursts per concurrency (one per cycle).")
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--min-requests", type=int, default=8, help="Fewest requests per burst.")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of healthy requests.")
    parser.add_argument("--leave-max-tokens", type=int, default=64, help="max_tokens of clients that leave.")
    parser.add_argument("--leave-after", type=float, default=0.5, help="Seconds before a non-streaming client leaves.")
    parser.add_argument("--prompts", type=int, default=12, help="Pool of first turns, taken in turn from --datasets.")
    parser.add_argument(
        "--prompt-token-cap", type=int, default=64,
        help="Longest pool prompt, in chat tokens (SmolLM2's template adds about 30 to the user's text). Prefill "
        "dominates a burst: bf16 on a CPU without native bf16 runs it at a few dozen tokens per second.",
    )
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--eval-dir", type=Path, default=common.EVAL_DIR)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=common.DTYPE, help="Model dtype.")
    parser.add_argument("--scheduler", choices=["prefix", "full", "threshold"], default="prefix")
    parser.add_argument("--cost-table", type=Path, default=COST_TABLE, help="Cost table of --scheduler prefix.")
    parser.add_argument("--client-timeout", type=float, default=300.0, help="Socket timeout of every client (s).")
    parser.add_argument(
        "--drain-timeout", type=float, default=60.0,
        help="After a burst, wait this long (s) for the server's threads to end, and as long for the engine to empty.",
    )
    parser.add_argument(
        "--time-limit", type=float, default=540.0, help="No burst starts after this many seconds of the run."
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="Smoke mode: C 1 and 4, 2 cycles, 3 prompts, 4 tokens.")
    parser.add_argument("--output-name", help="Writes benchmarks/results/<name>.{json,md}.")
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.cycles, args.min_requests, args.prompts = [1, 4], 2, 6, 3
        args.max_tokens, args.leave_max_tokens = 4, 32
    args.output_name = args.output_name or ("server_load_quick" if args.quick else "server_load")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------------------------------


def chat_body(prompt: str, max_tokens: int, **fields) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, **fields}


def encode(body: dict) -> bytes:
    return json.dumps(body).encode()


def healthy_plan(prompts: list[str], index: int, args: argparse.Namespace, rng: random.Random) -> Plan:
    """A healthy request on pool prompt `index`: streaming half the time, greedy three times in four."""
    stream, greedy = rng.random() < 0.5, rng.random() < 0.75
    sampling = {"temperature": 0} if greedy else {"temperature": 0.7, "top_p": 0.95}
    body = chat_body(prompts[index], args.max_tokens, stream=stream, **sampling)
    return Plan("healthy", encode(body), stream=stream, greedy=greedy, prompt=index)


def make_plan(kind: str, prompts: list[str], context_window: int, args: argparse.Namespace, rng: random.Random) -> Plan:
    """The request of one `kind` of `MIX` on a random pool prompt."""
    index = rng.randrange(len(prompts))
    if kind == "healthy":
        return healthy_plan(prompts, index, args, rng)
    prompt, tokens = prompts[index], args.max_tokens
    if kind in LEAVE_KINDS:
        stream = kind == "leave_stream"
        return Plan(kind, encode(chat_body(prompt, args.leave_max_tokens, temperature=0, stream=stream)), stream)
    bodies = {
        "temperature_1e-50": lambda: encode(chat_body(prompt, tokens, temperature=1e-50)),
        "top_k_2**63+5": lambda: encode(chat_body(prompt, tokens, top_k=2**63 + 5)),
        "max_tokens_0": lambda: encode(chat_body(prompt, 0)),
        "stream_string_false": lambda: encode(chat_body(prompt, tokens, stream="false")),
        "malformed_json": lambda: encode(chat_body(prompt, tokens))[:-9],
        "lone_surrogate": lambda: encode(chat_body(prompt + "\ud800", tokens)),
        "unknown_model": lambda: encode({**chat_body(prompt, tokens), "model": "no-such-model"}),
        "short_body_write_shut": lambda: encode(chat_body(prompt, tokens)),
        "oversized_prompt": lambda: encode(chat_body(" ".join(["hello"] * (context_window + 64)), tokens)),
    }
    extra = 64 if kind == "short_body_write_shut" else 0
    return Plan(kind, bodies[kind](), extra_length=extra)


def send(address: tuple[str, int], plan: Plan, args: argparse.Namespace) -> dict:
    """Sends `plan` on a fresh connection and reads the answer; returns the request's record."""
    record = {"kind": plan.kind, "stream": plan.stream, "greedy": plan.greedy, "prompt": plan.prompt, "status": None,
              "error": None, "reset": False, "complete": False, "left": False}
    started = time.perf_counter()
    connection = http.client.HTTPConnection(*address, timeout=args.client_timeout)
    try:
        connection.putrequest("POST", PATH)
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(len(plan.body) + plan.extra_length))
        connection.endheaders(plan.body)
        if plan.extra_length or plan.half_close:
            connection.sock.shutdown(socket.SHUT_WR)
        if plan.kind == "leave_waiting":
            time.sleep(args.leave_after)
            record["left"] = True
            return record
        response = connection.getresponse()
        record["status"] = response.status
        if plan.stream and response.status == 200:
            read_stream(response, record, leave=plan.kind == "leave_stream")
        else:
            read_json(response, record)
    except (OSError, http.client.HTTPException) as error:
        record["error"] = type(error).__name__
        record["reset"] = isinstance(error, RESET_ERRORS)
    except (ValueError, LookupError, TypeError) as error:  # an answer that is not the JSON or events it should be
        record["error"] = f"malformed answer ({type(error).__name__})"
    finally:
        connection.close()
        record["latency_s"] = time.perf_counter() - started
    return record


def read_json(response: http.client.HTTPResponse, record: dict) -> None:
    raw = response.read()
    try:
        body = json.loads(raw)
    except ValueError:
        record["error"] = "unparsable_body"
        return
    if response.status != 200:
        record["error_type"] = (body.get("error") or {}).get("type") if isinstance(body, dict) else None
        return
    choice = body["choices"][0]
    record["text"], record["finish_reason"] = choice["message"]["content"], choice["finish_reason"]
    record["complete"] = isinstance(record["text"], str) and record["finish_reason"] in ("stop", "length")


def read_stream(response: http.client.HTTPResponse, record: dict, leave: bool) -> None:
    """Reads server-sent events to `[DONE]` (or, with `leave`, to the first content and then stops reading)."""
    pieces, finish_reason, done, failed = [], None, False, False
    for line in response:
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: "):].strip()
        if data == b"[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            failed = True
            continue
        for choice in event["choices"]:
            pieces.append(choice["delta"].get("content") or "")
            finish_reason = choice["finish_reason"] or finish_reason
        if leave and any(pieces):
            record["left"] = True
            return
    record["text"], record["finish_reason"] = "".join(pieces), finish_reason
    record["complete"] = done and not failed and finish_reason in ("stop", "length")


# ----------------------------------------------------------------------------------------------------------------------
# Bursts
# ----------------------------------------------------------------------------------------------------------------------


def process_status() -> tuple[float, int]:
    """This process's RSS in MiB and its number of OS threads (psutil, else /proc/self/status)."""
    if psutil is not None:
        process = psutil.Process()
        return process.memory_info().rss / 2**20, process.num_threads()
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def rss_mib() -> float:
    gc.collect()
    return process_status()[0]


def trimmed_rss_mib() -> float | None:
    """RSS after gc and glibc's `malloc_trim(0)`, which hands freed heap back to the OS: the memory still in use
    (a leak grows it; allocator caches do not). None without glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        return None
    return rss_mib()


def server_threads() -> int:
    """Python threads of this process other than the main, client and sampler threads: the server's."""
    main = threading.main_thread()
    return sum(1 for t in threading.enumerate() if t is not main and not t.name.startswith(("client-", "sampler")))


class Sampler(threading.Thread):
    """Records the peak RSS and thread counts every 0.1 s until stopped."""

    def __init__(self):
        super().__init__(name="sampler", daemon=True)
        self.stop_event = threading.Event()
        self.peak = {"rss_mib": 0.0, "server_threads": 0, "os_threads": 0}

    def run(self) -> None:
        while True:
            rss, os_threads = process_status()
            sample = {"rss_mib": rss, "server_threads": server_threads(), "os_threads": os_threads}
            self.peak = {key: max(value, sample[key]) for key, value in self.peak.items()}
            if self.stop_event.wait(0.1):
                return

    def stop(self) -> dict:
        self.stop_event.set()
        self.join()
        return self.peak


def wait_until(condition, timeout: float) -> float | None:
    """Seconds until `condition()` held (polled every 0.05 s), or None after `timeout`."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if condition():
            return time.perf_counter() - started
        time.sleep(0.05)
    return None


def run_burst(server: DSparkServer, plans: list[list[Plan]], args: argparse.Namespace) -> dict:
    """One burst: a thread per client sends its plans one after another; all start together."""
    engine: RecordingEngine = server.engine
    address = server.server_address[:2]
    barrier = threading.Barrier(len(plans) + 1)
    records: list[list[dict]] = [[] for _ in plans]

    def client(i: int) -> None:
        barrier.wait()
        for plan in plans[i]:
            records[i].append(send(address, plan, args))

    clients = [threading.Thread(target=client, args=(i,), name=f"client-{i}", daemon=True) for i in range(len(plans))]
    threads_before, rss_before = server_threads(), rss_mib()
    os_threads_before = process_status()[1]
    reasons_before, tokens_before = collections.Counter(engine.finish_reasons), engine.stats.generated_tokens
    sampler = Sampler()
    sampler.start()
    for thread in clients:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    deadline = started + args.client_timeout * max(len(p) for p in plans) + 30
    for thread in clients:
        thread.join(max(0.0, deadline - time.perf_counter()))
    wall = time.perf_counter() - started
    settle_s = wait_until(lambda: server_threads() <= threads_before, args.drain_timeout)
    drain_s = wait_until(lambda: engine.drained, args.drain_timeout)
    peak = sampler.stop()
    after = rss_mib()
    time.sleep(REST_S)  # the engine loop hands the burst's freed memory back once it is idle
    at_rest = rss_mib()
    flat = [r for rs in records for r in rs]
    return {
        "concurrency": len(plans),
        "requests": sum(len(p) for p in plans),
        "clients_unfinished": sum(t.is_alive() for t in clients),
        "wall_s": wall,
        "generated_tokens": engine.stats.generated_tokens - tokens_before,
        "engine_finish_reasons": dict(engine.finish_reasons - reasons_before),
        "drain_s": drain_s,
        "threads_settle_s": settle_s,
        "rss_mib_before": rss_before,
        "rss_mib_peak": peak["rss_mib"],
        "rss_mib_after": after,
        "rss_mib_at_rest": at_rest,
        "rss_mib_after_trim": trimmed_rss_mib(),
        "server_threads_before": threads_before,
        "server_threads_peak": peak["server_threads"],
        "server_threads_after": server_threads(),
        "os_threads_before": os_threads_before,
        "os_threads_peak": peak["os_threads"],
        "os_threads_after": process_status()[1],
        "records": flat,
    }


def deal(kinds: list[str], clients: int) -> list[list[str]]:
    """Round-robin: client i gets kinds i, i + clients, ..."""
    return [kinds[i::clients] for i in range(clients)]


# ----------------------------------------------------------------------------------------------------------------------
# Summaries and checks
# ----------------------------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def mark_differences(records: list[dict], baseline: dict[str, dict]) -> None:
    """Sets `differs_from_alone` on every complete greedy record (its text against the baseline's)."""
    for record in records:
        if record["greedy"] and record["complete"]:
            record["differs_from_alone"] = record["text"] != baseline[str(record["prompt"])]["text"]


def divergences(records: list[dict], baseline: dict[str, dict], prompts: list[str], server: DSparkServer) -> list[dict]:
    """Each distinct greedy answer that differs from its alone answer: where, and whether the two tokens there tie.

    Both answers are re-tokenized after the chat prompt; the target is run once over the alone answer's prefix up to
    the first differing token (`dspark_hf.evaluation.first_divergence`: a tie when the two logits differ by at most
    2·eps·max|logit| of the target's dtype, so the rounding of a differently shaped pass may swap them)."""
    tokenizer, target = server.tokenizer, server.engine.target
    counts = collections.Counter((r["prompt"], r["text"]) for r in records if r.get("differs_from_alone"))
    rows = []
    for (index, text), count in counts.items():
        prompt_ids = chat_input_ids(tokenizer, prompts[index])[0].tolist()
        alone, loaded = ([*prompt_ids, *tokenizer(t, add_special_tokens=False)["input_ids"]]
                         for t in (baseline[str(index)]["text"], text))
        found = first_divergence(target, torch.tensor([alone]), torch.tensor([loaded]))
        row = {"prompt": index, "count": count, "alone": baseline[str(index)]["text"], "under_load": text,
               "is_tie": None}
        if found is not None:
            row.update(first_difference=found.position - len(prompt_ids), is_tie=found.is_tie,
                       alone_token=tokenizer.decode([found.plain_token]), alone_logit=found.plain_logit,
                       load_token=tokenizer.decode([found.other_token]), load_logit=found.other_logit)
        rows.append(row)
    return rows


def is_lost(record: dict) -> bool:
    return record["kind"] == "healthy" and not record["complete"]


def summarize(bursts: list[dict]) -> dict:
    """Per concurrency: healthy latencies, resets, lost and differing answers; per kind: statuses and errors."""
    per_concurrency = {}
    for concurrency in sorted({b["concurrency"] for b in bursts}):
        records = [r for b in bursts if b["concurrency"] == concurrency for r in b["records"]]
        healthy = [r for r in records if r["kind"] == "healthy"]
        latencies = [r["latency_s"] for r in healthy if r["complete"]]
        greedy = [r for r in healthy if "differs_from_alone" in r]
        per_concurrency[concurrency] = {
            "bursts": sum(b["concurrency"] == concurrency for b in bursts),
            "requests": len(records),
            "served": sum(r["status"] is not None for r in records),
            "healthy": len(healthy),
            "healthy_complete": len(latencies),
            "healthy_lost": sum(map(is_lost, records)),
            "p50_latency_s": percentile(latencies, 50),
            "p99_latency_s": percentile(latencies, 99),
            "resets": sum(r["reset"] for r in records),
            "other_errors": sum(r["error"] is not None and not r["reset"] for r in records),
            "greedy_compared": len(greedy),
            "greedy_differing": sum(r["differs_from_alone"] for r in greedy),
        }
    kinds = {}
    for record in (r for b in bursts for r in b["records"]):
        entry = kinds.setdefault(record["kind"], {"count": 0, "statuses": collections.Counter(),
                                                   "errors": collections.Counter(), "left": 0})
        entry["count"] += 1
        entry["statuses"][str(record["status"])] += 1
        if record["error"]:
            entry["errors"][record["error"]] += 1
        entry["left"] += record["left"]
    return {"per_concurrency": per_concurrency,
            "kinds": {k: {**v, "statuses": dict(v["statuses"]), "errors": dict(v["errors"])} for k, v in kinds.items()}}


def checks(report: dict) -> list[dict]:
    bursts, summary = report["bursts"], report["summary"]
    records = [r for b in bursts for r in b["records"]]
    top = max(b["concurrency"] for b in bursts)
    top_resets = summary["per_concurrency"][top]["resets"]
    lost = sum(map(is_lost, records))
    differing = sum(r.get("differs_from_alone", False) for r in records)
    untied = sum(d["count"] for d in report["divergences"] if not d["is_tie"])
    trimmed = [b["rss_mib_after_trim"] for b in bursts]
    growth = None if None in trimmed or len(trimmed) < 2 else max(trimmed[1:]) / trimmed[0]
    resting = [b.get("rss_mib_at_rest") for b in bursts]
    rest_growth = None if None in resting or len(resting) < 2 else max(resting[1:]) / resting[0]
    poison = [r for r in records if r["kind"] in POISON_STATUS]
    wrong = sum(r["status"] != POISON_STATUS[r["kind"]] for r in poison)
    leaving = sum(r["kind"] in LEAVE_KINDS for r in records)
    gave_up = sum(r["kind"] not in LEAVE_KINDS and r["error"] is not None for r in records)
    cancelled = sum(b["engine_finish_reasons"].get("cancelled", 0) for b in bursts)
    errored = sum(b["engine_finish_reasons"].get("error", 0) for b in bursts)
    undrained = sum(b["drain_s"] is None for b in bursts)
    leaked = sum(b["server_threads_after"] > b["server_threads_before"] for b in bursts)
    return [
        {"check": f"0 connection resets at {top} concurrent clients", "value": top_resets, "passed": top_resets == 0},
        {"check": "0 healthy requests lost with poison mixed in", "value": lost, "passed": lost == 0},
        {"check": "0 greedy answers differing from the same request alone", "value": differing,
         "passed": differing == 0},
        {"check": "0 greedy answers differing from alone other than at a rounding tie", "value": untied,
         "passed": untied == 0},
        {"check": f"RSS flat: at rest {REST_S:g} s after each burst (the server's own release, nothing done by this "
         f"script), within +{RSS_TOLERANCE - 1:.0%} of the first burst's (largest ratio)", "value": rest_growth,
         "passed": None if rest_growth is None else rest_growth <= RSS_TOLERANCE},
        {"check": f"RSS flat: after gc and malloc_trim, every burst ends within +{RSS_TOLERANCE - 1:.0%} of the "
         "first burst (largest ratio)", "value": growth, "passed": None if growth is None else growth <= RSS_TOLERANCE},
        {"check": "every poison request answered with its expected status", "value": f"{wrong} of {len(poison)} not",
         "passed": wrong == 0},
        {"check": "every leaving client's request cancelled (and at most those of clients that gave up besides), none "
         "ended in error, engine drained after every burst",
         "value": f"{cancelled} cancelled; {leaving} clients left, {gave_up} gave up; {errored} errors; {undrained} "
         "bursts undrained",
         "passed": leaving <= cancelled <= leaving + gave_up and errored == 0 and undrained == 0},
        {"check": "no server thread left behind after a burst", "value": f"{leaked} bursts", "passed": leaked == 0},
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def seconds(value: float | None) -> str:
    return common.fmt(value, 2) + " s" if value is not None else "–"


def markdown(report: dict) -> str:
    settings, server = report["settings"], report["server"]
    env = report["environment"]
    lines = common.report_header("Server under load, poison and disconnects: DSparkServer on SmolLM2-135M-Instruct",
                                 report, dtypes=f"target and default draft in {settings['dtype']}")
    pool = collections.Counter(p["dataset"] for p in report["prompts"])
    lines += [
        f"Python {env['python']}, dspark_hf {env['dspark_hf']} (git {env['git']}), psutil {env['psutil']}.",
        "",
        f"Server: `DSparkServer` in-process on {server['url']} (loopback), {server['engine']}; "
        f"{server['draft']}; context window {server['context_window']} tokens. Clients: threads with `http.client`, "
        f"one connection per request. Bursts of C ∈ {settings['concurrency']} clients, {settings['cycles']} cycle(s); "
        f"a burst sends max({settings['min_requests']}, C × {settings['requests_per_client']}) requests. Healthy: "
        f"{settings['max_tokens']} tokens, streaming or not, greedy (3 in 4) or sampled; leaving clients ask "
        f"{settings['leave_max_tokens']} tokens. Prompt pool: {len(report['prompts'])} first turns of at most "
        f"{settings['prompt_token_cap']} chat tokens (looked for in {', '.join(settings['datasets'])}; taken: "
        f"{', '.join(f'{name} {count}' for name, count in pool.items())}); each greedy healthy answer is compared "
        "with the same request sent alone before the bursts. Latency: request sent to last byte read.",
        "",
    ]
    unstable = [i for i, b in report["baseline"].items() if b["text_again"] != b["text"]]
    lines += [f"Alone, twice in a row before the bursts: {len(unstable)} of {len(report['baseline'])} prompts got two "
              f"different greedy answers{' (prompts ' + ', '.join(unstable) + ')' if unstable else ''}; the first is "
              "the baseline.", ""]
    if report.get("stopped_early"):
        lines += [f"**Stopped early:** {report['stopped_early']}", ""]
    lines += ["## Per concurrency", "",
              "| C | bursts | requests | served | healthy ok / sent | healthy lost | p50 healthy | p99 healthy | resets "
              "| other errors | greedy differing / compared |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for concurrency, row in report["summary"]["per_concurrency"].items():
        lines.append(
            f"| {concurrency} | {row['bursts']} | {row['requests']} | {row['served']} | {row['healthy_complete']} / "
            f"{row['healthy']} | {row['healthy_lost']} | {seconds(row['p50_latency_s'])} | "
            f"{seconds(row['p99_latency_s'])} | {row['resets']} | {row['other_errors']} | {row['greedy_differing']} / "
            f"{row['greedy_compared']} |"
        )
    first_trimmed = report["bursts"][0]["rss_mib_after_trim"]
    lines += ["", "## Per burst", "",
              "RSS in MiB: before → peak → at rest (the burst drained, the server idle for "
              f"{REST_S:g} s, having released what it freed itself), then after gc and malloc_trim by this script "
              "(the memory still in use) and its ratio to that after burst 1. Server threads: Python threads other than "
              "the main, client and sampler threads (before / peak / after); OS threads include torch's. Engine: "
              "tokens generated and the finish reasons it gave.", "",
              "| # | C | requests | wall | healthy lost | resets | RSS before → peak → at rest | trimmed | / burst 1 "
              "| server threads | OS threads | engine tokens | finish reasons | drained after |",
              "|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|---:|---|---:|"]
    for i, burst in enumerate(report["bursts"], 1):
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(burst["engine_finish_reasons"].items())) or "–"
        lines.append(
            f"| {i} | {burst['concurrency']} | {burst['requests']} | {seconds(burst['wall_s'])} | "
            f"{sum(map(is_lost, burst['records']))} | {sum(r['reset'] for r in burst['records'])} | "
            f"{burst['rss_mib_before']:.0f} → {burst['rss_mib_peak']:.0f} → "
            f"{burst.get('rss_mib_at_rest', burst['rss_mib_after']):.0f} | "
            f"{common.fmt(burst['rss_mib_after_trim'], 0)} | "
            f"{common.fmt(first_trimmed and burst['rss_mib_after_trim'] / first_trimmed, 3)} | "
            f"{burst['server_threads_before']} / "
            f"{burst['server_threads_peak']} / {burst['server_threads_after']} | {burst['os_threads_before']} / "
            f"{burst['os_threads_peak']} / {burst['os_threads_after']} | {burst['generated_tokens']} | {reasons} | "
            f"{seconds(burst['drain_s'])} |"
        )
    lines += ["", "## By kind", "", "| kind | expected | sent | statuses | errors | left mid-request |",
              "|---|---:|---:|---|---|---:|"]
    for kind, entry in report["summary"]["kinds"].items():
        expected = {"healthy": 200, **POISON_STATUS}.get(kind, "(leaves)")
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(entry["statuses"].items()))
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(entry["errors"].items())) or "–"
        lines.append(f"| {kind} | {expected} | {entry['count']} | {statuses} | {errors} | {entry['left']} |")
    if report["divergences"]:
        lines += ["", "## Greedy answers differing from alone", "",
                  "Distinct answers; at the first differing token the target's logits over the alone answer's "
                  "prefix (`first_divergence`; tie: the two differ by at most 2·eps·max|logit| of the target's "
                  "dtype).", "",
                  "| prompt | times | alone | under load | first differing token | alone token (logit) "
                  "| under-load token (logit) | tie |", "|---:|---:|---|---|---:|---|---|---|"]
        for row in report["divergences"]:
            where = ("–", "–", "–") if row["is_tie"] is None else (
                row["first_difference"], f"{json.dumps(row['alone_token'])} ({row['alone_logit']:.3f})",
                f"{json.dumps(row['load_token'])} ({row['load_logit']:.3f})")
            lines.append(f"| {row['prompt']} | {row['count']} | {json.dumps(row['alone'])} | "
                         f"{json.dumps(row['under_load'])} | {where[0]} | {where[1]} | {where[2]} | "
                         f"{'–' if row['is_tie'] is None else ('yes' if row['is_tie'] else '**no**')} |")
    lines += ["", "## Checks", "", "| check | value | verdict |", "|---|---|---|"]
    for check in report["checks"]:
        value = check["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else ("–" if value is None else str(value))
        lines.append(f"| {check['check']} | {shown} | {common.verdict(check['passed'])} |")
    lines += ["", "## Alone, after the bursts", "", "| probe | expected | status | error | result |", "|---|---:|---:|---|---|"]
    for name, probe in report["probes"].items():
        lines.append(f"| {name} | {probe['expected_status']} | {probe['status']} | {probe['error'] or '–'} | "
                     f"{probe['result']} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def load_prompt_pool(args: argparse.Namespace, tokenizer) -> list[dict]:
    """Up to `--prompts` first turns of at most `--prompt-token-cap` chat tokens, taken in turn from `--datasets`
    (among the first `POOL_SCAN` prompts of each)."""

    def fitting(name: str, conversations: list[list[str]]):
        for i, turns in enumerate(conversations):
            tokens = chat_input_ids(tokenizer, turns[0]).shape[1]
            if tokens <= args.prompt_token_cap:
                yield {"dataset": name, "index": i, "prompt_tokens": tokens, "text": turns[0]}

    sets = load_prompt_sets(args.eval_dir, args.datasets, POOL_SCAN)
    rows = itertools.chain.from_iterable(itertools.zip_longest(*(fitting(n, c) for n, c in sets.items())))
    pool = list(itertools.islice((row for row in rows if row is not None), args.prompts))
    if not pool:
        raise SystemExit(f"No first turn of {args.datasets} fits in --prompt-token-cap {args.prompt_token_cap}.")
    return pool


def build_server(args: argparse.Namespace) -> DSparkServer:
    target, tokenizer = load_target("smollm2", dtype=args.dtype)
    draft, description = load_default_draft(target, tokenizer)
    cost_table = CostTable.load(args.cost_table) if args.scheduler == "prefix" else None
    engine = RecordingEngine(target, draft, scheduler=args.scheduler, cost_table=cost_table, tokenizer=tokenizer)
    server = DSparkServer(engine, model_name=MODEL_NAME, host="127.0.0.1", port=0)
    server.draft_description = description
    return server


def probe_summary(record: dict, baseline: dict[str, dict], prompts: list[str], server: DSparkServer) -> dict:
    """A greedy request sent alone after the bursts: its answer against that of the same request before them."""
    if not record["complete"]:
        result = "**no answer**"
    elif not record["differs_from_alone"]:
        result = "the same answer as alone before the bursts"
    else:
        (row,) = divergences([record], baseline, prompts, server)
        tie = {None: "one a prefix of the other", True: "a rounding tie", False: "**not a tie**"}[row["is_tie"]]
        result = f"a different answer from alone before the bursts, from token {row.get('first_difference')} ({tie})"
    return {"expected_status": 200, "status": record["status"], "error": record["error"],
            "latency_s": record["latency_s"], "text": record.get("text"), "result": result}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if common.missing_eval_dir(args):
        return 0
    run_started = time.perf_counter()
    env = common.setup(args)
    env.update(
        python=sys.version.split()[0],
        dspark_hf=importlib.metadata.version("dspark_hf"),
        psutil=psutil.__version__ if psutil is not None else "absent (RSS from /proc/self/status)",
        git=subprocess.run(["git", "describe", "--always", "--dirty"], cwd=common.ROOT, capture_output=True,
                           text=True).stdout.strip() or "unknown",
    )
    report = common.start_report("server_load", __file__, argv, args, env)
    server = build_server(args)
    engine = server.engine
    pool = load_prompt_pool(args, server.tokenizer)
    prompts = [p["text"] for p in pool]
    window = server.limits.context_window
    engine_text = f"DSparkEngine scheduler {args.scheduler!r}"
    if args.scheduler == "prefix":
        engine_text += f" with cost table {args.cost_table.resolve().relative_to(common.ROOT)}"
    report["server"] = {"url": server.url, "draft": server.draft_description, "context_window": window,
                        "engine": engine_text}
    report["prompts"] = [{k: v for k, v in p.items() if k != "text"} for p in pool]
    rng = random.Random(args.seed)
    with server:
        address = server.server_address[:2]
        print(f"Serving on {server.url}; baseline: {len(prompts)} greedy requests alone", file=sys.stderr)
        baseline = {}
        for index, prompt in enumerate(prompts):  # each alone twice: is the alone answer itself reproducible?
            plan = Plan("healthy", encode(chat_body(prompt, args.max_tokens, temperature=0)), greedy=True, prompt=index)
            first, again = send(address, plan, args), send(address, plan, args)
            if not (first["complete"] and again["complete"]):
                raise SystemExit(f"A baseline request for prompt {index} failed: {first}, {again}")
            baseline[str(index)] = {"text": first["text"], "finish_reason": first["finish_reason"],
                                    "latency_s": first["latency_s"], "text_again": again["text"]}
        report["baseline"] = baseline
        mix = itertools.cycle(MIX)
        bursts = []
        for cycle, concurrency in itertools.product(range(args.cycles), args.concurrency):
            elapsed = time.perf_counter() - run_started
            if elapsed > args.time_limit:
                report["stopped_early"] = (f"--time-limit {args.time_limit:.0f} s reached after {len(bursts)} bursts "
                                           f"({elapsed:.0f} s); the remaining bursts did not run.")
                break
            count = max(args.min_requests, concurrency * args.requests_per_client)
            kinds = [next(mix) for _ in range(count)]
            rng.shuffle(kinds)
            plans = [[make_plan(k, prompts, window, args, rng) for k in share] for share in deal(kinds, concurrency)]
            burst = run_burst(server, plans, args)
            burst["cycle"] = cycle
            bursts.append(burst)
            print(f"cycle {cycle} C={concurrency}: {burst['requests']} requests in {burst['wall_s']:.1f} s, "
                  f"RSS {burst['rss_mib_before']:.0f} → {burst['rss_mib_after']:.0f} MiB, "
                  f"server threads {burst['server_threads_before']} → {burst['server_threads_after']}",
                  file=sys.stderr, flush=True)
        healthy = encode(chat_body(prompts[0], args.max_tokens, temperature=0))
        probes = {
            "healthy greedy request": send(address, Plan("healthy", healthy, greedy=True, prompt=0), args),
            "valid greedy request, client shuts its write side after the body (HTTP half-close)": send(
                address, Plan("half_close", healthy, greedy=True, prompt=0, half_close=True), args),
        }
    records = [r for b in bursts for r in b["records"]]
    mark_differences([*records, *probes.values()], baseline)
    report["divergences"] = divergences(records, baseline, prompts, server)
    report["probes"] = {name: probe_summary(r, baseline, prompts, server) for name, r in probes.items()}
    report["bursts"] = bursts
    report["summary"] = summarize(bursts)
    report["checks"] = checks(report)
    report["engine_stats"] = {"tokens_per_second": engine.stats.tokens_per_second,
                              "mean_verification_budget": engine.stats.mean_verification_budget,
                              "tau": engine.stats.tau, "rounds": engine.stats.rounds}
    report["wall_s"] = time.perf_counter() - run_started
    common.write_results(args.output_name, report, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
