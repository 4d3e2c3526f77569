"""Search-space YAML: validation names the offending key; groups, suggestions, seeds and plans."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from autorank._shipped import search_spaces
from autorank.errors import AutorankError
from autorank.search.space import Constraints, SearchSpace, load_space, parse_duration, parse_size, parse_space, space_from_dict

REPO = Path(__file__).resolve().parents[2]

# (YAML document, the key the one-line error must name)
BAD = [
    ({"finetune": {"stpes": 10}}, "finetune.stpes"),            # unknown key (typo)
    ({"colour": "red"}, "colour"),                             # unknown top-level key
    ({"rank": {"multiplier": [4, 0.5]}}, "rank.multiplier"),  # bad range: low > high
    ({"rank": {"multiplier": [0, 2]}}, "rank.multiplier"),    # bad range: not > 0
    ({"rank": {"mode": "ratio", "ratio": [0.1, 1.5]}}, "rank.ratio"),
    ({"rank": {"mode": "ratio", "multiplier": [1, 2]}}, "rank.multiplier"),
    ({"methods": []}, "methods"),                              # empty choice
    ({"precisions": []}, "precisions"),
    ({"precisions": ["int3"]}, "precisions"),                  # unknown choice
    ({"methods": ["tucker"]}, "methods"),
    ({"grouping": "block"}, "grouping"),
    ({"objectives": ["size_bytes"]}, "objectives"),
    ({"constraints": {"max_size": "lots"}}, "constraints.max_size"),
    ({"constraints": {"max_drop": -1}}, "constraints.max_drop"),
    ({"constraints": {"min_ratio": "ten"}}, "constraints.min_ratio"),
    ({"finetune": {"steps": 2.5}}, "finetune.steps"),
    ({"finetune": {"qat": "yes"}}, "finetune.qat"),
    ({"finetune": {"distill": 1.5}}, "finetune.distill"),
    ({"finetune": {"fit": "yes"}}, "finetune.fit"),
    ({"search": {"sampler": "cmaes"}}, "search.sampler"),
    ({"search": {"time_budget": "soon"}}, "search.time_budget"),
    ({"search": {"trials": 0}}, "search.trials"),
    ({"rules": [{"methods": ["cp"]}]}, "rules[0].match"),
    ({"rules": [{"match": ["fc"], "precisions": []}]}, "rules[0].precisions"),
    ({"stages": {"early": ["layer1.*"]}}, "stages"),           # stages without grouping: stage
    ({"layers": {"include": []}}, "layers.include"),
]


@pytest.mark.parametrize("doc,key", BAD, ids=[k for _, k in BAD])
def test_each_yaml_error_is_one_line_naming_the_key(tmp_path, doc, key):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(AutorankError) as info:
        load_space(path)
    message = str(info.value)
    assert "\n" not in message
    assert f"'{key}'" in message, message


def test_broken_yaml_and_missing_file_are_one_line_errors(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("methods: [none, cp\nrank: {")
    with pytest.raises(AutorankError, match=r"invalid YAML at line \d"):
        load_space(path)
    with pytest.raises(AutorankError, match="file not found"):
        load_space(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["default.yaml", "resnet_cifar.yaml"])
def test_shipped_spaces_load_and_round_trip(name):
    space = load_space(REPO / "search_spaces" / name)
    assert space.objectives[0] == "accuracy"
    assert space_from_dict(space.to_dict()) == space


def test_shipped_spaces_load_by_name_and_a_file_of_that_name_wins(tmp_path, monkeypatch):
    assert set(search_spaces()) == {"default", "resnet_cifar"}
    for name in search_spaces():
        assert load_space(name) == load_space(REPO / "search_spaces" / f"{name}.yaml")
    monkeypatch.chdir(tmp_path)
    Path("default").write_text(yaml.safe_dump({"name": "mine", "search": {"trials": 3}}))
    assert load_space("default").name == "mine"  # an existing path is never shadowed by a shipped name


def test_unknown_space_name_lists_the_shipped_ones(tmp_path):
    with pytest.raises(AutorankError, match=r"^unknown search space 'resnet': shipped spaces are default, "
                                            r"resnet_cifar \(autorank spaces\), or give a YAML file$"):
        load_space("resnet")
    with pytest.raises(AutorankError, match=r"file not found \(shipped spaces by name: default, resnet_cifar\)"):
        load_space("search_spaces/resnet.yaml")


def test_units():
    assert parse_size("0.5MB") == 500_000
    assert parse_size("200KiB") == 204_800
    assert parse_size(1234) == 1234
    assert parse_duration("2h") == 7200
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90") == 90
    with pytest.raises(AutorankError):
        parse_size("-1MB")
    with pytest.raises(AutorankError):
        parse_duration("2 fortnights")


RESNET_LAYERS = {**{f"layer{s}.{b}.conv{c}": "conv" for s in (1, 2, 3) for b in range(3) for c in (1, 2)},
                 "linear": "linear"}


def test_grouping_controls_the_dimension_of_the_space():
    per_layer = parse_space({"grouping": "layer"}).groups(RESNET_LAYERS)
    per_stage = parse_space({"grouping": "stage"}).groups(RESNET_LAYERS)
    single = parse_space({"grouping": "global"}).groups(RESNET_LAYERS)
    assert len(per_layer) == 19
    assert sorted(g.key for g in per_stage) == ["layer1", "layer2", "layer3", "linear"]
    assert sorted(g.key for g in single) == ["all.conv", "all.linear"]  # convs and linears never share
    linear = next(g for g in single if g.kind == "linear")
    assert set(linear.methods) <= {"none", "svd"}
    custom = parse_space({"grouping": "stage", "stages": {"early": ["layer1.*", "layer2.*"]}}).groups(RESNET_LAYERS)
    assert sorted(g.key for g in custom) == ["early", "layer3", "linear"]


def test_rules_override_choices_for_matching_layers():
    space = parse_space({"grouping": "stage", "methods": ["none", "tucker2", "cp", "svd"],
                         "rules": [{"match": ["layer3.*"], "methods": ["tucker2"], "precisions": ["int8"],
                                    "multiplier": [0.5, 1.0]}]})
    groups = {g.key: g for g in space.groups(RESNET_LAYERS)}
    assert groups["layer3"].methods == ("tucker2",)
    assert groups["layer3"].precisions == ("int8",)
    assert groups["layer3"].rank == (0.5, 1.0)
    assert groups["layer1"].methods == ("none", "tucker2", "cp")


def test_seeds_cover_each_method_and_precision_at_the_evbmf_ranks():
    space = parse_space({"methods": ["none", "tucker2", "cp", "svd"], "precisions": ["fp32", "int8"],
                         "rank": {"multiplier": [0.25, 4.0]}})
    groups = space.groups(RESNET_LAYERS)
    seeds = space.seed_params(groups)
    conv = [g for g in groups if g.kind == "conv"][0]
    combos = {(s[f"{conv.key}.method"], s[f"{conv.key}.precision"]) for s in seeds}
    assert combos == {("tucker2", "fp32"), ("tucker2", "int8"), ("cp", "fp32"), ("cp", "int8")}
    assert all(v == 1.0 for s in seeds for k, v in s.items() if k.endswith(".rank"))
    assert all(s["linear.method"] == "svd" for s in seeds)
    assert len(space.seed_params(groups, limit=3)) == 3
    assert parse_space({"rank": {"mode": "ratio"}}).seed_params(groups) == []


def test_suggest_reproduces_enqueued_seeds_and_samples_within_ranges():
    space = parse_space({"grouping": "stage", "rank": {"multiplier": [0.5, 3.0]}})
    groups = space.groups(RESNET_LAYERS)
    study = optuna.create_study(directions=space.directions, sampler=optuna.samplers.RandomSampler(seed=0))
    seeds = space.seed_params(groups)
    for params in seeds:
        study.enqueue_trial(params)
    for i in range(len(seeds) + 10):
        trial = study.ask()
        params = space.suggest(trial, groups)
        if i < len(seeds):
            assert params == seeds[i]
        for g in groups:
            assert params[f"{g.key}.method"] in g.methods
            assert params[f"{g.key}.precision"] in g.precisions
            if params[f"{g.key}.method"] != "none":
                assert 0.5 <= params[f"{g.key}.rank"] <= 3.0
        study.tell(trial, [0.5, 1.0])


def test_constraints_give_optuna_style_violations():
    c = Constraints(max_size=1000, min_ratio=4.0, max_drop=1.0)
    ref = {"size_bytes": 8000.0, "accuracy": 0.90}
    ok = c.violations({"size_bytes": 1000.0, "accuracy": 0.89}, ref)
    assert all(v <= 1e-9 for v in ok.values())
    bad = c.violations({"size_bytes": 4000.0, "accuracy": 0.85}, ref)
    assert bad["max_size"] == 3000 and bad["min_ratio"] == 2.0 and bad["max_drop"] == pytest.approx(4.0)
    assert SearchSpace().constraints.violations({"size_bytes": 1, "accuracy": 0}, ref) == {}
