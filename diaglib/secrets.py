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
