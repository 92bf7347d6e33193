"""OOM sweeps of a few standard-library functions (docs/testing.rst shows the findings).

    allocpolicy run -- python -m pytest examples/sweep_stdlib        # preloaded
    python -m pytest examples/sweep_stdlib                           # in-process
    allocpolicy run -- python -m pytest examples/sweep_stdlib --oom-replay=112 -k csv
"""

import csv
import email
import email.policy
import io
import json
import re

import pytest

MESSAGE = b"""\
From: Ada <ada@example.org>
To: Bob <bob@example.org>
Subject: =?utf-8?q?r=C3=A9sum=C3=A9?= of the meeting
Date: Thu, 03 Dec 2026 10:00:00 +0000
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="b1"

--b1
Content-Type: text/plain; charset="utf-8"

Minutes attached.
--b1
Content-Type: text/html; charset="utf-8"

<p>Minutes attached.</p>
--b1--
"""

CSV = "sku,name,price\r\n" + "".join(f"SKU-{n:03d},widget {n},{n * 0.25}\r\n" for n in range(8))


@pytest.mark.oom_sweep
def test_re_compile():
    re.purge()
    pattern = re.compile(r"(?P<year>\d{4})-(?P<month>\d\d)-(?P<day>\d\d)", re.IGNORECASE)
    assert pattern.match("2026-12-03")["month"] == "12"


@pytest.mark.oom_sweep
def test_json_loads():
    doc = json.loads('{"users": [{"id": 1, "name": "ada", "tags": ["a", "b"]}, {"id": 2, "name": "bob"}]}')
    assert doc["users"][1]["name"] == "bob"


@pytest.mark.oom_sweep
def test_email_parse():
    msg = email.message_from_bytes(MESSAGE, policy=email.policy.default)
    assert msg["subject"] == "résumé of the meeting"
    assert msg.get_body(("plain",)).get_content().strip() == "Minutes attached."


@pytest.mark.oom_sweep
def test_csv_reader():
    rows = list(csv.DictReader(io.StringIO(CSV)))
    assert rows[3]["name"] == "widget 3" and len(rows) == 8


# Each body once at import, so that the sweep sees what a warm process does
# (lazy imports and first-use caches done), not a module's first import.
for _warm in (test_re_compile, test_json_loads, test_email_parse, test_csv_reader):
    _warm()
