//! timm's tensor names, in one table for both directions: reading a checkpoint (ours, with the
//! architecture in its metadata, or timm's own, architecture inferred from the shapes) and
//! writing the weights back under the same names (backbone files, full fine-tuning adapters).
//! Block tensors are named by the half-block layouts (`ops::layout`), everything else by [`Part`].

pub use super::infer::{assumptions, config_of, sidecar_config};
use super::infer::{err_cfg, file_config};
use super::{BackboneOptions, BackboneSource, Vit};
use crate::config::VitConfig;
use crate::model::error::{ModelError, Result};
use crate::model::ops::{HalfLayout, Kernels, layout};
use crate::model::resample::resample_grid;
use crate::model::tensor_file::{HostTensor, StoreAs, TensorFile, write_atomic};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// Metadata key of our backbone files: the [`VitConfig`] as JSON.
pub const BACKBONE_META_KEY: &str = "moppa.backbone";
/// Metadata key: how a backbone file was made (JSON), written by `moppa pretrain`.
pub const PRETRAIN_META_KEY: &str = "moppa.pretrain";
/// Metadata key: the class names of a backbone's own head (JSON list).
pub const CLASSES_META_KEY: &str = "moppa.classes";

/// A backbone tensor outside the transformer blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// `patch_embed.proj.weight`, `(D, C, p, p)` in files, `(D, C·p·p)` in memory.
    PatchW,
    /// `patch_embed.proj.bias`.
    PatchB,
    /// `cls_token`.
    ClsToken,
    /// `reg_token`.
    RegToken,
    /// `dist_token`.
    DistToken,
    /// `pos_embed`.
    PosEmbed,
    /// `norm_pre.weight`.
    NormPreW,
    /// `norm_pre.bias`.
    NormPreB,
    /// `norm.weight` (the final norm).
    NormW,
    /// `norm.bias`.
    NormB,
    /// `fc_norm.weight`.
    FcNormW,
    /// `fc_norm.bias`.
    FcNormB,
    /// `head.weight` (the backbone's own classifier).
    HeadW,
    /// `head.bias`.
    HeadB,
    /// `head_dist.weight` (DeiT distilled).
    HeadDistW,
    /// `head_dist.bias`.
    HeadDistB,
}

/// How a random backbone initialises a tensor (timm's conventions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum InitKind {
    /// Truncated normal, σ = 0.02.
    TruncNormal,
    /// Zeros (biases).
    Zeros,
    /// Ones (LayerNorm gains).
    Ones,
}

impl Part {
    /// Every part, in the order they are initialised, made trainable and listed.
    pub const ALL: [Self; 16] = [
        Self::PatchW,
        Self::PatchB,
        Self::ClsToken,
        Self::RegToken,
        Self::DistToken,
        Self::PosEmbed,
        Self::NormPreW,
        Self::NormPreB,
        Self::NormW,
        Self::NormB,
        Self::FcNormW,
        Self::FcNormB,
        Self::HeadW,
        Self::HeadB,
        Self::HeadDistW,
        Self::HeadDistB,
    ];

    /// The timm name.
    #[must_use]
    pub fn timm_name(self) -> &'static str {
        match self {
            Self::PatchW => "patch_embed.proj.weight",
            Self::PatchB => "patch_embed.proj.bias",
            Self::ClsToken => "cls_token",
            Self::RegToken => "reg_token",
            Self::DistToken => "dist_token",
            Self::PosEmbed => "pos_embed",
            Self::NormPreW => "norm_pre.weight",
            Self::NormPreB => "norm_pre.bias",
            Self::NormW => "norm.weight",
            Self::NormB => "norm.bias",
            Self::FcNormW => "fc_norm.weight",
            Self::FcNormB => "fc_norm.bias",
            Self::HeadW => "head.weight",
            Self::HeadB => "head.bias",
            Self::HeadDistW => "head_dist.weight",
            Self::HeadDistB => "head_dist.bias",
        }
    }

    /// A classifier head (never part of the backbone's trainable body; optional in files).
    #[must_use]
    pub fn is_head(self) -> bool {
        matches!(self, Self::HeadW | Self::HeadB | Self::HeadDistW | Self::HeadDistB)
    }

    /// The tensor whose presence decides whether this optional part is read: a head's weight.
    fn anchor(self) -> Self {
        match self {
            Self::HeadB => Self::HeadW,
            Self::HeadDistB => Self::HeadDistW,
            other => other,
        }
    }

    /// The shape this part has in a timm file of architecture `cfg` whose position embeddings
    /// cover a `grid × grid` patch grid; `None` when the architecture has no such tensor.
    #[must_use]
    pub fn file_shape(self, cfg: &VitConfig, grid: usize) -> Option<Vec<usize>> {
        let (d, p, c) = (cfg.embed_dim, cfg.patch_size, cfg.in_chans);
        let classes = cfg.num_classes;
        let pos_prefix = if cfg.no_embed_class { 0 } else { cfg.prefix_tokens };
        let some = |on: bool, shape: Vec<usize>| on.then_some(shape);
        match self {
            Self::PatchW => Some(vec![d, c, p, p]),
            Self::PatchB => some(cfg.patch_bias, vec![d]),
            Self::ClsToken => some(cfg.class_token, vec![1, 1, d]),
            Self::RegToken => some(cfg.reg_tokens > 0, vec![1, cfg.reg_tokens, d]),
            Self::DistToken => some(cfg.dist_token, vec![1, 1, d]),
            Self::PosEmbed => Some(vec![1, pos_prefix + grid * grid, d]),
            Self::NormPreW | Self::NormPreB => some(cfg.norm_pre, vec![d]),
            Self::NormW | Self::NormB => some(cfg.final_norm, vec![d]),
            Self::FcNormW | Self::FcNormB => some(cfg.fc_norm, vec![d]),
            Self::HeadW => some(classes > 0, vec![classes, d]),
            Self::HeadB => some(classes > 0, vec![classes]),
            Self::HeadDistW => some(classes > 0 && cfg.dist_token, vec![classes, d]),
            Self::HeadDistB => some(classes > 0 && cfg.dist_token, vec![classes]),
        }
    }

    /// How a random backbone initialises it.
    pub(super) fn init(self) -> InitKind {
        match self {
            Self::PatchW
            | Self::ClsToken
            | Self::RegToken
            | Self::DistToken
            | Self::PosEmbed
            | Self::HeadW
            | Self::HeadDistW => InitKind::TruncNormal,
            Self::NormPreW | Self::NormW | Self::FcNormW => InitKind::Ones,
            Self::PatchB | Self::NormPreB | Self::NormB | Self::FcNormB | Self::HeadB | Self::HeadDistB => {
                InitKind::Zeros
            }
        }
    }
}

/// The tensors of every part, indexed by [`Part`] (`None`: absent in this architecture).
pub type Parts = [Option<Tensor>; Part::ALL.len()];

impl Vit {
    /// Loads a backbone file: ours (config in the metadata) or timm's (config inferred).
    pub fn from_file(path: &Path, opts: &BackboneOptions, device: &Device) -> Result<Self> {
        let tf = TensorFile::read(path)?;
        Self::from_tensor_file(&tf, opts, device)
    }

    /// Builds from decoded tensors; every tensor must be known and of the right shape.
    pub fn from_tensor_file(tf: &TensorFile, opts: &BackboneOptions, device: &Device) -> Result<Self> {
        let path = tf.path.clone();
        let file_grid = file_config(tf, opts)?.grid();
        let cfg = config_of(tf, opts)?;
        let mut known: Vec<String> = Vec::new();
        let mut take = |name: &str, shape: &[usize]| -> Result<HostTensor> {
            known.push(name.to_owned());
            tf.get_shaped(name, shape).cloned()
        };
        let d = cfg.embed_dim;
        let grid = cfg.grid();
        let pos_prefix = if cfg.no_embed_class { 0 } else { cfg.prefix_tokens };
        let mut host: Vec<Option<HostTensor>> = Vec::with_capacity(Part::ALL.len());
        for part in Part::ALL {
            let name = part.timm_name();
            let wanted = part.file_shape(&cfg, file_grid);
            // Heads are optional: a file may come without the classifier its config describes
            // (weight and bias go together: a weight without its bias is an error).
            let optional = part.is_head() && !tf.has(part.anchor().timm_name());
            host.push(match wanted {
                Some(shape) if !optional => Some(take(name, &shape)?),
                _ => None,
            });
        }
        if let Some(w) = &mut host[Part::PatchW as usize] {
            w.shape = vec![d, w.shape[1..].iter().product()];
        }
        if let Some(pos) = &mut host[Part::PosEmbed as usize]
            && grid != file_grid
        {
            let (head, body) = pos.data.split_at(pos_prefix * d);
            let mut data = head.to_vec();
            data.extend(resample_grid(body, d, (file_grid, file_grid), (grid, grid)));
            *pos = HostTensor::new(vec![1, pos_prefix + grid * grid, d], data);
        }
        let attn_layout = Arc::new(HalfLayout::attn(d, cfg.qkv_bias, cfg.layer_scale));
        let mlp_layout = Arc::new(HalfLayout::mlp(d, cfg.mlp_hidden(), cfg.layer_scale));
        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let mut pack = |lay: &HalfLayout| -> Result<Tensor> {
                let mut flat = vec![0.0f32; lay.len];
                for (k, s) in lay.slots.iter().enumerate() {
                    if s.present {
                        let t = take(&format!("blocks.{i}.{}", s.name), &s.shape)?;
                        flat[s.range()].copy_from_slice(&t.data);
                    } else if k == layout::LS {
                        flat[s.range()].fill(1.0);
                    }
                }
                Ok(Tensor::from_vec(flat, lay.len, device)?)
            };
            blocks.push(super::BlockWeights {
                attn: pack(&attn_layout)?,
                mlp: pack(&mlp_layout)?,
            });
        }
        if tf.has(&format!("blocks.{}.norm1.weight", cfg.depth)) {
            return Err(err_cfg(
                &path,
                format!("the file has more than the configured {} blocks", cfg.depth),
            ));
        }
        let unknown: Vec<String> = tf.tensors.keys().filter(|k| !known.contains(k)).cloned().collect();
        if !unknown.is_empty() {
            return Err(ModelError::Unknown { path, names: unknown });
        }
        let mut parts: Parts = Default::default();
        for (slot, h) in parts.iter_mut().zip(&host) {
            *slot = h.as_ref().map(|h| h.to_tensor(device)).transpose()?;
        }
        Ok(Self {
            source: BackboneSource {
                path: Some(path.clone()),
                sha256: tf.sha256.clone(),
            },
            kernels: Kernels::Auto,
            parts,
            blocks,
            attn_layout,
            mlp_layout,
            cfg,
            grad: AtomicBool::new(true),
            compute: DType::F32,
        })
    }

    /// All weights under timm names, on the host (for writing our backbone files and full
    /// fine-tuning checkpoints). Placeholders of absent optional tensors are left out.
    pub fn to_host(&self) -> Result<BTreeMap<String, HostTensor>> {
        let mut out = BTreeMap::new();
        let host = |t: &Tensor, shape: Vec<usize>| -> Result<HostTensor> {
            Ok(HostTensor::new(
                shape,
                t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
            ))
        };
        for part in Part::ALL {
            if let Some(t) = self.part(part) {
                let shape = if part == Part::PatchW {
                    self.patch_file_shape()
                } else {
                    t.dims().to_vec()
                };
                out.insert(part.timm_name().to_owned(), host(t, shape)?);
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
        Ok(out)
    }

    /// The patch embedding's shape in timm files, `(D, C, p, p)`.
    #[must_use]
    pub fn patch_file_shape(&self) -> Vec<usize> {
        let c = &self.cfg;
        vec![c.embed_dim, c.in_chans, c.patch_size, c.patch_size]
    }
}

/// What goes into a backbone file besides the weights.
#[derive(Clone, Debug, Default)]
pub struct BackboneFileMeta {
    /// How it was made (`moppa.pretrain`), if known.
    pub provenance: Option<serde_json::Value>,
    /// Class names of its own head, if it has one.
    pub classes: Option<Vec<String>>,
}

/// Writes a backbone file atomically: `tensors` under timm names, `cfg` as `moppa.backbone`,
/// plus provenance and class names. The one writer of backbone files (`moppa pretrain`, tests).
pub fn write_backbone(
    path: &Path,
    cfg: &VitConfig,
    tensors: &BTreeMap<String, HostTensor>,
    meta: &BackboneFileMeta,
    store: StoreAs,
) -> Result<()> {
    let mut m: HashMap<String, String> = HashMap::new();
    m.insert(
        BACKBONE_META_KEY.to_owned(),
        serde_json::to_string(cfg).map_err(|e| ModelError::Config(e.to_string()))?,
    );
    if let Some(p) = &meta.provenance {
        m.insert(PRETRAIN_META_KEY.to_owned(), p.to_string());
    }
    if let Some(c) = &meta.classes {
        m.insert(
            CLASSES_META_KEY.to_owned(),
            serde_json::to_string(c).map_err(|e| ModelError::Config(e.to_string()))?,
        );
    }
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
            path: dir.to_owned(),
            error: source,
        })?;
    }
    write_atomic(path, tensors, &m, store)
}
