"""Workloads as data: requests with an arrival step, a prompt length and an output length.

A :class:`Workload` is an immutable tuple of :class:`Req`; ``to_frame()``/``from_frame()`` turn it into a
DataFrame and back. Generators build the workloads that probe token boundaries.
"""
from __future__ import annotations

import math
import operator
import random
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import pandas as pd

from ..errors import DiagError


@dataclass(frozen=True)
class Req:
    """One request. ``background`` requests (e.g. concurrent decoders) are aborted once all others finish."""

    req_id: str
    prompt_len: int
    output_len: int = 1
    arrival_step: int = 0
    background: bool = False

    def __post_init__(self):
        for name, low in (("prompt_len", 1), ("output_len", 1), ("arrival_step", 0)):
            v = getattr(self, name)
            try:
                n = operator.index(v)  # ints, numpy ints; not floats or strings
            except TypeError:
                n = None
            if n is None or isinstance(v, bool) or n < low:
                what = "a positive integer" if low else "an integer >= 0"
                raise DiagError(f"request {self.req_id!r}: {name} must be {what}, got {v!r}")
            object.__setattr__(self, name, n)


@dataclass(frozen=True)
class Workload:
    """Requests to replay through vLLM's scheduler, in arrival order."""

    requests: tuple[Req, ...]
    name: str = "workload"

    def __post_init__(self):
        if not self.requests:
            raise DiagError("the workload has no requests")
        ids = [r.req_id for r in self.requests]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise DiagError(f"duplicate request ids in the workload: {', '.join(dup)}")
        if all(r.background for r in self.requests):
            raise DiagError("the workload has only background requests")
        object.__setattr__(self, "requests", tuple(sorted(self.requests, key=lambda r: r.arrival_step)))

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self):
        return iter(self.requests)

    def __add__(self, other: "Workload") -> "Workload":
        return Workload(self.requests + other.requests, f"{self.name} + {other.name}")

    def to_frame(self) -> pd.DataFrame:
        """One row per request."""
        return pd.DataFrame([asdict(r) for r in self.requests])

    @classmethod
    def from_frame(cls, df: pd.DataFrame, name: str = "workload") -> "Workload":
        """Rows with req_id, prompt_len and optionally output_len, arrival_step, background."""
        missing = {"req_id", "prompt_len"} - set(df.columns)
        if missing:
            raise DiagError(f"workload table lacks column(s): {', '.join(sorted(missing))}")
        fields = ("req_id", "prompt_len", "output_len", "arrival_step", "background")
        rows = df[[c for c in fields if c in df.columns]].to_dict("records")
        return cls(tuple(Req(**{k: (str(v) if k == "req_id" else bool(v) if k == "background" else int(v))
                                for k, v in r.items()}) for r in rows), name)


def _ids(n: int) -> list[str]:
    return list(string.ascii_lowercase[:n]) if n <= 26 else [f"r{i}" for i in range(n)]


def prompts(*lengths: int, output_len: int = 1, arrival_step: int = 0) -> Workload:
    """Prompts of the given lengths arriving together, named a, b, c, ..."""
    if not lengths:
        raise DiagError("give at least one prompt length")
    return Workload(tuple(Req(i, L, output_len, arrival_step) for i, L in zip(_ids(len(lengths)), lengths)),
                    "prompts " + ", ".join(map(str, lengths)))


def single(length: int, output_len: int = 1) -> Workload:
    """One prompt of ``length`` tokens."""
    return prompts(length, output_len=output_len)


def with_decoders(length: int, decoders: int, *, output_len: int = 1, decoder_prompt_len: int = 16,
                  decoder_output_len: int = 100_000) -> Workload:
    """``decoders`` short requests that are decoding (they arrive at step 0 and are aborted once the
    prompt finishes) when a prompt of ``length`` tokens arrives at step 1."""
    if not isinstance(decoders, int) or decoders < 0:
        raise DiagError(f"the number of decoders must be >= 0, got {decoders!r}")
    bg = tuple(Req(f"dec{i}", decoder_prompt_len, decoder_output_len, 0, True) for i in range(decoders))
    return Workload(bg + (Req("prompt", length, output_len, 1 if decoders else 0),),
                    f"prompt {length} + {decoders} decoders")


def summing_to(total: int, size: int, *, output_len: int = 1) -> Workload:
    """Prompts of ``size`` tokens plus one remainder prompt, together exactly ``total`` tokens
    (``summing_to(8192, 1001)``: 8 x 1001 + 184), arriving together."""
    if not isinstance(total, int) or not isinstance(size, int) or total < 1 or size < 1:
        raise DiagError(f"total and size must be positive integers, got {total!r} and {size!r}")
    k, rest = divmod(total, size)
    lengths = [size] * k + ([rest] if rest else [])
    return Workload(prompts(*lengths, output_len=output_len).requests, f"{k} x {size} + {rest} = {total}")


def random_mix(n: int, *, seed: int = 0, lengths: Sequence[int] | None = None, median: int = 1024,
               sigma: float = 1.0, max_prompt: int = 32768, output_len: tuple[int, int] = (1, 256),
               arrival_span: int = 0) -> Workload:
    """``n`` requests, reproducible from ``seed``: prompt lengths drawn from ``lengths`` (an empirical
    distribution) or else log-normal(median, sigma) clipped to [1, max_prompt]; output lengths uniform
    in ``output_len``; arrival steps uniform in [0, arrival_span]."""
    if not isinstance(n, int) or n < 1:
        raise DiagError(f"a random mix needs at least 1 request, got {n!r}")
    lo, hi = output_len
    if not 1 <= lo <= hi:
        raise DiagError(f"output_len range must satisfy 1 <= low <= high, got {output_len!r}")
    if lengths is not None and not lengths:
        raise DiagError("the length distribution is empty")
    if median < 1 or sigma < 0 or max_prompt < 1 or arrival_span < 0:
        raise DiagError("median and max_prompt must be >= 1, sigma and arrival_span >= 0")
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        L = rng.choice(list(lengths)) if lengths is not None else \
            min(max_prompt, max(1, round(math.exp(rng.gauss(math.log(median), sigma)))))
        reqs.append(Req(f"r{i}", int(L), rng.randint(lo, hi), rng.randint(0, arrival_span)))
    return Workload(tuple(reqs), f"random mix of {n} (seed {seed})")
