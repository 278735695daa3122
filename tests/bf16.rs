//! bf16 products on the CPU (`--dtype bf16`): the GEMM against an exact f64 product of the
//! bf16-rounded operands, and the fused transformer halves with bf16 products against the
//! composite f64 reference (values and every gradient).

// Tests: unwrap is the assertion; pedantic style lints are for the library.
#![allow(clippy::unwrap_used, clippy::pedantic)]

use candle_core::{DType, Tensor, Var};
use moppa_studio::config::Activation;
use moppa_studio::model::ops::cpu::bf16;
use moppa_studio::model::ops::cpu::gemm::{Par, View, gemm};
use moppa_studio::model::ops::{self, HalfLayout, Kernels, composite};
use std::sync::Arc;

mod common;
use common::{randn, rel_err};

fn data(n: usize, seed: u64) -> Vec<f32> {
    randn(&[n], 1.0, seed).to_vec1().unwrap()
}

/// Checks `C = [C0 +] A·B` with bf16 products for `A: m×k` (row stride `k + pad`, so the view
/// is strided), `B` given as `k×n` rows or as the transpose of an `n×k` matrix (a weight).
fn check_gemm(m: usize, n: usize, k: usize, b_transposed: bool, accumulate: bool) {
    let pad = 3;
    let a = data(m * (k + pad), (m * 31 + k) as u64);
    let b = data(k * n, (n * 17 + k) as u64);
    let c0 = data(m * n, 5);
    let (b_view, b_at): (View<'_>, Box<dyn Fn(usize, usize) -> f32>) = if b_transposed {
        (View::t(&b, k), Box::new(|kk, j| b[j * k + kk]))
    } else {
        (View::rows(&b, n), Box::new(|kk, j| b[kk * n + j]))
    };
    let mut c = c0.clone();
    gemm(
        m,
        n,
        k,
        View::strided(&a, k + pad),
        b_view,
        &mut c,
        n,
        accumulate,
        Par::PoolBf16,
    );
    let (mut worst, mut unrounded_gap) = (0.0f64, 0.0f64);
    for i in 0..m {
        for j in 0..n {
            let (mut exact, mut scale, mut plain) = (0.0f64, 0.0f64, 0.0f64);
            for kk in 0..k {
                let (x, y) = (a[i * (k + pad) + kk], b_at(kk, j));
                let p = f64::from(bf16::round(x)) * f64::from(bf16::round(y));
                exact += p;
                scale += p.abs();
                plain += f64::from(x) * f64::from(y);
            }
            let base = if accumulate { f64::from(c0[i * n + j]) } else { 0.0 };
            let got = f64::from(c[i * n + j]) - base;
            let scale = scale.max(1e-3);
            worst = worst.max((got - exact).abs() / scale);
            unrounded_gap = unrounded_gap.max((plain - exact).abs() / scale);
        }
    }
    // f32 sums of exact products: a few ulps of the sum of magnitudes.
    assert!(
        worst < 2e-6,
        "{m}×{n}×{k} (Bᵀ {b_transposed}, += {accumulate}): error {worst:e}"
    );
    // The operands really were rounded: the unrounded product differs by ~2⁻⁹ of the scale.
    if k >= 8 {
        assert!(unrounded_gap > 1e-4, "{m}×{n}×{k}: looks unrounded ({unrounded_gap:e})");
    }
}

// The expected values are computed here in f64 from the operands rounded by `half::bf16`
// (round to nearest, ties to even: the same rounding as `torch.Tensor.bfloat16()`), so the test
// needs no fixture: it fails on wrong rounding (truncation is off by up to 2⁻⁸), a wrong packing
// of odd `k` or of the last partial column/row panels, or a lost accumulation.
#[test]
fn bf16_gemm_matches_the_exact_product_of_rounded_operands() {
    println!("native bf16 products: {}", bf16::native());
    for &(m, n, k) in &[
        (1, 1, 1),
        (7, 5, 3),
        (9, 48, 2),
        (13, 50, 33),
        (17, 97, 64),
        (100, 96, 96),
        (130, 20, 385),
    ] {
        for b_transposed in [true, false] {
            for accumulate in [false, true] {
                check_gemm(m, n, k, b_transposed, accumulate);
            }
        }
    }
}

#[test]
fn bf16_rounding_is_to_nearest_even() {
    // 1 + 2⁻⁸ lies halfway between bf16 1.0 and 1 + 2⁻⁷: ties go to the even mantissa (1.0);
    // 1 + 3·2⁻⁸ goes up to 1 + 2⁻⁶ (even); just above a half rounds up.
    assert_eq!(bf16::round(1.0 + 2f32.powi(-8)), 1.0);
    assert_eq!(bf16::round(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
    assert_eq!(bf16::round(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 1.0 + 2f32.powi(-7));
    assert_eq!(bf16::round(-2.5), -2.5);
}

/// Output and gradients (of `Σ out ⊙ r`) of `f` at `inputs` in `dtype`.
fn eval(
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    inputs: &[Tensor],
    r: &Tensor,
    dtype: DType,
) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
        .collect();
    let args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&args).unwrap();
    let loss = (&out * r.to_dtype(dtype).unwrap()).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    (
        out,
        vars.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()).collect(),
    )
}

type Op = Box<dyn Fn(Kernels, &[Tensor]) -> candle_core::Result<Tensor>>;

/// The fused half with bf16 products stays within bf16 rounding of the f64 reference, and
/// differs from the f32 fused half by more than f32 rounding (the bf16 path really ran).
fn check_half(name: &str, op: &Op, reference: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>, inputs: &[Tensor]) {
    let probe = op(Kernels::Auto, inputs).unwrap();
    let r = randn(probe.dims(), 1.0, 77);
    let (out_b, g_b) = eval(&|a| op(Kernels::Bf16, a), inputs, &r, DType::F32);
    let (out_f, g_f) = eval(&|a| op(Kernels::Auto, a), inputs, &r, DType::F32);
    let (out_c, g_c) = eval(reference, inputs, &r, DType::F64);
    let (e_b, e_f) = (rel_err(&out_b, &out_c), rel_err(&out_f, &out_c));
    println!("{name}: output error bf16 {e_b:.2e}, f32 {e_f:.2e}");
    assert!(e_b < 1e-2, "{name}: bf16 output error {e_b:e}");
    assert!(
        e_b > 20.0 * e_f.max(1e-7),
        "{name}: bf16 output {e_b:e} vs f32 {e_f:e}: not rounded?"
    );
    for (i, (gb, gc)) in g_b.iter().zip(&g_c).enumerate() {
        let e = rel_err(gb, gc);
        println!(
            "{name}: gradient {i} error bf16 {e:.2e}, f32 {:.2e}",
            rel_err(&g_f[i], gc)
        );
        // `moppa bench --verify`'s bf16 tolerance: gradients that pass through several bf16
        // products (LoRA's A through B and the attention backward) reach ~2e-2.
        assert!(e < 5e-2, "{name}: gradient {i} error {e:e}");
        let norm = gb.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm > 0.0, "{name}: gradient {i} is zero");
    }
}

fn flat_weights(layout: &HalfLayout, seed: u64) -> Tensor {
    // LayerNorm gains near 1, layer scale near 0.5, everything else small random.
    let mut w: Vec<f32> = randn(&[layout.len], 0.2, seed).to_vec1().unwrap();
    for (i, s) in layout.slots.iter().enumerate() {
        let base = match i {
            ops::layout::NORM_W => 1.0,
            ops::layout::LS => 0.5,
            _ => 0.0,
        };
        w[s.range()].iter_mut().for_each(|v| *v += base);
    }
    Tensor::from_vec(w, layout.len, &candle_core::Device::Cpu).unwrap()
}

#[test]
fn fused_halves_with_bf16_products_match_the_reference_within_bf16_rounding() {
    let (b, t, d, heads, hidden, r) = (2, 17, 48, 3, 96, 4);
    let x = randn(&[b, t, d], 1.0, 40);

    let al = Arc::new(HalfLayout::attn(d, true, true));
    let (l1, l2) = (al.clone(), al.clone());
    let attn: Op = Box::new(move |k, a| ops::attn_half(k, &a[0], &a[1], &l1, None, heads, 1e-6));
    let attn_ref = move |a: &[Tensor]| composite::attn_half(&a[0], &a[1], &l2, None, heads, 1e-6);
    check_half("attention", &attn, &attn_ref, &[x.clone(), flat_weights(&al, 41)]);

    let lora_parts = [
        randn(&[r, d], 0.3, 42),
        randn(&[d, r], 0.3, 43),
        randn(&[r, d], 0.3, 44),
        randn(&[d, r], 0.3, 45),
    ];
    let lora_of = |a: &[Tensor]| ops::LoraWeights {
        q_a: a[0].clone(),
        q_b: a[1].clone(),
        v_a: a[2].clone(),
        v_b: a[3].clone(),
        scale: 2.0,
    };
    let (l1, l2) = (al.clone(), al.clone());
    let lora: Op = Box::new(move |k, a| ops::attn_half_lora(k, &a[0], &a[1], &l1, &lora_of(&a[2..]), heads, 1e-6));
    // Off the fused path (composite kernels) the op is the composite reference.
    let lora_ref =
        move |a: &[Tensor]| ops::attn_half_lora(Kernels::Composite, &a[0], &a[1], &l2, &lora_of(&a[2..]), heads, 1e-6);
    let mut inputs = vec![x.clone(), flat_weights(&al, 46)];
    inputs.extend(lora_parts);
    check_half("attention + LoRA", &lora, &lora_ref, &inputs);

    let ml = Arc::new(HalfLayout::mlp(d, hidden, true));
    for act in [Activation::Gelu, Activation::QuickGelu] {
        let (l1, l2) = (ml.clone(), ml.clone());
        let mlp: Op = Box::new(move |k, a| ops::mlp_half(k, &a[0], &a[1], &l1, hidden, 1e-6, act));
        let mlp_ref = move |a: &[Tensor]| composite::mlp_half(&a[0], &a[1], &l2, 1e-6, act);
        check_half(
            &format!("mlp {act:?}"),
            &mlp,
            &mlp_ref,
            &[x.clone(), flat_weights(&ml, 47)],
        );
    }

    let ad_of = |a: &[Tensor]| ops::AdaptFormerWeights {
        down_w: a[0].clone(),
        down_b: a[1].clone(),
        up_w: a[2].clone(),
        up_b: a[3].clone(),
        scale: 0.5,
    };
    let (l1, l2) = (ml.clone(), ml.clone());
    let ad: Op = Box::new(move |k, a| {
        ops::mlp_half_adaptformer(k, &a[0], &a[1], &l1, hidden, 1e-6, Activation::Gelu, &ad_of(&a[2..]))
    });
    let ad_ref = move |a: &[Tensor]| {
        ops::mlp_half_adaptformer(
            Kernels::Composite,
            &a[0],
            &a[1],
            &l2,
            hidden,
            1e-6,
            Activation::Gelu,
            &ad_of(&a[2..]),
        )
    };
    let mut inputs = vec![x.clone(), flat_weights(&ml, 48)];
    inputs.extend([
        randn(&[r, d], 0.3, 49),
        randn(&[r], 0.3, 50),
        randn(&[d, r], 0.3, 51),
        randn(&[d], 0.3, 52),
    ]);
    check_half("mlp + AdaptFormer", &ad, &ad_ref, &inputs);
}

/// `--dtype bf16` on the CPU end to end: full fine-tuning of the (random) micro backbone on the
/// digits learns with bf16 products (f32 weight gradients), and its run folder records the
/// precision it ran at, which `moppa eval` then uses (the f32 twin is engine.rs's
/// `training_on_digits_learns…`).
#[test]
fn a_cpu_run_with_bf16_products_learns_and_records_its_precision() {
    use moppa_studio::config::{MethodConfig, MethodKind, Precision, RunConfig};
    use moppa_studio::train::protocol::{Event, FinishReason};
    use moppa_studio::train::{WorkerHandle, WorkerOptions};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cfg_backbone = common::micro_backbone(dir.path()).display().to_string();
    let cfg = RunConfig {
        backbone: cfg_backbone.clone(),
        steps: Some(200),
        lr: Some(2e-3),
        method: MethodConfig::of(MethodKind::Full),
        batch: 32,
        eval_every: 100,
        threads: Some(2),
        dtype: Precision::Bf16,
        out: Some(out.clone()),
        ..RunConfig::default()
    };
    let h = WorkerHandle::spawn(cfg, WorkerOptions::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let finished = loop {
        assert!(Instant::now() < deadline, "the run did not finish");
        if let Ok(Event::Finished(f)) = h.events().recv_timeout(Duration::from_millis(200)) {
            break f;
        }
    };
    assert_eq!(finished.reason, FinishReason::Done, "{:?}", finished.message);
    let val = finished.best_val_acc.unwrap();
    assert!(val > 0.5, "val accuracy {val} should be far above chance (0.1)");
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(config.contains("dtype = \"bf16\""), "{config}");
    // `moppa eval` on the run folder computes at the run's precision: the same test accuracy and
    // loss as the run's own test evaluation.
    let test_acc = finished.test_acc.unwrap();
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let test_loss = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["kind"] == "eval" && v["split"] == "test")
        .and_then(|v| v["loss"].as_f64())
        .unwrap();
    let o = common::moppa(&["eval", "--run", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    let expected = format!("test accuracy {test_acc:.4} (loss {test_loss:.4})");
    assert!(text.contains(&expected), "{text} vs {expected}");
    // The same through the library, to more digits than the CLI prints: the run's precision
    // reproduces the run's test loss; f32 products give another one.
    let loss_at = |precision| {
        let on = moppa_studio::train::evaluate::OnBackbone {
            spec: &cfg_backbone,
            heads: None,
            precision,
        };
        let adapter = out.join("adapter.safetensors");
        let split = moppa_studio::data::Split::Test;
        let e = moppa_studio::train::evaluate::evaluate_adapter(&adapter, on, "builtin:digits", split, false, 256);
        e.unwrap().result.loss
    };
    let (bf16_loss, f32_loss) = (loss_at(Precision::Bf16), loss_at(Precision::F32));
    assert!(
        (bf16_loss - test_loss).abs() < 1e-6 * test_loss,
        "{bf16_loss} vs the run's {test_loss}"
    );
    assert!(
        (f32_loss - test_loss).abs() > 1e-6 * test_loss,
        "f32 {f32_loss} = bf16 {test_loss}?"
    );
}
