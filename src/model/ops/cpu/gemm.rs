//! Safe row-major wrappers around the `gemm` crate (the same GEMM candle uses on the CPU).
#![allow(unsafe_code)]

use gemm::Parallelism;

/// How a GEMM runs: `Pool` splits it over the current rayon pool, `Serial` keeps it on the
/// calling thread (for GEMMs issued from inside a parallel loop), `PoolBf16` is `Pool` with the
/// operands of a layer's products with its weight rounded to bf16 (f32 accumulation; see
/// [`super::bf16`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Par {
    /// Use every thread of the current rayon pool.
    Pool,
    /// Stay on this thread.
    Serial,
    /// Use every thread of the pool, with bf16 operands in [`linear_fwd`] and [`linear_dx`].
    PoolBf16,
}

impl Par {
    /// `PoolBf16` when `bf16`, else `Pool`.
    #[must_use]
    pub fn pool(bf16: bool) -> Self {
        if bf16 { Self::PoolBf16 } else { Self::Pool }
    }

    fn get(self, flops: usize) -> Parallelism {
        let threads = rayon::current_num_threads();
        // Tiny products are not worth waking other threads for.
        if self == Self::Serial || threads <= 1 || flops < 64 * 64 * 64 {
            Parallelism::None
        } else {
            Parallelism::Rayon(threads)
        }
    }
}

/// A row-major view: element `(i, j)` at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    /// The underlying buffer.
    pub data: &'a [f32],
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A plain row-major `rows × cols` matrix (row stride = `cols`).
    #[must_use]
    pub fn rows(data: &'a [f32], cols: usize) -> Self {
        Self { data, rs: cols, cs: 1 }
    }

    /// The transpose of a row-major matrix with row stride `rs`, without copying.
    #[must_use]
    pub fn t(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs: 1, cs: rs }
    }

    /// A matrix with an explicit row stride (columns contiguous).
    #[must_use]
    pub fn strided(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }

    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(
                last < self.data.len(),
                "gemm: {what} view out of bounds ({rows}×{cols})"
            );
        }
    }
}

/// `C = beta·C + A·B` for `A: m×k`, `B: k×n`, `C: m×n` with row stride `c_rs` (columns
/// contiguous); `beta` is 0 (overwrite) or 1 (accumulate).
///
/// # Panics
/// If a view is too short for its shape (a programming error, never a user error).
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: View<'_>,
    b: View<'_>,
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
    par: Par,
) {
    if m == 0 || n == 0 {
        return;
    }
    a.check(m, k, "lhs");
    b.check(k, n, "rhs");
    assert!((m - 1) * c_rs + n <= c.len(), "gemm: destination out of bounds");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * c_rs..i * c_rs + n].fill(0.0);
            }
        }
        return;
    }
    if par == Par::PoolBf16 {
        super::bf16::gemm(m, n, k, a, b, c, c_rs, accumulate);
        return;
    }
    // SAFETY: every index the kernel touches lies inside the slices: checked above for the
    // row/column extents implied by (m, n, k) and the strides; `c` is borrowed mutably and cannot
    // alias `a` or `b`, which are shared borrows.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par.get(m * n * k),
        );
    }
}

/// `C (= or +=) X·Wᵀ` for `X: m×k` (row stride `x_rs`) and `W: n×k` row-major: a linear layer.
pub fn linear_fwd(
    m: usize,
    n: usize,
    k: usize,
    x: &[f32],
    x_rs: usize,
    w: &[f32],
    c: &mut [f32],
    c_rs: usize,
    accumulate: bool,
    par: Par,
) {
    gemm(m, n, k, View::strided(x, x_rs), View::t(w, k), c, c_rs, accumulate, par);
}

/// `dX (= or +=) dY·W` for `dY: m×n` (row stride `dy_rs`) and `W: n×k`: a linear layer's input gradient.
pub fn linear_dx(
    m: usize,
    n: usize,
    k: usize,
    dy: &[f32],
    dy_rs: usize,
    w: &[f32],
    dx: &mut [f32],
    dx_rs: usize,
    accumulate: bool,
    par: Par,
) {
    gemm(
        m,
        k,
        n,
        View::strided(dy, dy_rs),
        View::rows(w, k),
        dx,
        dx_rs,
        accumulate,
        par,
    );
}

/// `dW (= or +=) dYᵀ·X` for `dY: m×n`, `X: m×k`: a linear layer's weight gradient (`n×k`),
/// always from f32 operands (`PoolBf16` runs as `Pool`: weight gradients keep full precision).
pub fn linear_dw(
    m: usize,
    n: usize,
    k: usize,
    dy: &[f32],
    dy_rs: usize,
    x: &[f32],
    x_rs: usize,
    dw: &mut [f32],
    accumulate: bool,
    par: Par,
) {
    let par = if par == Par::PoolBf16 { Par::Pool } else { par };
    gemm(
        n,
        k,
        m,
        View::t(dy, dy_rs),
        View::strided(x, x_rs),
        dw,
        k,
        accumulate,
        par,
    );
}
