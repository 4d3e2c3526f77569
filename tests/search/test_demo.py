"""`autorank demo`: the README's first command, end to end (pretrain, 20-trial search, int8 export)."""

from __future__ import annotations

import re

from autorank.cli import main


def test_demo_ends_with_a_verified_int8_file_that_matches_the_search(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "best feasible: trial" in text
    assert (out / "best-int8.onnx").is_file() and (out / "best-int8.card.md").is_file()
    # what the search promised is what ONNX Runtime computes: same predictions, same val accuracy
    agreement = float(re.search(r"agreement: top-1 ([0-9.]+)", text).group(1))
    gap = float(re.search(r"gap ([+-][0-9.]+) points", text).group(1))
    file_ratio = float(re.search(r"computed \(file x([0-9.]+)\)", text).group(1))
    assert agreement >= 0.99, text
    assert abs(gap) <= 1.0, text
    assert file_ratio <= 1.10, text
