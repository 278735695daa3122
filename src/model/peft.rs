//! The fine-tuning methods behind one [`MethodKind`] choice, injected into a frozen backbone:
//! MoPPA, LoRA, AdaptFormer, linear probe, full fine-tuning. The classifier head is always
//! trainable; frozen weights stay plain tensors (no gradient work), trainable ones are `Var`s.

use super::adaptformer::AdaptFormerUnit;
use super::error::{ModelError, Result};
use super::init::Init;
use super::lora::LoraUnit;
use super::moppa::{self, Live, MoppaUnit};
use super::ops::profile::section;
use super::ops::{self, Kernels};
use super::param;
use super::vit::Vit;
use crate::config::{Lockable, MethodConfig, MethodKind, Placement, Pool, Prior};
use crate::physics::tensor::SpectralGrid;
use candle_core::{Tensor, Var};

/// The adapter of one block.
#[derive(Debug)]
pub enum BlockAdapter {
    /// Nothing (linear probe, full fine-tuning).
    None,
    /// MoPPA.
    Moppa(MoppaUnit),
    /// LoRA on q and v.
    Lora(LoraUnit),
    /// AdaptFormer.
    AdaptFormer(AdaptFormerUnit),
}

/// A prior taken out of the mixture (METHOD.md "Prior ablation").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Removal {
    /// The prior.
    pub prior: Prior,
    /// The block it is removed from; `None`: every MoPPA block.
    pub block: Option<usize>,
}

/// A trainable classifier head.
#[derive(Debug)]
pub struct Head {
    /// `(classes, D)`.
    pub w: Var,
    /// `(classes)`.
    pub b: Var,
}

/// Per-block router output of one forward pass (detached, for display and `moppa infer`).
#[derive(Debug, Clone)]
pub struct BlockRouting {
    /// Block index.
    pub block: usize,
    /// α of the patch tokens: `(B, HW, k)`, `(B, 1, k)` or `(1, 1, k)`.
    pub alpha: Tensor,
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct Forward {
    /// `(B, classes)`.
    pub logits: Tensor,
    /// `λ · mean_l KL(ᾱ_l ‖ U_k)` (MoPPA with ≥ 2 priors), a scalar tensor.
    pub route_loss: Option<Tensor>,
    /// Router weights per MoPPA block (when asked for).
    pub routing: Vec<BlockRouting>,
}

/// A backbone with one method injected and a new head.
#[derive(Debug)]
pub struct PeftModel {
    /// The backbone (frozen unless the method is `full`).
    pub backbone: Vit,
    /// The method and its hyper-parameters.
    pub method: MethodConfig,
    /// Class names of the task.
    pub classes: Vec<String>,
    /// Live-settable hyper-parameters.
    pub live: Live,
    /// One adapter per block.
    pub adapters: Vec<BlockAdapter>,
    /// The head.
    pub head: Head,
    /// A second head for distilled backbones (logits averaged).
    pub head_dist: Option<Head>,
    /// DCT constants of the token grid.
    pub grid: SpectralGrid,
    vars: Vec<(String, Var)>,
}

impl PeftModel {
    /// Injects `method` into `backbone` for a task with `classes`, initialising with `seed`.
    pub fn new(mut backbone: Vit, method: MethodConfig, classes: Vec<String>, seed: u64) -> Result<Self> {
        method.validate().map_err(ModelError::Config)?;
        if classes.is_empty() {
            return Err(ModelError::Config("the task has no classes".into()));
        }
        let device = backbone.device().clone();
        let dtype = backbone.dtype();
        // Master weights of adapters and head: f32 under a half-precision backbone (cast to the
        // compute dtype in forward), else the backbone's own dtype (f64 for gradient checks).
        let master = if matches!(dtype, candle_core::DType::BF16 | candle_core::DType::F16) {
            candle_core::DType::F32
        } else {
            dtype
        };
        let mut init = Init::new(seed, &device, master);
        let d = backbone.cfg.embed_dim;
        let g = backbone.grid();
        let mut vars = Vec::new();
        if method.method == MethodKind::Full {
            vars.extend(backbone.make_trainable()?);
        }
        let mut adapters = Vec::with_capacity(backbone.depth());
        for i in 0..backbone.depth() {
            let a = match method.method {
                MethodKind::Moppa => BlockAdapter::Moppa(MoppaUnit::new(d, (g, g), &method, &mut init)?),
                MethodKind::Lora => BlockAdapter::Lora(LoraUnit::new(
                    d,
                    method.rank,
                    method.lora_alpha.unwrap_or(method.rank as f64),
                    &mut init,
                )?),
                MethodKind::Adaptformer => BlockAdapter::AdaptFormer(AdaptFormerUnit::new(d, method.rank, &mut init)?),
                MethodKind::Linear | MethodKind::Full => BlockAdapter::None,
            };
            vars.extend(adapter_vars(i, &a));
            adapters.push(a);
        }
        let n = classes.len();
        let head = Head {
            w: init.kaiming_uniform(n, d)?,
            b: init.zeros(&[n])?,
        };
        vars.push(("head.weight".into(), head.w.clone()));
        vars.push(("head.bias".into(), head.b.clone()));
        let head_dist = if backbone.cfg.dist_token && backbone.cfg.pool == Pool::Token {
            let h = Head {
                w: init.kaiming_uniform(n, d)?,
                b: init.zeros(&[n])?,
            };
            vars.push(("head_dist.weight".into(), h.w.clone()));
            vars.push(("head_dist.bias".into(), h.b.clone()));
            Some(h)
        } else {
            None
        };
        let grid = SpectralGrid::new(g, g, dtype, &device)?;
        Ok(Self {
            live: Live::from_config(&method),
            backbone,
            method,
            classes,
            adapters,
            head,
            head_dist,
            grid,
            vars,
        })
    }

    /// Which op implementations run (the backbone's and the adapters').
    #[must_use]
    pub fn kernels(&self) -> Kernels {
        self.backbone.kernels
    }

    /// Every trainable tensor with its checkpoint name (full fine-tuning: block halves as
    /// `blocks.{i}.attn_half` / `mlp_half`).
    #[must_use]
    pub fn trainable(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Number of trainable scalars (placeholders of absent optional backbone tensors excluded).
    #[must_use]
    pub fn num_trainable(&self) -> usize {
        let (al, ml) = self.backbone.layouts();
        self.vars
            .iter()
            .map(|(name, v)| {
                v.elem_count()
                    - if name.ends_with("_half") {
                        phantom_of(name, al, ml)
                    } else {
                        0
                    }
            })
            .sum()
    }

    /// Block `block`'s MoPPA unit, if it has one.
    #[must_use]
    pub fn moppa_unit(&self, block: usize) -> Option<&MoppaUnit> {
        match self.adapters.get(block) {
            Some(BlockAdapter::Moppa(u)) => Some(u),
            _ => None,
        }
    }

    /// The blocks that carry a MoPPA unit, in order.
    #[must_use]
    pub fn moppa_blocks(&self) -> Vec<usize> {
        (0..self.adapters.len())
            .filter(|&b| self.moppa_unit(b).is_some())
            .collect()
    }

    /// The optimizer name of a lockable tensor of block `block` (`blocks.{b}.moppa.kappa_raw`),
    /// when that block's unit has it.
    #[must_use]
    pub fn lock_name(&self, block: usize, what: Lockable) -> Option<String> {
        let unit = self.moppa_unit(block)?;
        unit.lockable(what)?;
        Some(format!("{}.{}", moppa::prefix(block), MoppaUnit::tensor_name(what)))
    }

    /// Forward pass. `want_routing` keeps each block's α (detached) for display.
    pub fn forward(&self, images: &Tensor, want_routing: bool) -> Result<Forward> {
        self.forward_removing(images, want_routing, None)
    }

    /// [`Self::forward`] with `removal`'s prior taken out of its MoPPA blocks (METHOD.md
    /// "Prior ablation"); the route loss is then that of the changed routing.
    pub fn forward_removing(&self, images: &Tensor, want_routing: bool, removal: Option<Removal>) -> Result<Forward> {
        let x = self.backbone.embed(images)?;
        self.forward_from(x, 0, want_routing, removal, None)
    }

    /// The tokens entering block 0.
    pub fn embed(&self, images: &Tensor) -> Result<Tensor> {
        self.backbone.embed(images)
    }

    /// The rest of a forward pass from the tokens `x` entering block `from`. `inputs`, when
    /// given, receives the tokens entering each block from `from` on (what a later pass from
    /// any of them starts with).
    pub fn forward_from(
        &self,
        mut x: Tensor,
        from: usize,
        want_routing: bool,
        removal: Option<Removal>,
        mut inputs: Option<&mut Vec<Tensor>>,
    ) -> Result<Forward> {
        let k = self.kernels();
        let vit = &self.backbone;
        let grad = vit.grad_enabled();
        let prefix = vit.cfg.prefix_tokens;
        let mut kls = Vec::new();
        let mut routing = Vec::new();
        for (i, adapter) in self.adapters.iter().enumerate().skip(from) {
            if let Some(v) = inputs.as_deref_mut() {
                v.push(x.clone());
            }
            match adapter {
                BlockAdapter::None => {
                    x = vit.attn(i, &x, None)?;
                    x = vit.mlp(i, &x, None)?;
                }
                BlockAdapter::Lora(u) => {
                    x = vit.attn(i, &x, Some(&u.weights(grad, x.dtype())?))?;
                    x = vit.mlp(i, &x, None)?;
                }
                BlockAdapter::AdaptFormer(u) => {
                    x = vit.attn(i, &x, None)?;
                    x = vit.mlp(i, &x, Some(&u.weights(grad, x.dtype())?))?;
                }
                BlockAdapter::Moppa(u) => {
                    let run = |h: &Tensor| {
                        section("moppa fwd", h.device(), || {
                            let remove = removal.filter(|r| r.block.is_none_or(|b| b == i)).map(|r| r.prior);
                            u.forward(h, &self.grid, prefix, &self.live, k, grad, remove)
                        })
                    };
                    let res = match self.method.placement {
                        Placement::PreAttn => {
                            let res = run(&vit.norm1(i, &x)?)?;
                            x = (&x + &res.out)?;
                            x = vit.attn(i, &x, None)?;
                            x = vit.mlp(i, &x, None)?;
                            res
                        }
                        Placement::ParallelMlp => {
                            x = vit.attn(i, &x, None)?;
                            let res = run(&vit.norm2(i, &x)?)?;
                            x = (vit.mlp(i, &x, None)? + &res.out)?;
                            res
                        }
                    };
                    if let Some(kl) = res.route_kl {
                        kls.push(kl);
                    }
                    if want_routing && let Some(a) = res.alpha {
                        routing.push(BlockRouting {
                            block: i,
                            alpha: a.detach(),
                        });
                    }
                }
            }
        }
        let (pooled, dist) = vit.pool(&x)?;
        let mut logits = ops::linear(
            k,
            &pooled,
            &param(&self.head.w, grad, pooled.dtype())?,
            &param(&self.head.b, grad, pooled.dtype())?,
        )?;
        if let (Some(hd), Some(f)) = (&self.head_dist, dist) {
            let l2 = ops::linear(k, &f, &param(&hd.w, grad, f.dtype())?, &param(&hd.b, grad, f.dtype())?)?;
            logits = ((logits + l2)? * 0.5)?;
        }
        let route_loss = if kls.is_empty() {
            None
        } else {
            let n = kls.len() as f64;
            Some((Tensor::stack(&kls, 0)?.sum_all()? * (self.live.route_weight / n))?)
        };
        Ok(Forward {
            logits,
            route_loss,
            routing,
        })
    }
}

impl super::GradMode for PeftModel {
    fn set_grad_enabled(&self, on: bool) {
        self.backbone.set_grad_enabled(on);
    }
}

fn phantom_of(name: &str, al: &super::ops::HalfLayout, ml: &super::ops::HalfLayout) -> usize {
    let lay = if name.ends_with("attn_half") { al } else { ml };
    lay.slots
        .iter()
        .filter(|s| !s.present)
        .map(super::ops::layout::Slot::len)
        .sum()
}

/// The named variables of block `i`'s adapter.
#[must_use]
pub fn adapter_vars(i: usize, a: &BlockAdapter) -> Vec<(String, Var)> {
    match a {
        BlockAdapter::None => Vec::new(),
        BlockAdapter::Moppa(u) => u.named_vars(&moppa::prefix(i)),
        BlockAdapter::Lora(u) => u.named_vars(&format!("blocks.{i}.lora")),
        BlockAdapter::AdaptFormer(u) => u.named_vars(&format!("blocks.{i}.adaptformer")),
    }
}

/// Mean cross-entropy of logits `(B, C)` against integer labels `(B)` (u32), differentiable,
/// built from primitives that have a backward pass.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
    let max = logits.max_keepdim(1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
    let logp = shifted.broadcast_sub(&lse)?;
    let picked = logp.gather(&labels.unsqueeze(1)?, 1)?;
    picked.mean_all()?.neg()
}
