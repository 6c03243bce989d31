"""Parameter files: load, check against the notebooks, validate values.

A parameter file is YAML: top-level keys go to every notebook that declares
them; an optional ``notebooks:`` mapping holds per-notebook overrides::

    models: [smollm2-135m, whisper-tiny-en, minilm-l6]
    sparsities: [0.5, 0.7]
    notebooks:
      02_visualization:
        sparsities: [0.0, 0.5]

Papermill only *warns* about a parameter that a notebook does not declare, so
a typo would silently run the defaults. Here it is an error, as is any value
outside what the lab accepts; both are caught before any work starts, with one
line naming the parameter, the value and what is allowed.

A notebook checks the values of its own parameters cell in one call,
``params.validate_notebook(globals(), "02_visualization")``: the names come
from the notebook's ``parameters`` cell (papermill's ``inspect_notebook``), so
a parameter added there is checked without being named a second time.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from papermill import inspect_notebook

from lab_utils.core import files, sparsify
from lab_utils.core.device import DeviceError
from lab_utils.core.device import describe as describe_device
from lab_utils.core.evaluation import protocols, zeroshot
from lab_utils.core.models import ModelError, hub_reachable, resolve
from lab_utils.experiments import executor as ex

NOTEBOOKS_DIR = files.REPO_ROOT / "notebooks"
# A perplexity's window count and length: 0 takes the notebook's protocol's own
# (lab_utils.core.evaluation.protocols); a positive value overrides it, and the label says so.
PROTOCOL_OVERRIDES = ("eval_windows", "eval_seqlen", "ppl_windows", "ppl_seqlen")


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
            if nb == key or nb.startswith(str(key)):
                if not isinstance(val, dict):
                    raise ParamError(f"notebooks.{key} must be a mapping of parameters")
                per.update(val)
        out[nb] = per
    unknown = [k for k in overrides if not any(nb == k or nb.startswith(str(k)) for nb in notebooks)]
    if unknown:
        raise ParamError(f"notebooks: {unknown[0]!r} is not a notebook; choose one of {', '.join(notebooks)}")
    return out


def check_declared(data: dict, declared: dict[str, dict]) -> None:
    """Fail on a key that no notebook (or not the named notebook) declares.

    ``declared`` maps a notebook name to papermill's ``inspect_notebook`` dict.
    """
    every = set().union(*(set(d) for d in declared.values())) if declared else set()
    for key in data:
        if key == "notebooks":
            continue
        if key not in every:
            raise ParamError(f"parameter {key!r} is not declared by any notebook "
                             f"({', '.join(declared)}); known parameters: {', '.join(sorted(every))}")
    for nb_key, per in (data.get("notebooks") or {}).items():
        for nb, decl in declared.items():
            if nb == nb_key or nb.startswith(str(nb_key)):
                for key in per:
                    if key not in decl:
                        raise ParamError(f"parameter {key!r} is not declared by notebook {nb} "
                                         f"(it declares: {', '.join(sorted(decl))})")


# --------------------------------------------------------------------------- values
def _as_list(name: str, value) -> list:
    if not isinstance(value, list | tuple):
        raise ParamError(f"{name}: expected a list, got {value!r}")
    return list(value)


def _check_sparsity(name: str, value, allow_zero: bool = True) -> None:
    try:
        s = sparsify.check_sparsity_ratio(value)
    except sparsify.SparsityError:
        raise ParamError(f"{name}: {value!r} is outside [0, 1); a sparsity is the fraction of weights "
                         f"set to zero (0 = dense, 0.5 = half)") from None
    if not allow_zero and s == 0:
        raise ParamError(f"{name}: 0 is not a sparsity to prune at; use a value in (0, 1)")


def _check_pattern(name: str, value) -> None:
    try:
        sparsify.parse_pattern(value)
    except sparsify.SparsityError:
        raise ParamError(f"{name}: {value!r} is not a pattern; allowed: 'unstructured' or 'N:M' "
                         f"with 0 < N < M, e.g. '2:4', '4:8'") from None


def _check_method(name: str, value) -> None:
    if value not in sparsify.METHODS:
        raise ParamError(f"{name}: {value!r} is not a method; allowed: {', '.join(sparsify.METHODS)}")


def _check_model(name: str, value, check_hub: bool) -> None:
    try:
        resolve(value, check_hub=check_hub)
    except ModelError as e:
        raise ParamError(f"{name}: {e}") from None


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ParamError(f"{name}: {value!r} must be a positive integer")


def _check_seed(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ParamError(f"{name}: {value!r} must be a non-negative integer")


def _check_scope(name: str, value) -> None:
    if value not in sparsify.SCOPES:
        raise ParamError(f"{name}: {value!r} is not a scope; allowed: {', '.join(sparsify.SCOPES)}")


def _kind(name: str) -> str | None:
    """Which rule a parameter follows, from its name (``methods``,
    ``size_methods`` ... are all lists of methods)."""
    last = name.split("_")[-1]
    return {
        "models": "models", "model": "model",
        "methods": "methods", "method": "method",
        "sparsities": "sparsities", "sparsity": "sparsity",
        "patterns": "patterns", "pattern": "pattern",
        "nsamples": "positive", "seqlen": "positive", "windows": "positive",
        "utterances": "positive", "examples": "positive", "sentences": "positive",
        "tokens": "positive", "repeats": "positive", "reps": "positive", "steps": "positive",
        "window": "positive", "seed": "seed", "scope": "scope",
    }.get(last)


def validate_value(name: str, value, check_hub: bool = True) -> None:
    """Check one parameter by the rule its name implies; unknown names pass."""
    if name == "executor":  # local | serial | a scheduler address or scheduler file
        try:
            ex.check_executor(value)
        except ValueError as e:
            raise ParamError(str(e)) from None
        return
    if name in ("device", "dtype"):  # checked as a pair: float16 is refused on the CPU only
        _check_device(value if name == "device" else "cpu", value if name == "dtype" else "auto")
        return
    if name == "zeroshot_tasks":  # lm-eval task names; asking whether the hub answers only for a hub task
        tasks = _as_list(name, value)
        try:
            zeroshot.check_tasks(tasks, hub_available=not check_hub or set(tasks) <= set(zeroshot.OFFLINE_TASKS)
                                 or hub_reachable()[0])
        except ValueError as e:
            raise ParamError(f"{name}: {e}") from None
        return
    if name == "protocol":
        try:
            protocols.get(value)
        except ValueError as e:
            raise ParamError(str(e)) from None
        return
    if name in PROTOCOL_OVERRIDES:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ParamError(f"{name}: {value!r} must be a positive integer, or {protocols.FROM_PROTOCOL} "
                             f"for the protocol's own (see `protocol`)")
        return
    kind = _kind(name)
    if kind == "models":
        if not _as_list(name, value):
            raise ParamError(f"{name}: [] names no model; give at least one (a preset, hub id or folder)")
        for v in _as_list(name, value):
            _check_model(name, v, check_hub)
    elif kind == "model":
        _check_model(name, value, check_hub)
    elif kind == "methods":
        for v in _as_list(name, value):
            _check_method(name, v)
    elif kind == "method":
        _check_method(name, value)
    elif kind == "sparsities":
        for v in _as_list(name, value):
            _check_sparsity(name, v)
    elif kind == "sparsity":
        _check_sparsity(name, value)
    elif kind == "patterns":
        for v in _as_list(name, value):
            _check_pattern(name, v)
    elif kind == "pattern":
        _check_pattern(name, value)
    elif kind == "positive":
        _check_positive_int(name, value)
    elif kind == "seed":
        _check_seed(name, value)
    elif kind == "scope":
        _check_scope(name, value)


def validate(params: dict, check_hub: bool = True) -> None:
    """Validate every parameter (nested per-notebook ones too); raise ParamError.

    Notebooks call this in the cell after their parameters, so a value typed in
    JupyterLab fails as clearly as one from a parameter file.
    """
    for name, value in params.items():
        if name == "notebooks" and isinstance(value, dict):
            for per in value.values():
                if isinstance(per, dict):
                    validate(per, check_hub)
            continue
        validate_value(name, value, check_hub)
    if "device" in params and "dtype" in params:
        _check_device(params["device"], params["dtype"])


def _check_device(device: str, dtype: str) -> None:
    """A device torch sees here and a dtype it can run (one line naming what is allowed)."""
    try:
        describe_device(device, dtype)
    except DeviceError as e:
        raise ParamError(str(e)) from None  # it names the parameter and what is allowed


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
        if want is not bool and isinstance(value, bool):
            raise ParamError(f"{key}: {value!r} must be of type {info['inferred_type_name']} "
                             f"(notebook {notebook})")
        if not isinstance(value, want):
            raise ParamError(f"{key}: {value!r} must be of type {info['inferred_type_name']} "
                             f"(notebook {notebook}, default {info.get('default')})")


def _check_concepts(structured_sparsities, quant_group_sizes, distill_temperature, distill_alpha,
                    moe_experts, moe_active_fractions, timing_reps, **_) -> None:
    """Notebook 01's own rules, those its parameters' names do not imply."""
    def positive_int(name, v):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ParamError(f"{name}: {v!r} must be a positive integer")

    if not structured_sparsities or any(not 0 < float(s) < 1 for s in structured_sparsities):
        raise ParamError(f"structured_sparsities: {structured_sparsities!r} must be a non-empty list "
                         f"of fractions of MLP neurons to remove, each in (0, 1), e.g. [0.25, 0.5]")
    if not quant_group_sizes:
        raise ParamError("quant_group_sizes: give at least one 4-bit group size, e.g. [32, 64]")
    for g in quant_group_sizes:
        positive_int("quant_group_sizes", g)
        if g % 2:
            raise ParamError(f"quant_group_sizes: {g} must be even (two 4-bit codes per byte), e.g. 32")
    if not float(distill_temperature) > 0:
        raise ParamError(f"distill_temperature: {distill_temperature!r} must be > 0, e.g. 2.0")
    if not 0 <= float(distill_alpha) <= 1:
        raise ParamError(f"distill_alpha: {distill_alpha!r} must be in [0, 1] (the weight of the "
                         f"soft targets; 1 = soft targets only)")
    positive_int("moe_experts", moe_experts)
    positive_int("timing_reps", timing_reps)
    for f in moe_active_fractions:
        k = float(f) * moe_experts
        if not 0 < float(f) <= 1 or abs(k - round(k)) > 1e-9:
            raise ParamError(f"moe_active_fractions: {f!r} x {moe_experts} experts is not a whole "
                             f"number of experts; use multiples of 1/{moe_experts} in (0, 1]")


# Rules that span several parameters of one notebook, run after the per-name checks.
NOTEBOOK_RULES = {"01_concepts": _check_concepts}


# --------------------------------------------------------------------------- in a notebook
def declared(notebook: str) -> dict[str, dict]:
    """The parameters a notebook's ``parameters`` cell declares (name -> papermill's
    ``inspect_notebook`` entry: type, default, help), read from ``notebooks/``."""
    path = NOTEBOOKS_DIR / f"{notebook}.ipynb"
    if not path.is_file():
        raise ParamError(f"notebook {notebook!r} does not exist in {NOTEBOOKS_DIR}")
    return inspect_notebook(str(path))


def validate_notebook(namespace: dict, notebook: str, check_hub: bool = True) -> dict:
    """Check every parameter the notebook declares, as its kernel holds it.

    Called in the cell after the parameters with ``globals()``: each declared
    name is checked for the type of its default and for the rule its name
    implies (:func:`validate_value`), so a value typed in JupyterLab fails as
    clearly as one from a parameter file. Returns the checked values by name.
    """
    decl = declared(notebook)
    missing = [name for name in decl if name not in namespace]
    if missing:
        raise ParamError(f"parameter {missing[0]!r} of notebook {notebook} is not defined; "
                         f"run its parameters cell first")
    values = {name: namespace[name] for name in decl}
    check_types(values, decl, notebook)
    validate(values, check_hub)
    if notebook in NOTEBOOK_RULES:
        NOTEBOOK_RULES[notebook](**values)
    return values
