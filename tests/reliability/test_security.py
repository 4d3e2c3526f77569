"""Security basics: checkpoints never execute code, servers listen on loopback by default, and
names taken from configs never make a search write outside its output folder."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

from autorank.cli import build_parser, main
from autorank.tracking.server import LOOPBACK, ServerConfig, load_server_config
from tests.reliability.searches import REPO, write_space


class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_carrying_code_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"features.0.weight": _Payload(marker)}, evil)
    for command in (["search", "--config", str(write_space(tmp_path)), "--out", str(tmp_path / "out"),
                     "--no-progress"], ["compress", "--out", str(tmp_path / "cout")]):
        assert main([*command, "--model", "small_cnn", "--data", "digits", "--weights", str(evil)]) == 2
        assert "cannot load weights" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "cout").exists()


def test_every_checkpoint_load_in_autorank_is_weights_only():
    """torch.load / load_state_dict_from_url anywhere in the package pass weights_only=True."""
    offenders = []
    for path in (REPO / "autorank").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                    "load", "load_state_dict_from_url"):
                owner = ast.unparse(node.func)
                if owner not in ("torch.load", "torch.hub.load_state_dict_from_url", "load_state_dict_from_url"):
                    continue
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def test_servers_listen_on_loopback_unless_told_otherwise():
    assert ServerConfig().host == LOOPBACK
    assert load_server_config(REPO / "mlflow_server" / "server.yaml").host == LOOPBACK
    parser = build_parser()
    assert parser.parse_args(["ui", "--search", "x"]).host == LOOPBACK
    assert parser.parse_args(["server", "start"]).host is None  # then the config's, loopback by default
    assert load_server_config(None).host == LOOPBACK


@pytest.mark.slow
def test_names_from_configs_cannot_make_a_search_write_outside_its_folder(tmp_path, capsys):
    """A space named '..', a study named '../../x' and an experiment '../y' stay names, not paths."""
    work = tmp_path / "work"
    work.mkdir()
    space = write_space(work, name="escape", trials=2, steps=1)
    space.write_text(space.read_text().replace("name: escape", "name: '..'"))
    before = set(tmp_path.rglob("*"))
    assert main(["search", "--config", str(space), "--model", "small_cnn", "--data", "digits", "--out",
                 str(work / "out"), "--study-name", "../../x", "--experiment", "../y", "--no-progress"]) == 0
    written = set(tmp_path.rglob("*")) - before
    outside = [p for p in written if work / "out" not in (p, *p.parents)]
    assert not outside, outside
    assert (work / "out" / "mlflow.db").is_file() and (work / "out" / "mlartifacts").is_dir()

    bad = work / "bad.yaml"
    bad.write_text(space.read_text().replace("name: '..'", "name: ../../etc"))
    assert main(["search", "--config", str(bad), "--model", "small_cnn", "--data", "digits", "--out",
                 str(work / "out2"), "--no-progress"]) == 2
    assert "name" in capsys.readouterr().err and not (work / "out2").exists()
