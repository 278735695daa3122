//! `moppa pretrain`: a ViT trained from scratch by the same engine and exported as a backbone
//! file (timm tensor names, the architecture and input normalisation in the `moppa.backbone`
//! metadata, how it was made in `moppa.pretrain`). Supervised pretraining is a full fine-tuning
//! run of the worker, exported here; masked pretraining runs its own loop ([`mae`]).

pub mod mae;

use super::error::{Result, TrainError};
use crate::config::MethodKind;
use crate::data::{self, Split};
use crate::model::checkpoint::adapter_info;
use crate::model::tensor_file::{StoreAs, TensorFile};
use crate::model::vit::{BackboneFileMeta, write_backbone};
use std::path::Path;

/// Per-channel mean and std of a dataset's training images (pixels scaled to 0..1), from up to
/// `limit` images; grey images count as three equal channels.
pub fn dataset_stats(spec: &str, limit: usize) -> Result<([f32; 3], [f32; 3])> {
    let ds = data::load(spec, false, 0)?;
    let samples: Vec<_> = ds.split(Split::Train).iter().take(limit).cloned().collect();
    let (prepared, _) = data::loader::prepare_all(&samples, &data::transform::Resize::square(32));
    if prepared.is_empty() {
        return Err(TrainError::Config(format!("{spec}: no usable training image")));
    }
    let (mut sum, mut sq, mut n) = ([0f64; 3], [0f64; 3], 0f64);
    for (px, _) in &prepared {
        for p in px.chunks_exact(3) {
            for c in 0..3 {
                let v = f64::from(p[c]) / 255.0;
                sum[c] += v;
                sq[c] += v * v;
            }
            n += 1.0;
        }
    }
    let mean = sum.map(|s| s / n);
    let std: Vec<f64> = (0..3)
        .map(|c| (sq[c] / n - mean[c] * mean[c]).max(1e-12).sqrt())
        .collect();
    Ok((mean.map(|m| m as f32), [std[0] as f32, std[1] as f32, std[2] as f32]))
}

/// Turns a full fine-tuning run's `adapter.safetensors` (timm names, with its head) into a
/// backbone file. `provenance` (JSON) is stored as `moppa.pretrain`.
pub fn export_backbone(run_dir: &Path, out: &Path, store: StoreAs, provenance: &serde_json::Value) -> Result<()> {
    let adapter = run_dir.join(crate::train::runfolder::ADAPTER);
    let tf = TensorFile::read(&adapter)?;
    let info = adapter_info(&tf)?;
    if info.method.method != MethodKind::Full {
        return Err(TrainError::Config(format!(
            "{}: not a full fine-tuning run",
            adapter.display()
        )));
    }
    let mut cfg = info.backbone.clone();
    cfg.num_classes = info.classes.len();
    let mut tensors = tf.tensors.clone();
    // Adapters written before the patch embedding kept timm's 4-D shape stored it 2-D.
    if let Some(t) = tensors.get_mut("patch_embed.proj.weight")
        && t.shape.len() == 2
    {
        t.shape = vec![cfg.embed_dim, cfg.in_chans, cfg.patch_size, cfg.patch_size];
    }
    let meta = BackboneFileMeta {
        provenance: Some(provenance.clone()),
        classes: Some(info.classes.clone()),
    };
    write_backbone(out, &cfg, &tensors, &meta, store)?;
    Ok(())
}
