"""Malformed inputs: one clear `autorank: error:` line before any compute, no output folder left.

Covers the search space YAML, --data, --weights, --model, plan JSON and search folders, plus a
hypothesis fuzzing pass over the YAML and plan schemas (anything either loads or is refused with
one AutorankError line; nothing else escapes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autorank.cli import main
from autorank.compression import Plan, resolve_plan
from autorank.errors import AutorankError
from autorank.search import load_space
from tests.reliability.searches import REPO, write_space

DEFAULT_SPACE = yaml.safe_load((REPO / "search_spaces" / "default.yaml").read_text())


def run_and_expect_error(argv: list[str], capsys, *must_mention: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    line = captured.err.strip()
    assert line.startswith("autorank: error: ") and "\n" not in line, captured.err
    assert "Traceback" not in captured.err + captured.out
    for word in must_mention:
        assert word in line, line
    return line


def search_args(tmp_path: Path, *, config: Path | None = None, model: str = "small_cnn", data: str = "digits",
                weights: Path | str | None = None) -> list[str]:
    args = ["search", "--config", str(config or write_space(tmp_path)), "--model", model, "--data", data,
            "--out", str(tmp_path / "out"), "--no-progress"]
    return args + (["--weights", str(weights)] if weights is not None else [])


@pytest.mark.parametrize("text, mentions", [
    ("methods: [none, tucker2\n", ["invalid YAML"]),
    ("metods: [none, tucker2]\n", ["metods"]),
    ("rank:\n  multiplier: [2.0, 0.5]\n", ["rank.multiplier"]),
    ("precisions: []\n", ["precisions"]),
    ("methods: [none, dct]\n", ["methods", "dct"]),
    ("finetune:\n  steps: -5\n", ["finetune.steps"]),
    ("search:\n  sampler: grid\n", ["search.sampler"]),
    ("constraints:\n  max_size: lots\n", ["max_size"]),
    ("- just\n- a list\n", []),
])
def test_bad_yaml_is_one_line_naming_the_key_and_leaves_no_folder(tmp_path, capsys, text, mentions):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    run_and_expect_error(search_args(tmp_path, config=config), capsys, *mentions)
    assert not (tmp_path / "out").exists()


def _garbage(path: Path) -> Path:
    path.write_bytes(b"\x00not a checkpoint" * 10)
    return path


def _wrong_model(path: Path) -> Path:
    torch.save({"features.0.weight": torch.zeros(3, 3)}, path)
    return path


@pytest.mark.parametrize("kind, mentions", [
    ("data-missing-folder", ["not found", "nope"]),
    ("data-unknown", ["mnist"]),
    ("weights-missing", ["weights file not found"]),
    ("weights-garbage", ["cannot load weights"]),
    ("weights-wrong-model", ["does not fit"]),
    ("model-unknown", ["unknown model"]),
])
def test_bad_data_weights_model_are_refused_before_compute(tmp_path, capsys, kind, mentions):
    args = {
        "data-missing-folder": dict(data=f"imagefolder:{tmp_path / 'nope'}"),
        "data-unknown": dict(data="mnist"),
        "weights-missing": dict(weights=tmp_path / "missing.pt"),
        "weights-garbage": dict(weights=_garbage(tmp_path / "garbage.pt")),
        "weights-wrong-model": dict(weights=_wrong_model(tmp_path / "other.pt")),
        "model-unknown": dict(model="resnet9000"),
    }[kind]
    run_and_expect_error(search_args(tmp_path, **args), capsys, *mentions)
    assert not (tmp_path / "out").exists()


def test_resume_without_a_search_and_overwriting_a_search_are_refused(tmp_path, capsys):
    run_and_expect_error(["search", "--resume", "--out", str(tmp_path / "none"), "--no-progress"], capsys, "no search")
    assert not (tmp_path / "none").exists()
    out = tmp_path / "out"
    out.mkdir()
    (out / "search.json").write_text(json.dumps({"sentinel": True}))
    run_and_expect_error(search_args(tmp_path), capsys, "--resume")
    assert json.loads((out / "search.json").read_text()) == {"sentinel": True}
    (out / "search.json").write_text("{truncated")
    run_and_expect_error(["search", "--resume", "--out", str(out), "--no-progress"], capsys, "corrupt")


@pytest.mark.parametrize("plan, mentions", [
    ("{not json", ["not valid JSON"]),
    ('{"layers": []}', ["layers"]),
    ('{"layers": {}, "extra": 1}', ["extra"]),
    ('{"layers": {"features.3": {"method": "dct"}}}', ["dct"]),
    ('{"layers": {"features.3": {"method": "tucker2", "rank": 4, "bits": 3}}}', ["features.3"]),
    ('{"layers": {"no.such.layer": {"method": "tucker2", "rank": 0.5}}}', ["no.such.layer"]),
    ('{"layers": {}, "activations": "int3"}', ["int3"]),
])
def test_bad_plan_json_is_refused_before_compute(tmp_path, capsys, plan, mentions):
    path = tmp_path / "plan.json"
    path.write_text(plan)
    run_and_expect_error(["compress", "--model", "small_cnn", "--data", "digits", "--plan", str(path),
                          "--out", str(tmp_path / "out")], capsys, *mentions)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- fuzzing the schemas

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=12), st.sampled_from(["none", "tucker2", "cp", "tt", "svd", "int8", "fp16",
                                                            "evbmf", "ratio", "layer", "stage", "nsga2", "2h", "1MB"]))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                       max_leaves=8)


def _paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in tree.items():
        out.append(prefix + (key,))
        if isinstance(value, dict):
            out += _paths(value, prefix + (key,))
    return out


PATHS = _paths(DEFAULT_SPACE)


@st.composite
def mutated_spaces(draw) -> dict:
    """The shipped default space with a few keys replaced, dropped or misspelt."""
    space = json.loads(json.dumps(DEFAULT_SPACE))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent = space
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        action = draw(st.sampled_from(["replace", "drop", "rename"]))
        if action == "replace":
            parent[path[-1]] = draw(_values)
        elif action == "drop":
            parent.pop(path[-1], None)
        elif path[-1] in parent:
            parent[path[-1] + draw(st.sampled_from(["_", "s", "x"]))] = parent.pop(path[-1])
    return space


def _loads_or_one_line_error(load) -> None:
    try:
        load()
    except AutorankError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(space=mutated_spaces())
def test_fuzzed_yaml_spaces_load_or_fail_with_one_line(tmp_path, space):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(space, allow_unicode=True))
    _loads_or_one_line_error(lambda: load_space(path))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_fuzzed_yaml_text_loads_or_fails_with_one_line(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    _loads_or_one_line_error(lambda: load_space(path))


_layer_specs = st.dictionaries(
    st.sampled_from(["method", "rank", "precision", "bits"]),
    st.one_of(_scalars, st.lists(st.integers(-3, 70), max_size=4)), max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=st.one_of(_values, st.fixed_dictionaries(
    {"layers": st.dictionaries(st.sampled_from(["features.3", "features.7", "classifier", "x"]),
                               st.one_of(_layer_specs, _values), max_size=3)},
    optional={"activations": _scalars})))
def test_fuzzed_plan_json_loads_or_fails_with_one_line(small_cnn, plan):
    """A plan that loads must then resolve against the model or be refused the same way."""
    _loads_or_one_line_error(lambda: resolve_plan(small_cnn, Plan.from_json(json.dumps(plan))))


@pytest.fixture(scope="module")
def small_cnn():
    from autorank.data import load_data
    from autorank.models import create_model

    return create_model("small_cnn", load_data("digits"))
