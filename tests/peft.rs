//! The PEFT methods against the PyTorch reference (tests/fixtures/moppa_ref.py, float64, on timm's
//! own blocks): logits, losses, router weights and the gradient of every trainable tensor; plus
//! finite-difference checks in f64, non-zero gradients for every method, parameter counts,
//! checkpoints and toy-batch overfitting.

// Tests: unwrap is the assertion; pedantic style lints are for the library.
#![allow(clippy::unwrap_used, clippy::pedantic)]

use candle_core::{DType, Device, Tensor, Var};
use moppa_studio::config::{MethodConfig, MethodKind, Placement, Prior, RouterKind, VitConfig, count_trainable};
use moppa_studio::model::checkpoint::load_adapter;
use moppa_studio::model::ops::Kernels;
use moppa_studio::model::tensor_file::TensorFile;
use moppa_studio::model::{BackboneOptions, PeftModel, Vit, cross_entropy};

mod common;
use common::{adapter_params, fixture, norm, randn};

fn diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    norm(&(a - b).unwrap())
}

/// The method as the fixture's metadata describes it.
fn method_of(meta: &serde_json::Value) -> MethodConfig {
    let f = |k: &str, d: f64| meta.get(k).and_then(serde_json::Value::as_f64).unwrap_or(d);
    let method = match meta["method"].as_str().unwrap() {
        "moppa" => MethodKind::Moppa,
        "lora" => MethodKind::Lora,
        "adaptformer" => MethodKind::Adaptformer,
        _ => MethodKind::Linear,
    };
    let priors = meta
        .get("priors")
        .and_then(|p| p.as_array())
        .map(|a| {
            a.iter()
                .map(|p| p.as_str().unwrap().parse::<Prior>().unwrap())
                .collect()
        })
        .unwrap_or_else(|| Prior::ALL.to_vec());
    MethodConfig {
        method,
        rank: meta.get("rank").and_then(serde_json::Value::as_u64).unwrap_or(4) as usize,
        placement: if meta.get("placement").and_then(|v| v.as_str()) == Some("parallel_mlp") {
            Placement::ParallelMlp
        } else {
            Placement::PreAttn
        },
        router: match meta.get("router").and_then(|v| v.as_str()) {
            Some("image") => RouterKind::Image,
            Some("layer") => RouterKind::Layer,
            _ => RouterKind::Token,
        },
        priors,
        route_weight: f("route_weight", 0.01),
        tau: f("tau", 1.0),
        gamma: f("gamma", 0.0),
        temperature: f("temperature", 1.0),
        scale: f("scale", 1.0),
        lora_alpha: meta.get("lora_alpha").and_then(serde_json::Value::as_f64),
    }
}

struct Case {
    model: PeftModel,
    tf: TensorFile,
}

fn load_case(name: &str, kernels: Kernels, dtype: DType) -> Case {
    let tf = TensorFile::read(&fixture(&format!("adapter_{name}.safetensors"))).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&tf.metadata["fixture"]).unwrap();
    let mut vit = Vit::from_file(
        &fixture("vit_cls.safetensors"),
        &BackboneOptions {
            heads: Some(3),
            ..Default::default()
        },
        &Device::Cpu,
    )
    .unwrap()
    .to_dtype(dtype)
    .unwrap();
    vit.kernels = kernels;
    let classes = (0..7).map(|i| i.to_string()).collect();
    let model = PeftModel::new(vit, method_of(&meta), classes, 0).unwrap();
    model.set_trainable(&adapter_params(&tf), &tf.path).unwrap();
    Case { model, tf }
}

fn labels(tf: &TensorFile) -> Tensor {
    let (_, v) = &tf.int_tensors["labels"];
    Tensor::from_vec(v.iter().map(|&l| l as u32).collect::<Vec<_>>(), v.len(), &Device::Cpu).unwrap()
}

fn loss_of(model: &PeftModel, tf: &TensorFile, dtype: DType) -> (Tensor, moppa_studio::model::Forward) {
    let images = tf
        .get("images")
        .unwrap()
        .to_tensor(&Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let fwd = model.forward(&images, true).unwrap();
    let mut loss = cross_entropy(&fwd.logits, &labels(tf)).unwrap();
    if let Some(r) = &fwd.route_loss {
        loss = (loss + r).unwrap();
    }
    (loss, fwd)
}

fn check_case(name: &str, kernels: Kernels) {
    let Case { model, tf } = load_case(name, kernels, DType::F32);
    let t = |n: &str| tf.get(n).unwrap().to_tensor(&Device::Cpu).unwrap();
    let (loss, fwd) = loss_of(&model, &tf, DType::F32);
    let e = diff(&fwd.logits, &t("logits")) / norm(&t("logits"));
    assert!(e < 1e-5, "{name}: logits relative error {e}");
    assert!(diff(&loss, &t("loss")) < 1e-5, "{name}: loss {loss} vs {}", t("loss"));
    match &fwd.route_loss {
        Some(r) => assert!(
            diff(r, &t("route_loss")) < 1e-7,
            "{name}: route loss {r} vs {}",
            t("route_loss")
        ),
        None => assert_eq!(t("route_loss").to_scalar::<f32>().unwrap(), 0.0),
    }
    if tf.has("router") {
        let alphas: Vec<Tensor> = fwd.routing.iter().map(|r| r.alpha.clone()).collect();
        let got = Tensor::stack(&alphas, 0).unwrap();
        assert_eq!(
            got.dims(),
            tf.get("router").unwrap().shape.as_slice(),
            "{name}: router shape"
        );
        assert!(diff(&got, &t("router")) < 1e-5, "{name}: router weights");
    } else {
        assert!(fwd.routing.is_empty());
    }
    let grads = loss.backward().unwrap();
    for (pname, var) in model.trainable() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
        let want = t(&format!("grad.{pname}"));
        let scale = norm(&want).max(1e-3);
        let e = diff(g, &want) / scale;
        assert!(
            e < 2e-4,
            "{name}: gradient of {pname}: relative error {e} (|want| = {})",
            norm(&want)
        );
    }
}

#[test]
fn moppa_token_router_matches_pytorch_reference() {
    check_case("moppa_token", Kernels::Auto);
    check_case("moppa_token", Kernels::Lean);
    check_case("moppa_token", Kernels::Composite);
}

#[test]
fn moppa_image_router_parallel_mlp_matches_pytorch_reference() {
    check_case("moppa_image", Kernels::Auto);
}

#[test]
fn moppa_layer_router_matches_pytorch_reference() {
    check_case("moppa_layer", Kernels::Auto);
}

#[test]
fn moppa_single_prior_matches_pytorch_reference() {
    check_case("moppa_single", Kernels::Auto);
}

#[test]
fn lora_adaptformer_linear_match_pytorch_reference() {
    for name in ["lora", "adaptformer", "linear"] {
        check_case(name, Kernels::Auto);
        check_case(name, Kernels::Lean);
        check_case(name, Kernels::Composite);
    }
}

/// Central finite differences in f64 (composite ops) on the raw parameters, at the fixture's
/// non-zero W_up.
fn finite_difference_case(name: &str, params: &[&str]) {
    let Case { model, tf } = load_case(name, Kernels::Composite, DType::F64);
    let (loss, _) = loss_of(&model, &tf, DType::F64);
    let grads = loss.backward().unwrap();
    let h = 1e-6;
    for pname in params {
        let var: &Var = &model
            .trainable()
            .iter()
            .find(|(n, _)| n == pname)
            .unwrap_or_else(|| panic!("no {pname}"))
            .1;
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for j in [0, base.len() / 2, base.len() - 1] {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[j] += delta;
                var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
                loss_of(&model, &tf, DType::F64).0.to_scalar::<f64>().unwrap()
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(base.clone(), var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            assert!(
                (fd - g[j]).abs() < 1e-7 + 1e-5 * fd.abs(),
                "{name} {pname}[{j}]: autograd {} vs finite difference {fd}",
                g[j]
            );
        }
    }
}

#[test]
fn moppa_gradients_match_finite_differences() {
    let p = |s: &str| format!("blocks.0.moppa.{s}");
    let names: Vec<String> = [
        "kappa_raw",
        "c_raw",
        "eps_raw",
        "source",
        "router.weight",
        "router.bias",
        "down.weight",
        "down.bias",
        "up.weight",
    ]
    .iter()
    .map(|s| p(s))
    .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    finite_difference_case("moppa_token", &refs);
    finite_difference_case("moppa_layer", &["blocks.1.moppa.router.logits", "blocks.1.moppa.c_raw"]);
    finite_difference_case(
        "moppa_image",
        &["blocks.0.moppa.router.weight", "blocks.0.moppa.eps_raw"],
    );
}

fn tiny_backbone(seed: u64) -> Vit {
    let cfg = VitConfig {
        img_size: 16,
        patch_size: 4,
        embed_dim: 24,
        depth: 2,
        num_heads: 2,
        num_classes: 0,
        ..VitConfig::tiny()
    };
    Vit::random(&cfg, seed, &Device::Cpu).unwrap()
}

/// `n` images of deterministic standard-normal noise (xorshift + Box-Muller, fixed seed: a test
/// must not depend on the thread RNG) and labels `i mod classes`.
fn toy_batch(n: usize, classes: usize) -> (Tensor, Tensor) {
    // Seed 1 is the xorshift state 0x9E37_79B9_7F4A_7C15 this batch has always used.
    let images = randn(&[n, 3, 16, 16], 1.0, 1);
    let labels = Tensor::from_vec(
        (0..n).map(|i| (i % classes) as u32).collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )
    .unwrap();
    (images, labels)
}

fn all_methods() -> Vec<MethodConfig> {
    let mut v: Vec<MethodConfig> = MethodKind::ALL
        .iter()
        .map(|m| MethodConfig {
            rank: 4,
            ..MethodConfig::of(*m)
        })
        .collect();
    v.push(MethodConfig {
        rank: 4,
        placement: Placement::ParallelMlp,
        router: RouterKind::Image,
        ..MethodConfig::default()
    });
    v.push(MethodConfig {
        rank: 4,
        router: RouterKind::Layer,
        priors: vec![Prior::Wave, Prior::Poisson],
        ..MethodConfig::default()
    });
    v
}

#[test]
fn every_trainable_parameter_gets_a_finite_nonzero_gradient() {
    for method in all_methods() {
        // With token pooling, what parallel_mlp adds to the patch tokens of the last block never
        // reaches the class token (an exact zero the PyTorch reference shows too), so that
        // placement is checked on an average-pooled backbone, where every patch token counts.
        // The final norm must act per token before the pooling: a mean over tokens of a linear
        // function of the last block's output sees only the DC frequency (Λ = 0), where no filter
        // depends on κ, c or ε, so those gradients would be float noise (sometimes exactly 0).
        // AdaptFormer's ReLU bottleneck beside the last MLP likewise only counts through the class
        // token there, whose few pre-activations can all be negative at a random init (a dead
        // unit, not a bug), so it gets the average-pooled backbone too.
        let backbone = if method.placement == Placement::ParallelMlp || method.method == MethodKind::Adaptformer {
            let cfg = VitConfig {
                pool: moppa_studio::config::Pool::Avg,
                fc_norm: false,
                final_norm: true,
                ..tiny_backbone(1).cfg
            };
            Vit::random(&cfg, 1, &Device::Cpu).unwrap()
        } else {
            tiny_backbone(1)
        };
        let model = PeftModel::new(backbone, method.clone(), vec!["a".into(), "b".into(), "c".into()], 5).unwrap();
        // Zero-initialised up-projections would hide every gradient upstream of them.
        for (name, var) in model.trainable() {
            if name.ends_with("up.weight") || name.ends_with(".b") {
                var.set(&(Tensor::randn(0f32, 0.2, var.dims(), &Device::Cpu).unwrap()))
                    .unwrap();
            }
        }
        let (images, labels) = toy_batch(4, 3);
        let fwd = model.forward(&images, false).unwrap();
        let mut loss = cross_entropy(&fwd.logits, &labels).unwrap();
        if let Some(r) = fwd.route_loss {
            loss = (loss + r).unwrap();
        }
        let grads = loss.backward().unwrap();
        for (name, var) in model.trainable() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{}: no gradient for {name}", method.label()));
            let v: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{}: {name} has a non-finite gradient",
                method.label()
            );
            assert!(
                v.iter().any(|x| *x != 0.0),
                "{}: {name} has an all-zero gradient",
                method.label()
            );
        }
    }
}

#[test]
fn zero_up_projection_gives_the_backbones_logits() {
    // W_up = 0 (MoPPA, AdaptFormer) or B = 0 (LoRA) at initialisation: the adapted network is the
    // pretrained one. Checked against timm's own logits for the vit_cls fixture.
    let io = TensorFile::read(&fixture("vit_cls_io.safetensors")).unwrap();
    let images = io.get("images").unwrap().to_tensor(&Device::Cpu).unwrap();
    let want = io.get("logits").unwrap().to_tensor(&Device::Cpu).unwrap();
    let vit = || {
        Vit::from_file(
            &fixture("vit_cls.safetensors"),
            &BackboneOptions {
                heads: Some(3),
                ..Default::default()
            },
            &Device::Cpu,
        )
        .unwrap()
    };
    let head = TensorFile::read(&fixture("vit_cls.safetensors")).unwrap();
    for method in all_methods() {
        let model = PeftModel::new(vit(), method.clone(), (0..7).map(|i| i.to_string()).collect(), 3).unwrap();
        // Use the backbone's own head so the logits are comparable.
        model
            .head
            .w
            .set(&head.get("head.weight").unwrap().to_tensor(&Device::Cpu).unwrap())
            .unwrap();
        model
            .head
            .b
            .set(&head.get("head.bias").unwrap().to_tensor(&Device::Cpu).unwrap())
            .unwrap();
        let got = model.forward(&images, false).unwrap().logits;
        assert!(diff(&got, &want) / norm(&want) < 1e-5, "{}", method.label());
    }
}

#[test]
fn parameter_counts_follow_the_formula() {
    // METHOD.md: per block (all priors, token router) 2rD + r + 3D + 3 + 3r + HW.
    let cfg = VitConfig {
        num_classes: 0,
        ..VitConfig::vit_b16()
    };
    let vit = Vit::random(&VitConfig { depth: 2, ..cfg }, 0, &Device::Cpu).unwrap();
    let classes: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    let head = 100 * 768 + 100;
    let count = |m: MethodConfig| {
        let vit = Vit::random(
            &VitConfig {
                depth: 2,
                num_classes: 0,
                ..VitConfig::vit_b16()
            },
            0,
            &Device::Cpu,
        )
        .unwrap();
        PeftModel::new(vit, m, classes.clone(), 0).unwrap().num_trainable()
    };
    let (r, d, hw) = (8, 768, 196);
    assert_eq!(
        count(MethodConfig::default()),
        2 * (2 * r * d + r + 3 * d + 3 + 3 * r + hw) + head
    );
    assert_eq!(
        2 * r * d + r + 3 * d + 3 + 3 * r + hw,
        14_823,
        "METHOD.md's ViT-B/16 figure"
    );
    assert_eq!(count(MethodConfig::of(MethodKind::Lora)), 2 * 24_576 + head);
    assert_eq!(
        count(MethodConfig::of(MethodKind::Adaptformer)),
        2 * (2 * r * d + r + d) + head
    );
    assert_eq!(count(MethodConfig::of(MethodKind::Linear)), head);
    drop(vit);
}

#[test]
fn adapter_checkpoint_reproduces_logits_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let backbone_path = dir.path().join("backbone.safetensors");
    let vit = tiny_backbone(2);
    let mut tensors = vit.to_host().unwrap();
    tensors.retain(|_, _| true);
    moppa_studio::model::tensor_file::write_atomic(
        &backbone_path,
        &tensors,
        &[("moppa.backbone".to_owned(), serde_json::to_string(&vit.cfg).unwrap())].into(),
        moppa_studio::model::tensor_file::StoreAs::F32,
    )
    .unwrap();
    let load = || Vit::from_file(&backbone_path, &BackboneOptions::default(), &Device::Cpu).unwrap();
    let (images, _) = toy_batch(3, 3);
    for method in all_methods() {
        let model = PeftModel::new(load(), method.clone(), vec!["x".into(), "y".into(), "z".into()], 9).unwrap();
        for (_, var) in model.trainable() {
            var.set(&(var.as_tensor() + Tensor::randn(0f32, 0.1, var.dims(), &Device::Cpu).unwrap()).unwrap())
                .unwrap();
        }
        let path = dir
            .path()
            .join(format!("{}.safetensors", method.label().replace(' ', "_")));
        let run_config = serde_json::to_string(&method).unwrap();
        model.save_adapter(&path, &run_config, 0).unwrap();
        let again = load_adapter(&path, load(), false).unwrap();
        let a: Vec<f32> = model
            .forward(&images, false)
            .unwrap()
            .logits
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = again
            .forward(&images, false)
            .unwrap()
            .logits
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b, "{}: logits must be identical", method.label());
        assert_eq!(again.classes, vec!["x", "y", "z"]);
        // Another backbone file with the same shapes: refused unless forced.
        let other = Vit::random(&load().cfg, 77, &Device::Cpu).unwrap();
        let msg = load_adapter(&path, other, false).unwrap_err().to_string();
        assert!(msg.contains("sha256") && msg.contains("--force"), "{msg}");
        // A backbone of another shape: always refused, naming both.
        let wide = Vit::random(
            &VitConfig {
                embed_dim: 32,
                ..load().cfg
            },
            1,
            &Device::Cpu,
        )
        .unwrap();
        let msg = load_adapter(&path, wide, true).unwrap_err().to_string();
        assert!(msg.contains("D 24") && msg.contains("D 32"), "{msg}");
    }
}

#[test]
fn all_methods_overfit_a_toy_batch() {
    for method in all_methods() {
        let model = PeftModel::new(
            tiny_backbone(4),
            method.clone(),
            (0..4).map(|i| i.to_string()).collect(),
            1,
        )
        .unwrap();
        let (images, labels) = toy_batch(8, 4);
        let vars: Vec<Var> = model.trainable().iter().map(|(_, v)| v.clone()).collect();
        // A head alone needs a larger step; adapters on this tiny random backbone (whose residual
        // stream is small) overshoot and collapse the features at that rate.
        let lr = if method.method == MethodKind::Linear {
            3e-2
        } else {
            5e-3
        };
        let mut opt = candle_nn::optim::AdamW::new(
            vars,
            candle_nn::optim::ParamsAdamW {
                lr,
                weight_decay: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        use candle_nn::Optimizer as _;
        let loss_at = |m: &PeftModel| {
            let f = m.forward(&images, false).unwrap();
            let mut l = cross_entropy(&f.logits, &labels).unwrap();
            if let Some(r) = f.route_loss {
                l = (l + r).unwrap();
            }
            l
        };
        let first = loss_at(&model).to_scalar::<f32>().unwrap();
        for _ in 0..100 {
            opt.backward_step(&loss_at(&model)).unwrap();
        }
        let last = loss_at(&model).to_scalar::<f32>().unwrap();
        assert!(last < 0.6 * first, "{}: loss {first} → {last}", method.label());
    }
}

#[test]
fn analytic_parameter_count_equals_the_built_model() {
    let shapes = [
        VitConfig {
            img_size: 16,
            patch_size: 4,
            embed_dim: 24,
            depth: 2,
            num_heads: 2,
            num_classes: 0,
            ..VitConfig::tiny()
        },
        VitConfig {
            img_size: 16,
            patch_size: 4,
            embed_dim: 24,
            depth: 2,
            num_heads: 2,
            reg_tokens: 2,
            layer_scale: true,
            qkv_bias: false,
            patch_bias: false,
            norm_pre: true,
            ..VitConfig::tiny()
        },
        VitConfig {
            img_size: 16,
            patch_size: 4,
            embed_dim: 24,
            depth: 1,
            num_heads: 2,
            dist_token: true,
            no_embed_class: false,
            ..VitConfig::tiny()
        },
        VitConfig {
            img_size: 16,
            patch_size: 4,
            embed_dim: 24,
            depth: 1,
            num_heads: 2,
            pool: moppa_studio::config::Pool::Avg,
            fc_norm: true,
            final_norm: false,
            no_embed_class: true,
            ..VitConfig::tiny()
        },
    ];
    for cfg in shapes {
        for method in all_methods() {
            let model = PeftModel::new(
                Vit::random(&cfg, 0, &Device::Cpu).unwrap(),
                method.clone(),
                vec!["a".into(), "b".into()],
                0,
            )
            .unwrap();
            assert_eq!(
                count_trainable(&cfg, &method, 2),
                model.num_trainable(),
                "{} on {cfg:?}",
                method.label()
            );
        }
    }
}

#[test]
fn bf16_backbone_keeps_f32_master_weights_and_trains() {
    // The GPU "autocast" path, exercised on the CPU with the lean ops: the backbone computes
    // in bf16, adapters and head keep f32 master weights and receive f32 gradients. Every
    // method (a LoRA-under-bf16 dtype mismatch was first seen on the GPU).
    for method in all_methods() {
        let label = method.label();
        // Every tensor must move for LoRA and pre-attention MoPPA; elsewhere (the last block's
        // MLP-parallel unit under class-token pooling reaches the head only through prefix
        // tokens, which no filter touches; see the test above) at least the head must.
        let all_move = method.method == MethodKind::Lora
            || (method.method == MethodKind::Moppa
                && method.placement == Placement::PreAttn
                && method.router == RouterKind::Token);
        let vit = tiny_backbone(5).to_dtype(DType::BF16).unwrap();
        let model = PeftModel::new(vit, method, vec!["a".into(), "b".into(), "c".into()], 0).unwrap();
        for (name, var) in model.trainable() {
            assert_eq!(var.dtype(), DType::F32, "{label}: {name}");
            // Zero-initialised up-projections would leave everything before them without a gradient.
            if name.ends_with("up.weight") || name.ends_with(".b") {
                let n = var.elem_count();
                let v: Vec<f32> = (0..n).map(|i| 0.2 * ((i * 7919 % 101) as f32 / 50.0 - 1.0)).collect();
                var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let (_, labels) = toy_batch(4, 3);
        let images = Tensor::arange(0u32, 4 * 3 * 16 * 16, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(0.618, 0.0)
            .unwrap()
            .sin()
            .unwrap()
            .reshape((4, 3, 16, 16))
            .unwrap();
        let fwd = model.forward(&images.to_dtype(DType::BF16).unwrap(), false).unwrap();
        assert_eq!(fwd.logits.dtype(), DType::BF16, "{label}");
        let mut loss = cross_entropy(&fwd.logits.to_dtype(DType::F32).unwrap(), &labels).unwrap();
        if let Some(r) = fwd.route_loss {
            loss = (loss + r.to_dtype(DType::F32).unwrap()).unwrap();
        }
        let grads = loss.backward().unwrap();
        for (name, var) in model.trainable() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{label}: no gradient for {name}"));
            assert_eq!(g.dtype(), DType::F32, "{label}: {name}");
            let total = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(total.is_finite(), "{label}: {name}");
            if all_move || name.starts_with("head") {
                assert!(total > 0.0, "{label}: zero gradient for {name}");
            }
        }
    }
}

/// METHOD.md "Prior ablation" on a constructed case: a token router forced onto the wave prior
/// (zero weights, bias (−50, 50, −50)). Removing wave changes the logits; removing heat changes
/// nothing; the remaining α sum to 1 per token (heat and Poisson 0.5 each once wave is gone),
/// and removing it in one block leaves the other block's α alone.
#[test]
fn removing_the_prior_a_router_is_forced_onto_changes_the_output_and_another_does_not() {
    use moppa_studio::model::peft::Removal;
    let model = PeftModel::new(
        tiny_backbone(3),
        MethodConfig {
            rank: 4,
            ..MethodConfig::default()
        },
        vec!["a".into(), "b".into(), "c".into()],
        2,
    )
    .unwrap();
    for (name, var) in model.trainable() {
        if name.ends_with("router.weight") {
            var.set(&var.zeros_like().unwrap()).unwrap();
        } else if name.ends_with("router.bias") {
            var.set(&Tensor::new(&[-50f32, 50.0, -50.0], &Device::Cpu).unwrap())
                .unwrap();
        } else if name.ends_with("up.weight") {
            var.set(&Tensor::randn(0f32, 0.5, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let (images, _) = toy_batch(4, 3);
    let base = model.forward(&images, true).unwrap();
    let without = |prior, block| {
        model
            .forward_removing(&images, true, Some(Removal { prior, block }))
            .unwrap()
    };
    let wave = without(Prior::Wave, None);
    let heat = without(Prior::Heat, None);
    assert!(
        diff(&base.logits, &wave.logits) > 1e-3,
        "removing the prior in use changes the output"
    );
    assert!(
        diff(&base.logits, &heat.logits) < 1e-6,
        "removing an unused prior changes nothing"
    );
    for r in &wave.routing {
        let a: Vec<Vec<f32>> = r.alpha.flatten_to(1).unwrap().to_vec2().unwrap();
        for row in a {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{row:?}");
            assert!(row[1] < 1e-12 && (row[0] - 0.5).abs() < 1e-6 && (row[2] - 0.5).abs() < 1e-6);
        }
    }
    let one = without(Prior::Wave, Some(1));
    let first: Vec<Vec<f32>> = one.routing[0].alpha.flatten_to(1).unwrap().to_vec2().unwrap();
    let second: Vec<Vec<f32>> = one.routing[1].alpha.flatten_to(1).unwrap().to_vec2().unwrap();
    assert!(first.iter().all(|r| r[1] > 0.999), "block 0 keeps wave");
    assert!(second.iter().all(|r| r[1] < 1e-12), "block 1 loses it");
    assert!(diff(&base.logits, &one.logits) > 1e-4);
    // A unit of one prior loses its filtered output entirely.
    let single = PeftModel::new(
        tiny_backbone(3),
        MethodConfig {
            rank: 4,
            priors: vec![Prior::Heat],
            ..MethodConfig::default()
        },
        vec!["a".into(), "b".into()],
        2,
    )
    .unwrap();
    for (name, var) in single.trainable() {
        if name.ends_with("up.weight") {
            var.set(&Tensor::randn(0f32, 0.5, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let b = single.forward(&images, false).unwrap();
    let r = single
        .forward_removing(
            &images,
            false,
            Some(Removal {
                prior: Prior::Heat,
                block: None,
            }),
        )
        .unwrap();
    assert!(diff(&b.logits, &r.logits) > 1e-4);
}
