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
    ({"finetune": {"guard": -5}}, "finetune.guard"),
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


def test_suggest_samples_within_ranges():
    space = parse_space({"grouping": "stage", "rank": {"multiplier": [0.5, 3.0]}})
    groups = space.groups(RESNET_LAYERS)
    study = optuna.create_study(directions=space.directions, sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        trial = study.ask()
        params = space.suggest(trial, groups)
        for g in groups:
            assert params[f"{g.key}.method"] in g.methods
            assert params[f"{g.key}.precision"] in g.precisions
            if params[f"{g.key}.method"] != "none":
                assert 0.5 <= params[f"{g.key}.rank"] <= 3.0
        study.tell(trial, [0.5, 1.0])


def test_allocate_mode_samples_a_few_global_parameters():
    """Allocate mode: target ratio (log range), a switch per decomposition family, the lowest precision
    and the two weights of the table's drops; per-layer choices come from the rules."""
    space = parse_space({"mode": "allocate", "methods": ["none", "tucker2", "cp", "svd"],
                         "precisions": ["fp32", "int8", "int4"], "allocate": {"ratio": [3, 24], "sharpness": [1, 1]},
                         "rules": [{"match": ["layer1.*"], "precisions": ["fp32", "int8"]},
                                   {"match": ["linear"], "methods": ["none"]}]})
    groups = space.groups(RESNET_LAYERS)
    assert len(groups) == 19 and {g.key for g in groups} == set(RESNET_LAYERS)  # one group per layer
    assert space.families(groups) == ["tucker2", "cp"] and space.reduced_precisions(groups) == ["int8", "int4"]
    study = optuna.create_study(directions=space.directions, sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(20):
        trial = study.ask()
        params = space.suggest(trial, groups)
        assert set(params) == {"ratio", "decomposed_weight", "allow.tucker2", "allow.cp", "lowest_precision"}
        assert 3 <= params["ratio"] <= 24 and 0.5 <= params["decomposed_weight"] <= 2.0  # sharpness fixed
        seen.add((params["allow.tucker2"], params["allow.cp"], params["lowest_precision"]))
        study.tell(trial, [0.5, 1.0])
    assert len(seen) > 4
    assert space.sensitivity.levels == (2.0, 4.0) and space.final.top == 0 and space.allocate.calibrate
    assert space_from_dict(space.to_dict()) == space
    old = space.to_dict()  # a search.json from before the costs were fitted ran on the raw table
    del old["allocate"]["calibrate"]
    assert not space_from_dict(old).allocate.calibrate
    assert space.allocate.granularity == ("layer",) and space_from_dict(old).allocate.granularity == ("layer",)


def test_allocate_mode_samples_the_granularity_when_both_are_allowed():
    """`allocate.granularity: [layer, stage]` adds a sampled `granularity`; a layer's stage is its top-level
    module (ResNet's layer1..layer3, the classifier alone)."""
    space = parse_space({"mode": "allocate", "methods": ["none", "cp"], "precisions": ["fp32", "int8"],
                         "allocate": {"granularity": ["layer", "stage"]}})
    groups = space.groups(RESNET_LAYERS)
    study = optuna.create_study(directions=space.directions, sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        seen.add(space.suggest(trial, groups)["granularity"])
        study.tell(trial, [0.5, 1.0])
    assert seen == {"layer", "stage"}
    assert {space.stage(name) for name in RESNET_LAYERS} == {"layer1", "layer2", "layer3", "linear"}
    assert space_from_dict(space.to_dict()) == space


@pytest.mark.parametrize("doc, key", [
    ({"mode": "allocate", "grouping": "stage"}, "grouping"),
    ({"mode": "allocate", "rank": {"multiplier": [1, 2]}}, "rank"),
    ({"mode": "allocate", "rules": [{"match": ["x"], "multiplier": [1, 2]}]}, "rules[0].multiplier"),
    ({"mode": "allocate", "activations": ["fp32", "int8"]}, "activations"),
    ({"mode": "allocate", "methods": ["none"], "precisions": ["fp32"]}, "methods"),
    ({"mode": "allocate", "allocate": {"ratio": [0.5, 4]}}, "allocate.ratio"),
    ({"mode": "allocate", "allocate": {"sharpness": [2, 1]}}, "allocate.sharpness"),
    ({"mode": "allocate", "allocate": {"decomposed_weight": [0.5, 20]}}, "allocate.decomposed_weight"),
    ({"mode": "allocate", "allocate": {"calibrate": "yes"}}, "allocate.calibrate"),
    ({"mode": "allocate", "allocate": {"granularity": ["block"]}}, "allocate.granularity"),
    ({"mode": "allocate", "sensitivity": {"levels": []}}, "sensitivity.levels"),
    ({"mode": "allocate", "sensitivity": {"levels": [2, 2]}}, "sensitivity.levels"),
    ({"mode": "allocate", "sensitivity": {"images": 0}}, "sensitivity.images"),
    ({"mode": "allocate", "sensitivity": {"retention": [0.4, 1.0]}}, "sensitivity.retention"),
    ({"mode": "allocate", "sensitivity": {"retention": [0.4, 0.4]}}, "sensitivity.retention"),
    ({"mode": "allocate", "sensitivity": {"retention": 0.4}}, "sensitivity.retention"),
    ({"mode": "allocate", "sensitivity": {"fit": 3}}, "sensitivity.fit"),
    ({"allocate": {"ratio": [2, 4]}}, "allocate"),
    ({"mode": "greedy"}, "mode"),
    ({"final": {"top": -1}}, "final.top"),
    ({"final": {"steps": 0}}, "final.steps"),
    ({"final": {"lr": 0}}, "final.lr"),
    ({"final": {"start": "pretrained"}}, "final.start"),
    ({"search": {"seed_ratios": [0.5, 1.0]}}, "search.seed_ratios"),
    ({"search": {"seeds": True, "evbmf_seeds": True}}, "search.evbmf_seeds"),
    ({"screening": {"keep": 0}}, "screening.keep"),
    ({"screening": {"batch": 0}}, "screening.batch"),
    ({"screening": {}, "finetune": {"qat": False}}, "screening"),
    ({"search": {"steps_budget": 0}}, "search.steps_budget"),
])
def test_allocate_final_and_seed_keys_fail_with_one_line(tmp_path, doc, key):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(AutorankError) as info:
        load_space(path)
    assert f"key '{key}'" in str(info.value) and "\n" not in str(info.value)


def test_old_spaces_and_search_json_stay_valid():
    """No mode: layers; `evbmf_seeds` is the old name of `seeds`; a search.json of an older search loads."""
    old = parse_space({"rank": {"mode": "ratio"}, "search": {"evbmf_seeds": False}})
    assert old.mode == "layers" and old.seeds is False and old.sensitivity is None and old.final.top == 0
    stored = {k: v for k, v in old.to_dict().items()
              if k not in ("mode", "sensitivity", "allocate", "final", "seeds", "seed_ratios")}
    assert space_from_dict({**stored, "evbmf_seeds": False}) == old


def test_constraints_give_optuna_style_violations():
    c = Constraints(max_size=1000, min_ratio=4.0, max_drop=1.0)
    ref = {"size_bytes": 8000.0, "accuracy": 0.90}
    ok = c.violations({"size_bytes": 1000.0, "accuracy": 0.89}, ref)
    assert all(v <= 1e-9 for v in ok.values())
    bad = c.violations({"size_bytes": 4000.0, "accuracy": 0.85}, ref)
    assert bad["max_size"] == 3000 and bad["min_ratio"] == 2.0 and bad["max_drop"] == pytest.approx(4.0)
    assert SearchSpace().constraints.violations({"size_bytes": 1, "accuracy": 0}, ref) == {}
