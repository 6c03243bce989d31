"""The engine on a GPU against the CPU: the same masks, and what a GPU buys.

A Llama with SmolLM2-135M's configuration (the literals below; random
weights, seed 0; no network, no file) is pruned on the CPU and on CUDA in
float32, Wanda and SparseGPT at 50% and 2:4, on the same random calibration
tokens. Wanda's masks must be identical; SparseGPT's must agree on at least
99% of the positions, and the pruned model's reconstruction error (the
relative error of its last hidden states against the dense model's, on
held-out tokens) must be within 1% of the CPU's. Then calibration + pruning
is timed at 128 x 2048 tokens in bfloat16 on the GPU, and one dense forward
pass, and one table is printed. Last, 2:4 semi-structured linear layers
(``torch.sparse.to_sparse_semi_structured``) are timed against dense in
bfloat16 at SmolLM2's layer shapes and at 7B-class ones, on prefill-sized and
one-token inputs, each format cycling through enough copies of its weight that
it is read from memory, not from the GPU's L2 cache; the table names the
backend torch used (CUTLASS or cuSPARSELt).

Without CUDA it refuses in one line and exits 0 (the comparison code runs on
the CPU in tests/test_bench_gpu.py). At most about 9 minutes on one GPU;
``--only-2-4`` runs the last table alone (a minute).

    python -m benchmarks gpu [-- --nsamples 16 --seqlen 512] [-- --only-2-4]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import pandas as pd
import torch

from lab_utils.core import device as devices
from lab_utils.core import sparsify
from lab_utils.core.measure import median_seconds, time_calls
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
# out x in linear shapes of the 2:4 timing: SmolLM2-135M's (q/o, k/v, gate/up, down) and a 7B Llama's
SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
LLAMA_7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
SEMI_TOKENS = (2048, 1)  # prefill-sized and one-token inputs
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


def prune_2_4(W: torch.Tensor) -> torch.Tensor:
    """``W`` with the two smallest |w| of every four consecutive inputs of a row set to zero."""
    return sparsify.apply_mask(W, sparsify.magnitude_mask(W, 0.5, prune_n=2, prune_m=4))


def semi_structured_table(device: str, cycle_mib: int = 256, repeats: int = 20) -> pd.DataFrame:
    """``F.linear(x, W)`` dense against 2:4 semi-structured ``W`` in bfloat16 on ``device``, per
    shape and input size: medians per product, each format cycling through ``cycle_mib`` MiB of
    copies of its weight per timed call; ``max_rel_error`` is the 2:4 output's largest error
    relative to the dense one's largest value (same weights: rounding only)."""
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for model, shapes in (("SmolLM2-135M", SMOLLM2_SHAPES), ("7B", LLAMA_7B_SHAPES)):
        for out_f, in_f in shapes:
            g = torch.Generator(device=device).manual_seed(0)
            W = prune_2_4(torch.randn(out_f, in_f, generator=g, device=device, dtype=torch.bfloat16))
            W_s = to_sparse_semi_structured(W)
            n_dense = max(1, math.ceil(cycle_mib * 2**20 / (W.numel() * 2)))
            n_semi = max(1, math.ceil(cycle_mib * 2**20 / (W.numel() * 2 * 9 / 16)))  # values + 1/16 metadata
            dense = [W.clone() for _ in range(n_dense)]
            semi = [W_s] + [to_sparse_semi_structured(W.clone()) for _ in range(n_semi - 1)]
            for tokens in SEMI_TOKENS:
                x = torch.randn(tokens, in_f, generator=g, device=device, dtype=torch.bfloat16)
                err = float((torch.nn.functional.linear(x, W_s) - torch.nn.functional.linear(x, W)).abs().max()
                            / torch.nn.functional.linear(x, W).abs().max())
                med = median_seconds(time_calls(
                    {"dense": lambda x=x, ws=dense: [torch.nn.functional.linear(x, w) for w in ws],
                     "2:4": lambda x=x, ws=semi: [torch.nn.functional.linear(x, w) for w in ws]},
                    3, repeats, device=device))
                dense_s, semi_s = med["dense"] / n_dense, med["2:4"] / n_semi
                rows.append({"model": model, "shape": f"{out_f}x{in_f}", "tokens": tokens,
                             "dense_us": 1e6 * dense_s, "semi_2_4_us": 1e6 * semi_s, "speedup": dense_s / semi_s,
                             "max_rel_error": err, "backend": type(W_s).__name__.removeprefix("SparseSemiStructuredTensor"),
                             "copies": f"{n_dense}/{n_semi}"})
    return pd.DataFrame(rows)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=16, help="calibration samples of the CPU-vs-GPU comparison")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per sample of the comparison")
    ap.add_argument("--time-nsamples", type=int, default=128, help="calibration samples of the timing")
    ap.add_argument("--time-seqlen", type=int, default=2048, help="tokens per sample of the timing")
    ap.add_argument("--only-2-4", action="store_true", help="only the 2:4 semi-structured table")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    pd.set_option("display.width", 160)
    if not torch.cuda.is_available():
        print(f"bench_gpu: no CUDA device here (torch {torch.__version__} sees: {', '.join(devices.available())}); "
              f"nothing run: it needs a CUDA machine")
        return 0
    dev = "cuda"
    print(f"device: {devices.device_name(dev)}; host: {devices.device_name('cpu')}; torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    if not args.only_2_4:
        table = compare_devices(SMOLLM2_135M, dev, nsamples=args.nsamples, seqlen=args.seqlen)
        print(table.to_string(index=False), flush=True)
        timing = time_on_gpu(SMOLLM2_135M, dev, args.time_nsamples, args.time_seqlen, forward_tokens=8 * 2048)
        print(timing.to_string(index=False), flush=True)
    print("\n2:4 semi-structured vs dense, bfloat16 (F.linear; microseconds per product, medians)")
    print(semi_structured_table(dev).to_string(index=False))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
