//! LayerNorm over the last dimension: forward (saving mean and 1/σ) and backward, parallel over
//! rows, vectorised per row.

use super::math::{ROW_CHUNK, dot, dot3, multiversion, sum, sum_sq_dev};
use rayon::prelude::*;

#[inline(always)]
fn fwd_rows(x: &[f32], y: &mut [f32], stats: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let d = gamma.len();
    let inv_d = 1.0 / d as f32;
    for ((xr, yr), st) in x
        .chunks_exact(d)
        .zip(y.chunks_exact_mut(d))
        .zip(stats.chunks_exact_mut(2))
    {
        let mean = sum(xr) * inv_d;
        let var = sum_sq_dev(xr, mean) * inv_d;
        let rstd = 1.0 / (var + eps).sqrt();
        for (((yv, xv), g), b) in yr.iter_mut().zip(xr).zip(gamma).zip(beta) {
            *yv = (xv - mean) * rstd * g + b;
        }
        st[0] = mean;
        st[1] = rstd;
    }
}

multiversion!(fn fwd_rows_mv(x: &[f32], y: &mut [f32], stats: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) => fwd_rows);

/// `y = (x − μ)/σ·γ + β` per row of length `γ.len()`; `stats` receives `(μ, 1/σ)` per row.
pub fn forward(x: &[f32], y: &mut [f32], stats: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let d = gamma.len();
    x.par_chunks(d * ROW_CHUNK)
        .zip(y.par_chunks_mut(d * ROW_CHUNK))
        .zip(stats.par_chunks_mut(2 * ROW_CHUNK))
        .for_each(|((x, y), s)| fwd_rows_mv(x, y, s, gamma, beta, eps));
}

#[inline(always)]
fn bwd_rows(x: &[f32], dy: &[f32], stats: &[f32], gamma: &[f32], dx: &mut [f32], accumulate: bool, dgb: &mut [f32]) {
    let d = gamma.len();
    let inv_d = 1.0 / d as f32;
    let (dg, db) = dgb.split_at_mut(d);
    for (((xr, dyr), st), dxr) in x
        .chunks_exact(d)
        .zip(dy.chunks_exact(d))
        .zip(stats.chunks_exact(2))
        .zip(dx.chunks_exact_mut(d))
    {
        let (mean, rstd) = (st[0], st[1]);
        // Σ dŷ and Σ dŷ·x̂ with dŷ = dy·γ and x̂ = (x − μ)/σ, as vectorised dot products.
        let sum_dxhat = dot(dyr, gamma);
        let sum_dxhat_xhat = rstd * (dot3(dyr, gamma, xr) - mean * sum_dxhat);
        for ((dgv, dbv), (xv, dyv)) in dg.iter_mut().zip(db.iter_mut()).zip(xr.iter().zip(dyr)) {
            *dgv += dyv * (xv - mean) * rstd;
            *dbv += dyv;
        }
        let m1 = sum_dxhat * inv_d;
        let m2 = sum_dxhat_xhat * inv_d;
        for (((dxv, xv), dyv), g) in dxr.iter_mut().zip(xr).zip(dyr).zip(gamma) {
            let xhat = (xv - mean) * rstd;
            let v = rstd * (dyv * g - m1 - xhat * m2);
            *dxv = if accumulate { *dxv + v } else { v };
        }
    }
}

multiversion!(fn bwd_rows_mv(x: &[f32], dy: &[f32], stats: &[f32], gamma: &[f32], dx: &mut [f32], accumulate: bool, dgb: &mut [f32]) => bwd_rows);

/// LayerNorm backward. `dx` is overwritten (or accumulated into, to fuse a residual). Returns
/// `(dγ, dβ)` summed over rows in a fixed order (deterministic for any thread count).
pub fn backward(
    x: &[f32],
    dy: &[f32],
    stats: &[f32],
    gamma: &[f32],
    dx: &mut [f32],
    accumulate: bool,
) -> (Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    let chunk = d * ROW_CHUNK * 4;
    let partials: Vec<Vec<f32>> = x
        .par_chunks(chunk)
        .zip(dy.par_chunks(chunk))
        .zip(stats.par_chunks(2 * ROW_CHUNK * 4))
        .zip(dx.par_chunks_mut(chunk))
        .map(|(((x, dy), s), dx)| {
            let mut dgb = vec![0.0f32; 2 * d];
            bwd_rows_mv(x, dy, s, gamma, dx, accumulate, &mut dgb);
            dgb
        })
        .collect();
    let mut dg = vec![0.0f32; d];
    let mut db = vec![0.0f32; d];
    for p in partials {
        for (a, b) in dg.iter_mut().zip(&p[..d]) {
            *a += b;
        }
        for (a, b) in db.iter_mut().zip(&p[d..]) {
            *a += b;
        }
    }
    (dg, db)
}
