//! Matrix products with bf16 operands and f32 accumulation (what `torch.autocast` does to a
//! linear layer on the CPU): on x86-64 CPUs with AVX512-BF16 (`vdpbf16ps`, two products per f32
//! lane per instruction, twice the f32 FMA rate), emulated elsewhere (operands rounded to bf16,
//! then the f32 GEMM), so results agree on every machine up to the order of summation.
//!
//! Both operands are rounded to nearest-even bf16 (8 significant bits); every product of two
//! bf16 values is exact in f32 and the sums are f32. Weight gradients never come here (see
//! [`super::gemm::linear_dw`]).
#![allow(unsafe_code)]

use super::gemm::View;
use rayon::prelude::*;
use std::cell::RefCell;

/// AVX-512 registers of f32 per output row of a micro-kernel.
const NV: usize = 3;
/// Output columns per micro-kernel (48 divides every ViT width: 96, 192, 288, 384, 768, …).
const NR: usize = 16 * NV;
/// Output rows per micro-kernel: 8 × 3 accumulators (of 32 registers). Measured on the tiny
/// preset's products (Zen 4, 2 threads): 8 × 48 at 308-318 GFLOP/s, 6 × 32 at 242-322,
/// 4 × 64 at 201-273.
const MR: usize = 8;
/// Micro-kernel row blocks per rayon task.
const BLOCKS_PER_TASK: usize = 16;

/// `x` rounded to the nearest bf16 (ties to even), as the bit pattern's top half.
#[inline]
fn to_bf16(x: f32) -> u32 {
    let b = x.to_bits();
    if x.is_nan() {
        // Quiet NaN, sign kept (what `half::bf16::from_f32` and `vcvtne2ps2bf16` give).
        (b >> 16) | 0x40
    } else {
        // Round to nearest, ties to even: add 0x7fff plus the lowest kept bit, then truncate.
        (b + 0x7fff + ((b >> 16) & 1)) >> 16
    }
}

/// `x` rounded to the nearest bf16 (ties to even), back in f32.
#[must_use]
pub fn round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Whether this CPU forms bf16 products natively (otherwise they are emulated).
#[must_use]
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

thread_local! {
    /// The packed right-hand side (on the calling thread), kept for the next product.
    static RHS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    /// A task's left-hand rows as bf16 (per worker thread).
    static LHS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// `C = [C +] A·B` with both operands rounded to bf16, for `A: m×k`, `B: k×n`, `C: m×n` (row
/// stride `c_rs`), split over the current rayon pool. Views are bounds-checked by the caller.
pub(super) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: View<'_>,
    b: View<'_>,
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if native() && a.cs == 1 {
        let packed = pack_rhs(k, n, b);
        native_gemm(m, n, k, a, &packed, c, c_rs, accumulate);
        RHS.with(|s| *s.borrow_mut() = packed);
        return;
    }
    emulated(m, n, k, a, b, c, c_rs, accumulate);
}

/// The portable path: round both operands to bf16 (as f32) and use the f32 GEMM.
fn emulated(m: usize, n: usize, k: usize, a: View<'_>, b: View<'_>, c: &mut [f32], c_rs: usize, accumulate: bool) {
    let ra: Vec<f32> = (0..m * k)
        .map(|i| round(a.data[(i / k) * a.rs + (i % k) * a.cs]))
        .collect();
    let rb: Vec<f32> = (0..k * n)
        .map(|i| round(b.data[(i / n) * b.rs + (i % n) * b.cs]))
        .collect();
    super::gemm::gemm(
        m,
        n,
        k,
        View::rows(&ra, k),
        View::rows(&rb, n),
        c,
        c_rs,
        accumulate,
        super::gemm::Par::Pool,
    );
}

/// `B` as bf16 pairs along `k`, in panels of [`NR`] columns: `[n/NR][k/2][NR]` words, each word
/// `B[2p][j] | B[2p+1][j] << 16`; missing rows and columns are zeros.
fn pack_rhs(k: usize, n: usize, b: View<'_>) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let panels = n.div_ceil(NR);
    let mut out = RHS.with(|s| std::mem::take(&mut *s.borrow_mut()));
    out.clear();
    out.resize(panels * kp * NR, 0);
    let word = |lo: f32, hi: f32| to_bf16(lo) | (to_bf16(hi) << 16);
    if b.cs == 1 {
        // Rows of B contiguous (a weight in `dX = dY·W`): each pair of rows fills a row of words
        // in every panel, column by column (a loop the compiler vectorises).
        for p in 0..kp {
            let row0 = &b.data[2 * p * b.rs..2 * p * b.rs + n];
            let row1 = (2 * p + 1 < k).then(|| &b.data[(2 * p + 1) * b.rs..(2 * p + 1) * b.rs + n]);
            for (panel, j0) in (0..n).step_by(NR).enumerate() {
                let cols = (n - j0).min(NR);
                let dst = &mut out[(panel * kp + p) * NR..(panel * kp + p) * NR + cols];
                match row1 {
                    Some(row1) => {
                        for ((d, &lo), &hi) in dst.iter_mut().zip(&row0[j0..j0 + cols]).zip(&row1[j0..j0 + cols]) {
                            *d = word(lo, hi);
                        }
                    }
                    None => {
                        for (d, &lo) in dst.iter_mut().zip(&row0[j0..j0 + cols]) {
                            *d = to_bf16(lo);
                        }
                    }
                }
            }
        }
    } else {
        // Columns of B strided (rows contiguous when B = Wᵀ, `rs == 1`): column by column.
        for j in 0..n {
            let base = (j / NR) * kp * NR + j % NR;
            for p in 0..kp {
                let at = |kk: usize| if kk < k { b.data[kk * b.rs + j * b.cs] } else { 0.0 };
                out[base + p * NR] = word(at(2 * p), at(2 * p + 1));
            }
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
fn native_gemm(
    m: usize,
    n: usize,
    k: usize,
    a: View<'_>,
    packed: &[u32],
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
) {
    let kp = k.div_ceil(2);
    let rows_per_task = MR * BLOCKS_PER_TASK;
    // Each task writes only the rows [r0, r1) of C; the pointer travels as an address.
    let c_addr = c.as_mut_ptr() as usize;
    (0..m.div_ceil(rows_per_task)).into_par_iter().for_each(|t| {
        let r0 = t * rows_per_task;
        let r1 = (r0 + rows_per_task).min(m);
        LHS.with(|s| {
            let mut lhs = s.borrow_mut();
            lhs.clear();
            lhs.resize((r1 - r0) * kp, 0);
            for (o, i) in (r0..r1).enumerate() {
                let row = &a.data[i * a.rs..i * a.rs + k];
                // SAFETY: the CPU has AVX512-BF16 (`native()` checked by the caller).
                unsafe { convert_row(row, &mut lhs[o * kp..(o + 1) * kp]) };
            }
            for i0 in (r0..r1).step_by(MR) {
                let rows = (r1 - i0).min(MR);
                for j0 in (0..n).step_by(NR) {
                    let cols = (n - j0).min(NR);
                    let panel = &packed[(j0 / NR) * kp * NR..(j0 / NR + 1) * kp * NR];
                    // SAFETY: the kernel reads `rows` rows of `kp` words from `lhs` and `kp × NR`
                    // words of `panel` (both sized above), and writes `rows × cols` values of C
                    // at rows i0.. < r1 ≤ m, columns j0.. < n: inside `c` (checked by the caller),
                    // and no other task writes these rows.
                    unsafe {
                        kernel(
                            kp,
                            lhs.as_ptr().add((i0 - r0) * kp),
                            kp,
                            panel.as_ptr(),
                            (c_addr as *mut f32).add(i0 * c_rs + j0),
                            c_rs,
                            rows,
                            cols,
                            accumulate,
                        );
                    }
                }
            }
        });
    });
}

/// One row of `A` as bf16 pairs (`out.len() = ⌈k/2⌉`, the last half-word zero when `k` is odd).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn convert_row(row: &[f32], out: &mut [u32]) {
    use std::arch::x86_64::{__m512bh, __m512i, _mm512_cvtne2ps_pbh, _mm512_loadu_ps, _mm512_storeu_si512};
    let k = row.len();
    let mut kk = 0;
    while kk + 32 <= k {
        // SAFETY: 32 values read at kk..kk+32 ≤ k; 16 words written at kk/2..kk/2+16 ≤ out.len().
        unsafe {
            let lo = _mm512_loadu_ps(row.as_ptr().add(kk));
            let hi = _mm512_loadu_ps(row.as_ptr().add(kk + 16));
            let v = _mm512_cvtne2ps_pbh(hi, lo);
            _mm512_storeu_si512(
                out.as_mut_ptr().add(kk / 2).cast(),
                std::mem::transmute::<__m512bh, __m512i>(v),
            );
        }
        kk += 32;
    }
    while kk < k {
        let hi = if kk + 1 < k { to_bf16(row[kk + 1]) } else { 0 };
        out[kk / 2] = to_bf16(row[kk]) | (hi << 16);
        kk += 2;
    }
}

/// `C[rows × cols] (+)= A·B` for one block: `a` holds `rows` rows of `kp` bf16 pairs (row
/// stride `a_rs` words), `b` one packed panel (`kp × NR` words).
///
/// # Safety
/// The CPU has AVX512-BF16; `a`, `b` and `c` are valid for the extents above (`rows ≤ MR`,
/// `cols ≤ NR`, row `r` of C at `c + r·c_rs`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn kernel(
    kp: usize,
    a: *const u32,
    a_rs: usize,
    b: *const u32,
    c: *mut f32,
    c_rs: usize,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::{
        __m512bh, __m512i, _mm512_add_ps, _mm512_dpbf16_ps, _mm512_loadu_si512, _mm512_mask_storeu_ps,
        _mm512_maskz_loadu_ps, _mm512_set1_epi32, _mm512_setzero_ps,
    };
    // SAFETY: see the function's contract; rows past `rows` read row `rows - 1` again (valid)
    // and are never stored; only the registers holding columns < `cols` are touched in C, under
    // masks that leave columns ≥ `cols` alone.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let mut rp = [a; MR];
        for (r, p) in rp.iter_mut().enumerate() {
            *p = a.add(r.min(rows - 1) * a_rs);
        }
        for p in 0..kp {
            let mut bv = [_mm512_setzero_ps(); NV].map(|z| -> __m512bh { std::mem::transmute(z) });
            for (v, bv) in bv.iter_mut().enumerate() {
                *bv = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(b.add(p * NR + 16 * v).cast()));
            }
            for r in 0..MR {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*rp[r].add(p) as i32));
                for v in 0..NV {
                    acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate().take(rows) {
            for (v, &sum) in acc.iter().enumerate() {
                let live = cols.saturating_sub(16 * v).min(16);
                if live == 0 {
                    break;
                }
                let mask = if live == 16 {
                    u16::MAX
                } else {
                    ((1u32 << live) - 1) as u16
                };
                let p = c.add(r * c_rs + 16 * v);
                let out = if accumulate {
                    _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, p))
                } else {
                    sum
                };
                _mm512_mask_storeu_ps(p, mask, out);
            }
        }
    }
}
