"""The search's sensitivity table plan (`autorank.search.table`): rank levels from the space."""

from __future__ import annotations

import math

from autorank.compression.ranks import attainable_ranks, method_params, ratio_ranks, scaled_ranks
from autorank.models import create_model
from autorank.search.space import parse_space
from autorank.search.table import table_job, table_levels
from autorank.search.trial import TrialContext, layer_table

SPACE = {
    "name": "retention",
    "mode": "allocate",
    "methods": ["none", "tucker2", "cp", "svd"],
    "precisions": ["fp32", "int8", "int4"],
    "sensitivity": {"images": 60, "levels": [2], "retention": [0.4, 0.25], "fit_images": 32},
    "finetune": {"steps": 4, "batch_size": 64, "decompose_iters": 5},
    "search": {"trials": 1},
}


def test_retention_levels_keep_the_same_fraction_of_every_layer(tmp_path, pretrained_digits, digits):
    """`sensitivity.retention` adds levels after the EVBMF multiples: at each, every layer's candidate
    keeps that fraction of its own parameters (the closest attainable ranks), at every decomposed precision
    (`table_choices`: the integer ones)."""
    space = parse_space(SPACE)
    assert table_levels(space) == ["vbmf*2", 0.4, 0.25]
    model = create_model("small_cnn", digits, pretrained_digits).eval()
    layers = layer_table(model, space)
    ctx = TrialContext(space=space, groups=space.groups({n: i.kind for n, i in layers.items()}), layers=layers,
                       model=model, reference={}, out_dir=tmp_path, device="cpu")
    job = table_job(ctx, digits)
    assert job.settings["levels"] == ["vbmf*2", 0.4, 0.25]
    found = 0
    for name, planned in job.planned.items():
        shape = layers[name].shape
        for method in {lp.method for lp, _ in planned} - {"none"}:
            evbmf = attainable_ranks(method, shape, tuple(scaled_ranks(layers[name].evbmf[method],
                                                                       layers[name].full[method], 2.0)))
            for fraction in (0.4, 0.25):
                expected = attainable_ranks(method, shape, ratio_ranks(method, shape, fraction))
                at_level = [lp for lp, level in planned if lp.method == method and level == fraction]
                if list(expected) == list(evbmf) or method_params(method, shape, expected) >= math.prod(shape):
                    continue  # a repeated or non-shrinking rank is not measured twice
                assert {lp.precision for lp in at_level} == {"int8", "int4"}  # decomposed: integer precisions
                assert all(tuple(lp.rank) == expected for lp in at_level)
                found += 1
    assert found >= 6  # tucker2 and cp on each of the digits CNN's convs, svd on its classifier, two fractions
