#!/usr/bin/env python3
"""Checks pytorch_bench.py's models against tests/fixtures/moppa_ref.py in float64.

Small timm ViT (16×24 px, patch 4: a 4×6 grid, so H ≠ W exercises the grid order), random non-zero
adapter parameters copied from the reference into the bench model; compares logits, the total loss
(cross-entropy + route loss) and the adapter gradients. Prints the max absolute differences.
"""
import copy
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "fixtures"))
import moppa_ref  # noqa: E402
import pytorch_bench as pb  # noqa: E402


def randomize(params, gen):
    with torch.no_grad():
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def check(method, dct="kron", hyper=None):
    hyper = hyper or {}
    torch.manual_seed(0)
    vit = pb.build_vit(None, img_size=(16, 24), patch_size=4, embed_dim=24, depth=2, num_heads=2,
                       mlp_ratio=2.0, num_classes=5).double()
    ref = moppa_ref.AdaptedViT(copy.deepcopy(vit), method, rank=3, **hyper).double()
    gen = torch.Generator().manual_seed(1)
    randomize(ref.adapter_params().values(), gen)
    ours = pb.BenchModel(copy.deepcopy(vit), method, rank=3, dct=dct, dtype=torch.float64,
                         route_weight=hyper.get("route_weight", 0.01))
    with torch.no_grad():
        ours.vit.head.weight.copy_(ref.vit.head.weight)
        ours.vit.head.bias.copy_(ref.vit.head.bias)
    pairs = [("head.weight", ours.vit.head.weight), ("head.bias", ours.vit.head.bias)]
    for i, b in enumerate(ref.blocks):
        if method == "moppa":
            m = ours.moppa[i]
            for k in ("tau", "gamma", "temperature", "scale"):
                setattr(m, k, getattr(b.moppa, k))
            m.load_state_dict(b.moppa.state_dict(), strict=True)
            pairs += [(f"blocks.{i}.moppa.{n}", p) for n, p in m.named_parameters()]
        elif method == "lora":
            q = ours.vit.blocks[i].attn.qkv
            q.q.load_state_dict(b.lora.q.state_dict())
            q.v.load_state_dict(b.lora.v.state_dict())
            pairs += [(f"blocks.{i}.lora.q.{n}", p) for n, p in q.q.named_parameters()]
            pairs += [(f"blocks.{i}.lora.v.{n}", p) for n, p in q.v.named_parameters()]
        elif method == "adaptformer":
            ours.adaptformer[i].load_state_dict(b.adaptformer.state_dict())
            pairs += [(f"blocks.{i}.adaptformer.{n}", p) for n, p in ours.adaptformer[i].named_parameters()]
    x = torch.randn(4, 3, 16, 24, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 4])

    lr, rl, _ = ref(x)
    loss_r = F.cross_entropy(lr, y) + rl
    loss_r.backward()
    lo, ro = ours(x)
    loss_o = F.cross_entropy(lo, y) + (ro if ro is not None else 0.0)
    loss_o.backward()
    refp = ref.adapter_params()
    dlog = (lr - lo).abs().max().item()
    dloss = abs(loss_r.item() - loss_o.item())
    dgrad = max((refp[n].grad - p.grad).abs().max().item() for n, p in pairs)
    assert len(pairs) == len(refp), (len(pairs), len(refp))
    tag = f"{method}{' ' + dct if method == 'moppa' else ''}{' ' + str(hyper) if hyper else ''}"
    print(f"{tag:50s} |logits| {lr.abs().max().item():.3f}  max diff: logits {dlog:.2e}  "
          f"loss {dloss:.2e} (route {0.0 if ro is None else ro.item():.2e})  grads {dgrad:.2e}")
    return max(dlog, dloss, dgrad)


if __name__ == "__main__":
    worst = 0.0
    worst = max(worst, check("moppa", "kron"))
    worst = max(worst, check("moppa", "separable"))
    worst = max(worst, check("moppa", "kron", dict(tau=0.7, gamma=0.3, temperature=1.5, scale=0.5,
                                                   route_weight=0.2)))
    for m in ("lora", "adaptformer", "linear"):
        worst = max(worst, check(m))
    print(f"worst max abs difference: {worst:.2e}")
    sys.exit(0 if worst < 1e-10 else 1)
