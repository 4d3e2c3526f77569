"""The measured ONNX Runtime latency table: each layer configuration is timed once, and int8 blocks
run as integer kernels as in the exported file."""

from __future__ import annotations

import collections
import json
import warnings

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from autorank.compression import LayerPlan, Plan
from autorank.compression.methods import build_chain
from autorank.engine.latency import LatencyTable, block_graph, default_path
from autorank.models.cifar_resnet import CifarResNet


@pytest.fixture(scope="module")
def resnet20() -> CifarResNet:
    return CifarResNet(3).eval()


def _cnn() -> nn.Module:
    """Two conv blocks and a classifier: a fast whole-model export for the remainder."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def _table(model, path, threads: int = 1) -> LatencyTable:
    return LatencyTable(model, (3, 16, 16), path, model_key="cnn", threads=threads, batch_size=8,
                        seconds=0.005, runs=3)


def test_a_second_plan_with_the_same_layer_configurations_times_nothing_new(tmp_path):
    path = tmp_path / "latency.json"
    model = _cnn()
    table = _table(model, path)
    first = Plan({"3": LayerPlan("tucker2", [8, 8], "int8"), "8": LayerPlan("none", None, "int8")},
                 activations="int8")
    predicted = table.predict(first)
    # every layer's fp32 block, the call overhead at each of the 3 layers' input shapes and the whole model
    # (for the remainder), then the plan's two configurations
    assert table.measured == len(table.layers) + 3 + 1 + 2
    assert predicted.b1_ms > 0 and predicted.throughput > 0
    timed = table.measured
    second = Plan({"8": LayerPlan("none", None, "int8")}, activations="int8")
    assert table.predict(second) != predicted
    assert table.measured == timed  # its configurations are all in the table
    reloaded = _table(model, path)  # another trial, another process: the JSON file
    assert reloaded.predict(first) == predicted
    assert reloaded.measured == 0
    elsewhere = _table(model, path, threads=2)  # another thread count: measured afresh, not mixed in
    elsewhere.predict(second)
    assert elsewhere.measured == len(table.layers) + 3 + 1 + 1


def test_an_int8_block_runs_every_conv_of_its_chain_as_qlinearconv(resnet20, tmp_path):
    chain = list(build_chain(resnet20.get_submodule("layer2.1.conv2"), "tucker2", (12, 10)))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(block_graph(chain, "int8").SerializeToString(), options,
                         providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load_model(tmp_path / "optimized.onnx").graph.node)
    assert ops["QLinearConv"] == 3
    assert ops["Conv"] + ops["FusedConv"] == 0


def test_a_corrupt_table_file_is_measured_afresh_and_rewritten(tmp_path):
    path = tmp_path / "latency.json"
    path.write_text('{"header": {"machine": ')  # a writer that died mid-file
    with pytest.warns(RuntimeWarning, match="unreadable"):
        table = _table(_cnn(), path)
    predicted = table.predict(Plan({"3": LayerPlan("none", None, "int8")}, activations="int8"))
    assert predicted.b1_ms > 0 and table.measured > 0
    assert json.loads(path.read_text())["entries"] == {k: vars(v) for k, v in table.entries.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file reads back without a warning
        assert _table(_cnn(), path).entries == table.entries


def test_two_tables_on_one_file_keep_each_others_entries(tmp_path):
    path = tmp_path / "latency.json"
    first, second = _table(_cnn(), path), _table(_cnn(), path)  # two searches opened the table at once
    a = first.block("0", "none", None, "int8")
    b = second.block("3", "tucker2", [8, 8], "fp32")
    both = _table(_cnn(), path)
    assert both.entries["0|none||int8"] == a and both.entries["3|tucker2|8x8|fp32"] == b
    assert both.entries.keys() >= first.entries.keys() | second.entries.keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency.json"]  # no temporary file left behind


def test_a_table_measured_at_another_input_resolution_is_not_reused(tmp_path):
    path = tmp_path / "latency.json"
    plan = Plan({"3": LayerPlan("none", None, "int8")}, activations="int8")
    small = _table(_cnn(), path)
    small.predict(plan)
    large = LatencyTable(_cnn(), (3, 32, 32), path, model_key="cnn", threads=1, batch_size=8, seconds=0.005, runs=3)
    assert large.entries == {}  # same model, weights and file: another resolution times differently
    large.predict(plan)
    assert large.measured == small.measured
    assert large._input_shapes()["3"] == (16, 32, 32) and small._input_shapes()["3"] == (16, 16, 16)
    assert default_path("cnn", (3, 16, 16), 1) != default_path("cnn", (3, 32, 32), 1)


def test_a_recomposed_layer_has_its_own_entry_shared_by_every_method_and_rank(tmp_path):
    """Run recomposed, a decomposed layer is one float conv of the layer's geometry behind a rounded input:
    its own entry, distinct from the chain's, timed once for any decomposition of that layer."""
    table = _table(_cnn(), tmp_path / "latency.json")
    chain = Plan({"3": LayerPlan("tucker2", [8, 8], "int8")}, activations="int8")
    table.predict(chain)
    timed = table.measured
    table.predict(Plan({"3": LayerPlan("tucker2", [8, 8], "int8", run="recomposed")}, activations="int8"))
    assert table.measured == timed + 1
    assert {"3|tucker2|8x8|int8", "3|recomposed|int8"} <= table.entries.keys()
    assert table.entries["3|recomposed|int8"] != table.entries["3|tucker2|8x8|int8"]
    for other in (LayerPlan("cp", [12], "int8", run="recomposed"), LayerPlan("tt", [4, 8, 8], "int4", run="recomposed")):
        table.predict(Plan({"3": other}, activations="int8"))
    assert table.measured == timed + 2  # int4 is its own entry; cp at int8 reuses tucker2's
    # float compute (fp32 activations): the recomposed layer is the layer itself, already in the table
    weight_only = Plan({"3": LayerPlan("cp", [12], "int8", run="recomposed")}, activations="fp32")
    assert table.predict(weight_only) == table.predict(Plan({}, activations="fp32"))
    assert table.measured == timed + 2


def test_a_recomposed_block_is_one_float_conv_behind_a_rounded_input(resnet20, tmp_path):
    layer = resnet20.get_submodule("layer2.1.conv2")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(block_graph([layer], "fp32", rounded_input=True).SerializeToString(), options,
                         providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load_model(tmp_path / "optimized.onnx").graph.node)
    assert ops["Conv"] + ops["FusedConv"] == 1 and ops["QLinearConv"] == 0
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 1
