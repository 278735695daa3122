//! Multi-head softmax attention straight from a fused `qkv` buffer `(B, T, 3D)` (timm's layout:
//! q, k, v each `D = heads·hd` wide), writing `(B, T, D)` with heads side by side, so no permute or
//! copy is needed on either side. Parallel over images, small serial GEMMs per head.

use super::gemm::{Par, View, gemm};
use super::math::{dot, exp, max, multiversion, sum};
use rayon::prelude::*;

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    /// Images in the batch.
    pub b: usize,
    /// Tokens per image.
    pub t: usize,
    /// Width `D`.
    pub d: usize,
    /// Number of heads.
    pub heads: usize,
}

impl Dims {
    fn hd(&self) -> usize {
        self.d / self.heads
    }
}

#[inline(always)]
fn softmax_rows(s: &mut [f32], t: usize, scale: f32) {
    for row in s.chunks_exact_mut(t) {
        let shift = max(row) * scale;
        for v in row.iter_mut() {
            *v = exp(*v * scale - shift);
        }
        let inv = 1.0 / sum(row);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

multiversion!(fn softmax_rows_mv(s: &mut [f32], t: usize, scale: f32) => softmax_rows);

#[inline(always)]
fn softmax_bwd_rows(ds: &mut [f32], p: &[f32], t: usize, scale: f32) {
    for (dr, pr) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)) {
        let d = dot(dr, pr);
        for (dv, pv) in dr.iter_mut().zip(pr) {
            *dv = pv * (*dv - d) * scale;
        }
    }
}

multiversion!(fn softmax_bwd_rows_mv(ds: &mut [f32], p: &[f32], t: usize, scale: f32) => softmax_bwd_rows);

/// Forward: `out = softmax(q·kᵀ/√hd)·v` per head. `probs`, when given (`B·heads·T·T`), keeps the
/// attention weights for the backward pass.
pub fn forward(qkv: &[f32], out: &mut [f32], probs: Option<&mut [f32]>, dims: Dims) {
    let Dims { t, d, heads, .. } = dims;
    let hd = dims.hd();
    let scale = 1.0 / (hd as f32).sqrt();
    let run = |qkv_b: &[f32], out_b: &mut [f32], p_b: &mut [f32]| {
        for h in 0..heads {
            let p = &mut p_b[h * t * t..(h + 1) * t * t];
            let q = View::strided(&qkv_b[h * hd..], 3 * d);
            let k_t = View {
                data: &qkv_b[d + h * hd..],
                rs: 1,
                cs: 3 * d,
            };
            gemm(t, t, hd, q, k_t, p, t, false, Par::Serial);
            softmax_rows_mv(p, t, scale);
            let v = View::strided(&qkv_b[2 * d + h * hd..], 3 * d);
            gemm(
                t,
                hd,
                t,
                View::rows(p, t),
                v,
                &mut out_b[h * hd..],
                d,
                false,
                Par::Serial,
            );
        }
    };
    match probs {
        Some(probs) => qkv
            .par_chunks(t * 3 * d)
            .zip(out.par_chunks_mut(t * d))
            .zip(probs.par_chunks_mut(heads * t * t))
            .for_each(|((qkv_b, out_b), p_b)| run(qkv_b, out_b, p_b)),
        None => qkv.par_chunks(t * 3 * d).zip(out.par_chunks_mut(t * d)).for_each_init(
            || vec![0.0f32; heads * t * t],
            |p_b, (qkv_b, out_b)| run(qkv_b, out_b, p_b),
        ),
    }
}

/// Backward: from `d_out (B, T, D)` and the saved `probs`, writes `d_qkv (B, T, 3D)`.
pub fn backward(qkv: &[f32], probs: &[f32], d_out: &[f32], d_qkv: &mut [f32], dims: Dims) {
    let Dims { t, d, heads, .. } = dims;
    let hd = dims.hd();
    let scale = 1.0 / (hd as f32).sqrt();
    qkv.par_chunks(t * 3 * d)
        .zip(probs.par_chunks(heads * t * t))
        .zip(d_out.par_chunks(t * d))
        .zip(d_qkv.par_chunks_mut(t * 3 * d))
        .for_each_init(
            || vec![0.0f32; t * t],
            |ds, (((qkv_b, p_b), do_b), dqkv_b)| {
                for h in 0..heads {
                    let p = &p_b[h * t * t..(h + 1) * t * t];
                    let d_o = View::strided(&do_b[h * hd..], d);
                    // dP = dO·vᵀ
                    let v_t = View {
                        data: &qkv_b[2 * d + h * hd..],
                        rs: 1,
                        cs: 3 * d,
                    };
                    gemm(t, t, hd, d_o, v_t, ds, t, false, Par::Serial);
                    // dv = Pᵀ·dO
                    gemm(
                        t,
                        hd,
                        t,
                        View::t(p, t),
                        d_o,
                        &mut dqkv_b[2 * d + h * hd..],
                        3 * d,
                        false,
                        Par::Serial,
                    );
                    // dS = P ⊙ (dP − rowsum(dP ⊙ P)) / √hd
                    softmax_bwd_rows_mv(ds, p, t, scale);
                    // dq = dS·k, dk = dSᵀ·q
                    let k = View::strided(&qkv_b[d + h * hd..], 3 * d);
                    gemm(
                        t,
                        hd,
                        t,
                        View::rows(ds, t),
                        k,
                        &mut dqkv_b[h * hd..],
                        3 * d,
                        false,
                        Par::Serial,
                    );
                    let q = View::strided(&qkv_b[h * hd..], 3 * d);
                    gemm(
                        t,
                        hd,
                        t,
                        View::t(ds, t),
                        q,
                        &mut dqkv_b[d + h * hd..],
                        3 * d,
                        false,
                        Par::Serial,
                    );
                }
            },
        );
}
