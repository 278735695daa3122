//! A timm-compatible Vision Transformer (Dosovitskiy et al., arXiv 2010.11929): ViT-Ti/S/B/L, any
//! patch and image size (position embeddings resampled as timm does), class / register /
//! distillation tokens, token or average pooling, `norm_pre`, `fc_norm`, layer scale, optional
//! qkv bias. [`timm`] maps timm's tensor names both ways, [`init`] makes random backbones.
//!
//! Each block's weights live in two flat buffers (attention half, MLP half; see
//! `ops::layout`), run by fused ops on the CPU and by lean or composite candle ops elsewhere.

mod infer;
mod init;
pub mod timm;

use super::error::{ModelError, Result};
use super::ops::{self, HalfLayout, Kernels, layout};
use crate::config::{Pool, Precision, VitConfig};
use candle_core::{DType, Device, Tensor, Var};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
pub use timm::{BACKBONE_META_KEY, BackboneFileMeta, Part, write_backbone};

/// Choices the file cannot make for a foreign (timm) checkpoint.
#[derive(Clone, Debug, Default)]
pub struct BackboneOptions {
    /// Number of heads (timm files do not record it; default D/64).
    pub heads: Option<usize>,
    /// Run at another image size (position embeddings are resampled).
    pub img_size: Option<usize>,
    /// Override the pooling.
    pub pool: Option<Pool>,
}

/// One transformer block: two flat weight buffers.
#[derive(Clone, Debug)]
pub struct BlockWeights {
    /// Attention half (`norm1`, `attn.qkv`, `attn.proj`, `ls1`).
    pub attn: Tensor,
    /// MLP half (`norm2`, `mlp.fc1`, `mlp.fc2`, `ls2`).
    pub mlp: Tensor,
}

/// Where the backbone came from: a file (with its sha256) or random weights.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackboneSource {
    /// The file, if any.
    pub path: Option<PathBuf>,
    /// sha256 of the file (empty for random weights).
    pub sha256: String,
}

/// The backbone.
#[derive(Debug)]
pub struct Vit {
    /// Architecture.
    pub cfg: VitConfig,
    /// Provenance.
    pub source: BackboneSource,
    /// Which op implementations to use.
    pub kernels: Kernels,
    /// The tensors outside the blocks, by [`Part`].
    parts: timm::Parts,
    blocks: Vec<BlockWeights>,
    attn_layout: Arc<HalfLayout>,
    mlp_layout: Arc<HalfLayout>,
    grad: AtomicBool,
    /// The dtype the forward pass computes in (trainable weights may be f32 masters of it).
    compute: DType,
}

impl Vit {
    /// A tensor outside the blocks, if this architecture has it.
    #[must_use]
    pub fn part(&self, p: Part) -> Option<&Tensor> {
        self.parts[p as usize].as_ref()
    }

    fn need(&self, p: Part) -> Result<&Tensor> {
        self.part(p)
            .ok_or_else(|| ModelError::Config(format!("the backbone has no {}", p.timm_name())))
    }

    /// The backbone for a run at `precision` on its device: bf16 weights and activations on a GPU;
    /// on the CPU f32 weights and activations with the fused halves' products with weights
    /// formed from bf16 operands ([`Kernels::Bf16`], when the kernels are `Auto`).
    pub fn with_precision(self, precision: Precision) -> Result<Self> {
        if precision != Precision::Bf16 {
            return Ok(self);
        }
        if !self.device().is_cpu() {
            return self.to_dtype(DType::BF16);
        }
        let kernels = if self.kernels == Kernels::Auto {
            Kernels::Bf16
        } else {
            self.kernels
        };
        Ok(Self { kernels, ..self })
    }

    /// The same backbone with every weight in `dtype` (f64 for gradient checks, bf16 on GPUs).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let mut parts: timm::Parts = Default::default();
        for (to, from) in parts.iter_mut().zip(&self.parts) {
            *to = from.as_ref().map(|t| t.to_dtype(dtype)).transpose()?;
        }
        Ok(Self {
            cfg: self.cfg.clone(),
            source: self.source.clone(),
            kernels: self.kernels,
            parts,
            blocks: self
                .blocks
                .iter()
                .map(|b| {
                    Ok(BlockWeights {
                        attn: b.attn.to_dtype(dtype)?,
                        mlp: b.mlp.to_dtype(dtype)?,
                    })
                })
                .collect::<candle_core::Result<_>>()?,
            attn_layout: self.attn_layout.clone(),
            mlp_layout: self.mlp_layout.clone(),
            grad: AtomicBool::new(self.grad_enabled()),
            compute: dtype,
        })
    }

    /// Whether forward passes build a graph for gradients (false: evaluation).
    #[must_use]
    pub fn grad_enabled(&self) -> bool {
        self.grad.load(Ordering::Relaxed)
    }

    /// Switches gradient tracking of the weights on or off.
    pub fn set_grad_enabled(&self, on: bool) {
        self.grad.store(on, Ordering::Relaxed);
    }

    /// A weight as the forward pass uses it: in the compute dtype (a differentiable cast of an
    /// f32 master weight), detached when gradients are off.
    fn p(&self, t: &Tensor) -> Result<Tensor> {
        let t = if t.dtype() == self.compute {
            t.clone()
        } else {
            t.to_dtype(self.compute)?
        };
        Ok(if self.grad_enabled() { t } else { t.detach() })
    }

    /// The dtype the backbone computes in (its weights', or what f32 master weights are cast to).
    #[must_use]
    pub fn dtype(&self) -> DType {
        self.compute
    }

    /// The device the weights live on.
    #[must_use]
    pub fn device(&self) -> &Device {
        self.part(Part::PatchW).map_or(&Device::Cpu, Tensor::device)
    }

    /// Number of blocks.
    #[must_use]
    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// Whether the backbone has its own classifier head.
    #[must_use]
    pub fn has_head(&self) -> bool {
        self.part(Part::HeadW).is_some()
    }

    /// Patch-grid side.
    #[must_use]
    pub fn grid(&self) -> usize {
        self.cfg.grid()
    }

    /// Turns every weight into a trainable `Var` (full fine-tuning); returns them with their names.
    /// Block halves are named `blocks.{i}.attn_half` / `blocks.{i}.mlp_half`. Under a bf16/f16
    /// backbone the `Var`s are f32 master weights, cast to the compute dtype in the forward pass.
    pub fn make_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        let master = match self.compute {
            DType::BF16 | DType::F16 => DType::F32,
            other => other,
        };
        let mut out = Vec::new();
        let mut var = |name: String, t: &mut Tensor| -> Result<()> {
            let v = Var::from_tensor(&t.to_dtype(master)?)?;
            *t = v.as_tensor().clone();
            out.push((name, v));
            Ok(())
        };
        for part in Part::ALL.into_iter().filter(|p| !p.is_head()) {
            if let Some(t) = &mut self.parts[part as usize] {
                var(part.timm_name().into(), t)?;
            }
        }
        for (i, b) in self.blocks.iter_mut().enumerate() {
            var(format!("blocks.{i}.attn_half"), &mut b.attn)?;
            var(format!("blocks.{i}.mlp_half"), &mut b.mlp)?;
        }
        Ok(out)
    }

    /// The layouts of the two halves of every block.
    #[must_use]
    pub fn layouts(&self) -> (&HalfLayout, &HalfLayout) {
        (self.attn_layout.as_ref(), self.mlp_layout.as_ref())
    }

    /// Patch embedding, prefix tokens, position embeddings and `norm_pre`: `(B, 3, S, S)` →
    /// `(B, T, D)`.
    pub fn embed(&self, images: &Tensor) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (g, d) = (cfg.grid(), cfg.embed_dim);
        let (patches, b) = self.patches(images)?;
        let x = self.project_patches(&patches)?.reshape((b, g * g, d))?;
        let mut prefix: Vec<Tensor> = Vec::new();
        for t in [Part::ClsToken, Part::DistToken, Part::RegToken]
            .into_iter()
            .filter_map(|p| self.part(p))
        {
            prefix.push(self.p(t)?.broadcast_as((b, t.dim(1)?, d))?.contiguous()?);
        }
        let pos = self.p(self.need(Part::PosEmbed)?)?;
        let x = if cfg.no_embed_class {
            let x = x.broadcast_add(&pos)?;
            prefix.push(x);
            Tensor::cat(&prefix, 1)?
        } else {
            prefix.push(x);
            Tensor::cat(&prefix, 1)?.broadcast_add(&pos)?
        };
        self.norm_pre(&x)
    }

    /// The images as rows of patch pixels, `(B·N, C·p·p)` in timm's order, and `B`.
    fn patches(&self, images: &Tensor) -> Result<(Tensor, usize)> {
        let cfg = &self.cfg;
        let (b, c, h, w) = images.dims4()?;
        if c != cfg.in_chans || h != cfg.img_size || w != cfg.img_size {
            return Err(ModelError::Config(format!(
                "images are {c}×{h}×{w}, the backbone expects {}×{}×{}",
                cfg.in_chans, cfg.img_size, cfg.img_size
            )));
        }
        let (p, g) = (cfg.patch_size, cfg.grid());
        let rows = images
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * g * g, c * p * p))?;
        Ok((rows, b))
    }

    /// The patch embedding of rows of patch pixels.
    fn project_patches(&self, patches: &Tensor) -> Result<Tensor> {
        let w = self.p(self.need(Part::PatchW)?)?;
        Ok(match self.part(Part::PatchB) {
            Some(bias) => ops::linear(self.kernels, patches, &w, &self.p(bias)?)?,
            None => ops::linear_no_bias(self.kernels, patches, &w)?,
        })
    }

    /// LayerNorm by the parts `w`, `b`; the identity when the backbone has no such norm.
    fn norm_by(&self, x: &Tensor, w: Part, b: Part) -> Result<Tensor> {
        Ok(match (self.part(w), self.part(b)) {
            (Some(w), Some(b)) => ops::layer_norm(self.kernels, x, &self.p(w)?, &self.p(b)?, self.cfg.ln_eps)?,
            _ => x.clone(),
        })
    }

    fn norm_pre(&self, x: &Tensor) -> Result<Tensor> {
        self.norm_by(x, Part::NormPreW, Part::NormPreB)
    }

    /// Masked-autoencoder encoder input: the patch embedding with position embeddings of the
    /// patches at `keep` (`B·K` flat indices `b·N + n` into the `B × N` patch grid, `u32`),
    /// after the class token (with its own position embedding) and `norm_pre`: `(B, 1 + K, D)`.
    /// Only for a ViT whose single prefix token is a class token with a position embedding.
    pub fn embed_visible(&self, images: &Tensor, keep: &Tensor, k: usize) -> Result<Tensor> {
        let cfg = &self.cfg;
        if !cfg.class_token || cfg.prefix_tokens != 1 || cfg.no_embed_class {
            return Err(ModelError::Config(
                "masked pretraining needs a ViT with a class token and no other prefix tokens".into(),
            ));
        }
        let (n, d) = (cfg.grid() * cfg.grid(), cfg.embed_dim);
        let (patches, b) = self.patches(images)?;
        let pos = self.p(self.need(Part::PosEmbed)?)?.reshape((n + 1, d))?;
        let pos_patch = pos.narrow(0, 1, n)?.repeat((b, 1))?.index_select(keep, 0)?;
        let x = (self.project_patches(&patches.index_select(keep, 0)?)? + pos_patch)?.reshape((b, k, d))?;
        let cls = (self.p(self.need(Part::ClsToken)?)?.reshape((1, d))? + pos.narrow(0, 0, 1)?)?
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?
            .contiguous()?;
        self.norm_pre(&Tensor::cat(&[&cls, &x], 1)?)
    }

    /// Adds the position embeddings to a full token sequence `(B, T, D)` (an MAE decoder's).
    pub fn add_pos_embed(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_add(&self.p(self.need(Part::PosEmbed)?)?)?)
    }

    /// The final norm over every token (identity when the backbone has none).
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm_by(x, Part::NormW, Part::NormB)
    }

    /// `norm1` of block `i`.
    pub fn norm1(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        self.half_norm(&self.blocks[i].attn, &self.attn_layout, x)
    }

    /// `norm2` of block `i`.
    pub fn norm2(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        self.half_norm(&self.blocks[i].mlp, &self.mlp_layout, x)
    }

    fn half_norm(&self, w: &Tensor, lay: &HalfLayout, x: &Tensor) -> Result<Tensor> {
        let w = self.p(w)?;
        let g = ops::composite::slot(&w, lay, layout::NORM_W)?;
        let b = ops::composite::slot(&w, lay, layout::NORM_B)?;
        Ok(ops::layer_norm(self.kernels, x, &g, &b, self.cfg.ln_eps)?)
    }

    /// The attention half of block `i`, with LoRA on q and v when given.
    pub fn attn(&self, i: usize, x: &Tensor, lora: Option<&ops::LoraWeights>) -> Result<Tensor> {
        let w = self.p(&self.blocks[i].attn)?;
        let (lay, heads, eps) = (&self.attn_layout, self.cfg.num_heads, self.cfg.ln_eps);
        Ok(match lora {
            Some(l) => ops::attn_half_lora(self.kernels, x, &w, lay, l, heads, eps)?,
            None => ops::attn_half(self.kernels, x, &w, lay, None, heads, eps)?,
        })
    }

    /// The MLP half of block `i`, with AdaptFormer beside it when given.
    pub fn mlp(&self, i: usize, x: &Tensor, adapter: Option<&ops::AdaptFormerWeights>) -> Result<Tensor> {
        let w = self.p(&self.blocks[i].mlp)?;
        let (lay, hidden, eps, act) = (&self.mlp_layout, self.cfg.mlp_hidden(), self.cfg.ln_eps, self.cfg.act);
        Ok(match adapter {
            Some(a) => ops::mlp_half_adaptformer(self.kernels, x, &w, lay, hidden, eps, act, a)?,
            None => ops::mlp_half(self.kernels, x, &w, lay, hidden, eps, act)?,
        })
    }

    /// Final norm, pooling and `fc_norm`: `(B, T, D)` → `(B, D)`; for distilled backbones also
    /// the distillation token's feature.
    pub fn pool(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let x = self.final_norm(x)?;
        let prefix = self.cfg.prefix_tokens;
        let pooled = match self.cfg.pool {
            Pool::Token => x.narrow(1, 0, 1)?.squeeze(1)?,
            Pool::Avg => {
                let n = x.dim(1)? - prefix;
                x.narrow(1, prefix, n)?.mean(1)?
            }
        };
        let pooled = self.norm_by(&pooled, Part::FcNormW, Part::FcNormB)?;
        let dist = if self.cfg.dist_token && self.cfg.pool == Pool::Token {
            Some(x.narrow(1, 1, 1)?.squeeze(1)?)
        } else {
            None
        };
        Ok((pooled, dist))
    }

    /// The backbone's own classifier on pooled features (distilled: the mean of both heads).
    pub fn own_logits(&self, pooled: &Tensor, dist: Option<&Tensor>) -> Result<Option<Tensor>> {
        let (Some(w), Some(b)) = (self.part(Part::HeadW), self.part(Part::HeadB)) else {
            return Ok(None);
        };
        let y = ops::linear(self.kernels, pooled, &self.p(w)?, &self.p(b)?)?;
        match (self.part(Part::HeadDistW), self.part(Part::HeadDistB), dist) {
            (Some(w), Some(b), Some(f)) => {
                let y2 = ops::linear(self.kernels, f, &self.p(w)?, &self.p(b)?)?;
                Ok(Some(((y + y2)? * 0.5)?))
            }
            _ => Ok(Some(y)),
        }
    }

    /// Logits of the backbone alone (its own head).
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let mut x = self.embed(images)?;
        for i in 0..self.depth() {
            x = self.attn(i, &x, None)?;
            x = self.mlp(i, &x, None)?;
        }
        let (pooled, dist) = self.pool(&x)?;
        self.own_logits(&pooled, dist.as_ref())?
            .ok_or_else(|| ModelError::Config("the backbone has no classifier head".into()))
    }

    /// Replaces the backbone's own head (pretraining writes it into the backbone file).
    pub fn set_head(&mut self, w: Tensor, b: Tensor) {
        self.cfg.num_classes = b.elem_count();
        self.parts[Part::HeadW as usize] = Some(w);
        self.parts[Part::HeadB as usize] = Some(b);
    }
}
