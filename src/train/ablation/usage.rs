//! How a model routes a set of images, per MoPPA block: each prior's share of each class's patch
//! tokens, and each prior's weight against the tokens' frequency content `hf`
//! ([`crate::physics::freq::token_hf`]) as a correlation and a 2-D histogram.

use crate::model::peft::BlockRouting;
use crate::train::error::{Result, TrainError};
use crate::train::protocol::{BlockUsage, USAGE_BINS};
use candle_core::DType;

/// Sums over tokens of one block.
#[derive(Clone, Debug)]
struct BlockSums {
    block: usize,
    /// `[class][prior]` Σα, and tokens per class.
    class_alpha: Vec<Vec<f64>>,
    class_tokens: Vec<u64>,
    /// Per prior: n, Σx, Σy, Σx², Σy², Σxy with x = hf, y = α.
    moments: Vec<[f64; 6]>,
    /// Per prior: `USAGE_BINS²` counts, row = α bin, column = hf bin.
    hist: Vec<Vec<u32>>,
}

/// Accumulates [`BlockUsage`] over batches.
#[derive(Clone, Debug)]
pub struct UsageTally {
    classes: usize,
    priors: usize,
    blocks: Vec<BlockSums>,
}

fn bin(v: f64) -> usize {
    ((v.clamp(0.0, 1.0) * USAGE_BINS as f64) as usize).min(USAGE_BINS - 1)
}

impl UsageTally {
    /// An empty tally for `classes` classes and `priors` active priors.
    #[must_use]
    pub fn new(classes: usize, priors: usize) -> Self {
        Self {
            classes,
            priors,
            blocks: Vec::new(),
        }
    }

    /// Adds one batch: each block's α (`(B, HW, k)`, `(B, 1, k)` or `(1, 1, k)`), the labels and
    /// each image's unnormalised pixels (`side × side` RGB) for `hf`.
    pub fn add(
        &mut self,
        routing: &[BlockRouting],
        labels: &[u32],
        rgb: &[&[u8]],
        side: usize,
        patch: usize,
    ) -> Result<()> {
        let hf: Vec<Vec<f64>> = rgb
            .iter()
            .map(|p| crate::physics::freq::token_hf(p, side, patch))
            .collect();
        for r in routing {
            let (ab, at, k) = r.alpha.dims3()?;
            if k != self.priors {
                return Err(TrainError::Config(format!(
                    "block {}: {k} router weights for {} priors",
                    r.block, self.priors
                )));
            }
            let alpha: Vec<f32> = r.alpha.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let slot = if let Some(i) = self.blocks.iter().position(|b| b.block == r.block) {
                i
            } else {
                self.blocks.push(BlockSums {
                    block: r.block,
                    class_alpha: vec![vec![0.0; k]; self.classes],
                    class_tokens: vec![0; self.classes],
                    moments: vec![[0.0; 6]; k],
                    hist: vec![vec![0; USAGE_BINS * USAGE_BINS]; k],
                });
                self.blocks.len() - 1
            };
            let sums = &mut self.blocks[slot];
            for (img, (&label, hfs)) in labels.iter().zip(&hf).enumerate() {
                let c = label as usize;
                for (t, &h) in hfs.iter().enumerate() {
                    let row = (if ab == 1 { 0 } else { img }) * at + if at == 1 { 0 } else { t };
                    let Some(a) = alpha.get(row * k..row * k + k) else {
                        continue;
                    };
                    if let (Some(ca), Some(ct)) = (sums.class_alpha.get_mut(c), sums.class_tokens.get_mut(c)) {
                        for (s, v) in ca.iter_mut().zip(a) {
                            *s += f64::from(*v);
                        }
                        *ct += 1;
                    }
                    for (p, &v) in a.iter().enumerate() {
                        let y = f64::from(v);
                        let m = &mut sums.moments[p];
                        m[0] += 1.0;
                        m[1] += h;
                        m[2] += y;
                        m[3] += h * h;
                        m[4] += y * y;
                        m[5] += h * y;
                        sums.hist[p][bin(y) * USAGE_BINS + bin(h)] += 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// The usage per block, in block order.
    #[must_use]
    pub fn finish(mut self) -> Vec<BlockUsage> {
        self.blocks.sort_by_key(|b| b.block);
        self.blocks
            .into_iter()
            .map(|b| BlockUsage {
                block: b.block,
                class_share: b
                    .class_alpha
                    .iter()
                    .zip(&b.class_tokens)
                    .map(|(a, &n)| {
                        if n == 0 {
                            Vec::new()
                        } else {
                            a.iter().map(|s| s / n as f64).collect()
                        }
                    })
                    .collect(),
                hf_corr: b.moments.iter().map(pearson).collect(),
                hist: b.hist,
            })
            .collect()
    }
}

/// Pearson correlation from `[n, Σx, Σy, Σx², Σy², Σxy]` (NaN when either is constant).
fn pearson(m: &[f64; 6]) -> f64 {
    let [n, sx, sy, sxx, syy, sxy] = *m;
    let cov = n * sxy - sx * sy;
    let vx = n * sxx - sx * sx;
    let vy = n * syy - sy * sy;
    if vx <= 1e-12 * n * n || vy <= 1e-12 * n * n {
        f64::NAN
    } else {
        cov / (vx * vy).sqrt()
    }
}

/// Each prior's share over classes averaged over blocks: `[class][prior]` (a class without
/// tokens: empty).
#[must_use]
pub fn mean_class_share(usage: &[BlockUsage]) -> Vec<Vec<f64>> {
    let classes = usage.iter().map(|u| u.class_share.len()).max().unwrap_or(0);
    (0..classes)
        .map(|c| {
            let rows: Vec<&Vec<f64>> = usage
                .iter()
                .filter_map(|u| u.class_share.get(c))
                .filter(|r| !r.is_empty())
                .collect();
            let Some(k) = rows.first().map(|r| r.len()) else {
                return Vec::new();
            };
            (0..k)
                .map(|p| rows.iter().map(|r| r.get(p).copied().unwrap_or(0.0)).sum::<f64>() / rows.len() as f64)
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// A hand-made batch: 3 images (classes 0, 1, 0) of 2×2 tokens (8×8 pixels, patch 4), two
    /// priors. Class 0's tokens: image 0 α = (1, 0) ×4, image 2 α = (0.5, 0.5) ×4 → share
    /// (0.75, 0.25); class 1: α = (0.2, 0.8) ×4 → (0.2, 0.8); class 2 has no image.
    #[test]
    fn class_shares_of_a_hand_made_batch() -> Result<()> {
        let rows: Vec<f32> = [[1.0f32, 0.0]; 4]
            .into_iter()
            .chain([[0.2, 0.8]; 4])
            .chain([[0.5, 0.5]; 4])
            .flatten()
            .collect();
        let alpha = Tensor::from_vec(rows, (3, 4, 2), &Device::Cpu)?;
        let routing = vec![BlockRouting { block: 3, alpha }];
        let img = vec![0u8; 8 * 8 * 3];
        let rgb: Vec<&[u8]> = vec![&img, &img, &img];
        let mut t = UsageTally::new(3, 2);
        t.add(&routing, &[0, 1, 0], &rgb, 8, 4)?;
        let u = t.finish();
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].block, 3);
        let want = [vec![0.75, 0.25], vec![0.2, 0.8], vec![]];
        for (got, want) in u[0].class_share.iter().zip(&want) {
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-6, "{:?}", u[0].class_share);
            }
        }
        // Flat images: hf is 0 everywhere, so no correlation; every token in hf bin 0.
        assert!(u[0].hf_corr.iter().all(|c| c.is_nan()));
        assert_eq!(u[0].hist[0].iter().sum::<u32>(), 12);
        assert_eq!(
            u[0].hist[0][(USAGE_BINS - 1) * USAGE_BINS],
            4,
            "α = 1 in the top row, hf column 0"
        );
        // The mean over blocks of one block is that block.
        assert_eq!(mean_class_share(&u)[1], u[0].class_share[1]);
        Ok(())
    }

    #[test]
    fn tokens_whose_weight_follows_hf_correlate_with_it() -> Result<()> {
        // Image: left column of patches flat, right column stripes; α₀ = hf, α₁ = 1 − hf.
        let mut img = vec![0u8; 8 * 8 * 3];
        for r in 0..8 {
            for c in 4..8 {
                for ch in 0..3 {
                    img[(r * 8 + c) * 3 + ch] = if c % 2 == 0 { 255 } else { 0 };
                }
            }
        }
        let hf = crate::physics::freq::token_hf(&img, 8, 4);
        let rows: Vec<f32> = hf.iter().flat_map(|&h| [h as f32, 1.0 - h as f32]).collect();
        let alpha = Tensor::from_vec(rows, (1, 4, 2), &Device::Cpu)?;
        let mut t = UsageTally::new(1, 2);
        t.add(&[BlockRouting { block: 0, alpha }], &[0], &[&img], 8, 4)?;
        let u = t.finish();
        assert!((u[0].hf_corr[0] - 1.0).abs() < 1e-9, "{:?}", u[0].hf_corr);
        assert!((u[0].hf_corr[1] + 1.0).abs() < 1e-9);
        Ok(())
    }
}
