"""One definition of a secret serves records, evidence bundles and reports."""
from diaglib.secrets import REDACTED, scrub, secret_values


def test_scrub_covers_every_token_family_and_assignments():
    tokens = ["hf_" + "a1B2" * 5, "sk-" + "x" * 20, "sk_live_" + "y" * 20, "ghp_" + "Z" * 36, "ghu_" + "q" * 24,
              "AKIA" + "ABCDEFGHIJKLMNOP", "xoxb-" + "1234567890-abc"]
    text = " ".join(tokens) + " OPENAI_API_KEY=abcdefgh12 db_password: hunter2-horse"
    out = scrub(text)
    for secret in [*tokens, "abcdefgh12", "hunter2-horse"]:
        assert secret not in out, secret
    assert "OPENAI_API_KEY=" + REDACTED in out
    assert scrub("max_num_batched_tokens: 8192, num_tokens=8192") == "max_num_batched_tokens: 8192, num_tokens=8192"


def test_secret_values_skip_short_and_numeric_values():
    env = {"HF_TOKEN": "hf_longenoughvalue", "TOKENIZERS_PARALLELISM": "false", "X_KEY": "12345678", "PATH": "/usr/bin"}
    assert secret_values(env) == ["hf_longenoughvalue"]
