//! The architecture a backbone file describes: ours record it in their metadata; a timm file's
//! is inferred from its tensor shapes, with what its `config.json` (beside it, as the Hugging
//! Face hub stores timm models) says about the rest through the table in `config::arch`.
//! Features this crate lacks are refused here, naming the tensor or architecture that showed them.

use super::BackboneOptions;
use super::timm::{BACKBONE_META_KEY, Part};
use crate::config::{Activation, Pool, TimmConfig, VitConfig, arch_traits};
use crate::model::error::{ModelError, Result};
use crate::model::tensor_file::TensorFile;
use std::path::Path;

pub(super) fn err_cfg(path: &Path, msg: impl std::fmt::Display) -> ModelError {
    ModelError::Format {
        path: path.to_owned(),
        msg: msg.to_string(),
    }
}

fn is_square(n: usize) -> Option<usize> {
    let r = (n as f64).sqrt().round() as usize;
    (r * r == n).then_some(r)
}

/// Tensor names that reveal a feature this crate does not implement: a name part and the feature.
const UNSUPPORTED_TENSORS: [(&str, &str); 8] = [
    ("attn_pool.", "an attention-pool (map) head"),
    ("relative_position_bias_table", "relative position bias"),
    ("rel_pos", "relative position embeddings"),
    ("rope", "RoPE position embeddings"),
    ("attn.q_bias", "separate q and v biases (BEiT/EVA attention)"),
    (".mlp.fc1_g.", "a SwiGLU MLP"),
    (".mlp.norm.", "a normalised (SwiGLU) MLP"),
    ("q_norm", "query/key normalisation"),
];

/// Refuses a file whose tensors show a feature this crate lacks, naming the feature and the
/// first tensor that revealed it.
fn refuse_unsupported(tf: &TensorFile) -> Result<()> {
    let refuse = |feature: &str, revealed_by: String| ModelError::Unsupported {
        path: tf.path.clone(),
        feature: feature.to_owned(),
        revealed_by,
    };
    for name in tf.tensors.keys() {
        if let Some((_, feature)) = UNSUPPORTED_TENSORS.iter().find(|(part, _)| name.contains(part)) {
            return Err(refuse(feature, format!("tensor '{name}'")));
        }
    }
    // A packed SwiGLU MLP (DINOv2 giant, EVA-02): fc1 makes twice the features fc2 takes.
    if let (Some(fc1), Some(fc2)) = (
        tf.tensors.get("blocks.0.mlp.fc1.weight"),
        tf.tensors.get("blocks.0.mlp.fc2.weight"),
    ) && fc1.shape.first() == fc2.shape.get(1).map(|h| 2 * h).as_ref()
    {
        return Err(refuse(
            "a SwiGLU MLP",
            format!(
                "tensor 'blocks.0.mlp.fc1.weight' {:?}: twice the {} features fc2 takes",
                fc1.shape,
                fc2.shape.get(1).copied().unwrap_or_default()
            ),
        ));
    }
    Ok(())
}

/// The `config.json` next to a file (as the Hugging Face hub stores timm models), if there is
/// one that is a timm config. A `config.json` that is not timm's (another library's) is ignored;
/// one that is timm's but unreadable is an error.
pub fn sidecar_config(path: &Path) -> Result<Option<TimmConfig>> {
    let Some(json) = path.parent().map(|d| d.join("config.json")) else {
        return Ok(None);
    };
    let Ok(text) = std::fs::read_to_string(&json) else {
        return Ok(None);
    };
    let looks_timm = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .is_some_and(|v| v.get("architecture").is_some_and(serde_json::Value::is_string));
    if !looks_timm {
        return Ok(None);
    }
    TimmConfig::parse(&text).map(Some).map_err(|msg| err_cfg(&json, msg))
}

/// What the loader assumed about a file that records neither our metadata nor a timm
/// `config.json` (empty when nothing was assumed); for a warning.
pub fn assumptions(tf: &TensorFile, opts: &BackboneOptions) -> Result<Vec<String>> {
    if tf.metadata.contains_key(BACKBONE_META_KEY) || sidecar_config(&tf.path)?.is_some() {
        return Ok(Vec::new());
    }
    let cfg = config_of(tf, opts)?;
    let mut out = Vec::new();
    if opts.heads.is_none() {
        out.push(format!("{} heads (D/64)", cfg.num_heads));
    }
    out.push("exact GELU".into());
    out.push(format!("LayerNorm eps {:e}", cfg.ln_eps));
    out.push("ImageNet mean/std".into());
    Ok(out)
}

/// Infers the architecture of a foreign timm file from its tensor shapes, with what its
/// `config.json` (if any) says about the rest.
fn infer_config(tf: &TensorFile, opts: &BackboneOptions) -> Result<VitConfig> {
    let path = &tf.path;
    refuse_unsupported(tf)?;
    let timm = sidecar_config(path)?;
    let traits = match &timm {
        Some(t) => match arch_traits(&t.architecture) {
            Ok(Some(traits)) => Some(traits),
            Ok(None) => {
                return Err(err_cfg(
                    path,
                    format!(
                        "config.json names architecture '{}', which is not a ViT family MoPPA Studio knows (ViT, DeiT, DINOv2, CLIP ViT)",
                        t.architecture
                    ),
                ));
            }
            Err(u) => {
                return Err(ModelError::Unsupported {
                    path: path.clone(),
                    feature: u.feature.to_owned(),
                    revealed_by: format!("config.json architecture '{}'", u.arch),
                });
            }
        },
        None => None,
    };
    let has = |p: Part| tf.has(p.timm_name());
    let pw = tf.get(Part::PatchW.timm_name())?;
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
        .get(Part::RegToken.timm_name())
        .map_or(0, |t| t.shape.get(1).copied().unwrap_or(0));
    let class_token = has(Part::ClsToken);
    let dist_token = has(Part::DistToken);
    let prefix = usize::from(class_token) + reg_tokens + usize::from(dist_token);
    let npos = tf.get(Part::PosEmbed.timm_name())?.shape.get(1).copied().unwrap_or(0);
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
    let recorded_heads = timm
        .as_ref()
        .and_then(|t| t.arg_usize("num_heads"))
        .or_else(|| traits.as_ref().and_then(|t| t.num_heads));
    let heads = match opts.heads.or(recorded_heads) {
        Some(h) => h,
        None if d % 64 == 0 => d / 64,
        None => {
            return Err(ModelError::Config(format!(
                "{}: the file does not record the number of heads and D = {d} is not a multiple of 64; pass --heads",
                path.display()
            )));
        }
    };
    let fc_norm = has(Part::FcNormW);
    let mut act = traits.as_ref().map_or(Activation::Gelu, |t| t.act);
    let mut ln_eps = traits.as_ref().map_or(1e-6, |t| t.ln_eps);
    let (mut mean, mut std) = (crate::config::IMAGENET_MEAN, crate::config::IMAGENET_STD);
    let mut eval_crop = None;
    if let Some(t) = &timm {
        if let Some(a) = t.act_override().map_err(|m| err_cfg(path, m))? {
            act = a;
        }
        if let Some(e) = t.model_args.get("norm_eps").and_then(serde_json::Value::as_f64) {
            ln_eps = e;
        }
        match t.pool() {
            None | Some("token" | "avg" | "") => {}
            Some(other) => {
                return Err(ModelError::Unsupported {
                    path: path.clone(),
                    feature: format!("global_pool '{other}'"),
                    revealed_by: "config.json".into(),
                });
            }
        }
        let pc = &t.pretrained_cfg;
        let interpolation = match pc.interpolation.as_deref() {
            None => crate::config::Interpolation::Bicubic,
            Some(name) => crate::config::Interpolation::parse(name).ok_or_else(|| {
                err_cfg(
                    path,
                    format!("config.json: unknown interpolation '{name}' (nearest, bilinear, bicubic, lanczos)"),
                )
            })?,
        };
        // timm's DEFAULT_CROP_PCT when the config does not say.
        let crop_pct = pc.crop_pct.unwrap_or(0.875);
        if !(crop_pct > 0.0 && crop_pct <= 1.0) {
            return Err(err_cfg(
                path,
                format!("config.json: crop_pct {crop_pct} must be in (0, 1]"),
            ));
        }
        eval_crop = Some(crate::config::EvalCrop {
            crop_pct,
            interpolation,
        });
        let three = |v: &Option<Vec<f32>>| v.as_deref().and_then(|v| <[f32; 3]>::try_from(v).ok());
        mean = three(&t.pretrained_cfg.mean).unwrap_or(mean);
        std = three(&t.pretrained_cfg.std).unwrap_or(std);
    }
    let pool = match timm.as_ref().and_then(TimmConfig::pool) {
        Some("avg") => Pool::Avg,
        Some("token") => Pool::Token,
        _ if fc_norm || !class_token => Pool::Avg,
        _ => Pool::Token,
    };
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
        pool,
        fc_norm,
        final_norm: has(Part::NormW),
        norm_pre: has(Part::NormPreW),
        layer_scale: tf.has("blocks.0.ls1.gamma"),
        patch_bias: has(Part::PatchB),
        num_classes: tf.tensors.get(Part::HeadW.timm_name()).map_or(0, |t| t.shape[0]),
        prefix_tokens: prefix,
        act,
        ln_eps,
        eval_crop,
        mean,
        std,
    })
}

/// The architecture a file records (ours: its metadata; timm's: inferred from the shapes) with
/// the heads and pooling of `opts`, before any image-size override.
pub(super) fn file_config(tf: &TensorFile, opts: &BackboneOptions) -> Result<VitConfig> {
    let mut cfg = match tf.metadata.get(BACKBONE_META_KEY) {
        Some(json) => serde_json::from_str::<VitConfig>(json)
            .map_err(|e| err_cfg(&tf.path, format!("bad {BACKBONE_META_KEY} metadata: {e}")))?,
        None => infer_config(tf, opts)?,
    };
    if let Some(h) = opts.heads {
        cfg.num_heads = h;
    }
    if let Some(p) = opts.pool {
        cfg.pool = p;
    }
    Ok(cfg)
}

/// The architecture a backbone file describes as `opts` will run it (image size and derived
/// prefix included), validated. Needs only the header: shapes and metadata
/// (`TensorFile::read_header`).
pub fn config_of(tf: &TensorFile, opts: &BackboneOptions) -> Result<VitConfig> {
    let mut cfg = file_config(tf, opts)?;
    if let Some(s) = opts.img_size {
        cfg.img_size = s;
    }
    cfg.prefix_tokens = cfg.derived_prefix_tokens();
    cfg.validate().map_err(|e| err_cfg(&tf.path, e))?;
    Ok(cfg)
}
