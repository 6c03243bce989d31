"""A zoo of tiny random models of many architectures, MoE included (tests/tiny_models.py's ZOO),
each pruned with Wanda and SparseGPT, unstructured and 2:4: every weight matrix inside the blocks
(each expert's too; routers, embeddings, norms and biases aside) comes out half zero, counted
here from the parameters themselves, not from the engine's own layer view."""

import copy
import re

import pytest
import torch
from tiny_models import MOE, ZOO, build_zoo, zoo_batches
from torch import nn
from transformers.pytorch_utils import Conv1D

from lab_utils.core import sparsify as sp
from lab_utils.core.models import LoadedModel, ModelSpec, transformer_blocks
from lab_utils.engine import prune
from lab_utils.engine.config import PruneConfig

SETTINGS = [("wanda", "unstructured"), ("wanda", "2:4"), ("sparsegpt", "unstructured"), ("sparsegpt", "2:4")]
ROUTER = re.compile(r"(^|\.)(gate|router|shared_expert_gate)(\.|$)")


def block_matrices(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, weight as out x in) of every matrix in the blocks, one per expert of a fused
    parameter; routers, embedding tables and biases left out."""
    out = []
    for prefix, blocks in transformer_blocks(model).values():
        for i, block in enumerate(blocks):
            for mname, module in block.named_modules():
                if ROUTER.search(mname) or isinstance(module, nn.Embedding):
                    continue
                for pname, p in module.named_parameters(recurse=False):
                    name = f"{prefix}.{i}.{mname}.{pname}"
                    if p.dim() < 2 or "bias" in pname:
                        continue
                    if p.dim() == 3:  # one matrix per expert
                        t = getattr(module, "is_transposed", False)
                        out += [(f"{name}[{e}]", p[e].t() if t else p[e]) for e in range(p.shape[0])]
                    else:
                        out.append((name, p.t() if isinstance(module, Conv1D) else p))
    return out


def prune_zoo(arch: str, method: str, pattern: str, dense=None):
    """(model, report): ``arch`` of the zoo pruned to 50% by ``method`` in ``pattern``."""
    model, family = copy.deepcopy(dense) if dense else build_zoo(arch)
    lm = LoadedModel(model, None, ModelSpec(arch, family, arch, "local", "perplexity", arch))
    cfg = PruneConfig(method, 0.5, pattern, nsamples=8, seqlen=32)
    return model, prune.prune_model(lm, cfg, batches=zoo_batches(model, family))


def test_the_zoo_spans_three_families_and_several_mixtures_of_experts():
    families = {family for family, *_ in ZOO.values()}
    assert len(ZOO) >= 20 and families == {"decoder-only", "encoder-decoder", "encoder-only"}
    assert len(MOE) >= 3 and set(MOE) <= set(ZOO)


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_every_block_matrix_of_the_zoo_is_pruned(arch):
    dense = build_zoo(arch)
    for method, pattern in SETTINGS:
        model, report = prune_zoo(arch, method, pattern, dense)
        matrices = block_matrices(model)
        assert len(matrices) >= 6, arch  # ALBERT: one shared layer
        for name, W in matrices:
            zeros = float((W == 0).float().mean())
            # SparseGPT also zeroes the inputs no calibration token reaches (a ReLU's dead units)
            assert 0.5 <= zeros <= (0.5 if method == "wanda" else 0.75), (arch, method, pattern, name, zeros)
            if pattern == "2:4":
                assert sp.nm_violations(W, 2, 4) == 0, (arch, method, name)
        total = sum(W.numel() for _, W in matrices)
        assert report.prunable_params == total and report.coverage == 1.0 and report.left_out == []
        assert report.actual_sparsity == pytest.approx(sum(int((W == 0).sum()) for _, W in matrices) / total)
        assert report.nm_verified is (True if pattern == "2:4" else None)
        assert (report.experts > 0) == (arch in MOE)
        inputs = zoo_batches(model, dense[1], nsamples=2)[0]["inputs"]
        with torch.no_grad():
            out = model(**inputs)[0]
        assert torch.isfinite(out).all(), (arch, method, pattern)
