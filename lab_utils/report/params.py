"""Parameter files: load, check against the notebooks, validate values.

A parameter file is YAML: top-level keys go to every notebook that declares
them; an optional ``notebooks:`` mapping holds per-notebook overrides
(``notebooks: {02_visualization: {sparsities: [0.0, 0.5]}}``).

Papermill only *warns* about a parameter that a notebook does not declare, so
a typo would silently run the defaults. Here it is an error, as is any value
the lab refuses, a list that names nothing or one thing twice, and a scheduler
address nobody listens at: :func:`check_file` catches them before any work
starts, in one line naming the parameter, the value and what is allowed,
through the lower floors' own checks. A notebook checks its parameters cell in one call,
``params.validate_notebook(globals(), "02_visualization")``.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import fields
from pathlib import Path

import yaml

from lab_utils.core import files, sparsify
from lab_utils.core import formats as core_formats
from lab_utils.core.checks import whole_number
from lab_utils.core.device import describe as describe_device
from lab_utils.core.device import resolved
from lab_utils.core.evaluation import protocols, zeroshot
from lab_utils.core.models import hub_reachable, resolve
from lab_utils.engine.config import PruneConfig
from lab_utils.experiments import benchmarks, recovery
from lab_utils.experiments import executor as ex

NOTEBOOKS_DIR = files.REPO_ROOT / "notebooks"
# A perplexity's window count and length: 0 takes the notebook's protocol's own
# (lab_utils.core.evaluation.protocols); a positive value overrides it, and the label says so.
PROTOCOL_OVERRIDES = ("eval_windows", "eval_seqlen")
RENAMED = {"ppl_windows": "eval_windows", "ppl_seqlen": "eval_seqlen"}  # old name -> the name every notebook uses


class ParamError(ValueError):
    """One clear line: the parameter, the value, and what is allowed."""


def load_params(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"parameter file {path} does not exist (see params/ for examples)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ParamError(f"parameter file {path} is not valid YAML{at}: "
                         f"{getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamError(f"parameter file {path} must be a YAML mapping of name: value, "
                         f"got a {type(data).__name__}")
    return data


def split_params(data: dict, notebooks: list[str]) -> dict[str, dict]:
    """Per-notebook parameter dicts (shared keys + that notebook's overrides)."""
    shared = {k: v for k, v in data.items() if k != "notebooks"}
    overrides = data.get("notebooks") or {}
    if not isinstance(overrides, dict):
        raise ParamError("'notebooks' must map a notebook name to its parameters")
    out = {}
    for nb in notebooks:
        per = dict(shared)
        for key, val in overrides.items():
            if nb.startswith(str(key)):
                if not isinstance(val, dict):
                    raise ParamError(f"notebooks.{key} must be a mapping of parameters")
                per.update(val)
        out[nb] = per
    unknown = [k for k in overrides if not any(nb.startswith(str(k)) for nb in notebooks)]
    if unknown:
        raise ParamError(f"notebooks: {unknown[0]!r} is not a notebook; choose one of {', '.join(notebooks)}")
    return out


def _check_renamed(name: str) -> None:
    if name in RENAMED:
        raise ParamError(f"{name}: renamed, use {RENAMED[name]!r} (the same in every notebook)")


def check_declared(data: dict, declared: dict[str, dict]) -> None:
    """Fail on a key that no notebook (or not the named notebook) declares.

    ``declared`` maps a notebook name to papermill's ``inspect_notebook`` dict.
    """
    every = set().union(*(set(d) for d in declared.values())) if declared else set()
    for key in data:
        if key == "notebooks":
            continue
        _check_renamed(key)
        if key not in every:
            raise ParamError(f"parameter {key!r} is not declared by any notebook "
                             f"({', '.join(declared)}); known parameters: {', '.join(sorted(every))}")
    for nb_key, per in (data.get("notebooks") or {}).items():
        for nb, decl in declared.items():
            if nb.startswith(str(nb_key)):
                for key in per:
                    _check_renamed(key)
                    if key not in decl:
                        raise ParamError(f"parameter {key!r} is not declared by notebook {nb} "
                                         f"(it declares: {', '.join(sorted(decl))})")


# --------------------------------------------------------------------------- values
def _lower(name: str, check, *args, **kwargs):
    """A lower floor's check of parameter ``name``: its ValueError becomes one
    ParamError line that opens with the parameter's name."""
    try:
        return check(*args, **kwargs)
    except ValueError as e:
        msg = str(e)
        raise ParamError(msg if msg.startswith((f"{name}:", f"{name} ")) else f"{name}: {msg}") from None


def _as_list(name: str, value) -> list:
    if not isinstance(value, list | tuple):
        raise ParamError(f"{name}: expected a list, got {value!r}")
    return list(value)


def _format(value) -> core_formats.Format:
    """A storage format, written as its name (``"csr "`` or ``"csr-"`` would reach the notebooks
    as a string that no longer names what was measured)."""
    fmt = core_formats.parse_format(value)
    if fmt.name != value:
        raise ValueError(f"format {value!r} is written {fmt.name!r}")
    return fmt


# The rule a parameter follows, from the last word of its name (``methods``,
# ``size_methods`` ... are all lists of methods): the check of one value, and for
# a list what one entry is called (a list names at least one, each once).
RULES = {
    "method": (sparsify.check_method, None), "methods": (sparsify.check_method, "method"),
    "sparsity": (sparsify.check_sparsity_ratio, None), "sparsities": (sparsify.check_sparsity_ratio, "sparsity"),
    "pattern": (sparsify.parse_pattern, None), "patterns": (sparsify.parse_pattern, "pattern"),
    "scope": (sparsify.check_scope, None), "formats": (_format, "format"),
}
# Lists that may be empty, as their notebooks' rules decide: no size_formats, no file measured
# (notebook 04; notebook 03 refuses it); N:M patterns alone need no sparsities.
MAY_BE_EMPTY = ("size_formats", "sparsities")
# Whole numbers, by the last word of the name: the smallest allowed.
WHOLE = {"seed": 0, **dict.fromkeys(("nsamples", "seqlen", "windows", "window", "utterances", "examples",
                                     "sentences", "tokens", "repeats", "reps", "steps", "layers", "size"), 1)}


def validate_value(name: str, value, check_hub: bool = True) -> None:
    """Check one parameter by the rule its name implies; unknown names pass."""
    _check_renamed(name)
    kind = name.split("_")[-1]
    if name == "executor":  # local | serial | a scheduler address or scheduler file, which must answer
        _lower(name, ex.check_reachable, value)
    elif name in ("device", "dtype"):  # checked as a pair: float16 is refused on the CPU only
        _check_device(value if name == "device" else "cpu", value if name == "dtype" else "auto")
    elif name == "zeroshot_tasks":  # lm-eval task names; asking whether the hub answers only for a hub task
        tasks = _as_list(name, value)
        hub = not check_hub or set(tasks) <= set(zeroshot.OFFLINE_TASKS) or hub_reachable()[0]
        _distinct(name, tasks, _lower(name, zeroshot.check_tasks, tasks, hub_available=hub))
    elif name == "protocol":
        _lower(name, protocols.get, value)
    elif name in PROTOCOL_OVERRIDES:  # 0: the protocol's own
        whole_number(f"{name}:", value, minimum=protocols.FROM_PROTOCOL, error=ParamError)
    elif kind in WHOLE:  # "nsamples: must be a positive integer, got 0"
        whole_number(f"{name}:", value, minimum=WHOLE[kind], error=ParamError)
    elif kind in ("model", "models"):
        names = _as_list(name, value) if kind == "models" else [value]
        if not names:
            raise ParamError(f"{name}: [] names no model; give at least one (a preset, hub id or folder)")
        _distinct(name, names, [_model_key(_lower(name, resolve, v, check_hub=check_hub)) for v in names])
    elif kind in RULES:
        check, entry = RULES[kind]
        values = _as_list(name, value) if entry else [value]
        if entry and not values and name not in MAY_BE_EMPTY:
            raise ParamError(f"{name}: [] names no {entry}; give at least one")
        _distinct(name, values, [_lower(name, check, v) for v in values])


def _model_key(spec) -> tuple[str, str]:
    """What a model name loads: a preset and its hub id, or two spellings of one folder, are one model."""
    return spec.source, str(Path(spec.location).resolve()) if spec.source == "local" else spec.location


def _distinct(name: str, values: list, keys) -> None:
    """Each entry of a list once (``keys``: what each entry names): a repeated model, method or
    sparsity would be computed and shown twice."""
    first: dict = {}
    for value, key in zip(values, keys, strict=True):
        if key in first:
            what = "is listed twice" if first[key] == value else f"names the same as {first[key]!r}"
            raise ParamError(f"{name}: {value!r} {what}; list each once")
        first[key] = value


def validate(params: dict, check_hub: bool = True) -> None:
    """Validate every parameter by its name (nested per-notebook ones too); raise ParamError."""
    for name, value in params.items():
        if name == "notebooks" and isinstance(value, dict):
            for per in value.values():
                if isinstance(per, dict):
                    validate(per, check_hub)
            continue
        validate_value(name, value, check_hub)
    if "device" in params and "dtype" in params:
        _check_device(params["device"], params["dtype"])
    patterns = params.get("patterns", [sparsify.UNSTRUCTURED])
    if params.get("sparsities") == [] and any(not sparsify.parse_pattern(p)[0] for p in patterns):
        raise ParamError("sparsities: [] names no sparsity for the unstructured pattern; give at least one, "
                         "e.g. [0.5], or list only N:M patterns")


def _check_device(device: str, dtype: str) -> None:
    """A device torch sees here and a dtype it can run (its one line names what is allowed)."""
    _lower("device", describe_device, device, dtype)


def check_types(params: dict, declared: dict[str, dict], notebook: str) -> None:
    """A value whose YAML type differs from the notebook default's type."""
    names = {"int": int, "float": (int, float), "str": str, "bool": bool, "list": list, "dict": dict}
    for key, value in params.items():
        info = declared.get(key)
        if not info:
            continue
        want = names.get((info.get("inferred_type_name") or "").split("[")[0])
        if want is None:
            continue
        if (want is not bool and isinstance(value, bool)) or not isinstance(value, want):
            raise ParamError(f"{key}: {value!r} must be of type {info['inferred_type_name']} "
                             f"(notebook {notebook}, default {info.get('default')})")


# --------------------------------------------------------------------------- rules across parameters
def _check_concepts(structured_sparsities, quant_group_sizes, distill_temperature, distill_alpha,
                    moe_experts, moe_active_fractions, timing_reps, **_) -> None:
    """Notebook 01's own rules, those its parameters' names do not imply."""
    if not structured_sparsities or any(not 0 < float(s) < 1 for s in structured_sparsities):
        raise ParamError(f"structured_sparsities: {structured_sparsities!r} must be a non-empty list "
                         f"of fractions of MLP neurons to remove, each in (0, 1), e.g. [0.25, 0.5]")
    if not quant_group_sizes:
        raise ParamError("quant_group_sizes: give at least one 4-bit group size, e.g. [32, 64]")
    for g in quant_group_sizes:
        whole_number("quant_group_sizes:", g, error=ParamError)
        if g % 2:
            raise ParamError(f"quant_group_sizes: {g} must be even (two 4-bit codes per byte), e.g. 32")
    if not float(distill_temperature) > 0:
        raise ParamError(f"distill_temperature: {distill_temperature!r} must be > 0, e.g. 2.0")
    if not 0 <= float(distill_alpha) <= 1:
        raise ParamError(f"distill_alpha: {distill_alpha!r} must be in [0, 1] (the weight of the "
                         f"soft targets; 1 = soft targets only)")
    whole_number("moe_experts:", moe_experts, error=ParamError)
    whole_number("timing_reps:", timing_reps, error=ParamError)
    if not moe_active_fractions:
        raise ParamError("moe_active_fractions: [] names no fraction; give at least one, e.g. [0.25, 1.0]")
    for f in moe_active_fractions:
        k = float(f) * moe_experts
        if not 0 < float(f) <= 1 or abs(k - round(k)) > 1e-9:
            raise ParamError(f"moe_active_fractions: {f!r} x {moe_experts} experts is not a whole "
                             f"number of experts; use multiples of 1/{moe_experts} in (0, 1]")


def _check_sweep(size_formats, owl, owl_method, owl_sparsity, nsamples, seqlen, seed, **_) -> None:
    """Notebook 03: the size table's formats (``nm`` needs an N:M pattern; its conclusions need a
    lossless format, its round trip csr or a +zstd one) and the OWL run's configuration, as the
    engine will check it."""
    names = _lower("size_formats", core_formats.check_formats, size_formats)
    if not any(core_formats.parse_format(f).lossless for f in names):
        raise ParamError(f"size_formats: {size_formats!r} holds no lossless format; notebook 03 compares "
                         f"the lossless files (add e.g. 'bitmask+zstd')")
    if not any(f == "csr" or f.endswith("+zstd") for f in names):
        raise ParamError(f"size_formats: {size_formats!r} holds neither 'csr' nor a '+zstd' format, those "
                         f"notebook 03 reads back in its round trip (add e.g. 'bitmask+zstd')")
    if owl:
        _lower("owl", PruneConfig, owl_method, owl_sparsity, owl=True, nsamples=nsamples, seqlen=seqlen, seed=seed)


def _lossless_formats(size_formats) -> tuple[str, ...]:
    """Notebook 04's size formats by name, the plain dense file (every size's baseline)
    first, or () for none; a lossy format is refused: the files must hold the evaluated weights."""
    names = []
    for f in size_formats or ():
        fmt = _lower("size_formats", core_formats.parse_format, f)
        if not fmt.lossless:
            raise ParamError(f"size_formats: {f!r} is lossy; the quality-vs-size figure compares files "
                             f"that hold exactly the evaluated weights (use e.g. 'bitmask+zstd')")
        names.append(fmt.name)
    return tuple(dict.fromkeys(["dense", *names])) if names else ()


def _check_benchmarks(size_formats, **values) -> None:
    _lossless_formats(size_formats)
    recovery_plan(values)


def recovery_plan(values: dict) -> recovery.RecoveryPlan:
    """Notebook 04's ``recovery_*`` parameters as one checked
    :class:`~lab_utils.experiments.recovery.RecoveryPlan`, on the notebook's device; its
    dtype is ``recovery_dtype``, or the notebook's ``dtype`` where that is auto."""
    plan = {k.removeprefix("recovery_"): v for k, v in values.items() if k.startswith("recovery_")}
    device, _ = resolved(values.get("device", "auto"), values.get("dtype", "auto"))
    # recovery_dtype auto follows the notebook's dtype, and an auto left there is the engine's to
    # resolve: bfloat16 on a CPU that runs it natively (training only; the evaluation keeps dtype)
    if plan.get("dtype", "auto") == "auto":
        plan["dtype"] = values.get("dtype", "auto")
    try:
        return recovery.RecoveryPlan(**{**plan, "device": device})
    except ValueError as e:  # its message opens with the field's name: name the parameter
        field, _, rest = str(e).partition(" ")
        name = field.rstrip(":")
        raise ParamError(f"recovery_{name}: {rest}" if name in plan else f"recovery: {e}") from None


def benchmark_config(values: dict) -> benchmarks.BenchmarkConfig:
    """Notebook 04's checked parameters (:func:`validate_notebook`) as one
    :class:`~lab_utils.experiments.benchmarks.BenchmarkConfig`: the perplexity's
    windows are the ``protocol``'s unless ``eval_windows`` / ``eval_seqlen``
    override them (0: the protocol's), the device and dtype resolved."""
    values = dict(values)
    if "protocol" in values:
        values["eval_windows"], values["eval_seqlen"] = protocols.resolve(
            values["protocol"], values.get("eval_windows", 0), values.get("eval_seqlen", 0))
    bench = protocols.EvalConfig(**{f.name: values[f.name] for f in fields(protocols.EvalConfig)
                                    if f.name in values})
    device, dtype = resolved(values.get("device", "auto"), values.get("dtype", "auto"))
    return benchmarks.BenchmarkConfig(nsamples=values["nsamples"], seqlen=values["seqlen"], seed=values["seed"],
                                      bench=bench, size_formats=_lossless_formats(values["size_formats"]),
                                      device=device, dtype=dtype)


def _check_protocol(values: dict) -> None:
    if "protocol" in values:
        _lower("protocol", protocols.resolve, values["protocol"], *(values.get(k, 0) for k in PROTOCOL_OVERRIDES))


# Rules that span several parameters of one notebook, run after the per-name checks.
NOTEBOOK_RULES = {"01_concepts": _check_concepts, "03_sparsification_and_sizes": _check_sweep,
                  "04_benchmarks": _check_benchmarks}


def check_values(values: dict, notebook: str, decl: dict[str, dict], check_hub: bool = True) -> None:
    """Every check of one notebook's values (all of its declared parameters):
    types, the rule each name implies, and the notebook's rules across parameters."""
    check_types(values, decl, notebook)
    validate(values, check_hub)
    _check_protocol(values)
    if notebook in NOTEBOOK_RULES:
        NOTEBOOK_RULES[notebook](**values)


# --------------------------------------------------------------------------- a file, a notebook
def notebook_names() -> list[str]:
    return sorted(p.stem for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def declared(notebook: str) -> dict[str, dict]:
    """The parameters a notebook's ``parameters`` cell declares: name -> the entry
    papermill's ``inspect_notebook`` gives (name, inferred_type_name, default, help),
    read here with ``ast``: importing papermill (nbformat's jsonschema) takes seconds,
    which ``--check`` should not spend."""
    path = NOTEBOOKS_DIR / f"{notebook}.ipynb"
    if not path.is_file():
        raise ParamError(f"notebook {notebook!r} does not exist in {NOTEBOOKS_DIR}")
    cells = json.loads(path.read_text())["cells"]
    src = next(("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])), "")
    lines, out = src.splitlines(), {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name, kind = node.target.id, ast.get_source_segment(src, node.annotation)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, kind = node.targets[0].id, "None"
        else:
            continue
        comment = re.search(r"#\s*(.*)$", lines[node.end_lineno - 1][node.end_col_offset:])
        out[name] = {"name": name, "inferred_type_name": kind,
                     "default": ast.get_source_segment(src, node.value) if node.value is not None else None,
                     "help": comment.group(1).strip() if comment else ""}
    return out


def defaults(decl: dict[str, dict]) -> dict:
    """The notebook's default values (its parameters cell's literals)."""
    out = {}
    for name, info in decl.items():
        try:
            out[name] = ast.literal_eval(info.get("default") or "None")
        except (ValueError, SyntaxError):
            out[name] = info.get("default")
    return out


def check_file(path: str | Path, check_hub: bool = True) -> tuple[dict, dict[str, dict]]:
    """Everything that can be checked before running, on every notebook's effective
    values (its defaults with the file's keys over them): returns (the file's
    parameters, per notebook the keys the file sets). Raises ParamError (one line)."""
    data = load_params(path)
    decl = {nb: declared(nb) for nb in notebook_names()}
    check_declared(data, decl)
    per_nb = split_params(data, list(decl))
    for nb, values in per_nb.items():
        per_nb[nb] = {k: v for k, v in values.items() if k in decl[nb]}
        check_values({**defaults(decl[nb]), **per_nb[nb]}, nb, decl[nb], check_hub)
    return data, per_nb


def validate_notebook(namespace: dict, notebook: str, check_hub: bool = True) -> dict:
    """Check every parameter the notebook declares, as its kernel holds it.

    Called in the cell after the parameters with ``globals()``, so a value typed in
    JupyterLab fails as clearly as one from a parameter file. Returns the checked
    values by name.
    """
    decl = declared(notebook)
    missing = [name for name in decl if name not in namespace]
    if missing:
        raise ParamError(f"parameter {missing[0]!r} of notebook {notebook} is not defined; "
                         f"run its parameters cell first")
    values = {name: namespace[name] for name in decl}
    check_values(values, notebook, decl, check_hub)
    return values
