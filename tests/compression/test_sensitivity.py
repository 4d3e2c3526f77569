"""The per-layer sensitivity table on the small CNN and sklearn digits (real, seeded, small)."""

from __future__ import annotations

import dataclasses

import pytest

from autorank.compression import LayerPlan, Plan, SensitivityTable, compress, profile
from autorank.engine import sensitivity_table
from autorank.errors import AutorankError
from tests.compression.conftest import TABLE_OPTIONS


def test_table_is_deterministic_for_a_seed_and_keep_fp32_costs_nothing(digits_table, digits_cnn, digits):
    again = sensitivity_table(digits_cnn, digits, **TABLE_OPTIONS)
    assert dataclasses.replace(again, seconds=0.0) == dataclasses.replace(digits_table, seconds=0.0)

    assert list(digits_table.layers) == ["features.7", "features.10", "classifier"]
    assert digits_table.images == 120 and digits_table.split == "val"
    for name, cands in digits_table.layers.items():
        keep = cands[0]
        assert (keep.method, keep.rank, keep.precision, keep.drop) == ("none", None, "fp32", 0.0)
        assert keep.accuracy == digits_table.reference_accuracy
        weight = digits_cnn.get_submodule(name).weight
        bias = digits_cnn.get_submodule(name).bias
        assert keep.size_bytes == 4 * (weight.numel() + (bias.numel() if bias is not None else 0))
        kinds = [c.kind for c in cands]
        if name == "classifier":
            assert kinds == ["none/fp32", "none/int8", "none/int4", "svd@0.5/int8", "svd@0.5/int4"]
        else:
            assert kinds == ["none/fp32", "none/int8", "none/int4", "tucker2@0.5/int8", "tucker2@0.5/int4"]
        for cand in cands[1:]:
            assert cand.size_bytes < keep.size_bytes
            assert cand.drop == pytest.approx(100 * (digits_table.reference_accuracy - cand.accuracy))
    # decomposing the 32->64 conv to half its weights at int4 costs more than int8 kept whole
    mid = {c.kind: c for c in digits_table.layers["features.7"]}
    assert mid["tucker2@0.5/int4"].drop > mid["none/int8"].drop
    assert digits_table.fixed_bytes + sum(c[0].size_bytes for c in digits_table.layers.values()) == \
        profile(digits_cnn, digits.input_shape).size_bytes == digits_table.model_bytes


def test_candidate_sizes_add_up_to_the_compressed_models_size(digits_table, digits_cnn, digits):
    """Each candidate was measured alone; combined, the profile of the compressed model is the sum."""
    chosen = {name: cands[-1] for name, cands in digits_table.layers.items()}
    plan = Plan({name: c.layer_plan() for name, c in chosen.items()})
    small = profile(compress(digits_cnn, plan, n_iter_max=20), digits.input_shape)
    predicted = digits_table.predict(plan)
    assert predicted.size_bytes == small.size_bytes and predicted.macs == small.macs
    assert predicted.drop == pytest.approx(sum(max(c.drop, 0) for c in chosen.values()))
    with pytest.raises(AutorankError, match="not a candidate"):
        digits_table.predict(Plan({"features.7": LayerPlan("tucker2", [3, 3], "int8")}))


def test_json_round_trip(digits_table, tmp_path):
    path = tmp_path / "sensitivity.json"
    path.write_text(digits_table.to_json())
    assert SensitivityTable.from_json(path.read_text()) == digits_table
    with pytest.raises(AutorankError, match="sensitivity table"):
        SensitivityTable.from_json('{"layers": {}}')
    assert "features.7" in digits_table.format()


def test_int8_activations_count_their_quantizers(digits_cnn, digits):
    table = sensitivity_table(digits_cnn, digits, include=["features.10"], methods=(), precisions=("int8",),
                              activations="int8", limit=60, device="cpu")
    keep, int8 = table.layers["features.10"]
    assert int8.size_bytes == 64 * 64 * 9 + 4 * 64 + 5  # int8 weights + per-channel scales + one quantizer
    assert table.activations == "int8" and keep.size_bytes == 4 * 64 * 64 * 9


def test_bad_options_fail_before_any_measurement(digits_cnn, digits):
    with pytest.raises(AutorankError, match="methods"):
        sensitivity_table(digits_cnn, digits, methods=("tucker3",))
    with pytest.raises(AutorankError, match="precisions"):
        sensitivity_table(digits_cnn, digits, precisions=("int2",))
    with pytest.raises(AutorankError, match="retention ratio"):
        sensitivity_table(digits_cnn, digits, levels=(1.5,))
    with pytest.raises(AutorankError, match="no layers"):
        sensitivity_table(digits_cnn, digits, include=["nothing*"])


def test_evbmf_multiple_levels_scale_each_layers_evbmf_ranks(digits_cnn, digits):
    """"vbmf*M" levels: M times the layer's EVBMF ranks (clamped to full rank); a level that would not
    shrink the layer is dropped, so no candidate holds more weights than the layer."""
    from autorank.compression.ranks import full_ranks, method_params, resolve_rank

    table = sensitivity_table(digits_cnn, digits, include=["features.7", "features.10"], methods=("tucker2",),
                              levels=("vbmf*1", "vbmf*2", "vbmf*64"), precisions=("fp32",),
                              decomposed_precisions=("int8",), limit=60, device="cpu", n_iter_max=5)
    for name, cands in table.layers.items():
        layer = digits_cnn.get_submodule(name)
        shape = tuple(layer.weight.shape)
        evbmf = resolve_rank("tucker2", layer, "vbmf")
        decomposed = {c.level: c for c in cands if c.method == "tucker2"}
        assert "vbmf*64" not in decomposed  # clamped to full rank: not smaller than the layer
        for level, cand in decomposed.items():
            multiple = float(level.split("*")[1])
            expected = [min(max(round(r * multiple), 1), f) for r, f in zip(evbmf, full_ranks("tucker2", shape))]
            assert cand.rank == expected
            assert method_params("tucker2", shape, tuple(cand.rank)) < layer.weight.numel()
    with pytest.raises(AutorankError, match="vbmf\\*M"):
        sensitivity_table(digits_cnn, digits, levels=("vbmf*0",))


def test_layer_by_layer_measurement_equals_the_whole_table(digits_table, digits_cnn, digits):
    """What a search spreads over workers (plan_table, then measure_layer per layer, in any order)
    assembles into the same table as sensitivity_table; per-layer choices restrict each layer."""
    from autorank.engine.sensitivity import measure_layer, plan_table

    options = {k: v for k, v in TABLE_OPTIONS.items() if k not in ("include", "methods", "precisions",
                                                                    "decomposed_precisions")}
    choices = {"features.7": (("tucker2",), ("fp32", "int8", "int4"), ("int8", "int4")),
               "features.10": (("tucker2",), ("fp32", "int8", "int4"), ("int8", "int4")),
               "classifier": (("svd",), ("fp32", "int8", "int4"), ("int8", "int4"))}
    job = plan_table(digits_cnn, digits, layers=choices, **options)
    rows = {name: measure_layer(job, name) for name in reversed(list(job.planned))}
    table = job.assemble(rows, seconds=0.0)
    assert table.layers == digits_table.layers
    assert table.fixed_bytes == digits_table.fixed_bytes and table.reference_accuracy == digits_table.reference_accuracy

    narrow = plan_table(digits_cnn, digits, layers={"features.7": ((), ("fp32", "int8"), ("int8",))}, **options)
    assert [lp.precision for lp, _ in narrow.planned["features.7"]] == ["int8"]
    with pytest.raises(AutorankError, match="not compressible layers"):
        plan_table(digits_cnn, digits, layers={"features.99": ((), ("int8",), ("int8",))}, **options)
    with pytest.raises(AutorankError, match="not measured"):
        job.assemble({"features.7": rows["features.7"]}, seconds=0.0)


def test_a_layers_candidates_run_only_the_network_from_that_layer_on(cifar, shared):
    """The table records the values that cross into the graph at a layer (on ResNet-20 the block input
    feeds both a block's first conv and its shortcut) and runs each candidate from there: the accuracy of a
    full pass."""
    from autorank.engine import evaluate
    from autorank.engine.sensitivity import _Downstream, plan_table
    from autorank.models import create_model

    model = create_model("resnet20", cifar, shared / "models" / "cifar10" / "resnet20-12fca82f-jpeg-adapted.pt").eval()
    choices = {name: (("tucker2",), ("int8",), ("int4",)) for name in ("layer2.0.conv1", "layer3.2.conv2")}
    job = plan_table(model, cifar, layers=choices, levels=(0.3,), activations="int8", limit=200, seed=0, device="cpu",
                     n_iter_max=10)
    for name in choices:
        downstream = _Downstream.record(job, name)
        assert downstream is not None and downstream.nodes[downstream.start].target == name
        crossing = downstream.recorded[0][0]
        # conv1: the block's input (conv1 and the shortcut read it); conv2: its own input and the block's input
        assert len(crossing) == (1 if name.endswith("conv1") else 2)
        assert all(value.shape[0] == 200 for value in crossing.values())  # one batch: the subset
        assert downstream.accuracy(model) == job.reference
        for lp, _ in job.planned[name]:
            small = compress(model, Plan({name: lp}, "int8"), calibration=job.calibration, n_iter_max=10)
            assert downstream.accuracy(small) == evaluate(small, job.subset, "val", device="cpu")


def test_a_model_torch_fx_cannot_trace_is_measured_by_full_passes(digits_cnn, digits):
    """Data-dependent control flow defeats fx: the table still measures every candidate, by full passes."""
    import torch
    from torch import nn

    from autorank.engine.sensitivity import _Downstream, plan_table

    class Branchy(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) if x.sum() > -1e9 else -self.inner(x)

    model = Branchy(digits_cnn)
    job = plan_table(model, digits, include=["inner.features.10"], methods=("tucker2",), levels=(0.5,),
                     precisions=("int8",), decomposed_precisions=("int8",), limit=60, device="cpu", n_iter_max=5)
    assert _Downstream.record(job, "inner.features.10") is None
    table = sensitivity_table(model, digits, include=["inner.features.10"], methods=("tucker2",), levels=(0.5,),
                              precisions=("int8",), decomposed_precisions=("int8",), limit=60, device="cpu",
                              n_iter_max=5)
    plain = sensitivity_table(digits_cnn, digits, include=["features.10"], methods=("tucker2",), levels=(0.5,),
                              precisions=("int8",), decomposed_precisions=("int8",), limit=60, device="cpu",
                              n_iter_max=5)
    assert [c.accuracy for c in table.layers["inner.features.10"]] == [c.accuracy for c in plain.layers["features.10"]]
    assert torch.is_grad_enabled()
