//! The model's internals for the live views and `snapshots.jsonl`: each MoPPA block's
//! coefficients, source map, router statistics and locks, and the probe image's per-token router
//! weights. The filters and their mix are not taken here: the worker records this snapshot and
//! the displays see the view of that record (`snapfile::snapshot_view`), as a reopened run does.

use super::Trainer;
use crate::config::PerCoeff;
use crate::model::NoGrad;
use crate::train::error::Result;
use crate::train::probe::probe_forward;
use crate::train::protocol::{BlockSnapshot, Probe, ProbeOrigin, Rgb, RouterStats, Snapshot};
use candle_core::{DType, Tensor};
use std::collections::HashMap;

impl Trainer {
    /// The model's internals now (MoPPA blocks; empty for other methods), without filters.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let (h, w) = (self.model.grid.h, self.model.grid.w);
        let priors = self.info.priors.clone();
        let k = priors.len();
        let _no_grad = NoGrad::new(&self.model);
        let size = self.model.backbone.cfg.img_size;
        let probe = match &self.probe_image {
            Some((name, rgb)) => Some(Probe {
                image: rgb.clone(),
                origin: ProbeOrigin::File { name: name.clone() },
            }),
            None => self.val.rgb(self.probe).map(|(pixels, label)| Probe {
                image: Rgb { size, pixels },
                origin: ProbeOrigin::Val {
                    index: self.probe,
                    label,
                },
            }),
        };
        let mut probe_alpha: HashMap<usize, Vec<f32>> = HashMap::new();
        let mut probe_prediction = None;
        if let Some(p) = &probe {
            let fwd = probe_forward(&self.model, &p.image, &self.normalize, &self.device)?;
            probe_prediction = fwd.prediction;
            probe_alpha.extend(fwd.alpha);
        }
        let mut blocks = Vec::new();
        for b in self.model.moppa_blocks() {
            let Some(u) = self.model.moppa_unit(b) else { continue };
            let router = self
                .last_routing
                .iter()
                .find(|r| r.block == b)
                .map(|r| router_stats(&r.alpha, k))
                .transpose()?;
            let natural = u.coeffs();
            blocks.push(BlockSnapshot {
                block: b,
                filters_mean: Vec::new(),
                filters_channel: Vec::new(),
                mix: Vec::new(),
                coeffs: PerCoeff::from_fn(|c| natural[c].iter().map(|&v| v as f32).collect()),
                source: u.source_map()?,
                router,
                probe_alpha: probe_alpha.remove(&b).unwrap_or_default(),
                locked: self.locked_in(b),
            });
        }
        let live = &self.model.live;
        Ok(Snapshot {
            step: self.step,
            grid: (h, w),
            priors,
            channel: self.channel,
            tau: live.tau,
            gamma: live.gamma,
            route_weight: live.route_weight,
            temperature: live.temperature,
            blocks,
            probe,
            probe_prediction,
        })
    }
}

/// ᾱ, entropy and argmax shares from router weights `(B|1, N|1, k)`.
fn router_stats(alpha: &Tensor, k: usize) -> Result<RouterStats> {
    let v: Vec<f32> = alpha.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let rows = v.len() / k.max(1);
    let mut mean = vec![0f32; k];
    let mut share = vec![0f32; k];
    let mut entropy = 0f32;
    for row in v.chunks_exact(k) {
        let mut best = 0;
        for (p, &a) in row.iter().enumerate() {
            mean[p] += a;
            if a > row[best] {
                best = p;
            }
            if a > 0.0 {
                entropy -= a * a.ln();
            }
        }
        share[best] += 1.0;
    }
    let n = rows.max(1) as f32;
    for x in mean.iter_mut().chain(share.iter_mut()) {
        *x /= n;
    }
    entropy /= n;
    let norm = if k > 1 { entropy / (k as f32).ln() } else { 0.0 };
    Ok(RouterStats {
        mean_alpha: mean,
        entropy,
        entropy_norm: norm,
        argmax_share: share,
    })
}
