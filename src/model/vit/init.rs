//! Random backbones with timm's initialisation, seeded: for tests, benchmarks and pretraining
//! from scratch. Built as an in-memory timm file so they load through the same name table.

use super::Vit;
use super::timm::{BACKBONE_META_KEY, InitKind, Part};
use crate::config::VitConfig;
use crate::model::error::{ModelError, Result};
use crate::model::ops::HalfLayout;
use crate::model::tensor_file::{HostTensor, TensorFile};
use candle_core::Device;
use rand::{Rng as _, SeedableRng as _};
use std::path::PathBuf;

/// `n` values of `kind`: truncated normal σ = 0.02 (Box-Muller, cut at ±2σ like timm's
/// `trunc_normal_`), zeros or ones.
fn values(kind: InitKind, n: usize, rng: &mut rand::rngs::StdRng) -> Vec<f32> {
    match kind {
        InitKind::Zeros => vec![0.0; n],
        InitKind::Ones => vec![1.0; n],
        InitKind::TruncNormal => (0..n)
            .map(|_| {
                loop {
                    let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                    if z.abs() <= 2.0 {
                        break (0.02 * z) as f32;
                    }
                }
            })
            .collect(),
    }
}

impl Vit {
    /// Random weights with timm's initialisation (truncated normal σ = 0.02 for matrices and
    /// embeddings, zero biases, unit LayerNorm gains, layer scale 1e-5), seeded.
    pub fn random(cfg: &VitConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut cfg = cfg.clone();
        cfg.prefix_tokens = cfg.derived_prefix_tokens();
        cfg.validate().map_err(ModelError::Config)?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut tf = TensorFile {
            path: PathBuf::from("<random>"),
            metadata: [(
                BACKBONE_META_KEY.to_owned(),
                serde_json::to_string(&cfg).map_err(|e| ModelError::Config(e.to_string()))?,
            )]
            .into(),
            ..TensorFile::default()
        };
        let grid = cfg.grid();
        // The random stream is drawn in a fixed order: the parts before the blocks, the blocks
        // (attention halves of every block, then MLP halves), the heads.
        let put_parts = |tf: &mut TensorFile, rng: &mut rand::rngs::StdRng, heads: bool| {
            for part in Part::ALL.into_iter().filter(|p| p.is_head() == heads) {
                if let Some(shape) = part.file_shape(&cfg, grid) {
                    let data = values(part.init(), shape.iter().product(), rng);
                    tf.tensors
                        .insert(part.timm_name().to_owned(), HostTensor::new(shape, data));
                }
            }
        };
        put_parts(&mut tf, &mut rng, false);
        let d = cfg.embed_dim;
        for lay in [
            HalfLayout::attn(d, cfg.qkv_bias, cfg.layer_scale),
            HalfLayout::mlp(d, cfg.mlp_hidden(), cfg.layer_scale),
        ] {
            for i in 0..cfg.depth {
                for s in lay.slots.iter().filter(|s| s.present) {
                    let data = if s.shape.len() == 2 {
                        values(InitKind::TruncNormal, s.len(), &mut rng)
                    } else if s.name.ends_with("norm1.weight") || s.name.ends_with("norm2.weight") {
                        values(InitKind::Ones, s.len(), &mut rng)
                    } else if s.name.ends_with("gamma") {
                        vec![1e-5; s.len()]
                    } else {
                        values(InitKind::Zeros, s.len(), &mut rng)
                    };
                    tf.tensors
                        .insert(format!("blocks.{i}.{}", s.name), HostTensor::new(s.shape.clone(), data));
                }
            }
        }
        put_parts(&mut tf, &mut rng, true);
        let mut vit = Self::from_tensor_file(&tf, &super::BackboneOptions::default(), device)?;
        vit.source = super::BackboneSource::default();
        Ok(vit)
    }
}
