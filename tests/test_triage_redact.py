"""diaglib.secrets' host-name and home-folder redaction (added for triage pages), and all of it at once."""
from __future__ import annotations

import pytest

from diaglib.secrets import REDACTED, redact, scrub_homes, scrub_hosts, this_host


@pytest.mark.parametrize("text, gone, kept", [
    ("distributed_init_method=tcp://192.0.2.2:57869 backend=nccl", "192.0.2.2", "tcp://<host>:57869"),
    ("see http://gpu-node-17.corp.example.com:8000/v1/models", "gpu-node-17", "http://<host>:8000/v1/models"),
    ("root@gpu-node-17:~# vllm serve m", "gpu-node-17", "root@<host>"),
    ("MASTER_ADDR=10.1.2.3 NCCL_SOCKET_IFNAME=eth0", "10.1.2.3", "MASTER_ADDR=<host>"),
    ("{'host': 'infer-7.internal', 'port': 8000}", "infer-7", "'host': '<host>'"),
    ("connecting to 10.0.0.12:29500", "10.0.0.12", "<host>:29500"),
])
def test_host_names_and_addresses_go(text, gone, kept):
    out = scrub_hosts(text)
    assert gone not in out and kept in out


def test_what_is_not_a_host_stays():
    text = ("vLLM 0.10.1.1 on 127.0.0.1:8000 and localhost:8000, range (52, 8192), torch 2.7.1+cu126, "
            "model zai-org/GLM-4.6-FP8, file triton_heuristics.py:956, 1.5:2")
    assert scrub_hosts(text) == text


def test_home_folders_go():
    assert scrub_homes('File "/home/alice/venv/x.py"') == 'File "~/venv/x.py"'
    assert scrub_homes("/Users/bob/models and /root/.cache/vllm") == "~/models and ~/.cache/vllm"
    assert scrub_homes("/homes/x /rooted /usr/local/home/y") == "/homes/x /rooted /usr/local/home/y"


def test_redact_does_everything_and_this_machines_name():
    name = next(iter(this_host()), "no-host-name-here")
    env = {"MY_API_TOKEN": "s3cr3t-value-xyz", "TOKENIZERS_PARALLELISM": "false"}
    text = (f"hf_{'a' * 30} s3cr3t-value-xyz OPENAI_API_KEY=abcdefgh12 /home/alice/x {name}:1234 "
            "tokenizers false")
    out = redact(text, env)
    for secret in ("aaaaaaaa", "s3cr3t-value-xyz", "abcdefgh12", "alice"):
        assert secret not in out
    if len(name) >= 3:
        assert name not in out
    assert out.count(REDACTED) == 3 and "tokenizers false" in out
