#!/usr/bin/env python3
"""PyTorch reference timing for `moppa bench` (never a CI dependency).

Times one training step of the same models and methods as `moppa bench`, with the same protocol:
fixed random images and labels, 3 warm-up steps, then --steps timed steps; per step

    t0; forward + cross-entropy (+ route loss) + loss.item(); t1
        loss.backward() (+ cuda sync); t2
        optimizer.step(); optimizer.zero_grad(set_to_none=True) (+ cuda sync); t3

and reports medians (the upper median v[n // 2], as the Rust side does). With --compile the
forward + loss goes through `torch.compile` (inductor; AOTAutograd compiles its backward too) and
the first step, which compiles, is timed apart (`compile_s`) before the 3 warm-up steps.

Models are timm `VisionTransformer`s with random weights; the backbone math is timm's own modules
(norm1, attn, mlp, ...), with timm's default attention path (`Attention.fused_attn` is True unless
TIMM_FUSED_ATTN=0 is set, i.e. F.scaled_dot_product_attention). Methods follow shared/METHOD.md:

  moppa        pre_attn placement, token router over heat/wave/poisson, rank r, route loss λ = 0.01,
               τ = 1, γ = 0, T = 1, scale 1. The 2-D DCT is done as matrix products, in one of two forms:
               `kron`: one product with K = C_H ⊗ C_W (N×N) over the token axis, Ẑ = K·Z and
               Y = Kᵀ·(G ⊙ Ẑ), the three priors filtered side by side in one (B, N, 3r) product;
               `separable`: C_H·Z·C_Wᵀ on (B, r, H, W), the three priors batched as (B, 3, r, H, W).
               `--dct auto` (default) takes whichever measured faster in eager PyTorch on CPU (fwd+bwd of
               the spectral part): kron for N ≤ 100 patch tokens (tiny, 8×8), separable above (ViT-B/16,
               14×14), where the N² Kronecker product costs more than the four small products.
  lora         rank r on the q and v slices of the fused qkv ((α/r)·B·A·x, α = r), unmerged.
  adaptformer  0.1 · up(ReLU(down(norm2(x_mid)))) beside the MLP, width r.
  linear       head only.   full: every parameter.

Frozen parameters have requires_grad=False. AdamW (lr 1e-4, betas (0.9, 0.999), eps 1e-8) over the
trainable parameters, weight decay 0.01 on 2-D parameters only (the Rust optimizer's rule); PyTorch's
`fused=True` AdamW kernel by default (fastest measured on CPU; `--adamw default` is PyTorch's own choice:
a per-tensor loop on CPU, foreach on CUDA).
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PRESETS = {
    "tiny": dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0,
                 num_classes=10),
    # timm vit_base_patch16_224 geometry
    "vit-b16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                    num_classes=100),
}
METHODS = ("moppa", "lora", "adaptformer", "linear", "full")


# ----------------------------------------------------------------------------------------------
# Constants (built in float64, then cast)
# ----------------------------------------------------------------------------------------------
def dct_matrix(n):
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    c = math.sqrt(2.0 / n) * torch.cos(math.pi * k * (i + 0.5) / n)
    c[0, :] = math.sqrt(1.0 / n)
    return c


def laplacian_eigs(h, w):
    n = torch.arange(h, dtype=torch.float64).unsqueeze(1)
    m = torch.arange(w, dtype=torch.float64).unsqueeze(0)
    return 4.0 * torch.sin(math.pi * n / (2 * h)) ** 2 + 4.0 * torch.sin(math.pi * m / (2 * w)) ** 2


def inv_softplus(v):
    return v + torch.log(-torch.expm1(-v))


# ----------------------------------------------------------------------------------------------
# Adapters
# ----------------------------------------------------------------------------------------------
class MoPPA(nn.Module):
    """All three priors, token router. Parameter names as shared/INTERFACES.md (and moppa_ref.py)."""

    def __init__(self, dim, rank, grid, prefix, dct="auto", route_weight=0.01, tau=1.0, gamma=0.0,
                 temperature=1.0, scale=1.0, dtype=torch.float32):
        super().__init__()
        H, W = grid
        if dct == "auto":
            dct = "kron" if H * W <= 100 else "separable"
        self.rank, self.grid, self.prefix, self.dct = rank, grid, prefix, dct
        self.tau, self.gamma, self.temperature, self.scale = tau, gamma, temperature, scale
        self.down = nn.Linear(dim, rank, bias=True, dtype=dtype)
        self.up = nn.Linear(rank, dim, bias=False, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        self.router = nn.Linear(dim, 3, bias=True, dtype=dtype)
        f = torch.zeros(1, dtype=torch.float64) if rank == 1 else \
            torch.arange(rank, dtype=torch.float64) / (rank - 1)
        self.kappa_raw = nn.Parameter(inv_softplus(10.0 ** (-2.0 + 2.0 * f)).to(dtype))
        self.c_raw = nn.Parameter(inv_softplus(0.25 + 1.25 * f).to(dtype))
        self.eps_raw = nn.Parameter(inv_softplus(10.0 ** (-1.0 + 2.0 * f)).to(dtype))
        self.source = nn.Parameter(torch.ones(H, W, dtype=dtype))
        ch, cw, lam = dct_matrix(H), dct_matrix(W), laplacian_eigs(H, W)
        k = torch.kron(ch, cw)  # (N, N): K[(n,m),(i,j)] = C_H[n,i] C_W[m,j], row-major grid
        self.register_buffer("K", k.to(dtype), persistent=False)
        self.register_buffer("Kt", k.t().contiguous().to(dtype), persistent=False)
        self.register_buffer("ch", ch.to(dtype), persistent=False)
        self.register_buffer("cwt", cw.t().contiguous().to(dtype), persistent=False)
        self.register_buffer("cht", ch.t().contiguous().to(dtype), persistent=False)
        self.register_buffer("cw", cw.to(dtype), persistent=False)
        self.register_buffer("lam_col", lam.reshape(-1, 1).to(dtype), persistent=False)  # (N, 1)
        self.register_buffer("sqrt_lam_col", lam.sqrt().reshape(-1, 1).to(dtype), persistent=False)

    def filters(self):
        """(N, 3, r): heat, wave, Poisson gains per grid frequency (row-major) and channel."""
        tau = self.tau
        lam, sq = self.lam_col, self.sqrt_lam_col
        heat = torch.exp(-(F.softplus(self.kappa_raw) * tau) * lam)
        wave = torch.cos((F.softplus(self.c_raw) * tau) * sq)
        if self.gamma != 0.0:
            wave = wave * torch.exp(-self.gamma * tau * sq)
        eps = F.softplus(self.eps_raw)
        poisson = self.source.reshape(-1, 1) * (eps / (lam + eps))
        return torch.stack([heat, wave, poisson], dim=1)

    def forward(self, h):
        """h (B, P+N, D) -> (out (B, P+N, D), alpha (B, N, 3))."""
        B, L, _ = h.shape
        P, r = self.prefix, self.rank
        N = L - P
        z = self.down(h)
        z_pre, z_pat = z[:, :P], z[:, P:]  # (B, N, r)
        g = self.filters()  # (N, 3, r)
        if self.dct == "kron":
            zh = torch.matmul(self.K, z_pat)  # (B, N, r)
            y3 = torch.matmul(self.Kt, (zh.unsqueeze(2) * g).reshape(B, N, 3 * r)).reshape(B, N, 3, r)
        else:  # separable C_H Z C_Wᵀ on (B, r, H, W)
            H, W = self.grid
            zg = z_pat.transpose(1, 2).reshape(B, 1, r, H, W)
            zh = self.ch @ zg @ self.cwt
            gg = g.permute(1, 2, 0).reshape(3, r, H, W)
            y = self.cht @ (gg * zh) @ self.cw  # (B, 3, r, H, W)
            y3 = y.reshape(B, 3, r, N).permute(0, 3, 1, 2)  # (B, N, 3, r)
        logits = self.router(h[:, P:])
        if self.temperature != 1.0:
            logits = logits / self.temperature
        alpha = torch.softmax(logits, dim=-1)  # (B, N, 3)
        y = (y3 * alpha.unsqueeze(-1)).sum(dim=2)  # (B, N, r)
        out = self.up(torch.cat([z_pre, y], dim=1))
        if self.scale != 1.0:
            out = out * self.scale
        return out, alpha


class LoRAPair(nn.Module):
    def __init__(self, dim, rank, dtype):
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, dim, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(dim, rank, dtype=dtype))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))


class LoRAQKV(nn.Module):
    """Replaces attn.qkv: base(x) with (α/r)·B·A·x added to the q and v slices (unmerged)."""

    def __init__(self, base, dim, rank, alpha=None, dtype=torch.float32):
        super().__init__()
        self.base = base
        self.q = LoRAPair(dim, rank, dtype)
        self.v = LoRAPair(dim, rank, dtype)
        self.dim = dim
        self.scaling = (rank if alpha is None else alpha) / rank

    def forward(self, x):
        out = self.base(x)
        dq = F.linear(F.linear(x, self.q.a), self.q.b)
        dv = F.linear(F.linear(x, self.v.a), self.v.b)
        if self.scaling != 1.0:
            dq, dv = dq * self.scaling, dv * self.scaling
        q, k, v = out.split(self.dim, dim=-1)
        return torch.cat([q + dq, k, v + dv], dim=-1)


class AdaptFormer(nn.Module):
    def __init__(self, dim, width, s_af=0.1, dtype=torch.float32):
        super().__init__()
        self.down = nn.Linear(dim, width, dtype=dtype)
        self.up = nn.Linear(width, dim, dtype=dtype)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.s_af = s_af

    def forward(self, h):
        return self.s_af * self.up(F.relu(self.down(h)))


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def build_vit(preset, dtype=torch.float32, **override):
    from timm.models.vision_transformer import VisionTransformer

    cfg = dict(PRESETS[preset]) if preset else {}
    cfg.update(override)
    vit = VisionTransformer(class_token=True, qkv_bias=True, global_pool="token", **cfg)
    return vit.to(dtype)


class BenchModel(nn.Module):
    def __init__(self, vit, method, rank=8, route_weight=0.01, dct="auto", dtype=torch.float32):
        super().__init__()
        assert method in METHODS, method
        self.vit, self.method, self.route_weight = vit, method, route_weight
        D, P = vit.embed_dim, vit.num_prefix_tokens
        grid = tuple(vit.patch_embed.grid_size)
        for p in vit.parameters():
            p.requires_grad_(method == "full")
        for p in vit.head.parameters():
            p.requires_grad_(True)
        self.moppa = nn.ModuleList()
        self.adaptformer = nn.ModuleList()
        for blk in vit.blocks:
            if method == "moppa":
                self.moppa.append(MoPPA(D, rank, grid, P, dct=dct, route_weight=route_weight, dtype=dtype))
            elif method == "lora":
                blk.attn.qkv = LoRAQKV(blk.attn.qkv, D, rank, dtype=dtype)
            elif method == "adaptformer":
                self.adaptformer.append(AdaptFormer(D, rank, dtype=dtype))

    def forward(self, images):
        """(logits, route_loss or None)."""
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        alphas = []
        if self.method == "moppa":
            for blk, ad in zip(vit.blocks, self.moppa):
                out, alpha = ad(blk.norm1(x))
                alphas.append(alpha)
                x = blk(x + out)
        elif self.method == "adaptformer":
            for blk, ad in zip(vit.blocks, self.adaptformer):
                x_mid = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
                h = blk.norm2(x_mid)
                x = x_mid + blk.drop_path2(blk.ls2(blk.mlp(h))) + ad(h)
        else:  # lora (qkv wrapped), linear, full: timm's own blocks
            x = vit.blocks(x)
        logits = vit.forward_head(vit.norm(x))
        route_loss = None
        if alphas:
            kls = []
            for a in alphas:
                abar = a.mean(dim=(0, 1))
                kls.append((abar * torch.log(3.0 * abar)).sum())
            route_loss = self.route_weight * torch.stack(kls).mean()
        return logits, route_loss


def make_optimizer(model, impl):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim == 2]
    no_decay = [p for p in params if p.ndim != 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {}
    if impl == "foreach":
        kw["foreach"] = True
    elif impl == "fused":
        kw["fused"] = True
    elif impl == "loop":
        kw["foreach"] = False
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, **kw)


def label(method, rank):
    return {"moppa": f"moppa r{rank}", "lora": f"lora r{rank}", "adaptformer": f"adaptformer r{rank}"}.get(
        method, method)


def upper_median(v):
    v = sorted(v)
    return v[len(v) // 2] if v else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--method", choices=METHODS, default="moppa")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: every usable core)")
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32",
                    help="bf16 = torch.autocast(bfloat16) on either device (on the CPU, like moppa bench "
                         "--dtype bf16, the linear layers' products run from bf16 operands)")
    ap.add_argument("--dct", choices=("auto", "kron", "separable"), default="auto",
                    help="MoPPA DCT form (auto: kron for N <= 100 patch tokens, else separable)")
    ap.add_argument("--adamw", choices=("default", "loop", "foreach", "fused"), default="fused",
                    help="AdamW implementation (default fused; 'default' = PyTorch's own choice)")
    ap.add_argument("--tf32", action="store_true",
                    help="CUDA: f32 matrix products on TF32 tensor cores (set_float32_matmul_precision('high')); "
                         "like moppa bench --tf32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile (inductor) over the forward and loss; the first step, which "
                         "compiles the forward and (AOTAutograd) the backward, is timed apart as compile_s")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.batch < 1 or a.steps < 1 or (a.threads is not None and a.threads < 1):
        ap.error("--batch, --steps and --threads must be >= 1")

    threads = a.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(a.seed)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False")
    dev = torch.device(a.device)
    if a.tf32:
        torch.set_float32_matmul_precision("high")
    bf16 = a.dtype == "bf16"

    vit = build_vit(a.preset)
    model = BenchModel(vit, a.method, rank=a.rank, dct=a.dct).to(dev).train()
    opt = make_optimizer(model, a.adamw)
    S, classes = PRESETS[a.preset]["img_size"], PRESETS[a.preset]["num_classes"]
    images = torch.randn(a.batch, 3, S, S, device=dev)
    labels = (torch.arange(a.batch) % classes).to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def forward_loss(images, labels):
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits, route = model(images)
            loss = F.cross_entropy(logits.float(), labels)
            if route is not None:
                loss = loss + route.float()
        return loss

    step_fn = torch.compile(forward_loss) if a.compile else forward_loss
    compile_s = None
    if a.compile:
        # The first call compiles the forward, its backward the backward: timed apart.
        t0 = time.perf_counter()
        step_fn(images, labels).backward()
        opt.zero_grad(set_to_none=True)
        sync()
        compile_s = time.perf_counter() - t0

    fwd, bwd, upd, tot = [], [], [], []
    for i in range(a.steps + 3):
        t0 = time.perf_counter()
        loss = step_fn(images, labels)
        loss.item()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if i >= 3:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            upd.append(t3 - t2)
            tot.append(t3 - t0)
    step = upper_median(tot)
    fused_attn = bool(getattr(vit.blocks[0].attn, "fused_attn", False))
    res = {
        "preset": a.preset,
        "method": label(a.method, a.rank),
        "batch": a.batch,
        "device": "cuda:0" if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "dtype": "bf16" if bf16 else "f32",
        "tf32": bool(a.tf32 and dev.type == "cuda"),
        "fwd_ms": 1e3 * upper_median(fwd),
        "bwd_ms": 1e3 * upper_median(bwd),
        "opt_ms": 1e3 * upper_median(upd),
        "step_ms": 1e3 * step,
        "img_per_s": a.batch / step,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "fused_attn": fused_attn,
        "dct": model.moppa[0].dct if a.method == "moppa" else None,
        "adamw": a.adamw,
        "compiled": bool(a.compile),
        "compile_s": compile_s,
        "torch": torch.__version__,
    }
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{res['preset']} {res['method']} batch {a.batch} on {res['device']} ({res['threads']} threads, "
              f"{res['dtype']}, torch {torch.__version__}, sdpa {fused_attn}, DCT {res.get('dct', '-')}, AdamW {a.adamw}"
              f"{', compiled in %.1f s' % compile_s if compile_s is not None else ', eager'})")
        print(f"  forward+loss {res['fwd_ms']:.2f} ms  backward {res['bwd_ms']:.2f} ms  "
              f"optimizer {res['opt_ms']:.2f} ms")
        print(f"  step {res['step_ms']:.2f} ms  {res['img_per_s']:.1f} img/s  trainable {res['trainable']:,}")


if __name__ == "__main__":
    main()
