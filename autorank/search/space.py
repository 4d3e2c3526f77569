"""YAML search spaces: what may change per layer, what is optimised, under which budget.

`load_space(path)` validates the whole file before any compute starts; every mistake is one
`AutorankError` line naming the offending key (``search space X: key 'finetune.steps': ...``).
Two modes: `allocate` samples a handful of global parameters (target ratio, allowed method families
and precisions, how predicted drops are weighted) that the allocator turns into a per-layer plan
over the search's sensitivity table (`autorank.search.allocation`); `layers` samples per *group*
(per layer, per stage or global, so the user controls the dimension of the space) a method, rank
multiplier or ratio and precision. A `SearchSpace` turns a model's layers into groups (allocate
mode: one per layer, carrying its allowed methods and precisions) and suggests one trial's choices
through an Optuna trial.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autorank._shipped import search_spaces
from autorank.compression.plan import ACTIVATIONS, CONV_METHODS, LINEAR_METHODS, METHODS
from autorank.compression.quantize import PRECISIONS
from autorank.errors import AutorankError
from autorank.records import OBJECTIVES

MODES = ("layers", "allocate")
REDUCED_PRECISIONS = ("fp16", "int8", "int4")  # below fp32, widest first
GROUPINGS = ("layer", "stage", "global")
GRANULARITIES = ("layer", "stage")  # allocate mode: a choice per layer, or one per stage (`allocate(tied=...)`)
RANK_MODES = ("evbmf", "ratio")
SAMPLERS = ("nsga2", "tpe", "gp", "random")
FINAL_STARTS = ("trial", "fitted")  # the final fine-tune continues a trial's weights, or restarts from its fitted start
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_latency(value: str | int | float, key: str = "latency") -> float:
    """'0.3ms' or 0.3 -> 0.3 (milliseconds); 'us' and 's' are converted."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(ms|us|s)?\s*", str(value), re.IGNORECASE)
    if isinstance(value, bool) or match is None or not float(match.group(1)) > 0:
        raise AutorankError(f"{key}: expected a positive latency such as 0.3ms, got {value!r}")
    unit = (match.group(2) or "ms").lower()
    return float(match.group(1)) * {"ms": 1.0, "us": 1e-3, "s": 1e3}[unit]


def parse_size(value: str | int | float, key: str = "size") -> int:
    """'0.5MB' -> 500000 bytes (SI units; KiB/MiB are binary); plain numbers are bytes."""
    if isinstance(value, bool):
        raise AutorankError(f"{key}: expected a size such as 0.5MB, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise AutorankError(f"{key}: expected a size such as 0.5MB or 200KiB, got {value!r}")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = number * _SIZE_UNITS[unit]
    if not size > 0 or not math.isfinite(size):
        raise AutorankError(f"{key}: size must be positive, got {value!r}")
    return int(round(size))


def parse_duration(value: str | int | float, key: str = "time_budget") -> float:
    """'2h', '30m', '1h30m', '90s' or plain seconds -> seconds."""
    if isinstance(value, bool):
        raise AutorankError(f"{key}: expected a duration such as 30m or 2h, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        parts = re.findall(r"([0-9]*\.?[0-9]+)\s*([smhd])", text)
        if not parts or re.sub(r"[0-9]*\.?[0-9]+\s*[smhd]", "", text).strip():
            try:
                seconds = float(text)
            except ValueError:
                raise AutorankError(f"{key}: expected a duration such as 30m, 2h or 1h30m, got {value!r}") from None
        else:
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if not seconds > 0 or not math.isfinite(seconds):
        raise AutorankError(f"{key}: duration must be positive, got {value!r}")
    return seconds


@dataclass(frozen=True)
class Rule:
    """Per-layer overrides: the first rule whose globs match a layer name applies to it."""

    match: tuple[str, ...]
    methods: tuple[str, ...] | None = None
    precisions: tuple[str, ...] | None = None
    rank: tuple[float, float] | None = None


@dataclass(frozen=True)
class Constraints:
    """Feasibility limits; a trial violating any of them never counts as best."""

    max_size: int | None = None       # bytes
    min_ratio: float | None = None    # reference size_bytes / trial size_bytes
    max_drop: float | None = None     # accuracy points (percent) below the fine-tuned reference
    max_latency_ms: float | None = None  # ONNX Runtime batch-1 latency predicted by the latency table

    def violations(self, metrics: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
        """Optuna-style constraint values (<= 0 is satisfied), in the units of each limit."""
        values: dict[str, float] = {}
        if self.max_size is not None:
            values["max_size"] = float(metrics["size_bytes"] - self.max_size)
        if self.min_ratio is not None:
            values["min_ratio"] = float(self.min_ratio - reference["size_bytes"] / metrics["size_bytes"])
        if self.max_drop is not None:
            values["max_drop"] = float((reference["accuracy"] - metrics["accuracy"]) * 100 - self.max_drop)
        if self.max_latency_ms is not None:
            values["max_latency_ms"] = float(metrics.get("ort_latency_ms", math.inf) - self.max_latency_ms)
        return values

    def describe(self) -> str:
        parts = []
        if self.max_size is not None:
            parts.append(f"size <= {self.max_size:,} B")
        if self.min_ratio is not None:
            parts.append(f"ratio >= {self.min_ratio:g}x")
        if self.max_drop is not None:
            parts.append(f"drop <= {self.max_drop:g} pt")
        if self.max_latency_ms is not None:
            parts.append(f"ORT latency <= {self.max_latency_ms:g} ms")
        return ", ".join(parts) or "none"


@dataclass(frozen=True)
class Latency:
    """How `ort_latency_ms` / `ort_throughput` / `max_latency_ms` are measured (engine.latency): ONNX
    Runtime on this machine's CPU at `threads` intra-op threads, throughput at `batch_size`."""

    threads: int = 2
    batch_size: int = 128


@dataclass(frozen=True)
class Finetune:
    """The per-trial fine-tune budget (the reference model gets exactly the same)."""

    steps: int = 100
    lr: float = 0.01
    batch_size: int = 64
    optimizer: str = "sgd"
    schedule: str = "cosine"
    weight_decay: float = 5e-4
    qat: bool = True                  # fine-tune with fake quantization on (else quantize after)
    calibration_batches: int = 4      # batches used to calibrate int8 activations
    decompose_iters: int = 30         # CP/Tucker ALS iterations: fine-tuning recovers the rest, faster trials
    channels_last: bool = False       # NHWC memory format for fine-tune and evaluation (faster convs on CPU)
    fit: bool = True                  # data-aware fitting of the decomposed chains before fine-tuning
    fit_images: int = 512             # calibration images for the fit
    distill: float = 0.0              # weight of the KL to the uncompressed model's logits (0 = plain CE)
    temperature: float = 4.0          # distillation temperature
    warmup: int = 0                   # linear LR warm-up steps
    guard: int = 1000                 # val images the fine-tuned trial must not score below its start on (0 = off)


@dataclass(frozen=True)
class Sensitivity:
    """How the search's sensitivity table is measured (docs/SEARCH.md, "Sensitivity table")."""

    images: int = 500                          # stratified val images each candidate is evaluated on
    levels: tuple[float, ...] = (2.0, 4.0)     # rank levels: multiples of each layer's EVBMF ranks
    retention: tuple[float, ...] = ()          # more levels: fractions of each layer's parameters kept
    fit_images: int = 128                      # data-aware fit of each decomposed candidate (finetune.fit)


@dataclass(frozen=True)
class Allocate:
    """Ranges of the parameters `mode: allocate` samples (low == high: fixed, not sampled)."""

    ratio: tuple[float, float] = (2.0, 20.0)              # target size ratio vs fp32 (log scale)
    sharpness: tuple[float, float] = (0.5, 2.0)           # exponent on each predicted drop (log scale)
    decomposed_weight: tuple[float, float] = (0.5, 2.0)   # factor on decomposed candidates' costs (log)
    calibrate: bool = True                                # fit the costs to finished trials (search.allocation)
    granularity: tuple[str, ...] = ("layer",)             # per layer, or one choice per stage (sampled if both)


@dataclass(frozen=True)
class Screening:
    """Multi-fidelity screening (autorank.search.screening): zero-shot first, the fine-tune for the best."""

    images: int = 500     # stratified val images of the zero-shot screen
    batch: int = 8        # candidates screened before each promotion decision
    keep: float = 0.25    # fraction of the screened candidates (best by non-dominated rank) promoted


@dataclass(frozen=True)
class Final:
    """The longer fine-tune of the best front members once the trials are done (top 0: none)."""

    top: int = 0
    steps: int = 300
    lr: float | None = None           # peak LR (None: finetune.lr)
    start: str = "trial"              # trial: continue from the trial's weights | fitted: restart from its fitted start


@dataclass(frozen=True)
class Group:
    """Layers that share one sampled (method, rank, precision) choice."""

    key: str
    kind: str                        # conv | linear
    layers: tuple[str, ...]
    methods: tuple[str, ...]
    precisions: tuple[str, ...]
    rank: tuple[float, float]        # multiplier of the EVBMF rank, or retention-ratio range


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space (see search_spaces/default.yaml, `autorank spaces default`: every key, commented)."""

    name: str = "search"
    mode: str = "layers"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    skip_first: bool = True
    grouping: str = "layer"
    stages: tuple[tuple[str, tuple[str, ...]], ...] = ()
    methods: tuple[str, ...] = ("none", "tucker2", "cp", "svd")
    precisions: tuple[str, ...] = ("fp32", "int8")
    activations: tuple[str, ...] = ("fp32",)
    rank_mode: str = "evbmf"
    rank: tuple[float, float] = (0.25, 2.0)
    rules: tuple[Rule, ...] = ()
    objectives: tuple[str, ...] = ("accuracy", "size_bytes")
    constraints: Constraints = field(default_factory=Constraints)
    latency: Latency = field(default_factory=lambda: Latency())
    finetune: Finetune = field(default_factory=Finetune)
    sensitivity: Sensitivity | None = None   # the table: always in allocate mode, on request in layers mode
    allocate: Allocate = field(default_factory=Allocate)
    final: Final = field(default_factory=Final)
    screening: Screening | None = None       # None: every sampled trial is fine-tuned
    sampler: str = "tpe"
    trials: int | None = 20
    time_budget: float | None = None
    steps_budget: int | None = None          # fine-tune steps of the trials, in total
    seed: int = 0
    population: int = 10
    seeds: bool = True                        # warm starts: int8 only and uniform recipes first
    seed_ratios: tuple[float, ...] = (0.5, 0.2)  # parameter retention of the uniform recipes

    # ---- derived views -------------------------------------------------------------------
    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[name] for name in self.objectives]

    def to_dict(self) -> dict[str, Any]:
        """The resolved space (all defaults filled in), stored in search.json and MLflow."""
        data = asdict(self)
        data["stages"] = {name: list(globs) for name, globs in self.stages}
        return data

    def select_layers(self, names: Sequence[str]) -> list[str]:
        """The layers (from `find_layers`) that the include/exclude globs keep."""
        return [n for n in names if _matches(n, self.include) and not _matches(n, self.exclude)]

    def groups(self, layer_kinds: Mapping[str, str]) -> list[Group]:
        """Sampling groups for the searched layers (`layer_kinds`: name -> 'conv' | 'linear')."""
        grouped: dict[tuple[str, str, int], list[str]] = {}
        for name, kind in layer_kinds.items():
            rule_index = next((i for i, r in enumerate(self.rules) if _matches(name, r.match)), -1)
            grouped.setdefault((self._group_base(name), kind, rule_index), []).append(name)
        bases = [base for base, _, _ in grouped]
        groups = []
        for (base, kind, rule_index), layers in grouped.items():
            rule = self.rules[rule_index] if rule_index >= 0 else Rule(match=())
            key = base
            if bases.count(base) > 1:
                key += f".{kind}" if sum(1 for b, k, _ in grouped if b == base and k == kind) == 1 \
                    else f".{kind}.rule{rule_index + 1}"
            allowed = CONV_METHODS if kind == "conv" else LINEAR_METHODS
            methods = tuple(m for m in (rule.methods or self.methods) if m in allowed) or ("none",)
            groups.append(Group(key=key, kind=kind, layers=tuple(layers), methods=methods,
                                precisions=rule.precisions or self.precisions, rank=rule.rank or self.rank))
        return groups

    def _group_base(self, name: str) -> str:
        if self.grouping == "layer":
            return name
        if self.grouping == "global":
            return "all"
        return self.stage(name)

    # ---- sampling ------------------------------------------------------------------------
    def suggest(self, trial: Any, groups: Sequence[Group]) -> dict[str, Any]:
        """Ask an Optuna trial (or Ray's captor of one) for one trial's choices."""
        if self.mode == "allocate":
            return self._suggest_allocate(trial, groups)
        params: dict[str, Any] = {}
        for g in groups:
            method = trial.suggest_categorical(f"{g.key}.method", list(g.methods))
            params[f"{g.key}.method"] = method
            if method != "none":
                params[f"{g.key}.rank"] = trial.suggest_float(f"{g.key}.rank", g.rank[0], g.rank[1], log=True)
            params[f"{g.key}.precision"] = trial.suggest_categorical(f"{g.key}.precision", list(g.precisions))
        if len(self.activations) > 1 or self.activations != ("fp32",):
            params["activations"] = trial.suggest_categorical("activations", list(self.activations))
        return params

    def families(self, groups: Sequence[Group]) -> list[str]:
        """Allocate mode: the decompositions some layer may use (each an `allow.<method>` switch)."""
        return _unique(m for g in groups for m in g.methods if m != "none")

    def reduced_precisions(self, groups: Sequence[Group]) -> list[str]:
        """Allocate mode: the precisions below fp32 some layer may use, widest first (the sampled
        `lowest_precision` allows it and every wider one)."""
        present = {p for g in groups for p in g.precisions}
        return [p for p in REDUCED_PRECISIONS if p in present]

    def _suggest_allocate(self, trial: Any, groups: Sequence[Group]) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for key in ("ratio", "sharpness", "decomposed_weight"):
            low, high = getattr(self.allocate, key)
            if low < high:
                params[key] = trial.suggest_float(key, low, high, log=True)
        for method in self.families(groups):
            params[f"allow.{method}"] = trial.suggest_categorical(f"allow.{method}", [True, False])
        reduced = self.reduced_precisions(groups)
        if len(reduced) > 1:
            params["lowest_precision"] = trial.suggest_categorical("lowest_precision", reduced)
        if len(self.allocate.granularity) > 1:
            params["granularity"] = trial.suggest_categorical("granularity", list(self.allocate.granularity))
        return params

    def stage(self, name: str) -> str:
        """The stage a layer belongs to: the first of `stages` whose globs match it, else its top-level module."""
        for stage, globs in self.stages:
            if _matches(name, globs):
                return stage
        return name.split(".", 1)[0]

    def layer_choices(self, params: Mapping[str, Any], groups: Sequence[Group]) -> dict[str, tuple[str, float | None, str]]:
        """Per layer: (method, rank multiplier or ratio, precision) from a trial's params."""
        choices = {}
        for g in groups:
            method = params[f"{g.key}.method"]
            rank = params.get(f"{g.key}.rank") if method != "none" else None
            for layer in g.layers:
                choices[layer] = (method, rank, params[f"{g.key}.precision"])
        return choices


# ---- loading and validation ----------------------------------------------------------------

class _Reader:
    """Walks the YAML mapping, tracking the dotted key path for error messages."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, problem: str) -> AutorankError:
        key = "".join(c if c.isprintable() else repr(c)[1:-1] for c in key)  # a key with a newline: still one line
        return AutorankError(f"search space {self.source}: key '{key}': {problem}")

    def mapping(self, value: Any, key: str, allowed: Sequence[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping with keys {', '.join(allowed)}, got {_show(value)}")
        for name in value:
            if name not in allowed:
                where = f"{key}.{name}" if key else str(name)
                close = [a for a in allowed if a.startswith(str(name)[:3])]
                hint = f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(allowed)})"
                raise self.fail(where, f"unknown key{hint}")
        return value

    def choices(self, value: Any, key: str, allowed: Sequence[str]) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.fail(key, f"expected a list of choices from {', '.join(allowed)}, got {_show(value)}")
        if not value:
            raise self.fail(key, f"empty choice: give at least one of {', '.join(allowed)}")
        for item in value:
            if item not in allowed:
                raise self.fail(key, f"unknown choice {item!r} (allowed: {', '.join(allowed)})")
        if len(set(value)) != len(value):
            raise self.fail(key, "repeated choice")
        return tuple(value)

    def globs(self, value: Any, key: str, allow_empty: bool = False) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, f"expected a list of layer-name globs, got {_show(value)}")
        if not value and not allow_empty:
            raise self.fail(key, "empty choice: give at least one layer-name glob")
        return tuple(value)

    def range(self, value: Any, key: str, low: float, high: float, high_inclusive: bool = True) -> tuple[float, float]:
        if (not isinstance(value, list) or len(value) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise self.fail(key, f"expected a range [low, high], got {_show(value)}")
        lo, hi = float(value[0]), float(value[1])
        top_ok = hi <= high if high_inclusive else hi < high
        if not (low < lo <= hi and top_ok):
            bound = "]" if high_inclusive else ")"
            raise self.fail(key, f"bad range {value}: need {low:g} < low <= high, within ({low:g}, {high:g}{bound}")
        return lo, hi

    def number(self, value: Any, key: str, kind: type, low: float | None = None, high: float | None = None) -> Any:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int:
            ok = ok and float(value).is_integer()
        if not ok or not math.isfinite(float(value)):
            raise self.fail(key, f"expected {'an integer' if kind is int else 'a number'}, got {_show(value)}")
        if (low is not None and value < low) or (high is not None and value > high):
            span = f">= {low:g}" if high is None else f"in [{low:g}, {high:g}]"
            raise self.fail(key, f"must be {span}, got {value}")
        return kind(value)

    def flag(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {_show(value)}")
        return value

    def one_of(self, value: Any, key: str, allowed: Sequence[str]) -> str:
        if value not in allowed:
            raise self.fail(key, f"expected one of {', '.join(allowed)}, got {_show(value)}")
        return value


TOP_KEYS = ("name", "mode", "layers", "grouping", "stages", "methods", "precisions", "activations", "rank",
            "rules", "objectives", "constraints", "latency", "finetune", "sensitivity", "allocate", "screening", "final", "search")
LAYERS_ONLY = ("grouping", "stages", "rank")  # top-level keys that mean something in layers mode only


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a YAML search space, a path or a shipped space's name (`autorank spaces`);
    raise AutorankError naming the first bad key."""
    path = space_path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise AutorankError(f"search space {path}: invalid YAML{where}: {problem}") from None
    return parse_space(raw, source=str(path), default_name=path.stem)


def space_path(spec: str | Path) -> Path:
    """The YAML file of `spec`: an existing path, else the shipped space of that name."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.name == str(spec) and not path.suffix:  # a bare name, not a path
        return shipped_space(path.name)
    raise AutorankError(f"search space {path}: file not found (shipped spaces by name: {', '.join(search_spaces())})")


def shipped_space(name: str) -> Path:
    """The YAML file of a shipped space; AutorankError listing the names for an unknown one."""
    shipped = search_spaces()
    if name not in shipped:
        raise AutorankError(f"unknown search space {name!r}: shipped spaces are {', '.join(shipped)} "
                            "(autorank spaces), or give a YAML file")
    return shipped[name]


def parse_space(raw: Any, source: str = "<dict>", default_name: str = "search") -> SearchSpace:
    """Validate an already-parsed YAML document (also used to reload search.json's copy)."""
    r = _Reader(source)
    doc = r.mapping(raw, "", TOP_KEYS)
    name = doc.get("name", default_name)
    if not isinstance(name, str) or not re.fullmatch(r"[\w.\-]+", name):
        raise r.fail("name", f"expected a short name (letters, digits, . _ -), got {_show(name)}")

    mode = r.one_of(doc.get("mode", "layers"), "mode", MODES)
    if mode == "allocate":
        for key in LAYERS_ONLY:
            if key in doc:
                raise r.fail(key, "only used with 'mode: layers' (allocate mode plans per layer from the "
                                  "sensitivity table)")
    elif "allocate" in doc:
        raise r.fail("allocate", "only used with 'mode: allocate'")

    layers = r.mapping(doc.get("layers"), "layers", ("include", "exclude", "skip_first"))
    include = r.globs(layers.get("include", ["*"]), "layers.include")
    exclude = r.globs(layers.get("exclude") or [], "layers.exclude", allow_empty=True)
    skip_first = r.flag(layers.get("skip_first", True), "layers.skip_first")

    grouping = r.one_of(doc.get("grouping", "layer"), "grouping", GROUPINGS)
    stages_raw = doc.get("stages") or {}
    if not isinstance(stages_raw, dict):
        raise r.fail("stages", f"expected a mapping stage-name -> layer globs, got {_show(stages_raw)}")
    stages = tuple((str(k), r.globs(v, f"stages.{k}")) for k, v in stages_raw.items())
    if stages and grouping != "stage":
        raise r.fail("stages", "only used with 'grouping: stage'")

    methods = r.choices(doc.get("methods", ["none", "tucker2", "cp", "svd"]), "methods", METHODS)
    precisions = r.choices(doc.get("precisions", ["fp32", "int8"]), "precisions", PRECISIONS)
    activations = r.choices(doc.get("activations", ["fp32"]), "activations", ACTIVATIONS)

    rank = r.mapping(doc.get("rank"), "rank", ("mode", "multiplier", "ratio"))
    rank_mode = r.one_of(rank.get("mode", "evbmf"), "rank.mode", RANK_MODES)
    other = "ratio" if rank_mode == "evbmf" else "multiplier"
    if other in rank:
        raise r.fail(f"rank.{other}", f"not used with 'rank.mode: {rank_mode}'")
    if rank_mode == "evbmf":
        rank_range = r.range(rank.get("multiplier", [0.25, 2.0]), "rank.multiplier", 0.0, 64.0)
    else:
        rank_range = r.range(rank.get("ratio", [0.05, 0.8]), "rank.ratio", 0.0, 1.0)
    rank_key = "multiplier" if rank_mode == "evbmf" else "ratio"

    rules = []
    rules_raw = doc.get("rules") or []
    if not isinstance(rules_raw, list):
        raise r.fail("rules", f"expected a list of {{match: [globs], ...}} overrides, got {_show(rules_raw)}")
    for i, item in enumerate(rules_raw):
        key = f"rules[{i}]"
        rule = r.mapping(item, key, ("match", "methods", "precisions") + ((rank_key,) if mode == "layers" else ()))
        if "match" not in rule:
            raise r.fail(f"{key}.match", "missing: give the layer-name globs this rule applies to")
        rules.append(Rule(
            match=r.globs(rule["match"], f"{key}.match"),
            methods=r.choices(rule["methods"], f"{key}.methods", METHODS) if "methods" in rule else None,
            precisions=r.choices(rule["precisions"], f"{key}.precisions", PRECISIONS) if "precisions" in rule else None,
            rank=(r.range(rule[rank_key], f"{key}.{rank_key}", 0.0, 64.0 if rank_mode == "evbmf" else 1.0)
                  if rank_key in rule else None),
        ))

    objectives = r.choices(doc.get("objectives", ["accuracy", "size_bytes"]), "objectives", tuple(OBJECTIVES))
    if objectives[0] != "accuracy" or len(objectives) < 2:
        raise r.fail("objectives", "start with 'accuracy' and add at least one cost (size_bytes, params, macs, latency_ms, "
                     "ort_latency_ms, ort_throughput)")

    cons = r.mapping(doc.get("constraints"), "constraints", ("max_size", "min_ratio", "max_drop", "max_latency_ms"))
    try:
        max_size = parse_size(cons["max_size"], "max_size") if cons.get("max_size") is not None else None
    except AutorankError as exc:
        raise r.fail("constraints.max_size", str(exc).split(": ", 1)[1]) from None
    constraints = Constraints(
        max_size=max_size,
        min_ratio=r.number(cons["min_ratio"], "constraints.min_ratio", float, 1.0) if cons.get("min_ratio") is not None else None,
        max_drop=r.number(cons["max_drop"], "constraints.max_drop", float, 0.0, 100.0) if cons.get("max_drop") is not None else None,
        max_latency_ms=(r.number(cons["max_latency_ms"], "constraints.max_latency_ms", float, 0.0)
                        if cons.get("max_latency_ms") is not None else None),
    )
    lat = r.mapping(doc.get("latency"), "latency", ("threads", "batch_size"))
    latency = Latency(threads=r.number(lat.get("threads", 2), "latency.threads", int, 1),
                      batch_size=r.number(lat.get("batch_size", 128), "latency.batch_size", int, 1))

    ft = r.mapping(doc.get("finetune"), "finetune", tuple(Finetune.__dataclass_fields__))
    d = Finetune()
    finetune = Finetune(
        steps=r.number(ft.get("steps", d.steps), "finetune.steps", int, 0),
        lr=r.number(ft.get("lr", d.lr), "finetune.lr", float, 0.0, 10.0),
        batch_size=r.number(ft.get("batch_size", d.batch_size), "finetune.batch_size", int, 1),
        optimizer=r.one_of(ft.get("optimizer", d.optimizer), "finetune.optimizer", OPTIMIZERS),
        schedule=r.one_of(ft.get("schedule", d.schedule), "finetune.schedule", SCHEDULES),
        weight_decay=r.number(ft.get("weight_decay", d.weight_decay), "finetune.weight_decay", float, 0.0, 1.0),
        qat=r.flag(ft.get("qat", d.qat), "finetune.qat"),
        calibration_batches=r.number(ft.get("calibration_batches", d.calibration_batches),
                                     "finetune.calibration_batches", int, 1),
        decompose_iters=r.number(ft.get("decompose_iters", d.decompose_iters), "finetune.decompose_iters", int, 1),
        channels_last=r.flag(ft.get("channels_last", d.channels_last), "finetune.channels_last"),
        fit=r.flag(ft.get("fit", d.fit), "finetune.fit"),
        fit_images=r.number(ft.get("fit_images", d.fit_images), "finetune.fit_images", int, 1),
        distill=r.number(ft.get("distill", d.distill), "finetune.distill", float, 0.0, 1.0),
        temperature=r.number(ft.get("temperature", d.temperature), "finetune.temperature", float, 0.01, 100.0),
        warmup=r.number(ft.get("warmup", d.warmup), "finetune.warmup", int, 0),
        guard=r.number(ft.get("guard", d.guard), "finetune.guard", int, 0),
    )
    if not finetune.qat and "int8" in activations:
        raise r.fail("finetune.qat", "false (quantize after fine-tuning) supports weight precisions only: "
                                     "remove int8 from activations")
    if finetune.lr <= 0 and finetune.steps > 0:
        raise r.fail("finetune.lr", "must be > 0 when finetune.steps > 0")

    if mode == "allocate" and len(activations) > 1:
        raise r.fail("activations", "allocate mode measures its sensitivity table at one activation precision: "
                                    "give one")
    if mode == "allocate" and set(methods) <= {"none"} and set(precisions) <= {"fp32"}:
        raise r.fail("methods", "allocate mode needs a decomposition or a precision below fp32 to allocate")

    sensitivity = None
    if mode == "allocate" or "sensitivity" in doc:
        sens = r.mapping(doc.get("sensitivity"), "sensitivity", tuple(Sensitivity.__dataclass_fields__))
        levels = sens.get("levels", list(Sensitivity.levels))
        if not isinstance(levels, list) or not levels:
            raise r.fail("sensitivity.levels", f"expected a list of EVBMF rank multiples such as [1, 2], got {_show(levels)}")
        levels = tuple(r.number(v, "sensitivity.levels", float, 0.0, 64.0) for v in levels)
        if 0.0 in levels or len(set(levels)) != len(levels):
            raise r.fail("sensitivity.levels", "each multiple must be > 0 and given once")
        retention = sens.get("retention", [])
        if not isinstance(retention, list):
            raise r.fail("sensitivity.retention",
                         f"expected a list of parameter fractions such as [0.4], got {_show(retention)}")
        retention = tuple(r.number(v, "sensitivity.retention", float, 0.0, 1.0) for v in retention)
        if not all(0.0 < v < 1.0 for v in retention) or len(set(retention)) != len(retention):
            raise r.fail("sensitivity.retention", "each fraction must lie strictly between 0 and 1 and be given once")
        sensitivity = Sensitivity(images=r.number(sens.get("images", Sensitivity.images), "sensitivity.images", int, 1),
                                  levels=levels, retention=retention,
                                  fit_images=r.number(sens.get("fit_images", Sensitivity.fit_images),
                                                      "sensitivity.fit_images", int, 1))

    alloc = r.mapping(doc.get("allocate"), "allocate", tuple(Allocate.__dataclass_fields__))
    a = Allocate()
    ratio = r.range(alloc.get("ratio", list(a.ratio)), "allocate.ratio", 0.0, 1e4)
    if ratio[0] < 1.0:
        raise r.fail("allocate.ratio", f"bad range {list(ratio)}: a target ratio is >= 1 (times smaller than fp32)")
    allocate = Allocate(ratio=ratio, sharpness=r.range(alloc.get("sharpness", list(a.sharpness)), "allocate.sharpness",
                                                       0.0, 16.0),
                        decomposed_weight=r.range(alloc.get("decomposed_weight", list(a.decomposed_weight)),
                                                  "allocate.decomposed_weight", 0.0, 16.0),
                        calibrate=r.flag(alloc.get("calibrate", a.calibrate), "allocate.calibrate"),
                        granularity=r.choices(alloc.get("granularity", list(a.granularity)), "allocate.granularity",
                                              GRANULARITIES))

    screening = None
    if "screening" in doc:
        scr = r.mapping(doc.get("screening"), "screening", tuple(Screening.__dataclass_fields__))
        screening = Screening(images=r.number(scr.get("images", Screening.images), "screening.images", int, 1),
                              batch=r.number(scr.get("batch", Screening.batch), "screening.batch", int, 1),
                              keep=r.number(scr.get("keep", Screening.keep), "screening.keep", float, 0.0, 1.0))
        if screening.keep == 0.0:
            raise r.fail("screening.keep", "must be > 0: the fraction of screened candidates that are fine-tuned")
        if not finetune.qat:
            raise r.fail("screening", "screens the quantized model zero-shot: needs finetune.qat: true")

    fin = r.mapping(doc.get("final"), "final", ("top", "steps", "lr", "start"))
    final = Final(top=r.number(fin.get("top", 3 if "final" in doc else 0), "final.top", int, 0),
                  steps=r.number(fin.get("steps", Final.steps), "final.steps", int, 1),
                  lr=None if fin.get("lr") is None else r.number(fin["lr"], "final.lr", float, 0.0),
                  start=r.one_of(fin.get("start", Final.start), "final.start", FINAL_STARTS))
    if final.lr == 0.0:
        raise r.fail("final.lr", "must be > 0")

    s = r.mapping(doc.get("search"), "search", ("sampler", "trials", "time_budget", "steps_budget", "seed",
                                                "population", "seeds", "seed_ratios", "evbmf_seeds"))
    trials = r.number(s["trials"], "search.trials", int, 1) if s.get("trials") is not None else None
    steps_budget = r.number(s["steps_budget"], "search.steps_budget", int, 1) if s.get("steps_budget") is not None \
        else None
    try:
        time_budget = parse_duration(s["time_budget"]) if s.get("time_budget") is not None else None
    except AutorankError as exc:
        raise r.fail("search.time_budget", str(exc).split(": ", 1)[1]) from None
    if trials is None and time_budget is None and steps_budget is None and "trials" in s:
        raise r.fail("search.trials", "give a number of trials and/or search.time_budget or search.steps_budget")
    if "seeds" in s and "evbmf_seeds" in s:
        raise r.fail("search.evbmf_seeds", "the old name of 'search.seeds': give one of them")
    seeds_key = "search.evbmf_seeds" if "evbmf_seeds" in s else "search.seeds"
    seeds = r.flag(s.get("evbmf_seeds", s.get("seeds", True)), seeds_key)
    seed_ratios = s.get("seed_ratios", list(SearchSpace.seed_ratios))
    if not isinstance(seed_ratios, list):
        raise r.fail("search.seed_ratios", f"expected a list of parameter retention ratios, got {_show(seed_ratios)}")
    seed_ratios = tuple(r.number(v, "search.seed_ratios", float, 0.0, 1.0) for v in seed_ratios)
    if any(not 0.0 < v < 1.0 for v in seed_ratios) or len(set(seed_ratios)) != len(seed_ratios):
        raise r.fail("search.seed_ratios", "each ratio must be in (0, 1) and given once")

    return SearchSpace(
        name=name, mode=mode, include=include, exclude=exclude, skip_first=skip_first, grouping=grouping,
        stages=stages, methods=methods, precisions=precisions, activations=activations,
        rank_mode=rank_mode, rank=rank_range, rules=tuple(rules), objectives=objectives,
        constraints=constraints, latency=latency, finetune=finetune, sensitivity=sensitivity, allocate=allocate,
        final=final, screening=screening, sampler=r.one_of(s.get("sampler", "tpe"), "search.sampler", SAMPLERS),
        trials=trials if (trials is not None or time_budget is not None or steps_budget is not None) else 20,
        time_budget=time_budget, steps_budget=steps_budget,
        seed=r.number(s.get("seed", 0), "search.seed", int, 0),
        population=r.number(s.get("population", 10), "search.population", int, 2),
        seeds=seeds, seed_ratios=seed_ratios,
    )


def space_from_dict(data: Mapping[str, Any]) -> SearchSpace:
    """Rebuild a SearchSpace from `SearchSpace.to_dict()` (search.json) without re-validating.

    A search.json written before the allocate mode holds `evbmf_seeds` (now `seeds`) and no mode; one
    written before `allocate.calibrate` ran on the raw table."""
    data = dict(data)
    if "evbmf_seeds" in data:
        data["seeds"] = data.pop("evbmf_seeds")
    sensitivity = data.get("sensitivity")
    return SearchSpace(
        **{**data,
           "include": tuple(data["include"]), "exclude": tuple(data["exclude"]),
           "stages": tuple((k, tuple(v)) for k, v in data["stages"].items()),
           "methods": tuple(data["methods"]), "precisions": tuple(data["precisions"]),
           "activations": tuple(data["activations"]), "rank": tuple(data["rank"]),
           "rules": tuple(Rule(match=tuple(x["match"]),
                               methods=tuple(x["methods"]) if x["methods"] else None,
                               precisions=tuple(x["precisions"]) if x["precisions"] else None,
                               rank=tuple(x["rank"]) if x["rank"] else None) for x in data["rules"]),
           "objectives": tuple(data["objectives"]),
           "constraints": Constraints(**data["constraints"]),
           "latency": Latency(**data.get("latency", asdict(Latency()))),
           "finetune": Finetune(**data["finetune"]),
           "sensitivity": Sensitivity(**{**sensitivity, "levels": tuple(sensitivity["levels"]),
                                          "retention": tuple(sensitivity.get("retention", ()))}) if sensitivity else None,
           "allocate": Allocate(**{"calibrate": False,  # written before the costs were fitted
                                   **{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in data.get("allocate", asdict(Allocate())).items()}}),
           "final": Final(**data.get("final", asdict(Final()))),
           "screening": Screening(**data["screening"]) if data.get("screening") else None,
           "seed_ratios": tuple(data.get("seed_ratios", SearchSpace.seed_ratios))})


def _matches(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
