"""What counts as a secret, in one place, for everything diaglib writes into records, bundles and reports."""
from __future__ import annotations

import re
from collections.abc import Mapping

REDACTED = "<redacted>"
# Environment-variable names whose values are secrets.
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|PRIVATE", re.I)
# Token-like values: Hugging Face, OpenAI, GitHub, AWS, Slack.
_TOKEN_VALUE = re.compile(r"\b(?:(?:hf_|sk-|ghp_|gho_|ghs_|github_pat_|xox[abp]-|AKIA)[A-Za-z0-9_\-]{8,}"
                          r"|gh[pousr]_[A-Za-z0-9]{20,}"
                          r"|(?:sk|ghp|gho|github_pat|xox[abp])[-_][A-Za-z0-9_-]{16,}\b)")
# NAME=value / NAME: value where NAME ends in TOKEN, SECRET, PASSWORD or API_KEY.
_ASSIGNMENT = re.compile(r"(?i)\b((?:[A-Z0-9_]*(?:TOKEN|SECRET|PASSWORD|API_?KEY))\s*[=:]\s*)[^\s'\"]{6,}")


def scrub(text: str, marker: str = REDACTED) -> str:
    """``text`` with token-like values and secret assignments replaced by ``marker``."""
    text = _TOKEN_VALUE.sub(marker, text)
    return _ASSIGNMENT.sub(lambda m: m.group(1) + marker, text)


def secret_values(env: Mapping[str, str]) -> list[str]:
    """Values of secret-named variables, longest first, to be cut from any text (short or numeric ones,
    such as TOKENIZERS_PARALLELISM=false, would cut ordinary words out of logs and are left alone)."""
    return sorted({v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= 8 and not v.isdigit()},
                  key=len, reverse=True)


# Home folders (/home/NAME, /Users/NAME, /root) name a person or at least a machine's layout.
_HOME = re.compile(r"(?<![\w.~-])(?:/home/[^/\s'\"]+|/Users/[^/\s'\"]+|/root)(?=[/\s'\":,)\]}]|$)")
# Host names and addresses: the host part of a URL, host:port, user@host, host=/hostname= assignments.
_URL_HOST = re.compile(r"\b((?:tcp|https?|wss?|grpc|nats|redis|zmq|ipc)://(?:[^@/\s]+@)?)([A-Za-z0-9][\w.\-]*|\[[0-9a-fA-F:]+\])")
_HOST_PORT = re.compile(r"(?<![\w.\-/])((?:\d{1,3}\.){3}\d{1,3}|[A-Za-z][\w\-]*(?:\.[A-Za-z][\w\-]*)+\.[A-Za-z]{2,})"
                        r"(?=:\d{2,5}\b)")
_USER_HOST = re.compile(r"\b([A-Za-z_][\w.\-]*)@([A-Za-z0-9][\w\-]*(?:\.[\w\-]+)*)(?=[:\s]|$)")
_HOST_ASSIGN = re.compile(r"(?i)\b((?:host|hostname|host_ip|node|node_name|master_addr|nodename)['\"]?\s*[=:]\s*['\"]?)"
                          r"([A-Za-z0-9][\w.\-]*)")
_LOCAL = {"localhost", "127.0.0.1", "0.0.0.0", "::1", "[::1]", "None", "none", "null", "auto", "true", "false"}
HOST = "<host>"


def scrub_homes(text: str, marker: str = "~") -> str:
    """``text`` with home folders (/home/NAME, /Users/NAME, /root) replaced by ``marker``."""
    return _HOME.sub(marker, text)


def scrub_hosts(text: str, marker: str = HOST, names: tuple[str, ...] = ()) -> str:
    """``text`` with host names and addresses replaced by ``marker``: URL hosts, ``host:port``, ``user@host``,
    ``host=``/``hostname=``/``MASTER_ADDR=`` values, and ``names`` (e.g. this machine's); localhost stays."""
    def keep(h: str) -> bool:
        return h in _LOCAL

    text = _URL_HOST.sub(lambda m: m.group(0) if keep(m.group(2)) else m.group(1) + marker, text)
    text = _HOST_PORT.sub(lambda m: m.group(0) if keep(m.group(1)) else marker, text)
    text = _USER_HOST.sub(lambda m: m.group(0) if keep(m.group(2)) else f"{m.group(1)}@{marker}", text)
    text = _HOST_ASSIGN.sub(lambda m: m.group(0) if keep(m.group(2)) else m.group(1) + marker, text)
    for name in sorted({n for n in names if n and len(n) >= 3 and n not in _LOCAL}, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.\-]){re.escape(name)}(?![\w\-])", marker, text)
    return text


def this_host() -> tuple[str, ...]:
    """This machine's host names (short and fully qualified)."""
    import socket

    names = {socket.gethostname()}
    try:
        names.add(socket.getfqdn())
    except OSError:
        pass
    names |= {n.split(".")[0] for n in names}
    return tuple(sorted(n for n in names if n and n not in _LOCAL and not n.startswith("localhost")))


def redact(text: str, env: Mapping[str, str] | None = None, marker: str = REDACTED) -> str:
    """Everything above at once, for text that leaves the machine: the values of ``env``'s secret variables
    (default: this process's environment), token-like values and secret assignments, host names (this
    machine's too) and home folders."""
    import os

    for value in secret_values(os.environ if env is None else env):
        text = text.replace(value, marker)
    text = scrub(text, marker)
    text = scrub_hosts(text, names=this_host())
    return scrub_homes(text)
