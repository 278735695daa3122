//! Training ops: the fused CPU ops against the composite reference (values and gradients), and
//! both against finite differences. The composite ops are built from candle's differentiable
//! primitives; the finite-difference checks run them in f64.

// Tests: unwrap is the assertion; pedantic style lints are for the library.
#![allow(clippy::unwrap_used, clippy::pedantic)]

use candle_core::{D, DType, Device, Tensor, Var};
use moppa_studio::config::Activation;
use moppa_studio::model::ops::{self, HalfLayout, Kernels, composite};
use std::sync::Arc;

mod common;
use common::{randn, rel_err};

/// Runs `f` on fresh `Var`s made from `inputs` (as `dtype`), returns the output and the gradient
/// of `Σ out ⊙ r` for each input (`None` where `trainable[i]` is false: passed as a plain tensor).
fn eval(
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    trainable: &[bool],
    r: &Tensor,
    dtype: DType,
) -> (Tensor, Vec<Option<Tensor>>) {
    let vars: Vec<Option<Var>> = inputs
        .iter()
        .zip(trainable)
        .map(|(t, &tr)| tr.then(|| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()))
        .collect();
    let args: Vec<Tensor> = inputs
        .iter()
        .zip(&vars)
        .map(|(t, v)| {
            v.as_ref()
                .map_or_else(|| t.to_dtype(dtype).unwrap(), |v| v.as_tensor().clone())
        })
        .collect();
    let out = f(&args).unwrap();
    let loss = (&out * r.to_dtype(dtype).unwrap()).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = vars
        .iter()
        .map(|v| v.as_ref().map(|v| grads.get(v.as_tensor()).unwrap().clone()))
        .collect();
    (out, g)
}

/// Fused (f32) vs composite (f64): outputs and every gradient.
fn compare(
    fused: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    reference: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    trainable: &[bool],
    tol: f64,
) {
    let probe = fused(inputs).unwrap();
    let r = randn(probe.dims(), 1.0, 99);
    let (out_f, g_f2) = eval(fused, inputs, trainable, &r, DType::F32);
    let (out_c, g_c) = eval(reference, inputs, trainable, &r, DType::F64);
    let e = rel_err(&out_f, &out_c);
    assert!(e < tol, "forward: relative error {e}");
    for (i, (a, b)) in g_f2.iter().zip(&g_c).enumerate() {
        match (a, b) {
            (Some(a), Some(b)) => {
                let e = rel_err(a, b);
                assert!(e < tol * 10.0, "gradient of input {i}: relative error {e}");
                let norm = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
                assert!(norm > 0.0, "gradient of input {i} is zero");
            }
            (None, None) => {}
            _ => panic!("gradient presence differs for input {i}"),
        }
    }
}

/// Central finite differences of `Σ f(inputs) ⊙ r` in f64 at a few coordinates of each input.
fn finite_difference(
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    trainable: &[bool],
    samples: usize,
) {
    let inputs: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(DType::F64).unwrap()).collect();
    let probe = f(&inputs).unwrap();
    let r = randn(probe.dims(), 1.0, 7).to_dtype(DType::F64).unwrap();
    let (_, grads) = eval(f, &inputs, trainable, &r, DType::F64);
    let loss = |args: &[Tensor]| -> f64 {
        (f(args).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let h = 1e-6;
    for (i, g) in grads.iter().enumerate() {
        let Some(g) = g else { continue };
        let gflat: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = inputs[i].flatten_all().unwrap().to_vec1().unwrap();
        let n = base.len();
        for s in 0..samples.min(n) {
            let j = (s * 7919 + 13) % n;
            let mut plus = base.clone();
            plus[j] += h;
            let mut minus = base.clone();
            minus[j] -= h;
            let mut args = inputs.clone();
            args[i] = Tensor::from_vec(plus, inputs[i].shape(), &Device::Cpu).unwrap();
            let lp = loss(&args);
            args[i] = Tensor::from_vec(minus, inputs[i].shape(), &Device::Cpu).unwrap();
            let lm = loss(&args);
            let fd = (lp - lm) / (2.0 * h);
            let tol = 1e-6 * (1.0 + fd.abs().max(gflat[j].abs()));
            assert!(
                (fd - gflat[j]).abs() < tol,
                "input {i}[{j}]: autograd {} vs finite difference {fd}",
                gflat[j]
            );
        }
    }
}

fn flat_weights(layout: &HalfLayout, seed: u64) -> Tensor {
    // LayerNorm gains near 1, layer scale near 0.5, everything else small random.
    let mut w: Vec<f32> = randn(&[layout.len], 0.2, seed).to_vec1().unwrap();
    for (i, s) in layout.slots.iter().enumerate() {
        if i == ops::layout::NORM_W || i == ops::layout::LS {
            let base = if i == ops::layout::LS { 0.5 } else { 1.0 };
            for v in &mut w[s.range()] {
                *v += base;
            }
        }
        if !s.present {
            let fill = if i == ops::layout::LS { 1.0 } else { 0.0 };
            w[s.range()].fill(fill);
        }
    }
    Tensor::from_vec(w, layout.len, &Device::Cpu).unwrap()
}

#[test]
fn layer_norm_fused_matches_composite_and_finite_differences() {
    let x = (randn(&[3, 5, 16], 1.0, 1) + 0.3).unwrap();
    let g = (randn(&[16], 0.2, 2) + 1.0).unwrap();
    let b = randn(&[16], 0.2, 3);
    let fused = |a: &[Tensor]| ops::layer_norm(Kernels::Auto, &a[0], &a[1], &a[2], 1e-6);
    let reference = |a: &[Tensor]| composite::layer_norm(&a[0], &a[1], &a[2], 1e-6);
    let inputs = [x, g, b];
    compare(&fused, &reference, &inputs, &[true, true, true], 1e-5);
    compare(&fused, &reference, &inputs, &[true, false, false], 1e-5);
    finite_difference(&reference, &inputs, &[true, true, true], 12);
}

#[test]
fn linear_fused_matches_composite_and_finite_differences() {
    let x = randn(&[4, 6, 12], 1.0, 4);
    let w = randn(&[9, 12], 0.3, 5);
    let b = randn(&[9], 0.3, 6);
    let fused = |a: &[Tensor]| ops::linear(Kernels::Auto, &a[0], &a[1], &a[2]);
    let reference = |a: &[Tensor]| composite::linear(&a[0], &a[1], Some(&a[2]));
    let inputs = [x, w, b];
    compare(&fused, &reference, &inputs, &[true, true, true], 1e-5);
    // A frozen weight: only the input gradient.
    compare(&fused, &reference, &inputs, &[true, false, false], 1e-5);
    finite_difference(&reference, &inputs, &[true, true, true], 12);
}

#[test]
fn gelu_fused_matches_composite_and_finite_differences() {
    let x = randn(&[5, 33], 2.0, 8);
    let fused = |a: &[Tensor]| ops::gelu(Kernels::Auto, &a[0]);
    let reference = |a: &[Tensor]| a[0].gelu_erf();
    compare(&fused, &reference, std::slice::from_ref(&x), &[true], 1e-5);
    finite_difference(&reference, &[x], &[true], 20);
}

// The lean ops (the default on CUDA) run the same code on the CPU: checked here against the
// composite reference, which the finite-difference tests above check in f64.
#[test]
fn lean_softmax_and_layer_norm_match_composite() {
    let x = (randn(&[3, 5, 16], 2.0, 60) + 0.3).unwrap();
    let lean = |a: &[Tensor]| ops::lean::softmax(&a[0]);
    let reference = |a: &[Tensor]| composite::softmax(&a[0]);
    compare(&lean, &reference, std::slice::from_ref(&x), &[true], 1e-5);
    let g = (randn(&[16], 0.2, 61) + 1.0).unwrap();
    let b = randn(&[16], 0.2, 62);
    let lean = |a: &[Tensor]| ops::lean::layer_norm(&a[0], &a[1], &a[2], 1e-6);
    let reference = |a: &[Tensor]| composite::layer_norm(&a[0], &a[1], &a[2], 1e-6);
    let inputs = [x, g, b];
    compare(&lean, &reference, &inputs, &[true, true, true], 1e-5);
    compare(&lean, &reference, &inputs, &[true, false, false], 1e-5);
    compare(&lean, &reference, &inputs, &[false, true, true], 1e-5);
}

#[test]
fn lean_linear_matches_composite() {
    let x = randn(&[4, 6, 12], 1.0, 63);
    let w = randn(&[9, 12], 0.3, 64);
    let b = randn(&[9], 0.3, 65);
    let lean = |a: &[Tensor]| ops::lean::linear(&a[0], &a[1], Some(&a[2]));
    let reference = |a: &[Tensor]| composite::linear(&a[0], &a[1], Some(&a[2]));
    let inputs = [x, w, b];
    compare(&lean, &reference, &inputs, &[true, true, true], 1e-5);
    compare(&lean, &reference, &inputs, &[true, false, false], 1e-5);
    compare(&lean, &reference, &inputs, &[false, true, false], 1e-5);
    let lean = |a: &[Tensor]| ops::lean::linear(&a[0], &a[1], None);
    let reference = |a: &[Tensor]| composite::linear(&a[0], &a[1], None);
    compare(&lean, &reference, &inputs[..2], &[true, true], 1e-5);
    // A weight that is a view into a flat buffer (the backbone's layout): offset, no copy.
    let flat = randn(&[200], 0.3, 66);
    let lean = |a: &[Tensor]| ops::lean::linear(&a[0], &a[1].narrow(0, 50, 108)?.reshape((9, 12))?, None);
    let reference = |a: &[Tensor]| composite::linear(&a[0], &a[1].narrow(0, 50, 108)?.reshape((9, 12))?, None);
    compare(&lean, &reference, &[inputs[0].clone(), flat], &[true, true], 1e-5);
}

#[test]
fn lean_half_blocks_match_composite() {
    let (b, t, d, heads, hidden) = (3, 7, 12, 3, 40);
    for (ls, train_w) in [(false, false), (true, true)] {
        let layout = Arc::new(HalfLayout::attn(d, true, ls));
        let inputs = [
            randn(&[b, t, d], 1.0, 67),
            flat_weights(&layout, 68),
            randn(&[b, t, 2 * d], 0.3, 69),
        ];
        let l1 = layout.clone();
        let lean = move |a: &[Tensor]| ops::attn_half(Kernels::Lean, &a[0], &a[1], &l1, Some(&a[2]), heads, 1e-6);
        let reference = move |a: &[Tensor]| composite::attn_half(&a[0], &a[1], &layout, Some(&a[2]), heads, 1e-6);
        compare(&lean, &reference, &inputs, &[true, train_w, true], 2e-5);
        let layout = Arc::new(HalfLayout::mlp(d, hidden, ls));
        let inputs = [randn(&[b, t, d], 1.0, 70), flat_weights(&layout, 71)];
        let l1 = layout.clone();
        let lean = move |a: &[Tensor]| ops::mlp_half(Kernels::Lean, &a[0], &a[1], &l1, hidden, 1e-6, Activation::Gelu);
        let reference = move |a: &[Tensor]| composite::mlp_half(&a[0], &a[1], &layout, 1e-6, Activation::Gelu);
        compare(&lean, &reference, &inputs, &[true, train_w], 2e-5);
    }
}

fn attn_case(qkv_bias: bool, ls: bool, with_delta: bool, train_w: bool) {
    let (b, t, d, heads) = (3, 7, 12, 3);
    let layout = Arc::new(HalfLayout::attn(d, qkv_bias, ls));
    let x = randn(&[b, t, d], 1.0, 10);
    let w = flat_weights(&layout, 11);
    let delta = randn(&[b, t, 2 * d], 0.3, 12);
    let l1 = layout.clone();
    let fused = move |a: &[Tensor]| {
        ops::attn_half(
            Kernels::Auto,
            &a[0],
            &a[1],
            &l1,
            with_delta.then_some(&a[2]),
            heads,
            1e-6,
        )
    };
    let l2 = layout.clone();
    let reference =
        move |a: &[Tensor]| composite::attn_half(&a[0], &a[1], &l2, with_delta.then_some(&a[2]), heads, 1e-6);
    let inputs = [x, w, delta];
    let trainable = [true, train_w, with_delta];
    compare(&fused, &reference, &inputs, &trainable, 2e-5);
    if train_w {
        // Placeholder slots (absent qkv bias / layer scale) never receive a gradient.
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let out = fused(&[
            vars[0].as_tensor().clone(),
            vars[1].as_tensor().clone(),
            vars[2].as_tensor().clone(),
        ])
        .unwrap();
        let g = out.sum_all().unwrap().backward().unwrap();
        let gw: Vec<f32> = g.get(vars[1].as_tensor()).unwrap().to_vec1().unwrap();
        for s in layout.slots.iter().filter(|s| !s.present) {
            assert!(gw[s.range()].iter().all(|v| *v == 0.0), "{} must not train", s.name);
        }
    }
}

#[test]
fn attention_half_fused_matches_composite() {
    attn_case(true, false, false, false);
    attn_case(true, false, true, false);
    attn_case(false, true, false, true);
    attn_case(true, true, true, true);
}

#[test]
fn attention_half_composite_matches_finite_differences() {
    let (b, t, d, heads) = (2, 5, 8, 2);
    let layout = Arc::new(HalfLayout::attn(d, true, true));
    let inputs = [
        randn(&[b, t, d], 1.0, 20),
        flat_weights(&layout, 21),
        randn(&[b, t, 2 * d], 0.3, 22),
    ];
    let reference = move |a: &[Tensor]| composite::attn_half(&a[0], &a[1], &layout, Some(&a[2]), heads, 1e-6);
    finite_difference(&reference, &inputs, &[true, true, true], 30);
}

fn mlp_case(ls: bool, train_w: bool, act: Activation) {
    let (b, t, d, hidden) = (2, 9, 12, 40);
    let layout = Arc::new(HalfLayout::mlp(d, hidden, ls));
    let inputs = [randn(&[b, t, d], 1.0, 30), flat_weights(&layout, 31)];
    let l1 = layout.clone();
    let fused = move |a: &[Tensor]| ops::mlp_half(Kernels::Auto, &a[0], &a[1], &l1, hidden, 1e-6, act);
    let reference = move |a: &[Tensor]| composite::mlp_half(&a[0], &a[1], &layout, 1e-6, act);
    compare(&fused, &reference, &inputs, &[true, train_w], 2e-5);
}

#[test]
fn mlp_half_fused_matches_composite() {
    for act in [Activation::Gelu, Activation::QuickGelu] {
        mlp_case(false, false, act);
        mlp_case(false, true, act);
        mlp_case(true, true, act);
    }
}

#[test]
fn mlp_half_composite_matches_finite_differences() {
    let (d, hidden) = (6, 16);
    let layout = Arc::new(HalfLayout::mlp(d, hidden, true));
    let inputs = [randn(&[2, 4, d], 1.0, 40), flat_weights(&layout, 41)];
    let reference = move |a: &[Tensor]| composite::mlp_half(&a[0], &a[1], &layout, 1e-6, Activation::Gelu);
    finite_difference(&reference, &inputs, &[true, true], 30);
}

#[test]
fn quick_gelu_mlp_half_matches_its_formula_and_finite_differences() {
    // QuickGELU (OpenAI CLIP): the composite op's value is x·σ(1.702x) and its gradient is
    // checked by finite differences.
    let (d, hidden) = (6, 16);
    let layout = Arc::new(HalfLayout::mlp(d, hidden, true));
    let inputs = [randn(&[2, 4, d], 1.0, 42), flat_weights(&layout, 43)];
    let l1 = layout.clone();
    let reference = move |a: &[Tensor]| composite::mlp_half(&a[0], &a[1], &l1, 1e-6, Activation::QuickGelu);
    finite_difference(&reference, &inputs, &[true, true], 30);
    let x = Tensor::new(&[-3.0f32, -0.5, 0.0, 0.7, 4.0], &Device::Cpu).unwrap();
    let y = ((&x * 1.702).unwrap().silu().unwrap() / 1.702).unwrap();
    for (xv, yv) in x.to_vec1::<f32>().unwrap().iter().zip(y.to_vec1::<f32>().unwrap()) {
        let want = xv / (1.0 + (-1.702 * xv).exp());
        assert!((yv - want).abs() < 1e-6, "quick_gelu({xv}) = {yv}, want {want}");
    }
    let hidden_layout = layout.clone();
    // Fused on the CPU (checked against the composite op, gradients included, in
    // mlp_half_fused_matches_composite), composite where the lean op would run.
    for (k, tol) in [(Kernels::Auto, 1e-5), (Kernels::Lean, 1e-12)] {
        let got = ops::mlp_half(
            k,
            &inputs[0],
            &inputs[1],
            &hidden_layout,
            hidden,
            1e-6,
            Activation::QuickGelu,
        )
        .unwrap();
        let want = composite::mlp_half(&inputs[0], &inputs[1], &layout, 1e-6, Activation::QuickGelu).unwrap();
        assert!(rel_err(&got, &want) < tol, "{k:?}");
        let gelu = ops::mlp_half(
            k,
            &inputs[0],
            &inputs[1],
            &hidden_layout,
            hidden,
            1e-6,
            Activation::Gelu,
        )
        .unwrap();
        assert!(rel_err(&gelu, &want) > 1e-4, "{k:?}: QuickGELU must differ from GELU");
    }
}

#[test]
fn fused_ops_match_finite_differences_in_f32() {
    // Direct finite differences on the fused ops themselves (f32 forward, f64 loss), with a step
    // and tolerance suited to single precision.
    let (b, t, d, heads, hidden) = (2, 5, 8, 2, 24);
    let al = Arc::new(HalfLayout::attn(d, true, false));
    let ml = Arc::new(HalfLayout::mlp(d, hidden, false));
    let x = randn(&[b, t, d], 1.0, 50);
    let wa = flat_weights(&al, 51);
    let wm = flat_weights(&ml, 52);
    // The attention half, then the MLP half with GELU, then again with QuickGELU.
    let f = |x: &Tensor| -> Tensor {
        let y = ops::attn_half(Kernels::Auto, x, &wa, &al, None, heads, 1e-6).unwrap();
        let y = ops::mlp_half(Kernels::Auto, &y, &wm, &ml, hidden, 1e-6, Activation::Gelu).unwrap();
        ops::mlp_half(Kernels::Auto, &y, &wm, &ml, hidden, 1e-6, Activation::QuickGelu).unwrap()
    };
    let r = randn(&[b, t, d], 1.0, 53).to_dtype(DType::F64).unwrap();
    let loss = |x: &Tensor| {
        (f(x).to_dtype(DType::F64).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let xv = Var::from_tensor(&x).unwrap();
    let out = f(xv.as_tensor()).to_dtype(DType::F64).unwrap();
    let g = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g: Vec<f32> = g.get(xv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let base: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-2f32;
    for j in (0..base.len()).step_by(7) {
        let mut p = base.clone();
        p[j] += h;
        let mut m = base.clone();
        m[j] -= h;
        let lp = loss(&Tensor::from_vec(p, x.shape(), &Device::Cpu).unwrap());
        let lm = loss(&Tensor::from_vec(m, x.shape(), &Device::Cpu).unwrap());
        let fd = (lp - lm) / (2.0 * f64::from(h));
        let tol = 2e-3 * (1.0 + fd.abs());
        assert!(
            (fd - f64::from(g[j])).abs() < tol,
            "x[{j}]: backward {} vs finite difference {fd}",
            g[j]
        );
    }
    // Softmax composite sanity: rows sum to one.
    let p = composite::softmax(&randn(&[3, 11], 3.0, 54)).unwrap();
    let s: Vec<f32> = p.sum(D::Minus1).unwrap().to_vec1().unwrap();
    assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-6));
}

#[test]
fn spectral_mix_fused_matches_composite_for_every_router_shape() {
    use moppa_studio::physics::tensor::SpectralGrid;
    let (b, h, w, r, k) = (3, 4, 5, 3, 3);
    let grid = SpectralGrid::new(h, w, DType::F32, &Device::Cpu).unwrap();
    let grid64 = SpectralGrid::new(h, w, DType::F64, &Device::Cpu).unwrap();
    let z = randn(&[b, h * w, r], 1.0, 60);
    let g = randn(&[k, r, h * w], 0.5, 61);
    for alpha_shape in [[b, h * w, k], [b, 1, k], [1, 1, k]] {
        let a = (randn(&alpha_shape, 0.3, 62) + 0.5).unwrap();
        let fused = |t: &[Tensor]| ops::spectral_mix(Kernels::Auto, &grid, &t[0], &t[1], Some(&t[2]));
        let reference = |t: &[Tensor]| ops::spectral_mix(Kernels::Composite, &grid64, &t[0], &t[1], Some(&t[2]));
        let inputs = [z.clone(), g.clone(), a];
        compare(&fused, &reference, &inputs, &[true, true, true], 2e-5);
        finite_difference(&reference, &inputs, &[true, true, true], 10);
    }
    // A single prior: no router weights.
    let g1 = randn(&[1, r, h * w], 0.5, 63);
    let fused = |t: &[Tensor]| ops::spectral_mix(Kernels::Auto, &grid, &t[0], &t[1], None);
    let reference = |t: &[Tensor]| ops::spectral_mix(Kernels::Composite, &grid64, &t[0], &t[1], None);
    compare(&fused, &reference, &[z, g1], &[true, true], 2e-5);
}

/// The one-pass kernels of `ops::rowwise` (the CPU loops; `moppa bench --verify` checks the CUDA
/// kernels against these on a GPU): forward values against candle's GELU and the composite
/// softmax, backward passes against candle's autograd of the composite forms, which the tests
/// above check against finite differences; in f32 and, more loosely, bf16.
#[test]
fn rowwise_kernels_match_autograd_of_the_composite_forms() {
    use ops::rowwise;
    let grad_of = |f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>, x: &Tensor, dy: &Tensor| {
        let v = Var::from_tensor(x).unwrap();
        let y = f(v.as_tensor()).unwrap();
        let g = (y * dy).unwrap().sum_all().unwrap().backward().unwrap();
        g.get(v.as_tensor()).unwrap().clone()
    };
    let (x, dy) = (randn(&[6, 5, 40], 1.5, 1), randn(&[6, 5, 40], 1.0, 2));
    let gamma = (randn(&[40], 0.3, 3) + 1.0).unwrap();
    let beta = randn(&[40], 0.3, 4);
    let gelu_ref = grad_of(&|t| t.gelu_erf(), &x, &dy);
    let softmax_ref = grad_of(&composite::softmax, &x, &dy);
    let ln_ref = grad_of(&|t| composite::layer_norm(t, &gamma, &beta, 1e-6), &x, &dy);
    let p = composite::softmax(&x).unwrap();
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
        let c = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let forward = [
            ("gelu", rowwise::gelu(&c(&x)).unwrap(), x.gelu_erf().unwrap()),
            ("softmax", rowwise::softmax(&c(&x)).unwrap(), p.clone()),
        ];
        for (name, got, want) in forward {
            assert_eq!(got.dtype(), dtype);
            let e = rel_err(&got, &want);
            assert!(e < tol, "{name} forward ({dtype:?}): relative error {e:.2e}");
        }
        let gelu = rowwise::gelu_bwd(&c(&x), &c(&dy)).unwrap();
        let softmax = rowwise::softmax_bwd(&c(&p), &c(&dy)).unwrap();
        let ln = rowwise::layer_norm_bwd(&c(&x), &c(&gamma), &c(&dy), 1e-6).unwrap();
        for (name, got, want) in [
            ("gelu", gelu, &gelu_ref),
            ("softmax", softmax, &softmax_ref),
            ("layer norm", ln, &ln_ref),
        ] {
            assert_eq!(got.dtype(), dtype);
            let e = rel_err(&got, want);
            assert!(e < tol, "{name} backward ({dtype:?}): relative error {e:.2e}");
        }
    }
}

/// `rowwise::split_qkv` / `merge_heads` against narrow + reshape + transpose (+ the LoRA update
/// and the scale), exactly.
#[test]
fn rowwise_head_split_and_merge_match_reshapes() {
    use ops::rowwise;
    let (b, t, h, hd) = (2, 5, 3, 4);
    let d = h * hd;
    let qkv = randn(&[b, t, 3 * d], 1.0, 5);
    let delta = randn(&[b, t, 2 * d], 1.0, 6);
    let heads = |x: &Tensor| {
        x.reshape((b, t, h, hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let part = |x: &Tensor, i: usize| x.narrow(2, i * d, d).unwrap();
    let (q, k, v) = rowwise::split_qkv(&qkv, Some(&delta), h, 0.25).unwrap();
    let want_q = (heads(&(part(&qkv, 0) + part(&delta, 0)).unwrap()) * 0.25).unwrap();
    let want_v = heads(&(part(&qkv, 2) + part(&delta, 1)).unwrap());
    for (got, want) in [(&q, &want_q), (&k, &heads(&part(&qkv, 1))), (&v, &want_v)] {
        assert_eq!(got.dims(), &[b, h, t, hd]);
        assert!(rel_err(got, want) < 1e-7, "split: {:.2e}", rel_err(got, want));
    }
    let (q0, _, _) = rowwise::split_qkv(&qkv, None, h, 1.0).unwrap();
    assert!(rel_err(&q0, &heads(&part(&qkv, 0))) < 1e-7);
    let one = rowwise::split_heads(&part(&qkv, 2), h).unwrap();
    assert!(rel_err(&one, &heads(&part(&qkv, 2))) < 1e-7);
    // Merge is the inverse: (dq·s, dk, dv) side by side in (B, T, 3D).
    let merged = rowwise::merge_heads(&[&q, &k, &v], 2.0).unwrap();
    let unheads = |x: &Tensor| x.transpose(1, 2).unwrap().reshape((b, t, d)).unwrap();
    let want = Tensor::cat(&[&(unheads(&q) * 2.0).unwrap(), &unheads(&k), &unheads(&v)], 2).unwrap();
    assert!(rel_err(&merged, &want) < 1e-7, "merge: {:.2e}", rel_err(&merged, &want));
    assert!(rel_err(&rowwise::merge_heads(&[&k], 1.0).unwrap(), &unheads(&k)) < 1e-7);
}

/// LoRA's four matrices (random, B non-zero so every gradient is) and AdaptFormer's bottleneck,
/// as test inputs.
fn lora_inputs(d: usize, r: usize, seed: u64) -> [Tensor; 4] {
    [
        randn(&[r, d], 0.4, seed),
        randn(&[d, r], 0.4, seed + 1),
        randn(&[r, d], 0.4, seed + 2),
        randn(&[d, r], 0.4, seed + 3),
    ]
}

fn lora_of(a: &[Tensor]) -> ops::LoraWeights {
    ops::LoraWeights {
        q_a: a[0].clone(),
        q_b: a[1].clone(),
        v_a: a[2].clone(),
        v_b: a[3].clone(),
        scale: 2.0,
    }
}

fn adaptformer_of(a: &[Tensor]) -> ops::AdaptFormerWeights {
    ops::AdaptFormerWeights {
        down_w: a[0].clone(),
        down_b: a[1].clone(),
        up_w: a[2].clone(),
        up_b: a[3].clone(),
        scale: 0.1,
    }
}

fn adaptformer_inputs(d: usize, r: usize, seed: u64) -> [Tensor; 4] {
    [
        randn(&[r, d], 0.5, seed),
        randn(&[r], 0.5, seed + 1),
        randn(&[d, r], 0.5, seed + 2),
        randn(&[d], 0.5, seed + 3),
    ]
}

/// Central differences of `Σ f(inputs) ⊙ r` in f32 (loss summed in f64) against the backward of
/// `f` for input `i`, at every 5th coordinate; a step and tolerance suited to single precision.
fn fused_finite_difference_f32(f: &dyn Fn(&[Tensor]) -> Tensor, inputs: &[Tensor], i: usize, h: f32) {
    let probe = f(inputs);
    let r = randn(probe.dims(), 1.0, 77).to_dtype(DType::F64).unwrap();
    let loss = |args: &[Tensor]| {
        (f(args).to_dtype(DType::F64).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let v = Var::from_tensor(&inputs[i]).unwrap();
    let mut args = inputs.to_vec();
    args[i] = v.as_tensor().clone();
    let g = (f(&args).to_dtype(DType::F64).unwrap() * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g: Vec<f32> = g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let base: Vec<f32> = inputs[i].flatten_all().unwrap().to_vec1().unwrap();
    for j in (0..base.len()).step_by(5) {
        let mut p = base.clone();
        p[j] += h;
        let mut m = base.clone();
        m[j] -= h;
        args[i] = Tensor::from_vec(p, inputs[i].shape(), &Device::Cpu).unwrap();
        let lp = loss(&args);
        args[i] = Tensor::from_vec(m, inputs[i].shape(), &Device::Cpu).unwrap();
        let lm = loss(&args);
        let fd = (lp - lm) / (2.0 * f64::from(h));
        let tol = 2e-3 * (1.0 + fd.abs());
        assert!(
            (fd - f64::from(g[j])).abs() < tol,
            "input {i}[{j}]: backward {} vs finite difference {fd}",
            g[j]
        );
    }
}

/// A low-rank side path inside a fused half (inputs: x, the flat weights, four parameters)
/// against the composite path, values and gradients; where x trains and the weights do not, also
/// finite differences of the composite path (f64) and of the fused op (f32) for x and every
/// parameter.
fn check_side_path(
    fused: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    reference: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    train_x: bool,
    train_w: bool,
) {
    compare(
        fused,
        reference,
        inputs,
        &[train_x, train_w, true, true, true, true],
        2e-5,
    );
    if train_x && !train_w {
        finite_difference(reference, inputs, &[true, false, true, true, true, true], 12);
        let f = |a: &[Tensor]| fused(a).unwrap();
        for i in [0, 2, 3, 4, 5] {
            fused_finite_difference_f32(&f, inputs, i, 1e-2);
        }
    }
}

#[test]
fn lora_inside_the_fused_attention_half_matches_composite_and_finite_differences() {
    // The fused op computes LoRA from its own norm1(x) and adds it into the qkv rows; the
    // reference is the composite path: composite LayerNorm, the (Δq, Δv) update by candle matmuls,
    // the composite attention half.
    let (b, t, d, heads, r) = (2, 6, 12, 3, 3);
    for (qkv_bias, ls, train_x, train_w) in [
        (true, false, true, false),
        // The first block of a frozen backbone: no input gradient wanted.
        (true, false, false, false),
        (false, true, true, true),
    ] {
        let layout = Arc::new(HalfLayout::attn(d, qkv_bias, ls));
        let [qa, qb, va, vb] = lora_inputs(d, r, 80);
        let inputs = [randn(&[b, t, d], 1.0, 81), flat_weights(&layout, 82), qa, qb, va, vb];
        let (l1, l2) = (layout.clone(), layout.clone());
        let fused =
            move |a: &[Tensor]| ops::attn_half_lora(Kernels::Auto, &a[0], &a[1], &l1, &lora_of(&a[2..]), heads, 1e-6);
        let reference = move |a: &[Tensor]| {
            ops::attn_half_lora(Kernels::Composite, &a[0], &a[1], &l2, &lora_of(&a[2..]), heads, 1e-6)
        };
        check_side_path(&fused, &reference, &inputs, train_x, train_w);
    }
}

#[test]
fn adaptformer_inside_the_fused_mlp_half_matches_composite_and_finite_differences() {
    // The fused op runs AdaptFormer's bottleneck from its own norm2(x) and adds s·up(ReLU(down(h)))
    // outside the layer scale; the reference: composite LayerNorm, candle linears + ReLU, the
    // composite MLP half.
    let (b, t, d, hidden, r) = (2, 5, 12, 32, 4);
    for (ls, train_x, train_w, act) in [
        (false, true, false, Activation::Gelu),
        (false, false, false, Activation::Gelu),
        (true, true, true, Activation::QuickGelu),
    ] {
        let layout = Arc::new(HalfLayout::mlp(d, hidden, ls));
        let [dw, db, uw, ub] = adaptformer_inputs(d, r, 90);
        let inputs = [randn(&[b, t, d], 1.0, 91), flat_weights(&layout, 92), dw, db, uw, ub];
        let (l1, l2) = (layout.clone(), layout.clone());
        let fused = move |a: &[Tensor]| {
            ops::mlp_half_adaptformer(
                Kernels::Auto,
                &a[0],
                &a[1],
                &l1,
                hidden,
                1e-6,
                act,
                &adaptformer_of(&a[2..]),
            )
        };
        let reference = move |a: &[Tensor]| {
            ops::mlp_half_adaptformer(
                Kernels::Composite,
                &a[0],
                &a[1],
                &l2,
                hidden,
                1e-6,
                act,
                &adaptformer_of(&a[2..]),
            )
        };
        check_side_path(&fused, &reference, &inputs, train_x, train_w);
    }
}
