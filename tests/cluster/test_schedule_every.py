"""``dsl schedule --every``: a non-positive, non-finite or unparsable interval is one line, exit 2."""

from __future__ import annotations

import pytest

from cluster.schedule import seconds
from dsl.cli import main

BAD = ["0s", "0", "-5m", "nans", "nan", "inf", "infh", "1e400s", "", "s", "abc", "5x", "1_0s ", "--", "0.0d"]


@pytest.mark.parametrize("text", BAD)
def test_bad_every_is_one_line(capsys, text):
    code = main(["schedule", "--address", "http://127.0.0.1:9", "--name", "n", f"--every={text}", "--", "synth"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    shown = "''" if text == "--" else repr(text)  # argparse drops a "--" value: seen as empty
    assert err[0] == (f"dsl schedule: config error: --every {shown} is not a positive duration like "
                      "30s, 15m, 6h or 1d")


@pytest.mark.parametrize("text, value", [("30s", 30), ("15m", 900), ("6h", 21600), ("1d", 86400), ("2.5", 2.5)])
def test_good_every(text, value):
    assert seconds(text) == value
