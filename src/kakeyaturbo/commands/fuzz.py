"""``kakeya fuzz``: decode forged containers of every codec and count how each case ends.

Cases run in a worker process (one torch thread) that the command watches: a case that takes more
than :data:`~kakeyaturbo.fuzzing.HANG_SECONDS` counts as a hang (one that does not answer within
``--timeout`` seconds is killed and the worker restarted); one that pushes the worker's peak memory
more than ``--memory-mb`` above its baseline, or asks for more than its address-space limit, counts
as an over-allocation. Case ``i`` uses codec ``i mod codecs``, a mutation and a base chosen by a
generator seeded with ``--seed`` and ``i``, so a run is reproducible.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import resource
import time
from collections import Counter, defaultdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from kakeyaturbo.commands.common import check_output_path, write_json

ADDRESS_SPACE_HEADROOM = 4 << 30
"""Bytes of address space the worker may map beyond what it holds after building its bases."""


def configure(p: argparse.ArgumentParser) -> None:
    """Arguments of ``kakeya fuzz``."""
    p.add_argument("--codec", action="append", metavar="NAME",
                   help="codec to fuzz (repeatable); 'all' (default) fuzzes every registered codec")
    p.add_argument("--cases", type=int, default=100_000, help="forged containers to decode (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the mutations (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds after which a case is killed (it counts as a hang from 1 s; default: %(default)s)")
    p.add_argument("--memory-mb", type=int, default=256,
                   help="peak memory growth of the worker that counts as an over-allocation (default: %(default)s)")
    p.add_argument("--json", type=Path, metavar="P", help="write the counts as JSON here")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _worker(conn: Connection, seed: int, names: list[str]) -> None:
    """Build the bases of the codecs ``names``, then answer ``(base index, mutation, case seed)`` with
    ``(outcome, detail, seconds, peak bytes)`` until sent None."""
    import torch

    from kakeyaturbo import fuzzing

    torch.set_num_threads(1)
    base_list = fuzzing.bases(seed, names)
    for base in base_list:
        fuzzing.decode(base, base.blob)
    limit = _address_space() + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    conn.send([(b.name, str(b.dtype)) for b in base_list])
    while (msg := conn.recv()) is not None:
        index, mutation, case_seed = msg
        base = base_list[index]
        blob = fuzzing.forge(base, mutation, case_seed)
        t0 = time.perf_counter()
        kind, detail = fuzzing.outcome(base, blob)
        conn.send((kind, detail, time.perf_counter() - t0, _peak_bytes()))


class _Worker:
    """The worker process and the pipe to it."""

    def __init__(self, seed: int, names: list[str]) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, seed, names), daemon=True)
        self.proc.start()
        self.bases: list[tuple[str, str]] = self.conn.recv()
        self.baseline = 0

    def ask(self, case: tuple[int, str, int], timeout: float) -> tuple[str, str, float, int] | None:
        """The worker's answer to ``case``, or None when it did not answer within ``timeout`` seconds."""
        self.conn.send(case)
        if not self.conn.poll(timeout):
            return None
        return self.conn.recv()

    def stop(self) -> None:
        """End the worker (killed if it does not finish)."""
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()


def _classify(answer: tuple[str, str, float, int] | None, baseline: int, memory: int) -> tuple[str, str]:
    """The outcome of one case from the worker's answer (None: killed on timeout)."""
    from kakeyaturbo.fuzzing import HANG_SECONDS

    if answer is None:
        return "hang", "killed"
    kind, detail, seconds, peak = answer
    if seconds > HANG_SECONDS:
        return "hang", f"{kind}:{detail}"
    if peak - baseline > memory:
        return "over_allocation", f"{kind}:{detail}"
    return kind, detail


def fuzz(names: list[str], cases: int, seed: int, timeout: float, memory_mb: int) -> dict[str, Any]:
    """Run ``cases`` forged decodes over the codecs ``names``; the counts per codec and mutation."""
    from tqdm import tqdm

    from kakeyaturbo.fuzzing import MUTATIONS, OUTCOMES

    memory = memory_mb << 20
    counts: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    details: dict[str, Counter[str]] = defaultdict(Counter)
    worker = _Worker(seed, names)
    by_codec = {n: [i for i, (name, _) in enumerate(worker.bases) if name == n] for n in names}
    worker.baseline = _first_peak(worker)
    t0 = time.perf_counter()
    try:
        for case in tqdm(range(cases), desc="fuzz", unit="case", mininterval=1.0):
            rng = random.Random(f"{seed}:{case}")
            name = names[case % len(names)]
            mutation = rng.choice(sorted(MUTATIONS))
            answer = worker.ask((rng.choice(by_codec[name]), mutation, rng.randrange(2**32)), timeout)
            kind, detail = _classify(answer, worker.baseline, memory)
            counts[name][mutation][kind] += 1
            if kind not in ("decoded", "library_error"):
                details[kind][f"{name}/{mutation}/{detail}"] += 1
            if kind in ("hang", "over_allocation"):  # a fresh worker: killed, or its peak memory is spent
                worker.stop()
                worker = _Worker(seed, names)
                worker.baseline = _first_peak(worker)
    finally:
        worker.stop()
    totals = Counter(k for per in counts.values() for c in per.values() for k in c.elements())
    return {
        "cases": cases, "seed": seed, "codecs": names, "mutations": sorted(MUTATIONS),
        "limits": {"hang_seconds": 1.0, "timeout_seconds": timeout, "memory_growth_mb": memory_mb,
                   "address_space_headroom_mb": ADDRESS_SPACE_HEADROOM >> 20},
        "seconds": round(time.perf_counter() - t0, 1),
        "totals": {k: totals.get(k, 0) for k in OUTCOMES},
        "per_codec": {n: {k: sum(c.get(k, 0) for c in counts[n].values()) for k in OUTCOMES} for n in names},
        "per_codec_mutation": {n: {m: {k: counts[n][m].get(k, 0) for k in OUTCOMES} for m in sorted(counts[n])}
                               for n in names},
        "failures": {k: dict(sorted(v.items())) for k, v in sorted(details.items())},
    }


def _first_peak(worker: _Worker) -> int:
    """The worker's peak memory after building its bases (its baseline)."""
    return worker.ask((0, "bitflip", 0), timeout=60.0)[3]


def run(args: argparse.Namespace) -> int:
    """Fuzz, print the totals, write the counts; exit 1 when a case ended other than decoded or a library error."""
    from kakeyaturbo import codecs
    from kakeyaturbo.errors import ConfigError

    names = args.codec or ["all"]
    names = codecs.names() if "all" in names else names
    for name in names:
        codecs.codec_class(name)
    if args.cases < 1 or args.timeout <= 0 or args.memory_mb < 1:
        raise ConfigError("--cases, --timeout and --memory-mb must be positive")
    check_output_path(args.json)
    result = fuzz(names, args.cases, args.seed, args.timeout, args.memory_mb)
    print(" ".join(f"{k}={v}" for k, v in result["totals"].items()))
    write_json(args.json, result)
    bad = sum(v for k, v in result["totals"].items() if k not in ("decoded", "library_error"))
    return 1 if bad else 0
