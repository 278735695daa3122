//! Branch-free `f32` math that the compiler vectorises (exp, erf, exact GELU), and the
//! elementwise kernels built on it, compiled for AVX-512 / AVX2+FMA with runtime dispatch.
#![allow(unsafe_code)]

use rayon::prelude::*;

/// Rows handed to one rayon task by the elementwise kernels (fixed, so results never depend on
/// the thread count).
pub const ROW_CHUNK: usize = 16;

/// Generates a safe entry point that runs `$impl` compiled for the best instruction set present.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $imp:ident) => {
        $(#[$meta])*
        #[allow(unsafe_code)]
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) { $imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) { $imp($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512vl") {
                    // SAFETY: the CPU supports the features this copy was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $imp($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// `eˣ` to ~2 ulp for `x` in `[-87, 88]` (clamped outside), without branches.
///
/// The exponent is built from bits: adding 1.5·2²³ rounds `x·log₂e` to an integer that then
/// sits in the low mantissa bits, so no float→int conversion is needed (Rust's saturating `as`
/// conversion would not vectorise).
#[inline(always)]
#[must_use]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // t's bits minus ROUND's bits = n (two's complement in the low bits); +127 then << 23 is 2ⁿ.
    let scale = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    p * scale
}

/// `erf(x)` by the rational approximation Eigen and XLA use for `f32` (a few ulp).
#[inline(always)]
#[must_use]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    let p = x2 * p - 2.101_024_1e-6;
    let p = x2 * p - 5.692_506_4e-5;
    let p = x2 * p - 7.349_906_3e-4;
    let p = x2 * p - 2.954_6e-3;
    let p = x2 * p - 1.609_603_3e-2;
    let q = x2 * -1.456_607_2e-5 - 2.133_740_6e-4;
    let q = x2 * q - 1.682_827e-3;
    let q = x2 * q - 7.373_329_2e-3;
    let q = x2 * q - 1.426_473_9e-2;
    x * p / q
}

/// Lanes of the reduction helpers: enough independent accumulators for the compiler to use full
/// vector registers (float sums are not reassociated otherwise, so a plain `.sum()` stays scalar).
const LANES: usize = 16;

/// `Σ x`, vectorised.
#[inline(always)]
#[must_use]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + rem.iter().sum::<f32>()
}

/// `Σ a·b`, vectorised.
#[inline(always)]
#[must_use]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for ((s, u), v) in acc.iter_mut().zip(x).zip(y) {
            *s += u * v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ a·b·c`, vectorised.
#[inline(always)]
#[must_use]
pub fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb, cc) = (a.chunks_exact(LANES), b.chunks_exact(LANES), c.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder())
        .map(|((x, y), z)| x * y * z)
        .sum();
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for (((s, u), v), w) in acc.iter_mut().zip(x).zip(y).zip(z) {
            *s += u * v * w;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ (x − c)²`, vectorised.
#[inline(always)]
#[must_use]
pub fn sum_sq_dev(x: &[f32], c: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|v| (v - c) * (v - c)).sum();
    for ch in chunks {
        for (a, v) in acc.iter_mut().zip(ch) {
            *a += (v - c) * (v - c);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `max x` (−∞ for an empty slice), vectorised.
#[inline(always)]
#[must_use]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rem = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = if *v > *a { *v } else { *a };
        }
    }
    acc.iter()
        .chain(rem)
        .fold(f32::NEG_INFINITY, |m, v| if *v > m { *v } else { m })
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// `1/√(2π)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// Exact (erf) GELU: `x·Φ(x)`.
#[inline(always)]
#[must_use]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

/// `d GELU/dx = Φ(x) + x·φ(x)`.
#[inline(always)]
#[must_use]
pub fn gelu_grad(x: f32) -> f32 {
    0.5 * (1.0 + erf(x * FRAC_1_SQRT_2)) + x * FRAC_1_SQRT_2PI * exp(-0.5 * x * x)
}

#[inline(always)]
fn bias_gelu_rows(a: &mut [f32], g: &mut [f32], cdf: &mut [f32], bias: &[f32]) {
    let n = bias.len();
    for ((ar, gr), cr) in a
        .chunks_exact_mut(n)
        .zip(g.chunks_exact_mut(n))
        .zip(cdf.chunks_exact_mut(n))
    {
        for (((av, gv), cv), b) in ar.iter_mut().zip(gr.iter_mut()).zip(cr.iter_mut()).zip(bias) {
            let v = *av + b;
            let phi = 0.5 * (1.0 + erf(v * FRAC_1_SQRT_2));
            *av = v;
            *cv = phi;
            *gv = v * phi;
        }
    }
}

multiversion!(fn bias_gelu_rows_mv(a: &mut [f32], g: &mut [f32], cdf: &mut [f32], bias: &[f32]) => bias_gelu_rows);

/// In place `a += bias` (per row); then `g = GELU(a) = a·Φ(a)` and `cdf = Φ(a)` (kept for the
/// backward pass, which then needs no erf); rows of length `bias.len()`, in parallel.
pub fn bias_gelu(a: &mut [f32], g: &mut [f32], cdf: &mut [f32], bias: &[f32]) {
    let n = bias.len();
    a.par_chunks_mut(n * ROW_CHUNK)
        .zip(g.par_chunks_mut(n * ROW_CHUNK))
        .zip(cdf.par_chunks_mut(n * ROW_CHUNK))
        .for_each(|((a, g), c)| bias_gelu_rows_mv(a, g, c, bias));
}

#[inline(always)]
fn gelu_bwd_rows(d: &mut [f32], a: &[f32], cdf: &[f32]) {
    for ((dv, av), cv) in d.iter_mut().zip(a).zip(cdf) {
        *dv *= cv + av * FRAC_1_SQRT_2PI * exp(-0.5 * av * av);
    }
}

multiversion!(fn gelu_bwd_rows_mv(d: &mut [f32], a: &[f32], cdf: &[f32]) => gelu_bwd_rows);

/// In place `d ← d·GELU'(a)` with `GELU'(a) = Φ(a) + a·φ(a)`, from the saved `Φ(a)`; parallel.
pub fn gelu_bwd(d: &mut [f32], a: &[f32], cdf: &[f32], row_len: usize) {
    let chunk = row_len * ROW_CHUNK;
    d.par_chunks_mut(chunk)
        .zip(a.par_chunks(chunk))
        .zip(cdf.par_chunks(chunk))
        .for_each(|((d, a), c)| gelu_bwd_rows_mv(d, a, c));
}

/// QuickGELU's slope: `x·σ(1.702·x)`.
pub const QUICK_GELU: f32 = 1.702;

#[inline(always)]
fn bias_quick_gelu_rows(a: &mut [f32], g: &mut [f32], sig: &mut [f32], bias: &[f32]) {
    let n = bias.len();
    for ((ar, gr), sr) in a
        .chunks_exact_mut(n)
        .zip(g.chunks_exact_mut(n))
        .zip(sig.chunks_exact_mut(n))
    {
        for (((av, gv), sv), b) in ar.iter_mut().zip(gr.iter_mut()).zip(sr.iter_mut()).zip(bias) {
            let v = *av + b;
            let s = 1.0 / (1.0 + exp(-QUICK_GELU * v));
            *av = v;
            *sv = s;
            *gv = v * s;
        }
    }
}

multiversion!(fn bias_quick_gelu_rows_mv(a: &mut [f32], g: &mut [f32], sig: &mut [f32], bias: &[f32]) => bias_quick_gelu_rows);

/// In place `a += bias` (per row); then `g = a·σ(1.702a)` (QuickGELU) and `sig = σ(1.702a)` (kept
/// for the backward pass); rows of length `bias.len()`, in parallel.
pub fn bias_quick_gelu(a: &mut [f32], g: &mut [f32], sig: &mut [f32], bias: &[f32]) {
    let n = bias.len();
    a.par_chunks_mut(n * ROW_CHUNK)
        .zip(g.par_chunks_mut(n * ROW_CHUNK))
        .zip(sig.par_chunks_mut(n * ROW_CHUNK))
        .for_each(|((a, g), s)| bias_quick_gelu_rows_mv(a, g, s, bias));
}

#[inline(always)]
fn quick_gelu_bwd_rows(d: &mut [f32], a: &[f32], sig: &[f32]) {
    for ((dv, av), sv) in d.iter_mut().zip(a).zip(sig) {
        *dv *= sv + QUICK_GELU * av * sv * (1.0 - sv);
    }
}

multiversion!(fn quick_gelu_bwd_rows_mv(d: &mut [f32], a: &[f32], sig: &[f32]) => quick_gelu_bwd_rows);

/// In place `d ← d·QuickGELU'(a)` with `QuickGELU'(a) = s + 1.702·a·s·(1 − s)`, `s = σ(1.702a)`
/// saved by [`bias_quick_gelu`]; parallel.
pub fn quick_gelu_bwd(d: &mut [f32], a: &[f32], sig: &[f32], row_len: usize) {
    let chunk = row_len * ROW_CHUNK;
    d.par_chunks_mut(chunk)
        .zip(a.par_chunks(chunk))
        .zip(sig.par_chunks(chunk))
        .for_each(|((d, a), s)| quick_gelu_bwd_rows_mv(d, a, s));
}

#[inline(always)]
fn gelu_grad_rows(d: &mut [f32], a: &[f32]) {
    for (dv, av) in d.iter_mut().zip(a) {
        *dv *= gelu_grad(*av);
    }
}

multiversion!(fn gelu_grad_rows_mv(d: &mut [f32], a: &[f32]) => gelu_grad_rows);

/// In place `d ← d·GELU'(x)` computing Φ on the fly (when it was not saved).
pub fn gelu_bwd_recompute(d: &mut [f32], x: &[f32]) {
    const CHUNK: usize = 1 << 14;
    d.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(d, x)| gelu_grad_rows_mv(d, x));
}

#[inline(always)]
fn gelu_rows(x: &[f32], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv = gelu(*xv);
    }
}

multiversion!(fn gelu_rows_mv(x: &[f32], y: &mut [f32]) => gelu_rows);

/// `y = GELU(x)` elementwise, in parallel.
pub fn gelu_slice(x: &[f32], y: &mut [f32]) {
    const CHUNK: usize = 1 << 14;
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| gelu_rows_mv(x, y));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0.0f64;
        for i in -8700..8800 {
            let x = i as f32 * 0.01;
            let want = f64::from(x).exp();
            let rel = ((f64::from(exp(x)) - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
    }

    #[test]
    fn erf_and_gelu_are_accurate() {
        // Reference erf from the f64 series/continued fraction in libm-free form: use
        // erf(x) = 1 - erfc(x) with a high-precision f64 rational (Abramowitz-Stegun 7.1.26
        // is too coarse), so compare against numerically integrated Φ instead.
        let phi = |x: f64| {
            // Simpson integration of the normal density from 0 to x, 20k panels.
            let n = 20_000;
            let h = x / f64::from(n);
            let f = |t: f64| (-0.5 * t * t).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let mut s = f(0.0) + f(x);
            for k in 1..n {
                s += if k % 2 == 1 { 4.0 } else { 2.0 } * f(h * f64::from(k));
            }
            0.5 + s * h / 3.0
        };
        for i in -60..=60 {
            let x = i as f32 * 0.1;
            let want = f64::from(x) * phi(f64::from(x));
            let got = f64::from(gelu(x));
            assert!(
                (got - want).abs() < 2e-6 * (1.0 + want.abs()),
                "gelu({x}) = {got}, want {want}"
            );
            let h = 1e-4;
            let fd = (f64::from(x) + h) * phi(f64::from(x) + h) - (f64::from(x) - h) * phi(f64::from(x) - h);
            let fd = fd / (2.0 * h);
            assert!((f64::from(gelu_grad(x)) - fd).abs() < 2e-5, "gelu'({x})");
        }
    }
}
