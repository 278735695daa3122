//! `moppa params` and `moppa infer` end to end, against the timm fixtures; `moppa predict` against
//! `moppa eval`.

// Tests: unwrap is the assertion; pedantic style lints are for the library.
#![allow(clippy::unwrap_used, clippy::pedantic)]

use candle_core::Device;
use moppa_studio::config::MethodConfig;
use moppa_studio::model::tensor_file::TensorFile;
use moppa_studio::model::{BackboneOptions, PeftModel, Vit};
use std::path::Path;
use std::process::Command;

mod common;
use common::{adapter_params, colour_folder, fixture, moppa, rel_err_slices, short_train};

#[test]
fn params_table_lists_every_method_with_method_md_counts() {
    let out = moppa(&["params", "--backbone", "vit-b16", "--classes", "100"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    // METHOD.md: 177,876 for 12 MoPPA blocks + the 100-class head (76,900).
    assert!(text.contains("| moppa r8 | 254,776 |"), "{text}");
    assert!(text.contains("| lora r8 | 371,812 |"), "{text}");
    assert!(text.contains("| linear | 76,900 |"), "{text}");
    for m in ["full", "adaptformer r8", "moppa r8 heat", "moppa r8 layer-router"] {
        assert!(text.contains(&format!("| {m} |")), "missing {m}: {text}");
    }
    let out = moppa(&["params", "--backbone", "no-such-thing"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn infer_reproduces_timm_logits() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out.safetensors");
    let out = moppa(&[
        "infer",
        "--backbone",
        fixture("vit_cls.safetensors").to_str().unwrap(),
        "--heads",
        "3",
        "--input",
        fixture("vit_cls_io.safetensors").to_str().unwrap(),
        "--output",
        out_path.to_str().unwrap(),
        "--batch",
        "2",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = TensorFile::read(&out_path).unwrap();
    let want = TensorFile::read(&fixture("vit_cls_io.safetensors")).unwrap();
    let e = rel_err_slices(&got.get("logits").unwrap().data, &want.get("logits").unwrap().data);
    assert!(e < 1e-5, "relative error {e}");
}

#[test]
fn infer_with_a_moppa_adapter_writes_logits_and_router() {
    let dir = tempfile::tempdir().unwrap();
    let backbone = fixture("vit_cls.safetensors");
    let opts = BackboneOptions {
        heads: Some(3),
        ..Default::default()
    };
    let vit = Vit::from_file(&backbone, &opts, &Device::Cpu).unwrap();
    // The fixture's adapter values, saved in our format.
    let tf = TensorFile::read(&fixture("adapter_moppa_token.safetensors")).unwrap();
    let method = MethodConfig {
        rank: 4,
        ..MethodConfig::default()
    };
    let model = PeftModel::new(vit, method.clone(), (0..7).map(|i| i.to_string()).collect(), 0).unwrap();
    model.set_trainable(&adapter_params(&tf), &tf.path).unwrap();
    let adapter = dir.path().join("adapter.safetensors");
    model
        .save_adapter(&adapter, &serde_json::to_string(&method).unwrap(), 0)
        .unwrap();
    // The fixture's images as an input file.
    let input = dir.path().join("in.safetensors");
    let mut images = std::collections::BTreeMap::new();
    images.insert("images".to_owned(), tf.get("images").unwrap().clone());
    moppa_studio::model::tensor_file::write_atomic(
        &input,
        &images,
        &std::collections::HashMap::new(),
        moppa_studio::model::tensor_file::StoreAs::F32,
    )
    .unwrap();
    let out_path = dir.path().join("out.safetensors");
    let args = |extra: &[&str]| {
        let mut v = vec![
            "infer",
            "--backbone",
            backbone.to_str().unwrap(),
            "--heads",
            "3",
            "--adapter",
            adapter.to_str().unwrap(),
        ];
        v.extend_from_slice(&[
            "--input",
            input.to_str().unwrap(),
            "--output",
            out_path.to_str().unwrap(),
        ]);
        v.extend_from_slice(extra);
        v.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let out = Command::new(env!("CARGO_BIN_EXE_moppa"))
        .args(args(&["--batch", "3"]))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = TensorFile::read(&out_path).unwrap();
    assert!(rel_err_slices(&got.get("logits").unwrap().data, &tf.get("logits").unwrap().data) < 1e-5);
    let router = got.get("router").unwrap();
    assert_eq!(router.shape, vec![2, 4, 16, 3], "(blocks, N, HW, k)");
    assert!(rel_err_slices(&router.data, &tf.get("router").unwrap().data) < 1e-5);
    // A different backbone file (same shapes) is refused without --force.
    let other = dir.path().join("other.safetensors");
    let mut t = TensorFile::read(&backbone).unwrap().tensors;
    t.get_mut("norm.bias").unwrap().data[0] += 1.0;
    moppa_studio::model::tensor_file::write_atomic(
        &other,
        &t,
        &std::collections::HashMap::new(),
        moppa_studio::model::tensor_file::StoreAs::F32,
    )
    .unwrap();
    let mut a = args(&[]);
    a[2] = other.to_str().unwrap().to_owned();
    let out = Command::new(env!("CARGO_BIN_EXE_moppa")).args(&a).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    // One error line (a bare file also gets the warning naming what was assumed).
    let errors: Vec<&str> = err.lines().filter(|l| !l.starts_with("warning:")).collect();
    assert!(err.contains("sha256") && errors.len() == 1, "{err}");
    a.push("--force".into());
    let out = Command::new(env!("CARGO_BIN_EXE_moppa")).args(&a).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A missing input names the file.
    let out = moppa(&[
        "infer",
        "--backbone",
        backbone.to_str().unwrap(),
        "--heads",
        "3",
        "--input",
        "/nope/in.safetensors",
        "--output",
        "/tmp/x.safetensors",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr).unwrap().contains("/nope/in.safetensors"));
}

/// `moppa bench --verify`: the lean kernels' step against the composite reference (on the CPU
/// here; on a GPU the same flag checks the CUDA kernels), reported in the JSON.
#[test]
fn bench_verify_reports_the_kernels_against_the_reference() {
    let out = moppa(&[
        "bench",
        "--preset",
        "tiny",
        "--method",
        "moppa",
        "--batch",
        "4",
        "--steps",
        "1",
        "--kernels",
        "lean",
        "--verify",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let verify = &v["verify"];
    assert_eq!(verify["ok"], true, "{verify}");
    assert!(verify["worst_grad_rel_err"].as_f64().unwrap() < 1e-4, "{verify}");
    assert!(verify["zero_grads"].as_array().unwrap().is_empty(), "{verify}");
    let checks = verify["kernel_checks"].as_array().unwrap();
    assert_eq!(checks.len(), 18, "nine kernels in f32 and bf16: {verify}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("verify against the composite ops"));
}

/// Out-of-range augmentation flags are usage errors naming the flag (exit 2), before any work.
#[test]
fn train_rejects_out_of_range_rotations_and_zooms() {
    for (flag, value) in [("--rotate", "91"), ("--zoom", "51")] {
        let out = moppa(&["train", flag, value, "--steps", "1"]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
}

/// `moppa predict` classifies exactly as `moppa eval` does (same preprocessing, same model): its
/// top-1 classes over the test folder give eval's accuracy; a corrupt and a zero-byte file among
/// the good ones are named on stderr and counted, the others predicted, exit 0; `--top K` gives K
/// ranked rows whose probabilities sum to 1 over all classes; nothing readable is exit 1.
#[test]
fn predict_agrees_with_eval_and_names_the_files_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    colour_folder(&data);
    let run = dir.path().join("run");
    let args = short_train("", &data, 20, 8, &run);
    let out = moppa(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = moppa(&["eval", "--run", run.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let eval_acc: f64 = stdout.split_whitespace().nth(2).unwrap().parse().unwrap();
    // Some right, some wrong: a difference in preprocessing would move the count.
    assert!(eval_acc > 0.4 && eval_acc < 0.99, "eval accuracy {eval_acc}");
    // Its n (24 test images) and 95% Wilson interval; so few images are warned of.
    let (low, high) = moppa_studio::stats::wilson((eval_acc * 24.0).round() as u64, 24).unwrap();
    let want = format!("(n = 24, 95% CI {low:.4}-{high:.4})");
    assert!(stdout.lines().next().unwrap().ends_with(&want), "{stdout} vs {want}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: only 24 test images: one image is 4.2 points of accuracy"),
        "{stderr}"
    );

    // Predict the test folder, with a corrupt file and an empty one among the images.
    let test = data.join("test");
    std::fs::write(test.join("a/corrupt.png"), b"\x89PNG\r\n\x1a\n not really").unwrap();
    std::fs::write(test.join("b/empty.jpg"), b"").unwrap();
    let out = moppa(&["predict", "--run", run.to_str().unwrap(), test.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("corrupt.png") && stderr.contains("empty.jpg"),
        "{stderr}"
    );
    assert!(
        stderr.contains("predicted 24 image(s); 2 could not be read"),
        "{stderr}"
    );
    let csv = String::from_utf8_lossy(&out.stdout);
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("path,class,prob"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 24, "{csv}");
    let correct = rows
        .iter()
        .filter(|r| Path::new(r[0]).parent().unwrap().file_name().unwrap().to_str() == Some(r[1]))
        .count();
    assert!(
        (correct as f64 / 24.0 - eval_acc).abs() < 1e-4, // eval prints 4 decimals
        "predict's accuracy {correct}/24 differs from eval's {eval_acc}"
    );
    for r in &rows {
        let p: f64 = r[2].parse().unwrap();
        assert!(p > 1.0 / 3.0 - 1e-6 && p <= 1.0, "top-1 probability {p}");
    }

    // --top 3 over three classes: ranked rows, probabilities summing to 1, the top row = top-1.
    let img = test.join("c/0.png");
    let out = moppa(&[
        "predict",
        "--run",
        run.to_str().unwrap(),
        "--top",
        "3",
        img.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<String>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_owned).collect())
        .collect();
    assert_eq!(csv.lines().next(), Some("path,rank,class,prob"));
    assert_eq!(rows.iter().map(|r| r[1].as_str()).collect::<Vec<_>>(), ["1", "2", "3"]);
    let probs: Vec<f64> = rows.iter().map(|r| r[3].parse().unwrap()).collect();
    assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{probs:?}");
    assert!(probs.windows(2).all(|w| w[0] >= w[1]), "{probs:?}");

    // Nothing readable: exit 1 naming the file.
    let out = moppa(&[
        "predict",
        "--run",
        run.to_str().unwrap(),
        test.join("a/corrupt.png").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("corrupt.png") && stderr.contains("no image could be read"),
        "{stderr}"
    );
}

/// The augmentation a run gets: the built-in digits default to ±10° rotations, any other data to
/// none; flags change fields of that default (`--rotate 0` turns it off, `--zoom` adds to it);
/// `config.toml` names what ran.
#[test]
fn default_augmentation_follows_the_data_and_flags_change_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    colour_folder(&data);
    let augment_of = |name: &str, data: &str, extra: &[&str]| -> toml::Value {
        let run = dir.path().join(name);
        let mut args = short_train("", Path::new(data), 1, 8, &run);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let out = moppa(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let text = std::fs::read_to_string(run.join("config.toml")).unwrap();
        let cfg: toml::Value = toml::from_str(&text).unwrap();
        cfg["augment"].clone()
    };
    let rotate = |v: &toml::Value| v["rotate_deg"].as_integer().unwrap();
    let builtin = augment_of("builtin", "builtin:digits", &[]);
    assert_eq!(rotate(&builtin), 10, "{builtin}");
    assert_eq!(builtin["scale_pct"].as_integer(), Some(0), "{builtin}");
    let folder = augment_of("folder", data.to_str().unwrap(), &[]);
    assert_eq!(rotate(&folder), 0, "{folder}");
    assert_eq!(folder["flip"].as_bool(), Some(false), "{folder}");
    let off = augment_of("off", "builtin:digits", &["--rotate", "0"]);
    assert_eq!(rotate(&off), 0, "{off}");
    let zoom = augment_of("zoom", "builtin:digits", &["--zoom", "10"]);
    assert_eq!(
        (rotate(&zoom), zoom["scale_pct"].as_integer()),
        (10, Some(10)),
        "{zoom}"
    );
    let flip = augment_of("flip", data.to_str().unwrap(), &["--flip"]);
    assert_eq!((rotate(&flip), flip["flip"].as_bool()), (0, Some(true)), "{flip}");
}

/// `config.toml` records data and backbone paths absolute (the spelling given beside them), so a
/// run trained from `--data ../shapes` evaluates and resumes from any folder; a folder written
/// before, with a relative path, is found beside the run folder and the note says where.
#[test]
fn a_run_trained_from_a_relative_data_path_evaluates_from_another_folder() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    colour_folder(&root.join("shapes"));
    let work = root.join("work");
    let elsewhere = root.join("elsewhere/deeper");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let run_in = |cwd: &Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_moppa"))
            .args(args)
            .current_dir(cwd)
            .output()
            .unwrap()
    };
    let args = short_train("", Path::new("../shapes"), 4, 8, Path::new("run"));
    let out = run_in(&work, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = work.join("run");
    let toml = std::fs::read_to_string(run.join("config.toml")).unwrap();
    let shapes = std::fs::canonicalize(root.join("shapes")).unwrap();
    let cfg = moppa_studio::config::RunConfig::from_toml(&toml).unwrap();
    assert_eq!(std::fs::canonicalize(&cfg.data).unwrap(), shapes, "{toml}");
    assert_eq!(cfg.data_given.as_deref(), Some("../shapes"));
    let out = run_in(&elsewhere, &["eval", "--run", run.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Resuming with `--data ../shapes` given again (from where it was trained) is the same data.
    let out = run_in(
        &work,
        &[
            "train",
            "--resume",
            "run",
            "--data",
            "../shapes",
            "--steps",
            "6",
            "--plain",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A folder of an earlier version: its data recorded relative to where it was trained.
    let old = toml.replace(&format!("data = \"{}\"", cfg.data), "data = \"../shapes\"");
    assert_ne!(old, toml);
    std::fs::write(run.join("config.toml"), old).unwrap();
    let out = run_in(&elsewhere, &["eval", "--run", run.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("relative to the run folder's parent"), "{err}");
}

/// `moppa eval --ablate` on a short built-in MoPPA run: the base line with its n, one table row per
/// prior × (all, each MoPPA block), a CSV whose deltas are each row less the base (`none,all`
/// first); `--images 0` is a usage error; a LoRA adapter is refused naming its file. `moppa eval
/// --confusion` writes one row per true class whose counts add up to the evaluated n.
#[test]
fn eval_ablates_each_prior_and_writes_the_confusion_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let args = short_train("", Path::new("builtin:digits"), 10, 8, &run);
    let out = moppa(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv_path = dir.path().join("ablation.csv");
    let out = moppa(&[
        "eval",
        "--run",
        run.to_str().unwrap(),
        "--ablate",
        "--images",
        "64",
        "--output",
        csv_path.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("(n = 64, 95% CI "), "{stdout}");
    assert!(!run.join("eval-val.csv").exists() && !run.join("eval-test.csv").exists());
    let table: Vec<Vec<&str>> = stdout
        .lines()
        .skip_while(|l| !(l.starts_with("prior ") && l.contains("Δacc")))
        .skip(1)
        .take_while(|l| !l.contains(" passes in "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let blocks: Vec<&str> = table
        .iter()
        .filter(|r| r[0] == "heat" && r[1] != "all")
        .map(|r| r[1])
        .collect();
    assert!(!blocks.is_empty(), "{stdout}");
    let mut want = Vec::new();
    for prior in ["heat", "wave", "poisson"] {
        want.push((prior, "all"));
        want.extend(blocks.iter().map(|b| (prior, *b)));
    }
    let got: Vec<(&str, &str)> = table.iter().map(|r| (r[0], r[1])).collect();
    assert_eq!(got, want, "{stdout}");
    assert!(stdout.contains(&format!("{} passes in ", want.len() + 1)), "{stdout}");
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("prior,block,acc,loss,delta_acc,delta_loss"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), want.len() + 1, "{csv}");
    assert_eq!((rows[0][0], rows[0][1]), ("none", "all"));
    let num = |s: &str| s.parse::<f64>().unwrap();
    let (base_acc, base_loss) = (num(rows[0][2]), num(rows[0][3]));
    for (r, (prior, block)) in rows[1..].iter().zip(&want) {
        assert_eq!((r[0], r[1]), (*prior, *block), "{csv}");
        assert!((num(r[4]) - (num(r[2]) - base_acc)).abs() < 2e-6, "{csv}");
        assert!((num(r[5]) - (num(r[3]) - base_loss)).abs() < 2e-6, "{csv}");
    }

    // Out-of-range --images: usage error.
    let out = moppa(&["eval", "--run", run.to_str().unwrap(), "--ablate", "--images", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));

    // Confusion matrix: header of class names, one row per class, counts adding up to n.
    let confusion = dir.path().join("confusion.csv");
    let out = moppa(&[
        "eval",
        "--run",
        run.to_str().unwrap(),
        "--confusion",
        confusion.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let n: u64 = stdout
        .split("(n = ")
        .nth(1)
        .and_then(|s| s.split([',', ')']).next())
        .unwrap()
        .parse()
        .unwrap();
    let text = std::fs::read_to_string(&confusion).unwrap();
    let mut lines = text.lines();
    let classes: Vec<String> = (0..10).map(|d| d.to_string()).collect();
    assert_eq!(lines.next().unwrap(), format!("true\\predicted,{}", classes.join(",")));
    let mut total = 0;
    for (line, class) in lines.by_ref().zip(&classes) {
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells[0], class, "{text}");
        assert_eq!(cells.len(), classes.len() + 1, "{text}");
        total += cells[1..].iter().map(|c| c.parse::<u64>().unwrap()).sum::<u64>();
    }
    assert_eq!(lines.next(), None, "{text}");
    assert_eq!(total, n, "{text}");

    // A LoRA adapter has no priors to ablate: exit 1 naming the file.
    let lora = dir.path().join("lora");
    let mut args = short_train("", Path::new("builtin:digits"), 1, 8, &lora);
    args.extend(["--method".to_owned(), "lora".to_owned()]);
    let out = moppa(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = moppa(&["eval", "--run", lora.to_str().unwrap(), "--ablate"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("adapter.safetensors") && err.contains("MoPPA"), "{err}");
}
