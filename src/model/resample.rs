//! Position-embedding resampling exactly as timm does when a checkpoint is loaded at another
//! image size: `resample_abs_pos_embed(..., interpolation='bicubic')`, which calls PyTorch's
//! `F.interpolate(mode='bicubic', antialias=True)`: the PIL-style separable bicubic
//! (a = −0.5, weights renormalised over in-range taps), computed in `f32` like timm.

/// The `n_out × n_in` interpolation matrix of PyTorch's antialiased bicubic.
#[must_use]
pub fn bicubic_aa_weights(n_in: usize, n_out: usize) -> Vec<f64> {
    const A: f64 = -0.5;
    let cubic = |x: f64| {
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * A
        } else {
            0.0
        }
    };
    let scale = n_in as f64 / n_out as f64;
    let support_scale = scale.max(1.0);
    let support = 2.0 * support_scale;
    let inv = 1.0 / support_scale;
    let mut m = vec![0.0; n_out * n_in];
    for i in 0..n_out {
        let center = scale * (i as f64 + 0.5);
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(n_in as i64).max(0) as usize;
        let w: Vec<f64> = (lo..hi).map(|j| cubic((j as f64 - center + 0.5) * inv)).collect();
        let total: f64 = w.iter().sum();
        for (j, wj) in (lo..hi).zip(w) {
            m[i * n_in + j] = wj / total;
        }
    }
    m
}

/// Resamples a `(h_in·w_in) × d` grid of embeddings to `(h_out·w_out) × d` (row-major grids).
#[must_use]
pub fn resample_grid(data: &[f32], d: usize, (h_in, w_in): (usize, usize), (h_out, w_out): (usize, usize)) -> Vec<f32> {
    let wy = bicubic_aa_weights(h_in, h_out);
    let wx = bicubic_aa_weights(w_in, w_out);
    // Rows first (along W), then columns (along H).
    let mut tmp = vec![0.0f64; h_in * w_out * d];
    for r in 0..h_in {
        for o in 0..w_out {
            for i in 0..w_in {
                let w = wx[o * w_in + i];
                if w != 0.0 {
                    for c in 0..d {
                        tmp[(r * w_out + o) * d + c] += w * f64::from(data[(r * w_in + i) * d + c]);
                    }
                }
            }
        }
    }
    let mut out = vec![0.0f64; h_out * w_out * d];
    for o in 0..h_out {
        for r in 0..h_in {
            let w = wy[o * h_in + r];
            if w != 0.0 {
                for col in 0..w_out {
                    for c in 0..d {
                        out[(o * w_out + col) * d + c] += w * tmp[(r * w_out + col) * d + c];
                    }
                }
            }
        }
    }
    out.into_iter().map(|v| v as f32).collect()
}
