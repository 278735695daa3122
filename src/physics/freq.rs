//! Token frequency content (METHOD.md "Prior ablation and token frequency content"): how much of
//! each patch's contrast energy lies outside its lowest-frequency quarter, measured on the image
//! as the model sees it, without reference to any model.

use super::dct::Dct2;

/// `hf` of every patch token of a square RGB image (`side × side`, row-major, 3 bytes a pixel)
/// cut into `patch × patch` patches, in token order (row-major over the grid). Luminance
/// `Y = 0.299 R + 0.587 G + 0.114 B`, the orthonormal 2-D DCT-II `X` of each patch, and
/// `hf = Σ_{u ≥ p/2 or v ≥ p/2} X² / Σ_{(u,v) ≠ (0,0)} X²`, 0 for a flat patch. Empty when the
/// image is not `side × side × 3` bytes or `patch` does not divide `side`.
#[must_use]
pub fn token_hf(rgb: &[u8], side: usize, patch: usize) -> Vec<f64> {
    if patch == 0 || !side.is_multiple_of(patch) || rgb.len() != side * side * 3 {
        return Vec::new();
    }
    let g = side / patch;
    let dct = Dct2::new(patch, patch);
    let mut y = vec![0.0; patch * patch];
    let mut out = Vec::with_capacity(g * g);
    for ti in 0..g {
        for tj in 0..g {
            for (r, row) in y.chunks_mut(patch).enumerate() {
                for (c, v) in row.iter_mut().enumerate() {
                    let at = ((ti * patch + r) * side + tj * patch + c) * 3;
                    *v = 0.299 * f64::from(rgb[at]) + 0.587 * f64::from(rgb[at + 1]) + 0.114 * f64::from(rgb[at + 2]);
                }
            }
            out.push(patch_hf(&dct.forward(&y).unwrap_or_default(), patch));
        }
    }
    out
}

/// `hf` of one patch's DCT coefficients (`p × p`, row-major).
fn patch_hf(x: &[f64], p: usize) -> f64 {
    let (mut high, mut ac) = (0.0, 0.0);
    for (i, v) in x.iter().enumerate() {
        let (u, w) = (i / p, i % p);
        if u == 0 && w == 0 {
            continue;
        }
        let e = v * v;
        ac += e;
        if 2 * u >= p || 2 * w >= p {
            high += e;
        }
    }
    let dc = x.first().map_or(0.0, |d| d * d);
    // A flat patch leaves only rounding noise outside the DC cell.
    if ac <= 1e-18 * (dc + 1.0) { 0.0 } else { high / ac }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference (NumPy 2.4.6 / SciPy 1.17.1):
    //   import numpy as np; from scipy.fft import dctn
    //   def hf(rgb, p):
    //       Y = 0.299*rgb[...,0] + 0.587*rgb[...,1] + 0.114*rgb[...,2]
    //       g = Y.shape[0] // p; out = []
    //       for i in range(g):
    //           for j in range(g):
    //               X = dctn(Y[i*p:(i+1)*p, j*p:(j+1)*p], type=2, norm='ortho')
    //               u, v = np.meshgrid(np.arange(p), np.arange(p), indexing='ij')
    //               ac = (X**2).sum() - X[0,0]**2
    //               hi = (X[(u >= p/2) | (v >= p/2)]**2).sum()
    //               out.append(0.0 if ac <= 1e-18*(X[0,0]**2+1) else hi/ac)
    //       return out
    //   a = np.arange(8*8*3).reshape(8,8,3); rgb = ((a * 37 + a**2 * 11) % 256).astype(float)
    //   rgb[0:4, 4:8] = 90                             # one flat patch
    //   rgb[4:8, 0:4] = ((np.arange(4)[None,:,None] % 2) * 255).repeat(4, 0).repeat(3, 2)  # stripes
    //   print(hf(rgb, 4))
    //   -> [0.4514357089702298, 0.0, 0.8535533905932737, 0.9408152639109851]
    #[test]
    #[allow(clippy::unreadable_literal)] // SciPy's digits as printed
    fn hf_matches_the_scipy_reference_on_four_patches() {
        let mut rgb = vec![0u8; 8 * 8 * 3];
        for (i, v) in rgb.iter_mut().enumerate() {
            *v = ((i * 37 + i * i * 11) % 256) as u8;
        }
        for r in 0..4 {
            for c in 4..8 {
                for ch in 0..3 {
                    rgb[(r * 8 + c) * 3 + ch] = 90;
                }
            }
        }
        for r in 4..8 {
            for c in 0..4 {
                for ch in 0..3 {
                    rgb[(r * 8 + c) * 3 + ch] = if c % 2 == 1 { 255 } else { 0 };
                }
            }
        }
        let got = token_hf(&rgb, 8, 4);
        let want = [0.4514357089702298, 0.0, 0.8535533905932737, 0.9408152639109851];
        assert_eq!(got.len(), 4);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn a_wrong_size_gives_nothing() {
        assert!(token_hf(&[0; 10], 8, 4).is_empty());
        assert!(token_hf(&[0; 8 * 8 * 3], 8, 3).is_empty());
    }
}
