"""A vLLM server log as records: bytes -> text -> one :class:`Line` per line, with who wrote it.

What vLLM and its surroundings put around a message is taken off and kept: ANSI colours (also the
``#033[..m`` form syslog writes), CRLF (vLLM's NewLineFormatter itself ends continuation lines with
``\\r\\n``), container prefixes (docker compose ``name | ``, CRI ``<time> stdout F``), the process prefix
(``(EngineCore_DP0 pid=123)``, ``(VllmWorker TP3 pid=9)``: utils.decorate_logs up to 0.30, part of the
logger's format from 0.31), the logger header (``INFO 08-26 12:00:01 [core.py:74]``; before 0.11 the same
with the file name, from 0.11 ``fileinfo``) and JSON records (``--log-format json``, 0.32+).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..errors import DiagError

SAMPLE = 1 << 16
_ANSI = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_])")
_PROC = re.compile(r"\((?P<proc>[^()\n]{1,80}?) pid=(?P<pid>\d+)\)\s?")
_LEVELS = "DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL"
_HEADER = re.compile(rf"(?P<level>{_LEVELS}) (?P<time>\d\d-\d\d \d\d:\d\d:\d\d(?:[.,]\d+)?) "
                     r"\[?(?P<src>[\w./\-]+\.py:\d+)\] ?")
# the common case in one match: an optional process prefix, then the header
_FAST = re.compile(r"(?:\((?P<proc>[^()\n]{1,80}?) pid=(?P<pid>\d+)\)\s?)?" + _HEADER.pattern)
_LEAD = re.compile(r"(?:[\w.\-]+\s+\|\s)?(?:\d{4}-\d\d-\d\d[T ][\d:.,]+(?:Z|[+-]\d\d:?\d\d)?\s+"
                   r"(?:(?:stdout|stderr)\s+[FP]\s+)?)?")


@dataclass(slots=True)
class Line:
    """One line of the log: its number (1-based), the writing process, the logger header, the message."""

    n: int
    text: str
    proc: str | None = None
    pid: int | None = None
    level: str | None = None
    time: str | None = None
    src: str | None = None
    stream: str = ""  # which process wrote it: 'VllmWorker TP3 pid=9', or '' when the line names none


def _stream(proc, pid) -> str:
    return f"{proc} pid={pid}" if pid is not None else ""


def decode(data: bytes | str) -> str:
    """The log as text; a DiagError for an empty log or one that is not text (binary junk)."""
    if isinstance(data, str):
        text = data
    else:
        if not data.strip():
            raise DiagError("the log is empty")
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # PowerShell's `>` writes UTF-16
            text = data.decode("utf-16", errors="replace")
        else:
            sample = data[:SAMPLE]
            bad = sum(1 for b in sample if b < 32 and b not in (9, 10, 13, 27)) + sample.count(0xFF)
            if bad > len(sample) // 10:
                raise DiagError(f"this is not a text log: {100 * bad // len(sample)}% of its first "
                                f"{len(sample):,} bytes are control or invalid bytes")
            text = data.decode("utf-8", errors="replace")
    if not text.strip():
        raise DiagError("the log is empty")
    if text.count("\x00") > len(text) // 100:
        raise DiagError("this is not a text log: it is full of NUL bytes")
    return text


def records(text: str):
    """Every line of ``text`` as a :class:`Line` (a JSON record holding several lines yields several)."""
    if "#033[" in text:  # syslog's escape of ESC
        text = text.replace("#033[", "\x1b[")
    if "\x1b" in text:
        text = _ANSI.sub("", text)
    streams: dict[tuple, str] = {}
    fast = _FAST.match
    for n, raw in enumerate(text.splitlines(), 1):
        m = fast(raw)
        if m is not None:  # the common case: [process prefix] LEVEL time [file:line] message
            proc, pid = m.group("proc"), m.group("pid")
            if pid is not None:
                key = (proc, pid)
                stream = streams.get(key) or streams.setdefault(key, f"{proc} pid={pid}")
                yield Line(n, raw[m.end():].replace("\x00", ""), proc, int(pid), m.group("level"), m.group("time"),
                           m.group("src"), stream)
            else:
                yield Line(n, raw[m.end():].replace("\x00", ""), None, None, m.group("level"), m.group("time"),
                           m.group("src"))
            continue
        if raw.startswith('{"') and '"message"' in raw:
            yield from _json_record(n, raw)
            continue
        yield _line(n, raw)


def _line(n: int, raw: str) -> Line:
    s = raw
    if s[:1].isdigit() or " | " in s[:64]:
        m = _LEAD.match(s)
        if m and m.end():
            s = s[m.end():]
    proc = pid = None
    if s.startswith("("):
        m = _PROC.match(s)
        if m:
            proc, pid, s = m.group("proc"), int(m.group("pid")), s[m.end():]
    m = _HEADER.match(s)
    if m is None and "] " in s[:200]:
        m = _HEADER.search(s, 0, 200)  # a VLLM_LOGGING_PREFIX before the level
    if m is None:
        return Line(n, s.replace("\x00", ""), proc, pid, stream=_stream(proc, pid))
    rest = s[m.end():]
    if pid is None and m.start():  # VLLM_LOGGING_PREFIX, then the process, then the header
        p = _PROC.search(s, 0, m.start())
        if p:
            proc, pid = p.group("proc"), int(p.group("pid"))
    return Line(n, rest.replace("\x00", ""), proc, pid, m.group("level"), m.group("time"), m.group("src"),
                _stream(proc, pid))


def _json_record(n: int, raw: str):
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError:
        yield _line(n, raw)
        return
    if not isinstance(rec, dict):
        yield _line(n, raw)
        return
    text = str(rec.get("message", ""))
    if rec.get("exc_info"):
        text += "\n" + str(rec["exc_info"])
    pid = rec.get("process") if isinstance(rec.get("process"), int) else None
    proc = rec.get("processName")
    for part in text.splitlines() or [""]:
        yield Line(n, part, proc, pid, rec.get("levelname"), rec.get("asctime"), rec.get("filename"), _stream(proc, pid))
