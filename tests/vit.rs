//! The ViT backbone against PyTorch/timm: fixtures made by tests/fixtures/make_fixtures.py
//! (random-weight timm models, logits computed in float64 by timm itself).

// Tests: unwrap is the assertion; pedantic style lints are for the library.
#![allow(clippy::unwrap_used, clippy::pedantic)]

use candle_core::{Device, Tensor};
use moppa_studio::config::Pool;
use moppa_studio::model::ops::Kernels;
use moppa_studio::model::resample::resample_grid;
use moppa_studio::model::tensor_file::TensorFile;
use moppa_studio::model::{BackboneOptions, ModelError, Vit};

mod common;
use common::{fixture, rel_err};

fn meta(name: &str) -> serde_json::Value {
    let tf = TensorFile::read(&fixture(name)).unwrap();
    serde_json::from_str(&tf.metadata["fixture"]).unwrap()
}

fn io(name: &str) -> (Tensor, Tensor) {
    let tf = TensorFile::read(&fixture(name)).unwrap();
    let dev = Device::Cpu;
    (
        tf.get("images").unwrap().to_tensor(&dev).unwrap(),
        tf.get("logits").unwrap().to_tensor(&dev).unwrap(),
    )
}

fn check_variant(variant: &str, img_size: Option<usize>, io_name: &str) {
    let m = meta(&format!("vit_{variant}.safetensors"));
    let opts = BackboneOptions {
        heads: Some(m["num_heads"].as_u64().unwrap() as usize),
        img_size,
        ..BackboneOptions::default()
    };
    let (images, want) = io(io_name);
    for kernels in [Kernels::Auto, Kernels::Composite] {
        let mut vit = Vit::from_file(&fixture(&format!("vit_{variant}.safetensors")), &opts, &Device::Cpu).unwrap();
        vit.kernels = kernels;
        let got = vit.forward(&images).unwrap();
        let e = rel_err(&got, &want);
        assert!(e < 1e-5, "{variant} ({kernels:?}): logits relative error {e}");
    }
}

#[test]
fn cls_token_vit_matches_timm() {
    check_variant("cls", None, "vit_cls_io.safetensors");
}

#[test]
fn register_tokens_avg_pool_layer_scale_matches_timm() {
    check_variant("regavg", None, "vit_regavg_io.safetensors");
    let vit = Vit::from_file(
        &fixture("vit_regavg.safetensors"),
        &BackboneOptions {
            heads: Some(4),
            ..Default::default()
        },
        &Device::Cpu,
    )
    .unwrap();
    let c = &vit.cfg;
    assert_eq!(
        (c.pool, c.reg_tokens, c.prefix_tokens, c.layer_scale, c.no_embed_class),
        (Pool::Avg, 2, 3, true, true)
    );
    assert!(!c.qkv_bias && !c.patch_bias && c.norm_pre && c.fc_norm && !c.final_norm);
}

#[test]
fn distilled_vit_averages_both_heads_like_timm() {
    check_variant("dist", None, "vit_dist_io.safetensors");
}

#[test]
fn position_embeddings_resample_like_timm() {
    // timm: resample_abs_pos_embed(pos_embed, new_size=(6, 6), num_prefix_tokens=1,
    // interpolation='bicubic') (antialias=True), stored as pos_embed_resampled.
    let weights = TensorFile::read(&fixture("vit_cls.safetensors")).unwrap();
    let io = TensorFile::read(&fixture("vit_interp_io.safetensors")).unwrap();
    let pos = weights.get("pos_embed").unwrap();
    let d = 48;
    let got = resample_grid(&pos.data[d..], d, (4, 4), (6, 6));
    let want = &io.get("pos_embed_resampled").unwrap().data[d..];
    let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(err < 1e-6, "max abs error {err}");
    check_variant("cls", Some(48), "vit_interp_io.safetensors");
}

#[test]
fn bad_checkpoints_are_clear_errors() {
    let tf = TensorFile::read(&fixture("vit_cls.safetensors")).unwrap();
    let opts = BackboneOptions {
        heads: Some(3),
        ..Default::default()
    };
    // Unknown tensors are listed, never ignored.
    let mut extra = tf.clone();
    extra
        .tensors
        .insert("blocks.0.mystery".into(), extra.tensors["norm.bias"].clone());
    match Vit::from_tensor_file(&extra, &opts, &Device::Cpu) {
        Err(ModelError::Unknown { names, .. }) => {
            assert_eq!(names, vec!["blocks.0.mystery".to_owned()]);
        }
        other => panic!("expected an unknown-tensor error, got {other:?}"),
    }
    // A wrong shape names the tensor and both shapes.
    let mut bad = tf.clone();
    let t = bad.tensors.get_mut("blocks.1.mlp.fc2.bias").unwrap();
    t.shape = vec![47];
    t.data.pop();
    let msg = Vit::from_tensor_file(&bad, &opts, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("blocks.1.mlp.fc2.bias") && msg.contains("[47]") && msg.contains("[48]"),
        "{msg}"
    );
    // D = 48 is not a multiple of 64: the head count must be given.
    let msg = Vit::from_tensor_file(&tf, &BackboneOptions::default(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("--heads"), "{msg}");
    // Not a safetensors file at all.
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"hello").unwrap();
    let msg = Vit::from_file(&junk, &opts, &Device::Cpu).unwrap_err().to_string();
    assert!(msg.contains("junk.safetensors") && msg.contains("safetensors"), "{msg}");
    let msg = Vit::from_file(&dir.path().join("missing.safetensors"), &opts, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("missing.safetensors"), "{msg}");
}

#[test]
fn random_backbone_round_trips_through_host_tensors() {
    let cfg = moppa_studio::config::VitConfig {
        num_classes: 5,
        layer_scale: true,
        ..moppa_studio::config::VitConfig::tiny()
    };
    let vit = Vit::random(&cfg, 3, &Device::Cpu).unwrap();
    let host = vit.to_host().unwrap();
    let tf = TensorFile {
        path: "mem".into(),
        tensors: host,
        metadata: [("moppa.backbone".to_owned(), serde_json::to_string(&vit.cfg).unwrap())].into(),
        ..Default::default()
    };
    let again = Vit::from_tensor_file(&tf, &BackboneOptions::default(), &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1f32, (2, 3, 32, 32), &Device::Cpu).unwrap();
    assert_eq!(rel_err(&vit.forward(&x).unwrap(), &again.forward(&x).unwrap()), 0.0);
}
