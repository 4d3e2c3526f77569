"""`import autorank`: the pipeline's verbs and types at the top level, loaded on first use."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import autorank

REQUIRED = {"load_data", "create_model", "train", "evaluate", "compress", "make_plan", "profile", "run_search",
            "load_search", "best_trial", "export_onnx", "Plan", "LayerPlan", "TrainConfig", "allocate"}
STAGES = ("autorank.data", "autorank.models", "autorank.engine", "autorank.compression", "autorank.search",
          "autorank.tracking", "autorank.export")
HELPERS = {"augment_batch", "default_cache_dir", "check_weights_source", "decompose_layer", "build_chain",
           "quantize_weight", "resolve_rank", "method_params", "parse_size", "parse_duration", "default_tracking_uri",
           "front_csv", "figures", "result_json", "to_onnx", "write_onnx", "onnx_session"}


def test_import_autorank_loads_no_heavy_package_until_a_verb_is_used():
    probe = ("import sys, autorank\n"
             "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'optuna', 'onnx', 'tensorly') if m in sys.modules))\n"
             "autorank.compress\n"
             "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split("\n")[:2] == ["[]", "True"]


def test_the_top_level_names_are_the_stages_own_verbs_and_types():
    assert REQUIRED <= set(autorank.__all__) and set(autorank.__all__) <= set(dir(autorank))
    for name in autorank.__all__:
        stage = next(importlib.import_module(s) for s in (*STAGES, "autorank.errors")
                     if name in importlib.import_module(s).__all__)  # each in exactly its stage's public list
        assert getattr(autorank, name) is getattr(stage, name)
    with pytest.raises(AttributeError, match="no attribute 'decompose_layer'"):
        autorank.decompose_layer  # noqa: B018


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_exports_verbs_and_types_not_helpers(stage):
    module = importlib.import_module(stage)
    assert module.__all__ and all(hasattr(module, name) for name in module.__all__)
    assert not HELPERS & set(module.__all__)
    assert not HELPERS & set(vars(module))  # helpers live in the stage's modules, not its namespace


def test_the_verbs_compose_on_digits(digits):
    model = autorank.create_model("small_cnn", digits)
    autorank.train(model, digits, autorank.TrainConfig(steps=60, batch_size=64, lr=0.05, schedule="onecycle"))
    small = autorank.compress(model, autorank.make_plan(model, "tucker2", "vbmf", "int8"))
    assert autorank.profile(small, digits.input_shape).size_bytes < autorank.profile(model, digits.input_shape).size_bytes / 3
    assert autorank.evaluate(small, digits, limit=100) > 0.5  # far above chance (0.1) without fine-tuning
