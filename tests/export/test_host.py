"""The int8 grid is exact on CPUs with and without VNNI, and the export says which one verified it."""

from __future__ import annotations

import platform

from autorank.compression.quantize import QMAX
from autorank.export.host import FEATURES, INT16_MAX, host_report, pair_bound, pair_probe
from emulation import needs_qemu, run_on_avx2


def test_the_int8_grid_keeps_every_pair_of_products_inside_int16():
    assert pair_bound(QMAX["int8"]) == 2 * 255 * 64 <= INT16_MAX
    assert pair_bound(127) > INT16_MAX  # the full int8 range would not


def test_this_host_reports_its_kernel_and_computes_the_search_grid_exactly():
    report = host_report()
    assert set(report["cpu_features"]) == set(FEATURES)
    saturated, exact = pair_probe(QMAX["int8"])
    assert saturated == exact
    features = report["cpu_features"]
    vnni = features["avx512_vnni"] or features["avx_vnni"]
    x86_without_vnni = platform.machine() in ("x86_64", "AMD64") and not vnni
    # Both kinds of CI host are covered: the measured saturation follows the CPU's features
    print(f"host: {report['int8_kernel']} (features {features})")
    assert report["int8_kernel_saturates_8bit_weights"] == x86_without_vnni
    assert ("VPMADDUBSW" in report["int8_kernel"]) == x86_without_vnni


@needs_qemu
def test_an_avx2_cpu_without_vnni_saturates_full_int8_weights_but_not_the_search_grid():
    found = run_on_avx2(
        "import json; from autorank.export.host import host_report, pair_probe; "
        f"print(json.dumps({{'full': pair_probe(127), 'grid': pair_probe({QMAX['int8']}), 'host': host_report()}}))")
    full_out, full_exact = found["full"]
    assert full_out < full_exact  # 32,767 + rounding, not 64,770: the saturating kernel really ran
    assert found["grid"][0] == found["grid"][1]
    assert found["host"]["cpu_features"]["avx2"] and not found["host"]["cpu_features"]["avx512_vnni"]
    assert found["host"]["int8_kernel_saturates_8bit_weights"]
