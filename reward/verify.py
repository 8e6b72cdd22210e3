"""Answer checking with math-verify under a wall-clock timeout of our own.

math-verify's built-in timeout uses SIGALRM, which only works on the main thread, so it is switched off
here. Instead each check that is not a plain number comparison runs in a worker process; a check that
overruns the timeout has its worker killed and replaced, scores 0 and is counted. Plain numbers (most
arithmetic and GSM8K answers) are compared in-process: that comparison cannot hang.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

logger = logging.getLogger(__name__)

TIMEOUT_SECONDS = 5.0
WORKER_STARTUP_SECONDS = 120.0  # importing math-verify on a busy machine; a check's own timeout starts after it
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class VerifierError(RuntimeError):
    """Every check of a batch failed: the verifier itself is broken, so the rewards cannot be trusted."""


def math_verify_equal(gold: str, prediction: str) -> bool:
    """math-verify on two answer strings, its own timeouts off (call only under an outside timeout)."""
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call that its timeout is off
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    pred_parsed = parse(f"\\boxed{{{prediction}}}", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def plain_number(text: str) -> Fraction | None:
    """'1,234', '-3.50', '7/2' -> an exact Fraction; anything else -> None."""
    s = text.strip().replace(",", "")
    if s.startswith("$"):
        s = s[1:]
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


@dataclass
class VerifierStats:
    checks: int = 0
    correct: int = 0
    timeouts: int = 0
    errors: int = 0
    last_error: str | None = None
    by_kind: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, float]:
        return {"checks": self.checks, "correct": self.correct, "timeouts": self.timeouts, "errors": self.errors}


class _Worker:
    """One `python -m reward._worker` process, spoken to in JSON lines (independent of the caller's __main__)."""

    def __init__(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reward._worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env
        )
        self.job: int | None = None
        self.started = 0.0

    def wait_ready(self) -> None:
        """Block until the worker has imported math-verify (a second or more), so no check's timeout pays for it."""
        started, _, _ = select.select([self.process.stdout], [], [], WORKER_STARTUP_SECONDS)
        try:
            status = self.receive()[0] if started else f"nothing within {WORKER_STARTUP_SECONDS:g} s"
        except (EOFError, OSError, ValueError) as e:
            status = repr(e)
        if status != "ready":
            self.kill()
            raise VerifierError(f"a verifier worker (python -m reward._worker) failed to start: {status}")

    def send(self, gold: str, prediction: str) -> None:
        self.process.stdin.write(json.dumps([gold, prediction]) + "\n")
        self.process.stdin.flush()

    def receive(self) -> tuple[str, object]:
        line = self.process.stdout.readline()
        if not line:
            raise EOFError(f"worker exited with code {self.process.poll()}")
        status, value = json.loads(line)
        return status, value

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


class Verifier:
    """Checks (gold, prediction) pairs; thread-safe; each check bounded by `timeout` seconds of wall clock.

    A timeout or a crash scores 0 (False), is counted in `stats` and logged. If every check of a batch
    fails, `check` raises VerifierError instead of returning all zeros.
    """

    def __init__(self, timeout: float = TIMEOUT_SECONDS, workers: int = 2):
        self.timeout = timeout
        self.num_workers = workers
        self.stats = VerifierStats()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()  # the worker processes
        self._stats_lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for w in self._workers:
                w.kill()
            self._workers.clear()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def check(self, golds: list[str | None], predictions: list[str | None]) -> list[bool]:
        if len(golds) != len(predictions):
            raise ValueError(f"check: {len(golds)} gold answers for {len(predictions)} predictions")
        results: list[bool | None] = [None] * len(golds)
        kinds: Counter = Counter()
        slow: list[int] = []
        for i, (gold, pred) in enumerate(zip(golds, predictions)):
            if gold is None or pred is None or not pred.strip():
                results[i] = False
                kinds["no_answer"] += 1
                continue
            g, p = plain_number(gold), plain_number(pred)
            if g is not None and p is not None:
                results[i] = g == p
                kinds["number"] += 1
            else:
                slow.append(i)
        timeouts, errors, last_error = 0, 0, None
        if slow:
            with self._lock:
                outcomes = self._run([(golds[i], predictions[i]) for i in slow])
            for i, (status, value) in zip(slow, outcomes):
                kinds["math_verify"] += 1
                results[i] = bool(value) if status == "ok" else False
                if status == "ok":
                    continue
                if status == "timeout":
                    timeouts += 1
                else:
                    errors, last_error = errors + 1, value
                logger.warning("verifier %s on prediction %.80r (gold %r): %s; scored 0", status, predictions[i], golds[i], value)
        with self._stats_lock:  # one update per batch, so concurrent checks never lose a count
            self.stats.by_kind.update(kinds)
            self.stats.timeouts += timeouts
            self.stats.errors += errors
            self.stats.last_error = last_error or self.stats.last_error
            self.stats.checks += len(golds)
            self.stats.correct += sum(bool(r) for r in results)
        if slow and timeouts + errors == len(golds) and len(golds) > 1:
            raise VerifierError(f"all {len(golds)} checks of a batch failed (last: {last_error or 'timeout'})")
        return [bool(r) for r in results]

    def counts(self) -> dict[str, float]:
        """A consistent snapshot of the counters (checks, correct, timeouts, errors)."""
        with self._stats_lock:
            return self.stats.as_dict()

    def _run(self, jobs: list[tuple[str, str]]) -> list[tuple[str, object]]:
        """Run jobs on the worker processes; a job past the timeout gets ("timeout", ...) and its worker is replaced."""
        started = [_Worker() for _ in range(self.num_workers - len(self._workers))]  # they import in parallel
        for w in started:
            w.wait_ready()
        self._workers += started
        outcomes: list[tuple[str, object] | None] = [None] * len(jobs)
        pending = list(range(len(jobs)))[::-1]
        while pending or any(w.job is not None for w in self._workers):
            for i, w in enumerate(list(self._workers)):
                if w.job is None and pending:
                    w.job, w.started = pending.pop(), time.monotonic()
                    try:
                        w.send(*jobs[w.job])
                    except OSError as e:  # the worker died since its last job
                        outcomes[w.job] = ("error", f"worker died: {e!r}")
                        self._replace(i)
            busy = [w for w in self._workers if w.job is not None]
            if not busy:
                continue
            deadline = min(w.started for w in busy) + self.timeout
            ready, _, _ = select.select([w.process.stdout for w in busy], [], [], max(0.0, deadline - time.monotonic()))
            now = time.monotonic()
            for i, w in enumerate(list(self._workers)):
                if w.job is None:
                    continue
                if w.process.stdout in ready:
                    try:
                        outcomes[w.job] = w.receive()
                    except (EOFError, OSError, ValueError) as e:  # the worker died (e.g. out of memory)
                        outcomes[w.job] = ("error", f"worker died: {e!r}")
                        self._replace(i)
                        continue
                    w.job = None
                elif now - w.started >= self.timeout:
                    outcomes[w.job] = ("timeout", f"over {self.timeout:g} s")
                    self._replace(i)
        return outcomes  # type: ignore[return-value]

    def _replace(self, index: int) -> None:
        self._workers[index].kill()
        worker = _Worker()
        worker.wait_ready()
        self._workers[index] = worker


_default: Verifier | None = None
_default_lock = threading.Lock()


def default_verifier() -> Verifier:
    """One process-wide verifier, started on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Verifier()
        return _default


def is_correct(gold: str | None, prediction: str | None) -> bool:
    return default_verifier().check([gold], [prediction])[0]
