//! Trainable-parameter counts from the configuration alone (nothing built): `moppa params`, the
//! app's launch panel and the runs table. `tests/peft.rs` checks them against built models.

use super::method::{MethodConfig, MethodKind, RouterKind};
use super::prior::Prior;
use super::vit::{Pool, VitConfig};

/// Trainable scalars of `method` on a backbone of shape `cfg` with a `classes`-way head, without
/// building anything (for `moppa params` and the app's launch panel).
#[must_use]
pub fn count_trainable(cfg: &VitConfig, method: &MethodConfig, classes: usize) -> usize {
    let d = cfg.embed_dim;
    let r = method.rank;
    let depth = cfg.depth;
    let heads = 1 + usize::from(cfg.dist_token && cfg.pool == Pool::Token);
    let head = heads * (classes * d + classes);
    let per_block = match method.method {
        MethodKind::Linear | MethodKind::Full => 0,
        MethodKind::Lora => 4 * r * d,
        MethodKind::Adaptformer => 2 * r * d + r + d,
        MethodKind::Moppa => {
            let priors = method.active_priors();
            let k = priors.len();
            let router = match (k, method.router) {
                (1, _) => 0,
                (_, RouterKind::Layer) => k,
                _ => k * d + k,
            };
            let hw = cfg.grid() * cfg.grid();
            let source = if priors.contains(&Prior::Poisson) { hw } else { 0 };
            2 * r * d + r + router + k * r + source
        }
    };
    let backbone = if method.method == MethodKind::Full {
        backbone_params(cfg)
    } else {
        0
    };
    depth * per_block + head + backbone
}

/// Parameters of the backbone itself (its own head excluded).
#[must_use]
pub fn backbone_params(cfg: &VitConfig) -> usize {
    let d = cfg.embed_dim;
    let hidden = cfg.mlp_hidden();
    let p = cfg.patch_size;
    let prefix = cfg.derived_prefix_tokens();
    let npos = if cfg.no_embed_class { 0 } else { prefix } + cfg.grid() * cfg.grid();
    let norms = 2 * d * (usize::from(cfg.norm_pre) + usize::from(cfg.final_norm) + usize::from(cfg.fc_norm));
    let ls = if cfg.layer_scale { d } else { 0 };
    let attn = 2 * d + 3 * d * d + if cfg.qkv_bias { 3 * d } else { 0 } + d * d + d + ls;
    let mlp = 2 * d + hidden * d + hidden + d * hidden + d + ls;
    d * cfg.in_chans * p * p
        + if cfg.patch_bias { d } else { 0 }
        + prefix * d
        + npos * d
        + norms
        + cfg.depth * (attn + mlp)
}
