//! A timm-compatible Vision Transformer (Dosovitskiy et al., arXiv 2010.11929), loading timm's
//! own tensor names from safetensors: ViT-Ti/S/B/L, any patch and image size (position
//! embeddings resampled as timm does), class / register / distillation tokens, token or average
//! pooling, `norm_pre`, `fc_norm`, layer scale, optional qkv bias.
//!
//! Each block's weights live in two flat buffers (attention half, MLP half; see
//! `ops::layout`), run by fused ops on the CPU and by composite candle ops elsewhere.

use super::config::{Pool, VitConfig};
use super::error::{ModelError, Result};
use super::ops::{self, HalfLayout, Kernels, layout};
use super::resample::resample_grid;
use super::tensor_file::{HostTensor, TensorFile};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng as _, SeedableRng as _};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Metadata key of our backbone files: the [`VitConfig`] as JSON.
pub const BACKBONE_META_KEY: &str = "moppa.backbone";

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

/// A LayerNorm's parameters.
#[derive(Clone, Debug)]
pub struct Norm {
    /// Gain γ.
    pub w: Tensor,
    /// Bias β.
    pub b: Tensor,
}

/// A linear layer's parameters (timm orientation: `(out, in)`).
#[derive(Clone, Debug)]
pub struct Linear {
    /// Weight `(out, in)`.
    pub w: Tensor,
    /// Bias `(out)`.
    pub b: Tensor,
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
    patch_w: Tensor,
    patch_b: Option<Tensor>,
    cls_token: Option<Tensor>,
    reg_token: Option<Tensor>,
    dist_token: Option<Tensor>,
    pos_embed: Tensor,
    norm_pre: Option<Norm>,
    blocks: Vec<BlockWeights>,
    norm: Option<Norm>,
    fc_norm: Option<Norm>,
    head: Option<Linear>,
    head_dist: Option<Linear>,
    attn_layout: Arc<HalfLayout>,
    mlp_layout: Arc<HalfLayout>,
    grad: AtomicBool,
    /// The dtype the forward pass computes in (trainable weights may be f32 masters of it).
    compute: DType,
}

fn err_cfg(path: &Path, msg: impl std::fmt::Display) -> ModelError {
    ModelError::Format {
        path: path.to_owned(),
        msg: msg.to_string(),
    }
}

fn is_square(n: usize) -> Option<usize> {
    let r = (n as f64).sqrt().round() as usize;
    (r * r == n).then_some(r)
}

/// Infers the architecture of a foreign timm file from its tensor shapes.
fn infer_config(tf: &TensorFile, opts: &BackboneOptions) -> Result<VitConfig> {
    let path = &tf.path;
    let pw = tf.get("patch_embed.proj.weight")?;
    let [d, c, p, p2] = pw.shape[..] else {
        return Err(err_cfg(
            path,
            format!(
                "patch_embed.proj.weight has shape {:?}, expected (D, C, p, p)",
                pw.shape
            ),
        ));
    };
    if p != p2 {
        return Err(err_cfg(path, "non-square patches are not supported"));
    }
    let depth = (0..=tf.tensors.len())
        .take_while(|i| tf.has(&format!("blocks.{i}.norm1.weight")))
        .count();
    let hidden = tf.get("blocks.0.mlp.fc1.weight")?.shape.first().copied().unwrap_or(0);
    let reg_tokens = tf
        .tensors
        .get("reg_token")
        .map_or(0, |t| t.shape.get(1).copied().unwrap_or(0));
    let class_token = tf.has("cls_token");
    let dist_token = tf.has("dist_token");
    let prefix = usize::from(class_token) + reg_tokens + usize::from(dist_token);
    let npos = tf.get("pos_embed")?.shape.get(1).copied().unwrap_or(0);
    let (grid, no_embed_class) = match (npos.checked_sub(prefix).and_then(is_square), is_square(npos)) {
        (Some(g), _) => (g, false),
        (None, Some(g)) => (g, true),
        _ => {
            return Err(err_cfg(
                path,
                format!("pos_embed covers {npos} tokens: not a square grid (+{prefix} prefix tokens)"),
            ));
        }
    };
    let heads = match opts.heads {
        Some(h) => h,
        None if d % 64 == 0 => d / 64,
        None => {
            return Err(ModelError::Config(format!(
                "{}: the file does not record the number of heads and D = {d} is not a multiple of 64; pass --heads",
                path.display()
            )));
        }
    };
    let fc_norm = tf.has("fc_norm.weight");
    Ok(VitConfig {
        img_size: grid * p,
        patch_size: p,
        in_chans: c,
        embed_dim: d,
        depth,
        num_heads: heads,
        mlp_ratio: hidden as f64 / d as f64,
        qkv_bias: tf.has("blocks.0.attn.qkv.bias"),
        class_token,
        reg_tokens,
        dist_token,
        no_embed_class,
        pool: if fc_norm { Pool::Avg } else { Pool::Token },
        fc_norm,
        final_norm: tf.has("norm.weight"),
        norm_pre: tf.has("norm_pre.weight"),
        layer_scale: tf.has("blocks.0.ls1.gamma"),
        patch_bias: tf.has("patch_embed.proj.bias"),
        num_classes: tf.tensors.get("head.weight").map_or(0, |t| t.shape[0]),
        prefix_tokens: prefix,
        ..VitConfig::tiny()
    })
}

impl Vit {
    /// Loads a backbone file: ours (config in the metadata) or timm's (config inferred).
    pub fn from_file(path: &Path, opts: &BackboneOptions, device: &Device) -> Result<Self> {
        let tf = TensorFile::read(path)?;
        Self::from_tensor_file(&tf, opts, device)
    }

    /// Builds from decoded tensors; every tensor must be known and of the right shape.
    pub fn from_tensor_file(tf: &TensorFile, opts: &BackboneOptions, device: &Device) -> Result<Self> {
        let path = tf.path.clone();
        let mut cfg = match tf.metadata.get(BACKBONE_META_KEY) {
            Some(json) => serde_json::from_str::<VitConfig>(json)
                .map_err(|e| err_cfg(&path, format!("bad {BACKBONE_META_KEY} metadata: {e}")))?,
            None => infer_config(tf, opts)?,
        };
        if let Some(h) = opts.heads {
            cfg.num_heads = h;
        }
        if let Some(p) = opts.pool {
            cfg.pool = p;
        }
        let file_grid = cfg.grid();
        if let Some(s) = opts.img_size {
            cfg.img_size = s;
        }
        cfg.prefix_tokens = cfg.derived_prefix_tokens();
        cfg.validate().map_err(|e| err_cfg(&path, e))?;
        let mut known: Vec<String> = Vec::new();
        let mut take = |name: &str, shape: &[usize]| -> Result<HostTensor> {
            known.push(name.to_owned());
            tf.get_shaped(name, shape).cloned()
        };
        let (d, p, c) = (cfg.embed_dim, cfg.patch_size, cfg.in_chans);
        let prefix = cfg.prefix_tokens;
        let mut patch_w = take("patch_embed.proj.weight", &[d, c, p, p])?;
        patch_w.shape = vec![d, c * p * p];
        let patch_b = cfg
            .patch_bias
            .then(|| take("patch_embed.proj.bias", &[d]))
            .transpose()?;
        let cls = cfg.class_token.then(|| take("cls_token", &[1, 1, d])).transpose()?;
        let reg = (cfg.reg_tokens > 0)
            .then(|| take("reg_token", &[1, cfg.reg_tokens, d]))
            .transpose()?;
        let dist = cfg.dist_token.then(|| take("dist_token", &[1, 1, d])).transpose()?;
        let pos_prefix = if cfg.no_embed_class { 0 } else { prefix };
        let mut pos = take("pos_embed", &[1, pos_prefix + file_grid * file_grid, d])?;
        let grid = cfg.grid();
        if grid != file_grid {
            let (head, body) = pos.data.split_at(pos_prefix * d);
            let mut data = head.to_vec();
            data.extend(resample_grid(body, d, (file_grid, file_grid), (grid, grid)));
            pos = HostTensor::new(vec![1, pos_prefix + grid * grid, d], data);
        }
        let norm = |take: &mut dyn FnMut(&str, &[usize]) -> Result<HostTensor>,
                    name: &str|
         -> Result<(HostTensor, HostTensor)> {
            Ok((
                take(&format!("{name}.weight"), &[d])?,
                take(&format!("{name}.bias"), &[d])?,
            ))
        };
        let norm_pre = cfg.norm_pre.then(|| norm(&mut take, "norm_pre")).transpose()?;
        let final_norm = cfg.final_norm.then(|| norm(&mut take, "norm")).transpose()?;
        let fc_norm = cfg.fc_norm.then(|| norm(&mut take, "fc_norm")).transpose()?;
        let attn_layout = Arc::new(HalfLayout::attn(d, cfg.qkv_bias, cfg.layer_scale));
        let mlp_layout = Arc::new(HalfLayout::mlp(d, cfg.mlp_hidden(), cfg.layer_scale));
        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let mut pack = |lay: &HalfLayout| -> Result<Vec<f32>> {
                let mut flat = vec![0.0f32; lay.len];
                for (k, s) in lay.slots.iter().enumerate() {
                    if s.present {
                        let t = take(&format!("blocks.{i}.{}", s.name), &s.shape)?;
                        flat[s.range()].copy_from_slice(&t.data);
                    } else if k == layout::LS {
                        flat[s.range()].fill(1.0);
                    }
                }
                Ok(flat)
            };
            let attn = pack(&attn_layout)?;
            let mlp = pack(&mlp_layout)?;
            blocks.push((attn, mlp));
        }
        if tf.has(&format!("blocks.{}.norm1.weight", cfg.depth)) {
            return Err(err_cfg(
                &path,
                format!("the file has more than the configured {} blocks", cfg.depth),
            ));
        }
        let head = if tf.has("head.weight") && cfg.num_classes > 0 {
            Some((
                take("head.weight", &[cfg.num_classes, d])?,
                take("head.bias", &[cfg.num_classes])?,
            ))
        } else {
            None
        };
        let head_dist = if cfg.dist_token && tf.has("head_dist.weight") {
            Some((
                take("head_dist.weight", &[cfg.num_classes, d])?,
                take("head_dist.bias", &[cfg.num_classes])?,
            ))
        } else {
            None
        };
        let unknown: Vec<String> = tf.tensors.keys().filter(|k| !known.contains(k)).cloned().collect();
        if !unknown.is_empty() {
            return Err(ModelError::Unknown { path, names: unknown });
        }
        let t = |h: &HostTensor| h.to_tensor(device);
        let tn = |n: Option<(HostTensor, HostTensor)>| -> Result<Option<Norm>> {
            n.map(|(w, b)| Ok(Norm { w: t(&w)?, b: t(&b)? })).transpose()
        };
        let tl = |n: Option<(HostTensor, HostTensor)>| -> Result<Option<Linear>> {
            n.map(|(w, b)| Ok(Linear { w: t(&w)?, b: t(&b)? })).transpose()
        };
        Ok(Self {
            source: BackboneSource {
                path: Some(path.clone()),
                sha256: tf.sha256.clone(),
            },
            kernels: Kernels::Auto,
            patch_w: t(&patch_w)?,
            patch_b: patch_b.as_ref().map(t).transpose()?,
            cls_token: cls.as_ref().map(t).transpose()?,
            reg_token: reg.as_ref().map(t).transpose()?,
            dist_token: dist.as_ref().map(t).transpose()?,
            pos_embed: t(&pos)?,
            norm_pre: tn(norm_pre)?,
            blocks: blocks
                .into_iter()
                .map(|(a, m)| {
                    Ok(BlockWeights {
                        attn: Tensor::from_vec(a, attn_layout.len, device)?,
                        mlp: Tensor::from_vec(m, mlp_layout.len, device)?,
                    })
                })
                .collect::<Result<_>>()?,
            norm: tn(final_norm)?,
            fc_norm: tn(fc_norm)?,
            head: tl(head)?,
            head_dist: tl(head_dist)?,
            attn_layout,
            mlp_layout,
            cfg,
            grad: AtomicBool::new(true),
            compute: DType::F32,
        })
    }

    /// Random weights with timm's initialisation (truncated normal σ = 0.02 for matrices and
    /// embeddings, zero biases, unit LayerNorm gains), seeded.
    pub fn random(cfg: &VitConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut cfg = cfg.clone();
        cfg.prefix_tokens = cfg.derived_prefix_tokens();
        cfg.validate().map_err(ModelError::Config)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tn = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    loop {
                        // Box-Muller, truncated at ±2σ like timm's trunc_normal_.
                        let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                        if z.abs() <= 2.0 {
                            break (0.02 * z) as f32;
                        }
                    }
                })
                .collect()
        };
        let (d, p, c) = (cfg.embed_dim, cfg.patch_size, cfg.in_chans);
        let mut tf = TensorFile {
            path: PathBuf::from("<random>"),
            metadata: [(
                BACKBONE_META_KEY.to_owned(),
                serde_json::to_string(&cfg).unwrap_or_default(),
            )]
            .into(),
            ..TensorFile::default()
        };
        let mut put = |name: &str, shape: Vec<usize>, data: Vec<f32>| {
            tf.tensors.insert(name.to_owned(), HostTensor::new(shape, data));
        };
        put("patch_embed.proj.weight", vec![d, c, p, p], tn(d * c * p * p));
        if cfg.patch_bias {
            put("patch_embed.proj.bias", vec![d], vec![0.0; d]);
        }
        if cfg.class_token {
            put("cls_token", vec![1, 1, d], tn(d));
        }
        if cfg.reg_tokens > 0 {
            put("reg_token", vec![1, cfg.reg_tokens, d], tn(cfg.reg_tokens * d));
        }
        if cfg.dist_token {
            put("dist_token", vec![1, 1, d], tn(d));
        }
        let npos = if cfg.no_embed_class { 0 } else { cfg.prefix_tokens } + cfg.grid() * cfg.grid();
        put("pos_embed", vec![1, npos, d], tn(npos * d));
        let ones = |n: usize| vec![1.0f32; n];
        for name in ["norm_pre", "norm", "fc_norm"] {
            let on = match name {
                "norm_pre" => cfg.norm_pre,
                "norm" => cfg.final_norm,
                _ => cfg.fc_norm,
            };
            if on {
                put(&format!("{name}.weight"), vec![d], ones(d));
                put(&format!("{name}.bias"), vec![d], vec![0.0; d]);
            }
        }
        for lay in [
            HalfLayout::attn(d, cfg.qkv_bias, cfg.layer_scale),
            HalfLayout::mlp(d, cfg.mlp_hidden(), cfg.layer_scale),
        ] {
            for i in 0..cfg.depth {
                for s in lay.slots.iter().filter(|s| s.present) {
                    let data = if s.shape.len() == 2 {
                        tn(s.len())
                    } else if s.name.ends_with("norm1.weight") || s.name.ends_with("norm2.weight") {
                        ones(s.len())
                    } else if s.name.ends_with("gamma") {
                        vec![1e-5; s.len()]
                    } else {
                        vec![0.0; s.len()]
                    };
                    put(&format!("blocks.{i}.{}", s.name), s.shape.clone(), data);
                }
            }
        }
        if cfg.num_classes > 0 {
            put("head.weight", vec![cfg.num_classes, d], tn(cfg.num_classes * d));
            put("head.bias", vec![cfg.num_classes], vec![0.0; cfg.num_classes]);
            if cfg.dist_token {
                put("head_dist.weight", vec![cfg.num_classes, d], tn(cfg.num_classes * d));
                put("head_dist.bias", vec![cfg.num_classes], vec![0.0; cfg.num_classes]);
            }
        }
        let mut vit = Self::from_tensor_file(&tf, &BackboneOptions::default(), device)?;
        vit.source = BackboneSource::default();
        Ok(vit)
    }

    /// The same backbone with every weight in `dtype` (f64 for gradient checks, bf16 on GPUs).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let c = |t: &Tensor| t.to_dtype(dtype);
        let cn = |n: &Option<Norm>| -> candle_core::Result<Option<Norm>> {
            n.as_ref()
                .map(|n| {
                    Ok(Norm {
                        w: c(&n.w)?,
                        b: c(&n.b)?,
                    })
                })
                .transpose()
        };
        let cl = |l: &Option<Linear>| -> candle_core::Result<Option<Linear>> {
            l.as_ref()
                .map(|l| {
                    Ok(Linear {
                        w: c(&l.w)?,
                        b: c(&l.b)?,
                    })
                })
                .transpose()
        };
        let co = |t: &Option<Tensor>| t.as_ref().map(c).transpose();
        Ok(Self {
            cfg: self.cfg.clone(),
            source: self.source.clone(),
            kernels: self.kernels,
            patch_w: c(&self.patch_w)?,
            patch_b: co(&self.patch_b)?,
            cls_token: co(&self.cls_token)?,
            reg_token: co(&self.reg_token)?,
            dist_token: co(&self.dist_token)?,
            pos_embed: c(&self.pos_embed)?,
            norm_pre: cn(&self.norm_pre)?,
            blocks: self
                .blocks
                .iter()
                .map(|b| {
                    Ok(BlockWeights {
                        attn: c(&b.attn)?,
                        mlp: c(&b.mlp)?,
                    })
                })
                .collect::<candle_core::Result<_>>()?,
            norm: cn(&self.norm)?,
            fc_norm: cn(&self.fc_norm)?,
            head: cl(&self.head)?,
            head_dist: cl(&self.head_dist)?,
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
        self.patch_w.device()
    }

    /// Number of blocks.
    #[must_use]
    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// Whether the backbone has its own classifier head.
    #[must_use]
    pub fn has_head(&self) -> bool {
        self.head.is_some()
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
        var("patch_embed.proj.weight".into(), &mut self.patch_w)?;
        if let Some(b) = &mut self.patch_b {
            var("patch_embed.proj.bias".into(), b)?;
        }
        for (name, t) in [
            ("cls_token", &mut self.cls_token),
            ("reg_token", &mut self.reg_token),
            ("dist_token", &mut self.dist_token),
        ] {
            if let Some(t) = t {
                var(name.into(), t)?;
            }
        }
        var("pos_embed".into(), &mut self.pos_embed)?;
        for (name, n) in [
            ("norm_pre", &mut self.norm_pre),
            ("norm", &mut self.norm),
            ("fc_norm", &mut self.fc_norm),
        ] {
            if let Some(n) = n {
                var(format!("{name}.weight"), &mut n.w)?;
                var(format!("{name}.bias"), &mut n.b)?;
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
    pub fn layouts(&self) -> (&Arc<HalfLayout>, &Arc<HalfLayout>) {
        (&self.attn_layout, &self.mlp_layout)
    }

    /// Patch embedding, prefix tokens, position embeddings and `norm_pre`: `(B, 3, S, S)` →
    /// `(B, T, D)`.
    pub fn embed(&self, images: &Tensor) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (g, d) = (cfg.grid(), cfg.embed_dim);
        let (patches, b) = self.patches(images)?;
        let x = self.project_patches(&patches)?.reshape((b, g * g, d))?;
        let mut prefix: Vec<Tensor> = Vec::new();
        for t in [&self.cls_token, &self.dist_token, &self.reg_token]
            .into_iter()
            .flatten()
        {
            prefix.push(self.p(t)?.broadcast_as((b, t.dim(1)?, d))?.contiguous()?);
        }
        let x = if cfg.no_embed_class {
            let x = x.broadcast_add(&self.p(&self.pos_embed)?)?;
            prefix.push(x);
            Tensor::cat(&prefix, 1)?
        } else {
            prefix.push(x);
            Tensor::cat(&prefix, 1)?.broadcast_add(&self.p(&self.pos_embed)?)?
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
        Ok(match &self.patch_b {
            Some(bias) => ops::linear(self.kernels, patches, &self.p(&self.patch_w)?, &self.p(bias)?)?,
            None => ops::linear_no_bias(self.kernels, patches, &self.p(&self.patch_w)?)?,
        })
    }

    fn norm_pre(&self, x: &Tensor) -> Result<Tensor> {
        match &self.norm_pre {
            Some(n) => Ok(ops::layer_norm(
                self.kernels,
                x,
                &self.p(&n.w)?,
                &self.p(&n.b)?,
                self.cfg.ln_eps,
            )?),
            None => Ok(x.clone()),
        }
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
        let pos = self.p(&self.pos_embed)?.reshape((n + 1, d))?;
        let pos_patch = pos.narrow(0, 1, n)?.repeat((b, 1))?.index_select(keep, 0)?;
        let x = (self.project_patches(&patches.index_select(keep, 0)?)? + pos_patch)?.reshape((b, k, d))?;
        let cls = self
            .cls_token
            .as_ref()
            .ok_or_else(|| ModelError::Config("the backbone has no class token".into()))?;
        let cls = (self.p(cls)?.reshape((1, d))? + pos.narrow(0, 0, 1)?)?
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?
            .contiguous()?;
        self.norm_pre(&Tensor::cat(&[&cls, &x], 1)?)
    }

    /// Adds the position embeddings to a full token sequence `(B, T, D)` (an MAE decoder's).
    pub fn add_pos_embed(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_add(&self.p(&self.pos_embed)?)?)
    }

    /// The final norm over every token (identity when the backbone has none).
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.norm {
            Some(n) => ops::layer_norm(self.kernels, x, &self.p(&n.w)?, &self.p(&n.b)?, self.cfg.ln_eps)?,
            None => x.clone(),
        })
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

    /// The attention half of block `i`, with an optional LoRA update `(B, T, 2D)` for q and v.
    pub fn attn(&self, i: usize, x: &Tensor, delta: Option<&Tensor>) -> Result<Tensor> {
        Ok(ops::attn_half(
            self.kernels,
            x,
            &self.p(&self.blocks[i].attn)?,
            &self.attn_layout,
            delta,
            self.cfg.num_heads,
            self.cfg.ln_eps,
        )?)
    }

    /// The MLP half of block `i`.
    pub fn mlp(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        Ok(ops::mlp_half(
            self.kernels,
            x,
            &self.p(&self.blocks[i].mlp)?,
            &self.mlp_layout,
            self.cfg.mlp_hidden(),
            self.cfg.ln_eps,
        )?)
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
        let pooled = match &self.fc_norm {
            Some(n) => ops::layer_norm(self.kernels, &pooled, &self.p(&n.w)?, &self.p(&n.b)?, self.cfg.ln_eps)?,
            None => pooled,
        };
        let dist = if self.cfg.dist_token && self.cfg.pool == Pool::Token {
            Some(x.narrow(1, 1, 1)?.squeeze(1)?)
        } else {
            None
        };
        Ok((pooled, dist))
    }

    /// The backbone's own classifier on pooled features (distilled: the mean of both heads).
    pub fn own_logits(&self, pooled: &Tensor, dist: Option<&Tensor>) -> Result<Option<Tensor>> {
        let Some(head) = &self.head else {
            return Ok(None);
        };
        let y = ops::linear(self.kernels, pooled, &self.p(&head.w)?, &self.p(&head.b)?)?;
        match (&self.head_dist, dist) {
            (Some(hd), Some(f)) => {
                let y2 = ops::linear(self.kernels, f, &self.p(&hd.w)?, &self.p(&hd.b)?)?;
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
            x = self.mlp(i, &x)?;
        }
        let (pooled, dist) = self.pool(&x)?;
        self.own_logits(&pooled, dist.as_ref())?
            .ok_or_else(|| ModelError::Config("the backbone has no classifier head".into()))
    }

    /// All weights under timm names, on the host (for writing our backbone files and full
    /// fine-tuning checkpoints). Placeholders of absent optional tensors are left out.
    pub fn to_host(&self) -> Result<BTreeMap<String, HostTensor>> {
        let cfg = &self.cfg;
        let (d, p, c) = (cfg.embed_dim, cfg.patch_size, cfg.in_chans);
        let mut out = BTreeMap::new();
        let host = |t: &Tensor, shape: Vec<usize>| -> Result<HostTensor> {
            Ok(HostTensor::new(
                shape,
                t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
            ))
        };
        out.insert("patch_embed.proj.weight".into(), host(&self.patch_w, vec![d, c, p, p])?);
        if let Some(b) = &self.patch_b {
            out.insert("patch_embed.proj.bias".into(), host(b, vec![d])?);
        }
        for (name, t) in [
            ("cls_token", &self.cls_token),
            ("reg_token", &self.reg_token),
            ("dist_token", &self.dist_token),
        ] {
            if let Some(t) = t {
                out.insert(name.into(), host(t, t.dims().to_vec())?);
            }
        }
        out.insert(
            "pos_embed".into(),
            host(&self.pos_embed, self.pos_embed.dims().to_vec())?,
        );
        for (name, n) in [
            ("norm_pre", &self.norm_pre),
            ("norm", &self.norm),
            ("fc_norm", &self.fc_norm),
        ] {
            if let Some(n) = n {
                out.insert(format!("{name}.weight"), host(&n.w, vec![d])?);
                out.insert(format!("{name}.bias"), host(&n.b, vec![d])?);
            }
        }
        for (i, b) in self.blocks.iter().enumerate() {
            for (w, lay) in [(&b.attn, &self.attn_layout), (&b.mlp, &self.mlp_layout)] {
                let flat: Vec<f32> = w.to_dtype(DType::F32)?.to_vec1()?;
                for s in lay.slots.iter().filter(|s| s.present) {
                    out.insert(
                        format!("blocks.{i}.{}", s.name),
                        HostTensor::new(s.shape.clone(), flat[s.range()].to_vec()),
                    );
                }
            }
        }
        for (name, l) in [("head", &self.head), ("head_dist", &self.head_dist)] {
            if let Some(l) = l {
                out.insert(format!("{name}.weight"), host(&l.w, l.w.dims().to_vec())?);
                out.insert(format!("{name}.bias"), host(&l.b, l.b.dims().to_vec())?);
            }
        }
        Ok(out)
    }

    /// Replaces the backbone's own head (pretraining writes it into the backbone file).
    pub fn set_head(&mut self, w: Tensor, b: Tensor) {
        self.cfg.num_classes = b.elem_count();
        self.head = Some(Linear { w, b });
    }
}
