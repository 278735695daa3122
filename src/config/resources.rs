//! What a run will ask of the machine, from its configuration alone: the checks that refuse a
//! run which cannot fit before anything is allocated (`moppa train` exits 2 naming the flag).

use super::method::{MethodConfig, MethodKind};
use super::params::{backbone_params, count_trainable};
use super::vit::VitConfig;

/// Estimated memory of a training run, in bytes, by where it goes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryEstimate {
    /// The backbone's weights.
    pub backbone: f64,
    /// Trainable parameters with their gradients and two optimizer moments.
    pub trainable: f64,
    /// Activations kept for the backward pass of one batch, and the batch itself.
    pub activations: f64,
}

impl MemoryEstimate {
    /// All of it.
    #[must_use]
    pub fn total(&self) -> f64 {
        self.backbone + self.trainable + self.activations
    }
}

/// `12.3 GB`-style text.
#[must_use]
pub fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// A rough upper estimate (f32 everywhere): weights, 4 copies of every trainable value (value,
/// gradient, two optimizer moments), and per block the activations the backward pass keeps
/// (inputs of the norms and products, the MLP's hidden layer, the attention probabilities).
/// Computed in `f64`, so an absurd batch cannot overflow; the rank must be at most D (checked
/// first by [`check_resources`]).
#[must_use]
pub fn estimate_memory(vit: &VitConfig, method: &MethodConfig, batch: usize, classes: usize) -> MemoryEstimate {
    let f = |n: usize| n as f64;
    let d = f(vit.embed_dim);
    let (b, t) = (f(batch), f(vit.tokens()));
    let hidden = f(vit.mlp_hidden());
    let heads = f(vit.num_heads);
    let adapter_width = if method.method == MethodKind::Full {
        0.0
    } else {
        4.0 * f(method.rank)
    };
    let per_block = b * t * (12.0 * d + 4.0 * hidden + adapter_width) + 2.0 * b * heads * t * t;
    let input = b * 3.0 * f(vit.img_size) * f(vit.img_size);
    MemoryEstimate {
        backbone: 4.0 * f(backbone_params(vit)),
        trainable: 16.0 * f(count_trainable(vit, method, classes)),
        activations: 4.0 * (f(vit.depth) * per_block + input),
    }
}

/// Refuses settings that cannot work on this backbone or fit this machine: a rank above the
/// backbone's width, or an estimated memory above `memory_bytes` (the machine's physical memory,
/// when known). The message names the flag and the estimate.
pub fn check_resources(
    vit: &VitConfig,
    method: &MethodConfig,
    batch: usize,
    classes: usize,
    memory_bytes: Option<u64>,
) -> Result<(), String> {
    if matches!(
        method.method,
        MethodKind::Moppa | MethodKind::Lora | MethodKind::Adaptformer
    ) && method.rank > vit.embed_dim
    {
        return Err(format!(
            "--rank {} is larger than the backbone's width D = {} (a rank of at most D makes sense)",
            method.rank, vit.embed_dim
        ));
    }
    let Some(limit) = memory_bytes else { return Ok(()) };
    let est = estimate_memory(vit, method, batch, classes);
    if est.total() <= limit as f64 {
        return Ok(());
    }
    let culprit = if est.activations >= est.trainable && est.activations >= est.backbone {
        format!("--batch {batch} of {} px images", vit.img_size)
    } else if est.trainable >= est.backbone {
        format!("--rank {}", method.rank)
    } else {
        "--backbone".to_owned()
    };
    Err(format!(
        "{culprit} needs an estimated {} of memory; this machine has {}",
        human_bytes(est.total()),
        human_bytes(limit as f64)
    ))
}
