"""What fits on a GPU: the arithmetic of what the layer-sequential engine holds on the device
at once, per block and, for a mixture of experts, per expert; and tables over published shapes."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

F32 = 4  # bytes: weights, statistics and working memory are float32 on the device


@dataclass(frozen=True)
class BlockShape:
    """One transformer block, in the names of its model's ``config.json``."""

    hidden: int  # hidden_size
    intermediate: int  # intermediate_size; an expert's in a mixture of experts (Qwen: moe_intermediate_size)
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    blocks: int  # num_hidden_layers
    head_dim: int = 0  # head_dim; 0: hidden // heads, what transformers takes when the config has none
    experts: int = 0  # num_local_experts (Mixtral) or num_experts (Qwen); 0: a dense MLP
    experts_per_token: int = 1  # num_experts_per_tok: the experts the router sends each token to

    @property
    def attention_inputs(self) -> list[int]:
        """Input widths of q, k, v and o (o reads the heads' concatenated outputs)."""
        return [self.hidden] * 3 + [self.heads * (self.head_dim or self.hidden // self.heads)]

    @property
    def mlp_inputs(self) -> list[int]:
        """Input widths of one MLP's (one expert's) gate, up and down projections."""
        return [self.hidden, self.hidden, self.intermediate]


# As the models' config.json on the Hugging Face hub gives them.
LLAMA_SHAPES = {  # meta-llama/Llama-2-{7b,13b,70b}-hf
    "Llama-2-7B": BlockShape(4096, 11008, heads=32, kv_heads=32, blocks=32),
    "Llama-2-13B": BlockShape(5120, 13824, heads=40, kv_heads=40, blocks=40),
    "Llama-2-70B": BlockShape(8192, 28672, heads=64, kv_heads=8, blocks=80),
}
MOE_SHAPES = {
    # mistralai/Mixtral-8x7B-v0.1 (no head_dim: 4096 / 32 = 128)
    "Mixtral-8x7B": BlockShape(4096, 14336, heads=32, kv_heads=8, blocks=32, experts=8, experts_per_token=2),
    # Qwen/Qwen3-30B-A3B: moe_intermediate_size 768 (its intermediate_size 6144 is a dense MLP that
    # no block has: decoder_sparse_step 1, mlp_only_layers []); head_dim 128, not 2048 / 32
    "Qwen3-30B-A3B": BlockShape(2048, 768, heads=32, kv_heads=4, blocks=48, head_dim=128, experts=128,
                                experts_per_token=8),
}


def statistics_bytes(inputs: list[int], method: str) -> int:
    """Per pruned layer of input width n: Wanda one float32 vector (n), SparseGPT one float32
    Hessian (n x n)."""
    if method == "sparsegpt":
        return sum(n * n for n in inputs) * F32
    if method == "wanda":
        return sum(inputs) * F32
    raise ValueError(f"method {method!r}: the footprint is computed for 'wanda' and 'sparsegpt'")


def expert_footprint(shape: BlockShape, method: str = "sparsegpt") -> dict[str, int]:
    """Bytes of one expert (a dense block's MLP): its gate, up and down weights and their statistics."""
    return {"weights": 3 * shape.hidden * shape.intermediate * F32,
            "statistics": statistics_bytes(shape.mlp_inputs, method)}


def block_footprint(shape: BlockShape, method: str = "sparsegpt", *, nsamples: int = 128, seqlen: int = 2048,
                    act_bytes: int = 2, batch_tokens: int = 8192) -> dict[str, int]:
    """Bytes the layer-sequential engine holds on the device at once for one block:

    * ``weights``: the block in float32 (the mask math needs full precision): q, k, v, o, every
      expert's gate, up and down (one MLP's in a dense block) and the router (experts x hidden);
    * ``activations``: the calibration set at the block's input and output,
      ``nsamples x seqlen x hidden x act_bytes``, twice;
    * ``statistics``: those of every pruned layer, experts included (:func:`statistics_bytes`), all
      alive until the block is pruned; the router is not pruned and has none;
    * ``working``: one batch's MLP temporaries (``batch_tokens`` x experts_per_token x intermediate,
      three of them, float32: each token goes through its experts) plus SparseGPT's copies of the
      largest Hessian and its inverse while one layer is pruned.
    """
    h, i, mlps = shape.hidden, shape.intermediate, max(shape.experts, 1)
    q_width = shape.attention_inputs[-1]
    kv_width = shape.kv_heads * q_width // shape.heads
    weight_numel = 2 * h * q_width + 2 * h * kv_width + mlps * 3 * h * i + shape.experts * h
    stats = statistics_bytes(shape.attention_inputs, method) + mlps * statistics_bytes(shape.mlp_inputs, method)
    working = 3 * batch_tokens * shape.experts_per_token * i * F32
    if method == "sparsegpt":
        working += 2 * max(shape.attention_inputs + shape.mlp_inputs) ** 2 * F32
    parts = {"weights": weight_numel * F32, "activations": 2 * nsamples * seqlen * h * act_bytes,
             "statistics": stats, "working": working}
    parts["total"] = sum(parts.values())
    return parts


def footprint_table(shapes: dict[str, BlockShape] = LLAMA_SHAPES, gpu_gib=(24, 80)) -> pd.DataFrame:
    """Per shape and method, with the papers' 128 x 2048 calibration: what one block needs on the
    device (GiB), the whole model's float32 block weights (which stay in host memory), and whether
    the block fits each GPU size in ``gpu_gib``. Mixtures of experts add one expert's share (MiB)
    and the calibration tokens the router sends an expert on average."""
    gib, mib, tokens = 1024 ** 3, 1024 ** 2, 128 * 2048
    rows = []
    for name, shape in shapes.items():
        for method in ("wanda", "sparsegpt"):
            p = block_footprint(shape, method)
            row = {"model": name, "method": method, **{k: round(v / gib, 2) for k, v in p.items()},
                   "host_weights_fp32": round(shape.blocks * p["weights"] / gib, 1)}
            if shape.experts:
                row["experts"] = f"{shape.experts}, top {shape.experts_per_token}"
                for k, v in expert_footprint(shape, method).items():
                    row[f"expert_{k}_MiB"] = round(v / mib, 2)
                row["tokens_per_expert"] = tokens * shape.experts_per_token // shape.experts
            for g in gpu_gib:
                row[f"fits_{g}GiB"] = p["total"] <= g * gib
            rows.append(row)
    return pd.DataFrame(rows)
