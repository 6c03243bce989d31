"""The engine on a GPU against the CPU: the same masks, and what a GPU buys.

A Llama with SmolLM2-135M's configuration (the literals below; random
weights, seed 0; no network, no file) is pruned on the CPU and on CUDA in
float32, Wanda and SparseGPT at 50% and 2:4, on the same random calibration
tokens. Wanda's masks must be identical; SparseGPT's must agree on at least
99% of the positions, and the pruned model's reconstruction error (the
relative error of its last hidden states against the dense model's, on
held-out tokens) must be within 1% of the CPU's. Then calibration + pruning
is timed at 128 x 2048 tokens in bfloat16 on the GPU, and one dense forward
pass, and one table is printed.

Without CUDA the comparison runs CPU against the CPU's offload path on a
tiny configuration (the asserts run), one line says there is no GPU, and the
script exits 0. At most about 8 minutes on one GPU.

    python -m benchmarks gpu [-- --nsamples 16 --seqlen 512]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import pandas as pd
import torch

from lab_utils.core import device as devices
from lab_utils.core.models import DECODER_ONLY, LoadedModel, ModelSpec, prunable_layers
from lab_utils.engine import config, prune

# SmolLM2-135M's configuration (as its config.json gives it)
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                    rms_norm_eps=1e-5, max_position_embeddings=8192, hidden_act="silu",
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
# a tiny model of the same layout: the CPU self-check and the test
TINY = {**SMOLLM2_135M, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256}
SETTINGS = [("wanda", "unstructured"), ("wanda", "2:4"), ("sparsegpt", "unstructured"), ("sparsegpt", "2:4")]
SPARSEGPT_AGREEMENT = 0.99  # share of mask positions that must agree
ERROR_TOLERANCE = 0.01  # relative difference of the reconstruction errors


def build_model(shape: dict, seed: int = 0) -> LoadedModel:
    """A Llama of ``shape`` with random weights (seed ``seed``), float32 on the host."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**shape)).eval()
    spec = ModelSpec("llama-random", DECODER_ONLY, "Llama (random)", "local", "perplexity", "llama-random")
    return LoadedModel(model, None, spec)


def random_tokens(shape: dict, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, shape["vocab_size"], (nsamples, seqlen), generator=g)


def batches_of(tokens: torch.Tensor, batch_tokens: int = config.BATCH_TOKENS) -> list[dict]:
    """Calibration batches as the engine takes them (``prune_model(..., batches=)``)."""
    bs = max(1, batch_tokens // tokens.shape[1])
    return [{"inputs": {"input_ids": tokens[i:i + bs]}, "masks": {}} for i in range(0, tokens.shape[0], bs)]


def prune_copy(dense: LoadedModel, method: str, pattern: str, tokens: torch.Tensor, device: str = "cpu",
               dtype: str = "float32", offload: bool = False) -> tuple[LoadedModel, prune.PruneReport]:
    lm = LoadedModel(copy.deepcopy(dense.model), None, dense.spec)
    cfg = config.PruneConfig(method, 0.5, pattern, nsamples=tokens.shape[0], seqlen=tokens.shape[1],
                             device=device, dtype=dtype)
    report = prune.prune_model(lm, cfg, offload=offload, batches=batches_of(tokens))
    return lm, report


@torch.no_grad()
def reconstruction_error(dense: torch.nn.Module, pruned: torch.nn.Module, tokens: torch.Tensor) -> float:
    """||h_pruned - h_dense|| / ||h_dense|| of the last hidden states on ``tokens``."""
    h = dense.model(input_ids=tokens).last_hidden_state
    hp = pruned.model(input_ids=tokens).last_hidden_state
    return float((hp - h).norm() / h.norm())


def compare(dense: LoadedModel, a: LoadedModel, b: LoadedModel, method: str, pattern: str,
            held_out: torch.Tensor) -> dict:
    """How far apart two prunings of ``dense`` are: the share of mask
    positions that agree, and each one's reconstruction error."""
    same = total = 0
    for pa, pb in zip(prunable_layers(a.model), prunable_layers(b.model), strict=True):
        same += int(((pa.weight == 0) == (pb.weight == 0)).sum())
        total += pa.weight.numel()
    err_a = reconstruction_error(dense.model, a.model, held_out)
    err_b = reconstruction_error(dense.model, b.model, held_out)
    return {"method": method, "pattern": pattern, "mask_agreement": same / total, "error_a": err_a,
            "error_b": err_b, "error_rel_diff": abs(err_b - err_a) / err_a}


def check(row: dict) -> None:
    """The criteria: Wanda identical masks; SparseGPT >= 99% agreement and
    reconstruction errors within 1% of each other."""
    what = f"{row['method']} {row['pattern']}"
    if row["method"] == "wanda":
        assert row["mask_agreement"] == 1.0, f"{what}: masks differ ({row['mask_agreement']:.6f} agree)"
    else:
        assert row["mask_agreement"] >= SPARSEGPT_AGREEMENT, f"{what}: only {row['mask_agreement']:.4f} of the mask agrees"
    assert row["error_rel_diff"] <= ERROR_TOLERANCE, f"{what}: reconstruction errors differ by {row['error_rel_diff']:.4f}"


def compare_devices(shape: dict, device_b: str, *, nsamples: int, seqlen: int, offload_b: bool = False) -> pd.DataFrame:
    """Every setting pruned on the CPU and on ``device_b`` (float32), compared and checked."""
    dense = build_model(shape)
    tokens = random_tokens(shape, nsamples, seqlen, seed=1)
    held_out = random_tokens(shape, 4, seqlen, seed=2)
    rows = []
    for method, pattern in SETTINGS:
        a, _ = prune_copy(dense, method, pattern, tokens)
        b, _ = prune_copy(dense, method, pattern, tokens, device=device_b, offload=offload_b)
        row = compare(dense, a, b, method, pattern, held_out)
        check(row)
        rows.append(row)
    return pd.DataFrame(rows)


def time_on_gpu(shape: dict, device: str, nsamples: int, seqlen: int, forward_tokens: int) -> pd.DataFrame:
    """Calibration + pruning at ``nsamples x seqlen`` tokens in bfloat16 (the
    model in host memory, blocks on the GPU), and one dense forward pass."""
    dense = build_model(shape)
    tokens = random_tokens(shape, nsamples, seqlen, seed=1)
    rows = []
    for method, pattern in SETTINGS:
        _, r = prune_copy(dense, method, pattern, tokens, device=device, dtype="bfloat16")
        rows.append({"what": f"prune {method} {pattern}", "tokens": nsamples * seqlen, "seconds": r.seconds,
                     "peak_device_gib": (r.peak_device_memory_bytes or 0) / 1024 ** 3})
    model = copy.deepcopy(dense.model).to(device, torch.bfloat16)
    ids = random_tokens(shape, max(1, forward_tokens // seqlen), seqlen, seed=3).to(device)
    with torch.no_grad():
        model(input_ids=ids)  # warm-up: kernels chosen, memory allocated
        devices.reset_peak_memory(device)
        devices.synchronize(device)
        t0 = time.perf_counter()
        model(input_ids=ids)
        devices.synchronize(device)
    rows.append({"what": "forward bf16 (dense)", "tokens": ids.numel(), "seconds": time.perf_counter() - t0,
                 "peak_device_gib": devices.peak_memory(device) / 1024 ** 3})
    return pd.DataFrame(rows)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=16, help="calibration samples of the CPU-vs-GPU comparison")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per sample of the comparison")
    ap.add_argument("--time-nsamples", type=int, default=128, help="calibration samples of the timing")
    ap.add_argument("--time-seqlen", type=int, default=2048, help="tokens per sample of the timing")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    pd.set_option("display.width", 160)
    if not torch.cuda.is_available():
        table = compare_devices(TINY, "cpu", nsamples=4, seqlen=32, offload_b=True)
        print(table.to_string(index=False))
        print(f"no CUDA device here (torch sees: {', '.join(devices.available())}): ran the comparison "
              f"CPU against the CPU's offload path on a tiny model; the GPU table needs a CUDA machine")
        return 0
    dev = "cuda"
    print(f"device: {devices.device_name(dev)}; host: {devices.device_name('cpu')}", flush=True)
    t0 = time.perf_counter()
    table = compare_devices(SMOLLM2_135M, dev, nsamples=args.nsamples, seqlen=args.seqlen)
    print(table.to_string(index=False), flush=True)
    timing = time_on_gpu(SMOLLM2_135M, dev, args.time_nsamples, args.time_seqlen, forward_tokens=8 * 2048)
    print(timing.to_string(index=False))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
