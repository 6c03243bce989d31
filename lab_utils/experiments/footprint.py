"""What fits on a GPU: the arithmetic of what the layer-sequential engine
holds on the device at once, per block, and a table over Llama shapes."""

from __future__ import annotations

import pandas as pd


def block_footprint(hidden: int, intermediate: int, kv_hidden: int | None = None, *, method: str = "sparsegpt",
                    nsamples: int = 128, seqlen: int = 2048, act_bytes: int = 2,
                    batch_tokens: int = 8192) -> dict[str, int]:
    """Bytes the layer-sequential engine holds on the device at once, for a
    Llama-shaped block (q, k, v, o; gate, up, down):

    * ``weights``: one block in float32 (the mask math needs full precision);
    * ``activations``: the calibration set at the block's input and output,
      ``nsamples x seqlen x hidden x act_bytes``, twice;
    * ``statistics``: Wanda one float32 vector per layer; SparseGPT one
      float32 Hessian per layer, in x in (six hidden x hidden, one
      intermediate x intermediate), all alive until the block is pruned;
    * ``working``: one batch's forward temporaries (``batch_tokens`` x
      intermediate, three of them, float32) plus SparseGPT's copies of the
      largest Hessian and its inverse while one layer is pruned.
    """
    kv = hidden if kv_hidden is None else kv_hidden
    weight_numel = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate
    ins = [hidden] * 6 + [intermediate]  # q k v o gate up: hidden inputs; down: intermediate
    if method == "sparsegpt":
        stats = sum(n * n for n in ins) * 4
        working = 2 * intermediate * intermediate * 4
    elif method == "wanda":
        stats = sum(ins) * 4
        working = 0
    else:
        raise ValueError(f"method {method!r}: the footprint is computed for 'wanda' and 'sparsegpt'")
    working += 3 * batch_tokens * intermediate * 4
    parts = {"weights": weight_numel * 4, "activations": 2 * nsamples * seqlen * hidden * act_bytes,
             "statistics": stats, "working": working}
    parts["total"] = sum(parts.values())
    return parts


# Llama shapes (hidden, intermediate, key/value width, blocks) as their configs give them.
LLAMA_SHAPES = {"Llama-2-7B": (4096, 11008, 4096, 32), "Llama-2-13B": (5120, 13824, 5120, 40),
                "Llama-2-70B": (8192, 28672, 1024, 80)}


def footprint_table(gpu_gib=(24, 80)) -> pd.DataFrame:
    """Per Llama shape and method, with the papers' 128 x 2048 calibration: what one block
    needs on the device (GiB), the whole model's float32 weights (which stay in host memory),
    and whether it fits each GPU size in ``gpu_gib``."""
    gib = 1024 ** 3
    rows = []
    for name, (h, i, kv, n_blocks) in LLAMA_SHAPES.items():
        for method in ("wanda", "sparsegpt"):
            p = block_footprint(h, i, kv, method=method)
            row = {"model": name, "method": method, **{k: round(v / gib, 2) for k, v in p.items()},
                   "host_weights_fp32": round(n_blocks * p["weights"] / gib, 1)}
            for g in gpu_gib:
                row[f"fits_{g}GiB"] = p["total"] <= g * gib
            rows.append(row)
    return pd.DataFrame(rows)
