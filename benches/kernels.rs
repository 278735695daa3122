//! Criterion benchmarks of the CPU kernels at the tiny configuration's sizes (batch 64, 65
//! tokens, D 96, 3 heads, MLP 384): `cargo bench`. Compare against `moppa bench` for whole steps.

use criterion::{Criterion, criterion_group, criterion_main};
use moppa_studio::model::ops::cpu::{attention, gemm, layer_norm, math};
use std::hint::black_box;

const N: usize = 64 * 65;
const D: usize = 96;
const H: usize = 384;

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

fn kernels(c: &mut Criterion) {
    let x = data(N * D, 1);
    let w = data(H * D, 2);
    let a = data(N * H, 3);
    let mut out = vec![0f32; N * H];
    c.bench_function("gemm x·Wᵀ 4160×96 → 384", |b| {
        b.iter(|| gemm::linear_fwd(N, H, D, black_box(&x), D, &w, &mut out, H, false, gemm::Par::Pool));
    });
    let mut dx = vec![0f32; N * D];
    c.bench_function("gemm dY·W 4160×384 → 96", |b| {
        b.iter(|| gemm::linear_dx(N, H, D, black_box(&a), H, &w, &mut dx, D, false, gemm::Par::Pool));
    });
    let (gamma, beta) = (vec![1f32; D], vec![0f32; D]);
    let (mut y, mut st) = (vec![0f32; N * D], vec![0f32; 2 * N]);
    c.bench_function("layer norm forward 4160×96", |b| {
        b.iter(|| layer_norm::forward(black_box(&x), &mut y, &mut st, &gamma, &beta, 1e-6));
    });
    c.bench_function("layer norm backward 4160×96", |b| {
        b.iter(|| layer_norm::backward(black_box(&x), &y, &st, &gamma, &mut dx, false));
    });
    let (mut g, mut cdf, mut aa) = (vec![0f32; N * H], vec![0f32; N * H], a.clone());
    let bias = vec![0.1f32; H];
    c.bench_function("bias + GELU forward 4160×384", |b| {
        b.iter(|| {
            aa.copy_from_slice(&a);
            math::bias_gelu(&mut aa, &mut g, &mut cdf, &bias);
        });
    });
    let mut d = a.clone();
    c.bench_function("GELU backward 4160×384", |b| {
        b.iter(|| math::gelu_bwd(black_box(&mut d), &aa, &cdf, H));
    });
    let qkv = data(N * 3 * D, 4);
    let dims = attention::Dims {
        b: 64,
        t: 65,
        d: D,
        heads: 3,
    };
    let (mut o, mut probs) = (vec![0f32; N * D], vec![0f32; 64 * 3 * 65 * 65]);
    c.bench_function("attention forward 64×3 heads×65 tokens", |b| {
        b.iter(|| attention::forward(black_box(&qkv), &mut o, Some(&mut probs), dims));
    });
    let mut dqkv = vec![0f32; N * 3 * D];
    c.bench_function("attention backward 64×3 heads×65 tokens", |b| {
        b.iter(|| attention::backward(black_box(&qkv), &probs, &o, &mut dqkv, dims));
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = kernels
}
criterion_main!(benches);
