//! Helpers shared by the integration tests: fixture paths, running the `moppa` binary, relative
//! errors as INTERFACES.md defines them, deterministic noise, a small backbone file. Each test
//! file uses only some of them.
#![allow(dead_code, clippy::unwrap_used, clippy::pedantic)]

use candle_core::{DType, Device, Tensor};
use moppa_studio::config::VitConfig;
use moppa_studio::model::Vit;
use moppa_studio::model::tensor_file::StoreAs;
use moppa_studio::model::vit::{BackboneFileMeta, write_backbone};
use std::path::{Path, PathBuf};

pub mod hub_server;
pub mod served;

/// A committed fixture under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A fresh copy of fixture run folder `tests/fixtures/runs/NAME` under `into` (tests never write
/// into the committed one).
pub fn copy_run_fixture(name: &str, into: &Path) -> PathBuf {
    let from = fixture("runs").join(name);
    let to = into.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(&from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to
}

/// `moppa train` arguments for a short quiet run: `backbone` on the folder `data`, `steps` steps of
/// `batch`, no evaluation until the end, two threads, into `out`.
pub fn short_train(backbone: &str, data: &Path, steps: u32, batch: u32, out: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec!["train".into()];
    if !backbone.is_empty() {
        args.extend(["--backbone".into(), backbone.to_owned()]);
    }
    args.extend(
        [
            "--data",
            data.to_str().unwrap(),
            "--steps",
            &steps.to_string(),
            "--batch",
            &batch.to_string(),
            "--eval-every",
            "0",
            "--threads",
            "2",
            "--plain",
            "--out",
            out.to_str().unwrap(),
        ]
        .map(str::to_owned),
    );
    args
}

/// Runs the `moppa` binary with `args`.
pub fn moppa(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_moppa"))
        .args(args)
        .output()
        .expect("run moppa")
}

/// `‖a‖₂` over all elements, in f64.
pub fn norm(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt()
}

/// INTERFACES.md's relative error `‖a − b‖₂ / ‖b‖₂` over all elements, in f64.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    norm(&(&a - &b).unwrap()) / norm(&b).max(1e-30)
}

/// The same relative error for host slices.
pub fn rel_err_slices(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den).sqrt()
}

/// Deterministic normal noise (xorshift + Box-Muller) of `shape` times `scale`, `f32` on the CPU.
pub fn randn(shape: &[usize], scale: f64, seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * scale) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A small random backbone file in `dir` (16 px, patch 4, D 32, depth 3, 2 heads, no head): fast
/// enough for many real runs.
pub fn micro_backbone(dir: &Path) -> PathBuf {
    let path = dir.join("micro.safetensors");
    if !path.exists() {
        let cfg = VitConfig {
            img_size: 16,
            patch_size: 4,
            embed_dim: 32,
            depth: 3,
            num_heads: 2,
            num_classes: 0,
            ..VitConfig::tiny()
        };
        let vit = Vit::random(&cfg, 7, &Device::Cpu).unwrap();
        write_backbone(
            &path,
            &vit.cfg,
            &vit.to_host().unwrap(),
            &BackboneFileMeta::default(),
            StoreAs::F32,
        )
        .unwrap();
    }
    path
}

/// The adapter tensors of a reference fixture (`blocks.*` and `head.*`), as
/// `PeftModel::set_trainable` takes them.
pub fn adapter_params(
    tf: &moppa_studio::model::tensor_file::TensorFile,
) -> std::collections::BTreeMap<String, moppa_studio::model::tensor_file::HostTensor> {
    tf.tensors
        .iter()
        .filter(|(k, _)| k.starts_with("blocks.") || k.starts_with("head."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A small ImageFolder (`train/`, `val/`, `test/` × classes a, b, c) of plain colours drawn at
/// random, each class leaning to one channel: separable only in part, so a short run gets some
/// test images right and some wrong.
pub fn colour_folder(root: &Path) {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 33) as u32
    };
    for (split, n) in [("train", 16u32), ("val", 4), ("test", 8)] {
        for (c, name) in ["a", "b", "c"].into_iter().enumerate() {
            let d = root.join(split).join(name);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                let mut px = [0u8; 3];
                for (k, v) in px.iter_mut().enumerate() {
                    let lean = if k == c { 50 } else { 0 };
                    *v = (40 + next() % 150 + lean) as u8;
                }
                image::RgbImage::from_fn(10 + i % 5, 9, |x, y| {
                    image::Rgb([px[0] ^ ((x * y) as u8 & 3), px[1], px[2]])
                })
                .save(d.join(format!("{i}.png")))
                .unwrap();
            }
        }
    }
}
