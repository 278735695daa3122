//! Physics core: DCT matrices and transforms, the three filters, impulse responses, image scale.

// Tests: unwrap is the assertion; pedantic style lints are for the library.
#![allow(clippy::unwrap_used, clippy::pedantic)]

use candle_core::{DType, Device, Tensor, Var};
use moppa_studio::model::moppa::{inv_softplus, softplus, softplus_f64};
use moppa_studio::physics::tensor::{SpectralGrid, dct_matrix_tensor};
use moppa_studio::physics::{
    Dct2, FilterSet, ImageDct, Prior, PriorCoeffs, apply_prior, dct_matrix, heat_filter, impulse_response,
    laplacian_eigenvalues, poisson_filter, wave_filter,
};

/// Deterministic pseudo-random values in [-1, 1) (xorshift), so tests need no RNG crate.
fn noise(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[test]
fn dct_matrix_is_orthonormal() {
    for n in 1..=17 {
        let c = dct_matrix(n);
        for i in 0..n {
            for j in 0..n {
                let dot: f64 = (0..n).map(|k| c[i * n + k] * c[j * n + k]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-12, "C·Cᵀ[{i},{j}] = {dot} for N = {n}");
            }
        }
    }
}

#[test]
fn dct2_round_trip_on_non_square_grids() {
    for (h, w) in [(1, 1), (3, 4), (7, 5), (8, 8), (14, 14)] {
        let dct = Dct2::new(h, w);
        let x = noise(h * w, (h * 31 + w) as u64);
        let back = dct.inverse(&dct.forward(&x).unwrap()).unwrap();
        assert!(max_abs_diff(&x, &back) < 1e-12, "{h}×{w} round trip");
    }
}

// Reference (SciPy 1.x):
//   import numpy as np; from scipy.fft import dctn
//   x = np.arange(12, dtype=np.float64).reshape(3, 4); x = np.sin(x * 1.3) + 0.1 * x
//   print(repr(dctn(x, type=2, norm="ortho").ravel()))
#[test]
fn dct2_matches_scipy_dctn_ortho() {
    let x: Vec<f64> = (0..12)
        .map(|i| (f64::from(i) * 1.3).sin() + 0.1 * f64::from(i))
        .collect();
    let expected = [
        2.268_331_088_183_277_4,
        -1.501_984_930_456_453_4,
        -0.994_221_210_464_561_8,
        0.180_990_617_107_609_77,
        -0.786_951_705_620_353_2,
        1.467_868_403_186_712,
        -0.943_134_696_794_904_5,
        -0.274_250_905_516_029_4,
        -0.140_884_797_755_424_1,
        0.432_912_158_233_212_83,
        0.385_789_649_679_798_2,
        -0.080_883_648_116_278_57,
    ];
    let got = Dct2::new(3, 4).forward(&x).unwrap();
    assert!(max_abs_diff(&got, &expected) < 1e-12, "{got:?}");
    // The rustdct image path computes the same transform (in f32).
    let mut plane: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    ImageDct::new(3, 4).forward(&mut plane).unwrap();
    let plane: Vec<f64> = plane.into_iter().map(f64::from).collect();
    assert!(max_abs_diff(&plane, &expected) < 1e-5, "{plane:?}");
}

#[test]
fn constant_grid_keeps_only_the_dc_coefficient() {
    let spec = Dct2::new(5, 6).forward(&[2.5; 30]).unwrap();
    assert!((spec[0] - 2.5 * 30f64.sqrt()).abs() < 1e-12, "DC = {}", spec[0]);
    assert!(spec[1..].iter().all(|v| v.abs() < 1e-12), "{spec:?}");
}

#[test]
fn lambda_matches_formula_and_range() {
    let (h, w) = (6, 9);
    let l = laplacian_eigenvalues(h, w);
    assert_eq!(l[0], 0.0);
    for n in 0..h {
        for m in 0..w {
            let a = (std::f64::consts::PI * n as f64 / (2.0 * h as f64)).sin();
            let b = (std::f64::consts::PI * m as f64 / (2.0 * w as f64)).sin();
            let v = l[n * w + m];
            assert!((v - 4.0 * (a * a + b * b)).abs() < 1e-12);
            assert!((0.0..8.0).contains(&v), "Λ out of [0, 8): {v}");
        }
    }
}

#[test]
fn filter_gains_at_zero_frequency() {
    let l = laplacian_eigenvalues(4, 4);
    assert_eq!(heat_filter(&l, 0.7, 1.3)[0], 1.0);
    assert_eq!(wave_filter(&l, 0.9, 1.3, 0.4)[0], 1.0);
    let source = noise(16, 3);
    let p = poisson_filter(&l, 2.0, Some(&source)).unwrap();
    assert!((p[0] - source[0]).abs() < 1e-15, "Poisson DC gain is S[0,0]");
    assert!(poisson_filter(&l, 2.0, Some(&source[..3])).is_err(), "short source map");
}

#[test]
fn heat_tends_to_identity_as_kappa_tau_vanishes() {
    let dct = Dct2::new(7, 7);
    let x = noise(49, 11);
    let l = laplacian_eigenvalues(7, 7);
    let mut last = f64::INFINITY;
    for kt in [1e-1, 1e-3, 1e-6, 1e-9] {
        let y = dct.filter(&x, &heat_filter(&l, kt, 1.0)).unwrap();
        let err = max_abs_diff(&x, &y);
        assert!(err < last, "error must shrink with κτ: {err} after {last}");
        last = err;
    }
    assert!(last < 1e-8, "κτ = 1e-9 leaves the grid unchanged, error {last}");
}

#[test]
fn heat_impulse_response_is_positive_normalised_and_local() {
    let (h, w) = (9, 9);
    let set = FilterSet::new(
        h,
        w,
        PriorCoeffs {
            kappa: 0.1,
            tau: 1.0,
            ..PriorCoeffs::default()
        },
    )
    .unwrap();
    let r = set.impulse(Prior::Heat);
    assert!(r.iter().all(|&v| v >= -1e-7), "heat kernel must be non-negative: {r:?}");
    let total: f64 = r.iter().sum();
    assert!((total - 1.0).abs() < 1e-12, "heat kernel sums to {total}");
    let within: f64 = (0..h * w)
        .filter(|i| {
            let (n, m) = ((i / w) as f64 - 4.0, (i % w) as f64 - 4.0);
            n * n + m * m <= 4.0
        })
        .map(|i| r[i])
        .sum();
    assert!(within > 0.99, "κτ = 0.1: only {within} of the mass within radius 2");
}

#[test]
fn wave_impulse_response_changes_sign() {
    let set = FilterSet::new(
        10,
        10,
        PriorCoeffs {
            c: 1.5,
            ..PriorCoeffs::default()
        },
    )
    .unwrap();
    let r = set.impulse(Prior::Wave);
    let min = r.iter().copied().fold(f64::INFINITY, f64::min);
    let max = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    assert!(
        min < -1e-3 && max > 1e-3,
        "wave kernel should ring: min {min}, max {max}"
    );
}

/// Fraction of absolute mass farther than `radius` cells from the impulse.
fn tail_mass(h: usize, w: usize, r: &[f64], radius: f64) -> f64 {
    let total: f64 = r.iter().map(|v| v.abs()).sum();
    let far: f64 = (0..h * w)
        .filter(|i| {
            let (n, m) = ((i / w) as f64 - (h / 2) as f64, (i % w) as f64 - (w / 2) as f64);
            (n * n + m * m).sqrt() > radius
        })
        .map(|i| r[i].abs())
        .sum();
    far / total
}

#[test]
fn poisson_impulse_decays_slower_than_heat_at_matched_dc_gain() {
    // Both gains are 1 at Λ = 0 (S = 1); choose κτ so the heat kernel has a comparable core.
    let (h, w) = (15, 15);
    let set = FilterSet::new(
        h,
        w,
        PriorCoeffs {
            kappa: 0.5,
            eps: 1.0,
            ..PriorCoeffs::default()
        },
    )
    .unwrap();
    let heat = tail_mass(h, w, set.impulse(Prior::Heat), 3.0);
    let poisson = tail_mass(h, w, set.impulse(Prior::Poisson), 3.0);
    assert!(poisson > 3.0 * heat, "Poisson tail {poisson} vs heat tail {heat}");
    // Odd and even grids put the impulse at (⌊H/2⌋, ⌊W/2⌋).
    let even = FilterSet::new(4, 6, PriorCoeffs::default()).unwrap();
    let r = even.impulse(Prior::Heat);
    let argmax = (0..24).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap();
    assert_eq!(argmax, 2 * 6 + 3);
}

#[test]
fn bad_coefficients_are_rejected_by_name() {
    for (coeffs, name) in [
        (
            PriorCoeffs {
                kappa: 0.0,
                ..PriorCoeffs::default()
            },
            "kappa",
        ),
        (
            PriorCoeffs {
                c: -1.0,
                ..PriorCoeffs::default()
            },
            "c",
        ),
        (
            PriorCoeffs {
                eps: f64::NAN,
                ..PriorCoeffs::default()
            },
            "eps",
        ),
        (
            PriorCoeffs {
                tau: 0.0,
                ..PriorCoeffs::default()
            },
            "tau",
        ),
        (
            PriorCoeffs {
                gamma: -0.1,
                ..PriorCoeffs::default()
            },
            "gamma",
        ),
    ] {
        let err = coeffs.validate().unwrap_err().to_string();
        assert!(err.starts_with(name), "{err}");
    }
    assert!(
        PriorCoeffs {
            gamma: 0.0,
            ..PriorCoeffs::default()
        }
        .validate()
        .is_ok()
    );
}

#[test]
fn tensor_filters_equal_host_filters() {
    let (h, w) = (5, 7);
    let dev = Device::Cpu;
    let grid = SpectralGrid::new(h, w, DType::F64, &dev).unwrap();
    let l = laplacian_eigenvalues(h, w);
    let kappa = [0.01, 0.3, 1.0];
    let c = [0.25, 0.9, 1.5];
    let eps = [0.1, 1.0, 10.0];
    let source = noise(h * w, 5);
    let (tau, gamma) = (0.8, 0.2);
    let t = |v: &[f64]| Tensor::new(v, &dev).unwrap();
    let heat = grid.heat(&t(&kappa), tau).unwrap().to_vec2::<f64>().unwrap();
    let wave = grid.wave(&t(&c), tau, gamma).unwrap().to_vec2::<f64>().unwrap();
    let pois = grid.poisson(&t(&eps), &t(&source)).unwrap().to_vec2::<f64>().unwrap();
    for j in 0..3 {
        assert!(max_abs_diff(&heat[j], &heat_filter(&l, kappa[j], tau)) < 1e-14);
        assert!(max_abs_diff(&wave[j], &wave_filter(&l, c[j], tau, gamma)) < 1e-14);
        assert!(max_abs_diff(&pois[j], &poisson_filter(&l, eps[j], Some(&source)).unwrap()) < 1e-14);
    }
    // K = C_H ⊗ C_W transforms a flattened grid exactly like Dct2.
    let x = noise(h * w, 9);
    let k = grid.kron.matmul(&t(&x).unsqueeze(1).unwrap()).unwrap();
    let k: Vec<f64> = k.flatten_all().unwrap().to_vec1().unwrap();
    assert!(max_abs_diff(&k, &Dct2::new(h, w).forward(&x).unwrap()) < 1e-12);
    let c = dct_matrix_tensor(4, DType::F32, &dev).unwrap();
    assert_eq!(c.dtype(), DType::F32);
    assert_eq!(c.dims(), &[4, 4]);
}

#[test]
fn softplus_matches_pytorch_convention_and_inverts() {
    for v in [1e-3, 0.01, 0.25, 1.0, 10.0] {
        assert!(
            (softplus_f64(inv_softplus(v)) - v).abs() < 1e-12 * v.max(1.0),
            "v = {v}"
        );
    }
    assert_eq!(softplus_f64(30.0), 30.0);
    // The tensor softplus agrees with the host one, and its gradient is sigmoid(x), also at 0.
    let xs = [-30.0, -2.0, 0.0, 0.5, 3.0, 25.0];
    let x = Var::new(&xs[..], &Device::Cpu).unwrap();
    let y = softplus(x.as_tensor()).unwrap();
    let yv: Vec<f64> = y.to_vec1().unwrap();
    for (a, b) in yv.iter().zip(xs) {
        assert!(
            (a - softplus_f64(b)).abs() < 1e-10 * (1.0 + b.abs()),
            "softplus({b}) = {a}"
        );
    }
    let g = y.sum_all().unwrap().backward().unwrap();
    let g: Vec<f64> = g.get(x.as_tensor()).unwrap().to_vec1().unwrap();
    for (gi, xi) in g.iter().zip(xs) {
        let sig = 1.0 / (1.0 + (-xi).exp());
        assert!((gi - sig).abs() < 1e-12, "d softplus/dx at {xi}: {gi} vs {sig}");
    }
    // In f32, the smallest coefficients the ranges allow survive the parameterisation (1 + e^x
    // rounds to 1 below x ≈ -16.6: the tail must not be ln(1 + t) there), relative to
    // softplus_f64 of the same raw values.
    let raw: Vec<f32> = [1e-8, 3e-8, 1e-7, 1e-5]
        .iter()
        .map(|v| inv_softplus(*v) as f32)
        .collect();
    let y: Vec<f32> = softplus(&Tensor::new(&raw[..], &Device::Cpu).unwrap())
        .unwrap()
        .to_vec1()
        .unwrap();
    for (yi, ri) in y.iter().zip(&raw) {
        let want = softplus_f64(f64::from(*ri));
        assert!(
            (f64::from(*yi) - want).abs() < 1e-6 * want,
            "f32 softplus({ri}) = {yi}, want {want:e}"
        );
    }
}

#[test]
fn image_dct_round_trips_and_agrees_with_matrix_dct() {
    let (h, w) = (5, 7);
    let x = noise(h * w, 21);
    let mut plane: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let dct = ImageDct::new(h, w);
    dct.forward(&mut plane).unwrap();
    let want = Dct2::new(h, w).forward(&x).unwrap();
    let got: Vec<f64> = plane.iter().map(|&v| f64::from(v)).collect();
    assert!(max_abs_diff(&got, &want) < 1e-5);
    dct.inverse(&mut plane).unwrap();
    let back: Vec<f64> = plane.iter().map(|&v| f64::from(v)).collect();
    assert!(max_abs_diff(&back, &x) < 1e-5);
    // The image path's filter equals the grid path's filter.
    let l = laplacian_eigenvalues(h, w);
    let gain = wave_filter(&l, 0.7, 1.0, 0.1);
    let mut p: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let g32: Vec<f32> = gain.iter().map(|&v| v as f32).collect();
    dct.filter(&mut p, &g32).unwrap();
    let p: Vec<f64> = p.into_iter().map(f64::from).collect();
    let want = Dct2::new(h, w).filter(&x, &gain).unwrap();
    assert!(max_abs_diff(&p, &want) < 1e-5);
    let direct = impulse_response(&Dct2::new(h, w), &gain).unwrap();
    assert_eq!(direct.len(), h * w);
}

fn test_image(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let v = |k: u32| (((x * k + y * 3) % 17) * 15) as u8;
        image::Rgb([v(1), v(2), if (x / 4 + y / 4) % 2 == 0 { 220 } else { 30 }])
    })
}

#[test]
fn apply_with_vanishing_kappa_returns_the_image() {
    let img = image::DynamicImage::ImageRgb8(test_image(37, 23));
    let coeffs = PriorCoeffs {
        // The smallest κ the ranges allow.
        kappa: 1e-8,
        ..PriorCoeffs::default()
    };
    let out = apply_prior(&img, Prior::Heat, &coeffs).unwrap();
    assert_eq!(out.color(), img.color());
    assert_eq!(out.to_rgb8().as_raw(), img.to_rgb8().as_raw());
}

fn variance(img: &image::DynamicImage) -> f64 {
    let raw = img.to_rgb8().into_raw();
    let mean = raw.iter().map(|&v| f64::from(v)).sum::<f64>() / raw.len() as f64;
    raw.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / raw.len() as f64
}

#[test]
fn apply_blurs_rings_and_smooths() {
    let img = image::DynamicImage::ImageRgb8(test_image(40, 32));
    let heat = apply_prior(
        &img,
        Prior::Heat,
        &PriorCoeffs {
            kappa: 5.0,
            ..PriorCoeffs::default()
        },
    )
    .unwrap();
    let poisson = apply_prior(
        &img,
        Prior::Poisson,
        &PriorCoeffs {
            eps: 0.05,
            ..PriorCoeffs::default()
        },
    )
    .unwrap();
    let wave = apply_prior(
        &img,
        Prior::Wave,
        &PriorCoeffs {
            c: 3.0,
            ..PriorCoeffs::default()
        },
    )
    .unwrap();
    assert!(variance(&heat) < 0.5 * variance(&img), "heat must blur");
    assert!(variance(&poisson) < 0.5 * variance(&img), "Poisson must smooth");
    assert_ne!(
        wave.to_rgb8().as_raw(),
        img.to_rgb8().as_raw(),
        "wave must change the image"
    );
    // A constant image is a fixed point of all three (DC gain 1).
    let flat = image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(9, 6, image::Luma([77])));
    for prior in Prior::ALL {
        let out = apply_prior(&flat, prior, &PriorCoeffs::default()).unwrap();
        assert_eq!(out.color(), image::ColorType::L8);
        assert!(
            out.to_luma8().pixels().all(|p| p.0[0] == 77),
            "{prior} changed a constant image"
        );
    }
}
