//! CPU kernels: vectorised, rayon-parallel forward and backward passes for the transformer's
//! heavy parts. Everything here works on contiguous `f32` slices; `super::fused` wraps it into
//! candle custom ops.
//!
//! `#[inline(always)]` is deliberate here: row kernels must inline into the `target_feature`
//! copies `math::multiversion!` generates, or they would not be compiled for AVX2/AVX-512.
//! Kernel signatures follow BLAS (sizes, buffers, strides), hence the long argument lists.
#![allow(clippy::inline_always, clippy::too_many_arguments)]

pub mod attention;
pub mod bf16;
pub mod gemm;
pub mod layer_norm;
pub mod math;
pub mod pool;

use rayon::prelude::*;

/// Rows per rayon task for reductions over rows (fixed: results do not depend on thread count).
const SUM_CHUNK: usize = 256;

/// Column sums of a row-major `rows × cols` matrix, deterministic for any thread count.
#[must_use]
pub fn col_sums(m: &[f32], cols: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = m
        .par_chunks(cols * SUM_CHUNK)
        .map(|chunk| {
            let mut acc = vec![0.0f32; cols];
            for row in chunk.chunks_exact(cols) {
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        })
        .collect();
    let mut out = vec![0.0f32; cols];
    for p in partials {
        for (a, v) in out.iter_mut().zip(p) {
            *a += v;
        }
    }
    out
}

/// Column sums of `a ⊙ b` (both `rows × cols`), deterministic.
#[must_use]
pub fn col_dot(a: &[f32], b: &[f32], cols: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = a
        .par_chunks(cols * SUM_CHUNK)
        .zip(b.par_chunks(cols * SUM_CHUNK))
        .map(|(ca, cb)| {
            let mut acc = vec![0.0f32; cols];
            for (ra, rb) in ca.chunks_exact(cols).zip(cb.chunks_exact(cols)) {
                for ((s, x), y) in acc.iter_mut().zip(ra).zip(rb) {
                    *s += x * y;
                }
            }
            acc
        })
        .collect();
    let mut out = vec![0.0f32; cols];
    for p in partials {
        for (s, v) in out.iter_mut().zip(p) {
            *s += v;
        }
    }
    out
}

/// `dst[r] (= or +=) f(src[r])` row by row in parallel: a helper for fused epilogues.
pub fn rows_mut<F>(dst: &mut [f32], cols: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    dst.par_chunks_mut(cols * math::ROW_CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (i, row) in chunk.chunks_exact_mut(cols).enumerate() {
                f(c * math::ROW_CHUNK + i, row);
            }
        });
}

/// A zero-filled buffer (allocated as zeroed pages, so untouched parts cost nothing).
#[must_use]
pub fn zeros(n: usize) -> Vec<f32> {
    vec![0.0; n]
}
