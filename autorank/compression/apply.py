"""`compress(model, plan)`: decomposition + fake quantization of a pretrained model, as a new model."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from autorank.errors import AutorankError

from .fit import FIT_MODES, RecordedLayer, fit_chains, fit_recorded
from .layers import find_layers, is_candidate
from .methods import Recomposed, build_chain, decompose_layer
from .plan import CONV_METHODS, LINEAR_METHODS, LayerPlan, Plan, RankSpec
from .quantize import INT_BITS, ActivationFakeQuant, calibrate, quantize_weights_
from .ranks import method_params, parse_vbmf, ratio_ranks, resolve_rank


def _layer(model: nn.Module, name: str) -> nn.Module:
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        known = ", ".join(list(find_layers(model, skip_first=False))[:8])
        raise AutorankError(f"plan names unknown layer {name!r} (layers look like: {known}, ...)") from None
    if not is_candidate(layer):
        raise AutorankError(f"layer {name!r} is a {type(layer).__name__}: plans address Conv2d (groups=1) "
                            "or Linear modules")
    return layer


def _check(name: str, layer: nn.Module, lp: LayerPlan) -> None:
    """Everything about a layer plan that can be checked without computing anything."""
    allowed = CONV_METHODS if isinstance(layer, nn.Conv2d) else LINEAR_METHODS
    if lp.method not in allowed:
        raise AutorankError(f"layer {name!r} ({type(layer).__name__}): method {lp.method!r} not applicable, "
                            f"choose from {', '.join(allowed)}")
    if lp.run == "recomposed" and getattr(layer, "padding_mode", "zeros") != "zeros":
        raise AutorankError(f"layer {name!r}: run 'recomposed' needs zero padding (one ONNX Conv), the layer pads "
                            f"with {layer.padding_mode!r}")
    if lp.method == "none" or lp.rank is None or (isinstance(lp.rank, str) and parse_vbmf(lp.rank) is not None):
        return
    if isinstance(lp.rank, str):
        raise AutorankError(f"layer {name!r}: rank {lp.rank!r}: expected 'vbmf', 'vbmf:W' (W in [0,1]), "
                            "a ratio in (0,1] or integers")
    try:
        resolve_rank(lp.method, layer, lp.rank)  # ints and ratios: no EVBMF, only arithmetic
    except AutorankError as exc:
        raise AutorankError(f"layer {name!r}: {exc}") from None


def resolve_plan(model: nn.Module, plan: Plan) -> Plan:
    """The plan with integer ranks (lists), so that `compress` rebuilds the same model deterministically.

    A layer whose decomposition at the resolved ranks would not be smaller than the layer (EVBMF finds
    1x1 convs and small linear layers full-rank; ratios near 1 or integers can ask for as much) stays
    undecomposed at its precision, whatever the rank spec, and `notes` of the result says why.
    Raises AutorankError for unknown layers, inapplicable methods or invalid ranks before any compute.
    """
    layers = {name: _layer(model, name) for name in plan.layers}
    for name, lp in plan.layers.items():
        _check(name, layers[name], lp)
    resolved, notes = {}, dict(plan.notes)
    for name, lp in plan.layers.items():
        layer, method = layers[name], lp.method
        ranks: list[int] | None = None
        if method != "none":
            ranks = list(resolve_rank(method, layer, lp.rank))
            shape = tuple(layer.weight.shape)
            decomposed, weights = method_params(method, shape, ranks), math.prod(shape)
            if decomposed >= weights:
                notes[name] = (f"{method} at ranks {'x'.join(map(str, ranks))} would hold {decomposed:,} weights, "
                               f"the layer holds {weights:,}")
                method, ranks = "none", None
        run = lp.run if method != "none" else "chain"
        resolved[name] = LayerPlan(method, ranks, lp.precision, lp.stabilize, run)
    return Plan(resolved, plan.activations, notes)


def _with_input_quant(chain: nn.Module) -> nn.Sequential:
    """Fake-quantize the input of every conv/linear of the chain (as static INT8 inference would)."""
    modules = list(chain) if isinstance(chain, nn.Sequential) else [chain]
    return nn.Sequential(*[m for layer in modules for m in (ActivationFakeQuant(), layer)])


_RELUS = (torch.relu, torch.nn.functional.relu, torch.relu_)


def _output_quant_sites(model: nn.Module, plan: Plan) -> dict[str, str]:
    """int8 conv → the module after which its output gets fake-quantized (its BatchNorm, else itself).

    ONNX Runtime runs a QDQ conv as an integer QLinearConv only when its (BatchNorm-folded) output
    feeds a QuantizeLinear. Inside a chain and before a quantized layer (through a ReLU) the next
    layer's input quantizer is that QuantizeLinear; a conv whose output reaches anything else (a
    residual add, a float layer) gets its own output quantizer here, and export puts the same
    QuantizeLinear in the file. Found on a torch.fx trace of the uncompressed model; a model fx cannot
    trace keeps today's input-only quantization (those convs then run in float).
    """
    if plan.activations != "int8":
        return {}
    quantized = {name for name, lp in plan.layers.items() if lp.precision in INT_BITS}
    int8_convs = {name for name, lp in plan.layers.items()  # a recomposed layer computes in float
                  if lp.precision == "int8" and lp.run == "chain" and isinstance(model.get_submodule(name), nn.Conv2d)}
    if not int8_convs:
        return {}
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - fx refuses data-dependent control flow and many custom modules
        return {}

    def module(node: torch.fx.Node) -> nn.Module | None:
        return model.get_submodule(node.target) if node.op == "call_module" else None

    def is_relu(node: torch.fx.Node) -> bool:
        return ((node.op == "call_function" and node.target in _RELUS) or isinstance(module(node), nn.ReLU)
                or (node.op == "call_method" and node.target in ("relu", "relu_")))

    sites = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in int8_convs:
            continue
        site, out = node.target, node
        users = list(out.users)
        if len(users) == 1 and isinstance(module(users[0]), nn.BatchNorm2d):
            out = users[0]
            site = out.target
        if any(user.op == "output" for user in out.users):  # the model's output: the file keeps it float
            continue
        consumers, frontier = [], list(out.users)
        while frontier:
            user = frontier.pop()
            if is_relu(user):
                frontier.extend(user.users)
            else:
                consumers.append(user)
        if not consumers or any(c.op != "call_module" or c.target not in quantized for c in consumers):
            sites[node.target] = site
    return sites


def _decomposed(name: str, layer: nn.Module, lp: LayerPlan, n_iter_max: int, seed: int,
                cache: dict | None) -> nn.Module:
    """The layer's weight-space chain; `cache` keeps a float copy per (layer, method, ranks, settings), so
    that a later trial asking for the same skips the decomposition (CP-ALS + EPC is the costly one)."""
    key = (name, lp.method, tuple(lp.rank), lp.stabilize, n_iter_max, seed)
    if cache is not None and key in cache:
        return copy.deepcopy(cache[key])
    chain = decompose_layer(layer, lp.method, tuple(lp.rank), stabilize=lp.stabilize, n_iter_max=n_iter_max,
                            seed=seed)
    if cache is not None:
        cache[key] = copy.deepcopy(chain)
    return chain


def compress(model: nn.Module, plan: Plan, *, calibration: Iterable[Tensor] | None = None,
             decompose: bool = True, observer: str = "minmax", n_iter_max: int = 100,
             seed: int = 0, fit: Iterable[Tensor] | RecordedLayer | None = None, fit_mode: str = "als",
             factors: dict | None = None, output_quant: bool = True) -> nn.Module:
    """A new model with `plan` applied; `model` is left untouched.

    Decomposed layers become nn.Sequential chains of plain Conv2d/Linear; layers at fp16/int8/int4 get
    weight fake-quant; with `plan.activations == "int8"` the inputs of int8/int4 layers get calibrated
    activation fake-quant (a chain run recomposed: only its input), as do the outputs of int8 convs no
    quantized layer reads (`_output_quant_sites`)
    (`calibration`: batches of inputs; without it, ranges come from the first
    batch seen). `decompose=False` builds the same structure without computing factors, for loading a
    saved state_dict of a compressed model. `fit`: calibration images to which every decomposed chain
    is then fitted, and on which every layer kept whole at int8/int4 is rounded (data-aware, see
    `fit.fit_chains`; `fit_mode` als | pair | last), or a `RecordedLayer`
    when the plan decomposes that layer alone (its recorded input and output: no network pass). `factors`: a cache of
    weight-space chains shared by calls on the same `model` (a search's trials), see `_decomposed`.
    `output_quant=False` leaves out the output quantizers (the structure of weights saved before them).
    """
    if fit_mode not in FIT_MODES:
        raise AutorankError(f"fit mode {fit_mode!r}: choose from {', '.join(FIT_MODES)}")
    resolved = resolve_plan(model, plan)
    decomposed = [n for n, lp in resolved.layers.items() if lp.method != "none"]
    if isinstance(fit, RecordedLayer):
        changed = {n for n, lp in resolved.layers.items() if (lp.method, lp.precision) != ("none", "fp32")}
        if changed - {fit.name}:
            raise AutorankError(f"fit: the input recorded at {fit.name} holds only for a plan that changes that "
                                f"layer alone, not {sorted(changed)}")
    sites = _output_quant_sites(model, resolved) if output_quant else {}
    compressed = copy.deepcopy(model)
    for name, lp in resolved.layers.items():
        layer = compressed.get_submodule(name)
        if lp.method == "none":
            chain: nn.Module = layer
        elif decompose:
            chain = _decomposed(name, layer, lp, n_iter_max, seed, factors)
        else:
            chain = build_chain(layer, lp.method, tuple(lp.rank))
        for module in chain.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                quantize_weights_(module, lp.precision)
        if resolved.activations == "int8" and lp.precision in INT_BITS:
            # recomposed: one op runs in the file, so only the chain's input is rounded
            chain = _with_input_quant(chain) if lp.run == "chain" else nn.Sequential(ActivationFakeQuant(), *chain)
            if sites.get(name) == name:
                chain.append(ActivationFakeQuant(output_of=name))
        if lp.run == "recomposed":
            chain = Recomposed(lp.method, *chain)
        if chain is not layer:
            compressed.set_submodule(name, chain)
    for name, site in sites.items():
        if site != name:  # after the conv's BatchNorm: the tensor the file's folded conv outputs
            compressed.set_submodule(site, nn.Sequential(compressed.get_submodule(site),
                                                         ActivationFakeQuant(output_of=name)))
    # every decomposed chain, and the rounding of every layer kept whole at int8/int4
    fitted = [n for n, lp in resolved.layers.items() if lp.method != "none" or lp.precision in INT_BITS]
    if isinstance(fit, RecordedLayer) and decompose and fitted:
        fit_recorded(compressed, fit, mode=fit_mode)
    elif fit is not None and decompose and fitted:  # nothing to fit: no network passes either
        fit_chains(compressed, model, fitted, fit, mode=fit_mode)
    if calibration is not None:
        calibrate(compressed, calibration, observer)
    return compressed


def load_compressed(model: nn.Module, plan: Plan, state: dict[str, Tensor]) -> nn.Module:
    """`model` compressed by `plan` holding `state`, a saved state_dict of such a model.

    Weights saved before int8 convs got output quantizers (searches and exports of older versions)
    have no entries for them: they load into that older structure, which computes what they were
    trained as (those convs then run in float in ONNX Runtime). RuntimeError if neither fits.
    """
    compressed = compress(model, plan, decompose=False)
    try:
        compressed.load_state_dict(state)
        return compressed
    except RuntimeError as exc:
        if not _output_quant_sites(model, resolve_plan(model, plan)):
            raise
        error = exc
    older = compress(model, plan, decompose=False, output_quant=False)
    try:
        older.load_state_dict(state)
    except RuntimeError:
        raise error from None
    return older


def _probe_error(layer: nn.Module, chain: nn.Module, seed: int) -> float:
    """Relative output error of a chain on a seeded white-noise input (≈ the kernel's relative error)."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(layer, nn.Conv2d):
        size = max(16, 2 * max(layer.kernel_size))
        shape = (4, layer.in_channels, size, size)
    else:
        shape = (64, layer.in_features)
    x = torch.randn(shape, generator=gen).to(device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        y = layer(x)
        return float(torch.linalg.vector_norm(chain(x) - y) / torch.linalg.vector_norm(y).clamp_min(1e-30))


def mixed_plan(model: nn.Module, rank: RankSpec = "vbmf", precision: str = "fp32", *,
               activations: str = "fp32", include: list[str] | None = None,
               exclude: list[str] | None = None, skip_first: bool = True, n_iter_max: int = 100,
               seed: int = 0) -> Plan:
    """Per conv, the method (Tucker-2, CP or TT) with the lowest reconstruction error at the parameter
    budget that Tucker-2 gets from `rank`; linear layers get SVD. Returns a resolved plan."""
    layers = {}
    for name, layer in find_layers(model, include, exclude, skip_first).items():
        if isinstance(layer, nn.Linear):
            layers[name] = LayerPlan("svd", rank, precision)
            continue
        shape = tuple(layer.weight.shape)
        tucker = resolve_rank("tucker2", layer, rank)
        budget = min(method_params("tucker2", shape, tucker) / math.prod(shape), 1.0)
        options = {"tucker2": tucker, "cp": ratio_ranks("cp", shape, budget), "tt": ratio_ranks("tt", shape, budget)}
        errors = {m: _probe_error(layer, decompose_layer(layer, m, r, n_iter_max=n_iter_max, seed=seed), seed)
                  for m, r in options.items()}
        best = min(errors, key=errors.get)
        layers[name] = LayerPlan(best, list(options[best]), precision)
    return resolve_plan(model, Plan(layers, activations))

