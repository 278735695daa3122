//! The optimizer against PyTorch's AdamW, and its locks.

// Tests: unwrap is the assertion; pedantic style lints are for the library.
#![allow(clippy::unwrap_used, clippy::pedantic)]

use candle_core::{Device, Tensor, Var};
use moppa_studio::train::optim::{AdamW, Decay};

const W0: [f32; 6] = [0.5, -0.25, 1.0, 0.75, -1.5, 0.125];
const B0: [f32; 3] = [0.1, -0.2, 0.3];
const GW: [f32; 6] = [1.0, -2.0, 0.5, 0.25, 3.0, -1.0];
const GB: [f32; 3] = [-0.5, 0.75, 2.0];

fn setup() -> (Var, Var, AdamW) {
    setup_with(true)
}

fn setup_with(host_pass: bool) -> (Var, Var, AdamW) {
    let w = Var::from_tensor(&Tensor::from_slice(&W0, (2, 3), &Device::Cpu).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::from_slice(&B0, 3, &Device::Cpu).unwrap()).unwrap();
    let vars = vec![("w".to_string(), w.clone()), ("b".to_string(), b.clone())];
    let mut opt = AdamW::new(&vars, |_, v| if v.rank() == 2 { Decay::All } else { Decay::None }, 0.01).unwrap();
    opt.host_pass = host_pass;
    (w, b, opt)
}

/// Step `step` (0-based): gradients GW·(step+1) for w and GB/(step+1) for b, through a loss
/// `Σ w⊙GW' + Σ b⊙GB'` (its gradients are exactly those).
fn step(w: &Var, b: &Var, opt: &mut AdamW, step: usize) {
    let k = (step + 1) as f64;
    let gw = (Tensor::from_slice(&GW, (2, 3), &Device::Cpu).unwrap() * k).unwrap();
    let gb = (Tensor::from_slice(&GB, 3, &Device::Cpu).unwrap() / k).unwrap();
    let loss =
        ((w.as_tensor() * gw).unwrap().sum_all().unwrap() + (b.as_tensor() * gb).unwrap().sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let info = opt.step(&grads, 0.1, 0.0).unwrap();
    assert!(info.finite);
}

// Reference (PyTorch 2.15, float64):
//   w = torch.tensor([[0.5, -0.25, 1.0], [0.75, -1.5, 0.125]], dtype=torch.float64, requires_grad=True)
//   b = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)
//   opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.01}, {"params": [b], "weight_decay": 0.0}],
//                           lr=0.1, betas=(0.9, 0.999), eps=1e-8)
//   for step in range(3):
//       w.grad = torch.tensor([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]], dtype=torch.float64) * (step + 1)
//       b.grad = torch.tensor([-0.5, 0.75, 2.0], dtype=torch.float64) / (step + 1)
//       opt.step()
//   print(w.detach().flatten().tolist()); print(b.detach().flatten().tolist())
#[test]
fn adamw_matches_pytorch() {
    let want_w = [
        0.2064795947616539,
        0.04277115601388386,
        0.7049810963127292,
        0.45573035066487994,
        -1.7875264046057295,
        0.41664727961334613,
    ];
    let want_b = [0.38053380976305945, -0.4805338120804122, 0.019466185022896848];
    // Both implementations: the fused host pass (CPU default) and the tensor-op path (GPU).
    for host_pass in [true, false] {
        let (w, b, mut opt) = setup_with(host_pass);
        for s in 0..3 {
            step(&w, &b, &mut opt, s);
        }
        let got_w: Vec<f32> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let got_b: Vec<f32> = b.as_tensor().to_vec1().unwrap();
        for (g, e) in got_w.iter().zip(want_w).chain(got_b.iter().zip(want_b)) {
            assert!((f64::from(*g) - e).abs() < 1e-5, "host pass {host_pass}: {g} vs {e}");
        }
    }
}

#[test]
fn a_locked_tensor_keeps_its_value_and_moments() {
    for host_pass in [true, false] {
        locked_case(host_pass);
    }
}

fn locked_case(host_pass: bool) {
    let (w, b, mut opt) = setup_with(host_pass);
    step(&w, &b, &mut opt, 0);
    let moments = |opt: &AdamW| -> Vec<Vec<f32>> {
        opt.moments()
            .unwrap()
            .into_iter()
            .filter(|(n, _, _)| n == "b")
            .flat_map(|(_, m, v)| [m.to_vec1().unwrap(), v.to_vec1().unwrap()])
            .collect()
    };
    let (b_before, m_before) = (b.as_tensor().to_vec1::<f32>().unwrap(), moments(&opt));
    let w_before: Vec<f32> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    opt.set_locked("b", true);
    step(&w, &b, &mut opt, 1);
    assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), b_before);
    assert_eq!(moments(&opt), m_before);
    let w_after: Vec<f32> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    assert_ne!(w_after, w_before, "the unlocked tensor moves");
    // Released, it moves again from the kept moments.
    opt.set_locked("b", false);
    step(&w, &b, &mut opt, 2);
    assert_ne!(b.as_tensor().to_vec1::<f32>().unwrap(), b_before);
}

#[test]
fn moments_round_trip_by_name() {
    let (w, b, mut opt) = setup();
    step(&w, &b, &mut opt, 0);
    let saved = opt.moments().unwrap();
    let (w2, b2, mut fresh) = setup();
    for (name, m, v) in &saved {
        assert!(fresh.set_moments(name, m, v).unwrap());
    }
    assert!(!fresh.set_moments("nope", &saved[0].1, &saved[0].2).unwrap());
    let wrong = Tensor::zeros(5, candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(fresh.set_moments("b", &wrong, &wrong).is_err());
    let restored = fresh.moments().unwrap();
    for ((_, m1, v1), (_, m2, v2)) in saved.iter().zip(&restored) {
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(m1), flat(m2));
        assert_eq!(flat(v1), flat(v2));
    }
    drop((w2, b2));
}

#[test]
fn an_update_that_overflows_f32_changes_nothing() {
    // Adam's first update is ±1 per weight; times lr 1e39 it is no longer an f32. The step must
    // report that and keep the weights and moments, whatever checked the learning rate before.
    let (w, b, mut opt) = setup();
    let loss = (w.as_tensor().sum_all().unwrap() + b.as_tensor().sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    let info = opt.step(&grads, 1e39, 0.0).unwrap();
    assert!(!info.finite, "an overflowing update is refused");
    assert_eq!(w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), W0);
    assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), B0);
    // The next sane step goes through from the same state.
    let info = opt.step(&grads, 0.1, 0.0).unwrap();
    assert!(info.finite);
}
