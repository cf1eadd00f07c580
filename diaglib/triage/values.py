"""Read the values vLLM prints into its log back into Python objects, tolerantly.

vLLM writes its objects in several notations, often in one line: Python reprs (``{'mode': 3}``,
``KernelConfig(moe_backend='auto')``, ``<CUDAGraphMode.FULL: 2>``), pydantic JSON (``{"level":3}``, 0.10),
f-string reprs with bare words (``req_id=cmpl-1,prompt_token_ids_len=8192``, ``dtype=torch.bfloat16``) and
``dump_input.prepare_object_to_dump``'s mixture of both (``{r0: 8192}``, ``[false]``, ``'text'``). :func:`value`
reads any of them and never raises: what it cannot read stays a string, a cut-off line yields what came before
the cut. Calls become :class:`Call` (a dict of keyword arguments with the callee's name), enum reprs the
string ``Class.MEMBER``.
"""
from __future__ import annotations

import re

MAX_DEPTH = 64
_WORDS = {"None": None, "null": None, "True": True, "true": True, "False": False, "false": False}
_NUMBER = re.compile(r"-?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?=[\s,)\]}:]|$)")
_NAME_CALL = re.compile(r"[A-Za-z_][\w.]*\(")
_KWARG = re.compile(r"\s*([A-Za-z_]\w*)=(?!=)")
_ENUM = re.compile(r"<([\w.]+)(?::[^<>]*)?>")
_FIELD = re.compile(r"(?:^|, )([A-Za-z_]\w*)=")
_CLOSE = {"(": ")", "[": "]", "{": "}"}


class Call(dict):
    """``Name(a=1, b=2)`` as {'a': 1, 'b': 2} with ``.name`` 'Name' (positional arguments in ``.args``)."""

    def __init__(self, name: str, kwargs: dict, args: list):
        super().__init__(kwargs)
        self.name = name
        self.args = args

    def __repr__(self) -> str:
        return f"{self.name}({', '.join([*map(repr, self.args), *(f'{k}={v!r}' for k, v in self.items())])})"


class _Reader:
    def __init__(self, text: str):
        self.s = text
        self.i = 0
        self.n = len(text)

    def ws(self) -> None:
        while self.i < self.n and self.s[self.i] in " \t\r\n":
            self.i += 1

    def value(self, stop: str, depth: int = 0):
        self.ws()
        if self.i >= self.n:
            return None
        c = self.s[self.i]
        if depth >= MAX_DEPTH:
            return self.bare(stop)
        if c in "[(":
            self.i += 1
            items = self.items(_CLOSE[c], depth)
            return items if c == "[" else tuple(items)
        if c == "{":
            self.i += 1
            return self.mapping(depth)
        if c in "'\"":
            return self.string(c)
        if c == "<":
            m = _ENUM.match(self.s, self.i)
            if m:
                self.i = m.end()
                return m.group(1)
        m = _NAME_CALL.match(self.s, self.i)
        if m:
            self.i = m.end()
            return self.call(m.group(0)[:-1], depth)
        m = _NUMBER.match(self.s, self.i)
        if m:
            self.i = m.end()
            t = m.group(0)
            return float(t) if any(ch in t for ch in ".eE") else int(t)
        return self.bare(stop)

    def bare(self, stop: str):
        """A bare word up to the next separator at this depth (brackets inside it are balanced)."""
        start, depth = self.i, 0
        while self.i < self.n:
            c = self.s[self.i]
            if depth == 0 and (c in stop or c in ")]}"):
                break
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            self.i += 1
        word = self.s[start:self.i].strip()
        return _WORDS.get(word, word)

    def string(self, q: str) -> str:
        """A quoted string; vLLM's dump does not escape quotes, so a quote ends it only before a separator."""
        self.i += 1
        out = []
        while self.i < self.n:
            c = self.s[self.i]
            if c == "\\" and self.i + 1 < self.n:
                nxt = self.s[self.i + 1]
                out.append({"n": "\n", "t": "\t", "\\": "\\", "'": "'", '"': '"'}.get(nxt, "\\" + nxt))
                self.i += 2
                continue
            if c == q:
                rest = self.s[self.i + 1:self.i + 2]
                if rest in ("", ",", ")", "]", "}", ":", " "):
                    self.i += 1
                    return "".join(out)
            out.append(c)
            self.i += 1
        return "".join(out)

    def items(self, close: str, depth: int) -> list:
        out = []
        while True:
            self.ws()
            if self.i >= self.n:
                return out
            if self.s[self.i] == close:
                self.i += 1
                return out
            if self.s[self.i] == ",":
                self.i += 1
                continue
            before = self.i
            out.append(self.value(",", depth + 1))
            if self.i == before:  # a stray closer of another kind: skip it
                self.i += 1

    def mapping(self, depth: int) -> dict:
        out: dict = {}
        while True:
            self.ws()
            if self.i >= self.n:
                return out
            c = self.s[self.i]
            if c == "}":
                self.i += 1
                return out
            if c == ",":
                self.i += 1
                continue
            before = self.i
            key = self.value(":,", depth + 1)
            self.ws()
            if self.i < self.n and self.s[self.i] == ":":
                self.i += 1
                out[_key(key)] = self.value(",", depth + 1)
            elif self.i == before:
                self.i += 1
            else:  # a set printed as {a, b}
                out[_key(key)] = None

    def call(self, name: str, depth: int) -> Call:
        kwargs, args = {}, []
        while True:
            self.ws()
            if self.i >= self.n:
                break
            c = self.s[self.i]
            if c == ")":
                self.i += 1
                break
            if c == ",":
                self.i += 1
                continue
            before = self.i
            m = _KWARG.match(self.s, self.i)
            if m:
                self.i = m.end()
                kwargs[m.group(1)] = self.value(",", depth + 1)
            else:
                args.append(self.value(",", depth + 1))
            if self.i == before:
                self.i += 1
        return Call(name, kwargs, args)


def _key(k):
    """A dict key read from the log; an unhashable one (a malformed line) becomes a short string."""
    try:
        hash(k)
        return k
    except TypeError:
        return repr(k)[:200]


def value(text: str):
    """One printed value (see the module docstring); never raises."""
    return _Reader(text).value(",")


def fields(text: str) -> dict:
    """``a=1, b=Foo(c=2), d={'e': [3]}`` (vLLM's ``VllmConfig.__str__``) -> {'a': 1, 'b': Call, 'd': {...}}.

    Fields are split at ``, name=`` outside brackets and quotes; each value is read by :func:`value` (a value
    that is not a complete Python or JSON expression stays the string it was, e.g. ``auto`` or a path).
    """
    out: dict = {}
    for name, raw in _split_fields(text):
        v = value(raw)
        out[name] = raw.strip() if isinstance(v, str) and not raw.lstrip().startswith(("'", '"')) else v
    return out


def _split_fields(text: str) -> list[tuple[str, str]]:
    """(name, raw value) pairs at bracket depth 0."""
    starts = []
    depth, quote, i, n = 0, None, 0, len(text)
    while i < n:
        c = text[i]
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"" and (i == 0 or text[i - 1] in "=[(,{: "):
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0 and (i == 0 or text.startswith(", ", i)):
            m = _FIELD.match(text, i)
            if m:
                starts.append((m.group(1), m.start(1), m.end()))
        i += 1
    out = []
    for k, (name, _, vstart) in enumerate(starts):
        end = starts[k + 1][1] - 2 if k + 1 < len(starts) else len(text)
        out.append((name, text[vstart:end].rstrip().rstrip(",")))
    return out


def enum_member(v) -> str | None:
    """'CUDAGraphMode.FULL_AND_PIECEWISE' or 'FULL_AND_PIECEWISE' or 3 -> the member name (or the value)."""
    if v is None:
        return None
    return str(v).rsplit(".", 1)[-1]
