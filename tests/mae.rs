//! Masked-autoencoder pretraining: masks, targets, gradients, and `moppa pretrain --objective
//! mae` end to end (the written file is a head-less backbone that fine-tuning accepts).

// Tests: unwrap is the assertion; pedantic style lints are for the library.
#![allow(clippy::unwrap_used, clippy::pedantic)]

use candle_core::{Device, Tensor};
use moppa_studio::config::VitConfig;
use moppa_studio::model::mae::{Mae, patchify};
use moppa_studio::model::tensor_file::TensorFile;
use rand::SeedableRng as _;
use std::process::Command;

fn small() -> VitConfig {
    VitConfig {
        img_size: 16,
        patch_size: 4,
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        num_classes: 0,
        ..VitConfig::tiny()
    }
}

/// `moppa pretrain --objective OBJ` on the built-in digits into `dir/run` and `file`; the file.
fn pretrain_digits(objective: &str, epochs: u32, dir: &std::path::Path, file: &std::path::Path) -> TensorFile {
    let epochs = epochs.to_string();
    let run = dir.join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_moppa"))
        .args([
            "pretrain",
            "--objective",
            objective,
            "--data",
            "builtin:digits",
            "--epochs",
            &epochs,
        ])
        .args([
            "--run",
            run.to_str().unwrap(),
            "--output",
            file.to_str().unwrap(),
            "--threads",
            "2",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    TensorFile::read(file).unwrap()
}

/// One field of every `progress` line of a run's `metrics.jsonl`.
fn progress(run: &std::path::Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "progress")
        .map(|v| v[key].as_f64().unwrap())
        .collect()
}

#[test]
fn masks_keep_the_right_share_and_restore_is_the_inverse_shuffle() {
    let mae = Mae::new(&small(), 0.75, (32, 1, 1), 0, 0, &Device::Cpu).unwrap();
    let n = 16; // a 4 × 4 grid
    assert_eq!(mae.keep, 4);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (keep, restore, hidden) = mae.masks(3, &mut rng).unwrap();
    let keep: Vec<u32> = keep.to_vec1().unwrap();
    let restore: Vec<u32> = restore.to_vec1().unwrap();
    let hidden: Vec<Vec<f32>> = hidden.to_vec2().unwrap();
    for b in 0..3 {
        let row = &restore[b * n..(b + 1) * n];
        let mut sorted: Vec<u32> = row.to_vec();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            ((b * n) as u32..((b + 1) * n) as u32).collect::<Vec<_>>(),
            "a permutation"
        );
        assert_eq!(hidden[b].iter().filter(|&&h| h == 1.0).count(), n - 4);
        for j in 0..4 {
            let flat = keep[b * 4 + j] as usize;
            assert_eq!(flat / n, b, "kept patches come from their own image");
            // The j-th kept patch sits at position j of the decoder's shuffled sequence.
            assert_eq!(restore[flat] as usize, b * n + j);
            assert_eq!(hidden[b][flat % n], 0.0);
        }
    }
}

#[test]
fn patchify_orders_pixels_like_mae_and_normalises_each_patch() {
    // MAE's patchify: x.reshape(N, C, h, p, w, p) → einsum('nchpwq->nhwpqc'), then per patch
    // (x − mean) / sqrt(var + 1e-6). Here for one 2-channel 4 × 4 image with patches of 2.
    let (c, s, p) = (2usize, 4usize, 2usize);
    let vals: Vec<f32> = (0..c * s * s).map(|i| ((i * 7) % 11) as f32).collect();
    let img = Tensor::from_vec(vals.clone(), (1, c, s, s), &Device::Cpu).unwrap();
    let out: Vec<Vec<f32>> = patchify(&img, 2, p, c).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
    for (patch, row) in out.iter().enumerate() {
        let (gh, gw) = (patch / 2, patch % 2);
        let mut raw = Vec::new();
        for py in 0..p {
            for px in 0..p {
                for ch in 0..c {
                    raw.push(vals[ch * s * s + (gh * p + py) * s + gw * p + px]);
                }
            }
        }
        let mean = raw.iter().sum::<f32>() / raw.len() as f32;
        let var = raw.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / raw.len() as f32;
        for (got, r) in row.iter().zip(&raw) {
            let want = (r - mean) / (var + 1e-6).sqrt();
            assert!((got - want).abs() < 1e-5, "patch {patch}: {got} vs {want}");
        }
    }
}

#[test]
fn every_mae_parameter_gets_a_finite_nonzero_gradient() {
    let mae = Mae::new(&small(), 0.5, (32, 1, 1), 4, 3, &Device::Cpu).unwrap();
    let images = Tensor::randn(0f32, 1.0, (2, 3, 16, 16), &Device::Cpu).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (keep, restore, hidden) = mae.masks(2, &mut rng).unwrap();
    let (recon, logits) = mae.forward(&images, &keep, &restore, &hidden).unwrap();
    let l = recon.to_scalar::<f32>().unwrap();
    // Random weights predict ~0 for unit-variance targets.
    assert!(l > 0.3 && l < 5.0, "loss {l}");
    // SupMAE: the class loss on the mean visible token reaches the head and the encoder too.
    let labels = Tensor::new(&[1u32, 3], &Device::Cpu).unwrap();
    let ce = moppa_studio::model::cross_entropy(&logits.unwrap(), &labels).unwrap();
    let grads = (recon + ce).unwrap().backward().unwrap();
    for (name, var) in mae.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(norm.is_finite() && norm > 0.0, "{name}: gradient norm {norm}");
    }
}

#[test]
fn pretrain_mae_writes_a_headless_backbone_that_fine_tuning_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mae.safetensors");
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_moppa")).args(args).output().unwrap();
    let tf = pretrain_digits("mae", 1, dir.path(), &file);
    assert!(!tf.has("head.weight"), "an MAE backbone has no classifier");
    assert!(tf.has("blocks.3.mlp.fc2.weight") && !tf.tensors.keys().any(|k| k.starts_with("decoder")));
    let prov: serde_json::Value = serde_json::from_str(&tf.metadata["moppa.pretrain"]).unwrap();
    assert_eq!(prov["objective"], "mae");
    // The reconstruction loss falls from its start (~1: random weights predict ~0 for
    // per-patch normalised targets) within one epoch of 3000 images.
    let losses = progress(&dir.path().join("run"), "loss");
    assert!(losses.len() >= 3);
    assert!(losses.last().unwrap() < &(0.8 * losses[0]), "{losses:?}");
    let val = prov["val_reconstruction_loss"].as_f64().unwrap();
    assert!(val < 0.8 * losses[0], "validation loss {val} vs first {}", losses[0]);
    let ft = run(&[
        "train",
        "--backbone",
        file.to_str().unwrap(),
        "--steps",
        "2",
        "--eval-every",
        "0",
        "--threads",
        "2",
        "--out",
        dir.path().join("ft").to_str().unwrap(),
    ]);
    assert!(ft.status.success(), "{}", String::from_utf8_lossy(&ft.stderr));
    // Bad values are usage errors naming the flag.
    let bad = run(&[
        "pretrain",
        "--objective",
        "mae",
        "--data",
        "builtin:digits",
        "--mask-ratio",
        "1.5",
        "--output",
        file.to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--mask-ratio"));
}

#[test]
fn pretrain_supmae_keeps_its_classifier_as_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("supmae.safetensors");
    let tf = pretrain_digits("supmae", 4, dir.path(), &file);
    assert_eq!(tf.get("head.weight").unwrap().shape, vec![10, 96]);
    let prov: serde_json::Value = serde_json::from_str(&tf.metadata["moppa.pretrain"]).unwrap();
    assert_eq!(prov["objective"], "supmae");
    // The class loss falls (from ln 10 ≈ 2.30) while the reconstruction is learned, and the
    // head beats chance (0.1) on the test digits with every patch seen; both learn slowly from
    // 188 steps with a quarter of the patches (8 epochs here gave 0.37).
    let ce = progress(&dir.path().join("run"), "class_loss");
    assert!(ce.last().unwrap() < &(ce[0] - 0.05), "{ce:?}");
    let test_acc = prov["test_acc"].as_f64().unwrap();
    assert!(test_acc > 0.13, "test accuracy {test_acc}");
    let classes: Vec<String> = serde_json::from_str(&tf.metadata["moppa.classes"]).unwrap();
    assert_eq!(classes.len(), 10);
    let backbone = moppa_studio::model::Vit::from_file(&file, &Default::default(), &Device::Cpu).unwrap();
    assert!(backbone.has_head());
}
