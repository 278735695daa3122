//! `moppa filters` and `moppa apply` end to end: output shape and values, error exits.

// Tests: unwrap is the assertion; pedantic style lints are for the library.
#![allow(clippy::unwrap_used, clippy::pedantic)]

mod common;
use common::moppa;
use std::path::Path;

fn grid(v: &serde_json::Value) -> Vec<Vec<f64>> {
    v.as_array()
        .expect("array of rows")
        .iter()
        .map(|r| {
            r.as_array()
                .expect("row")
                .iter()
                .map(|x| x.as_f64().expect("number"))
                .collect()
        })
        .collect()
}

#[test]
fn filters_json_matches_method_formulas() {
    let (kappa, c, eps, tau, gamma) = (0.37, 1.1, 2.5, 0.8, 0.15);
    let out = moppa(&[
        "filters", "--grid", "14", "--grid-w", "9", "--kappa", "0.37", "--c", "1.1", "--eps", "2.5", "--tau", "0.8",
        "--gamma", "0.15",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v["grid"], serde_json::json!([14, 9]));
    assert_eq!(v["coeffs"]["kappa"].as_f64(), Some(kappa));
    assert_eq!(v["coeffs"]["gamma"].as_f64(), Some(gamma));
    let (lambda, heat, wave, poisson) = (
        grid(&v["lambda"]),
        grid(&v["heat"]),
        grid(&v["wave"]),
        grid(&v["poisson"]),
    );
    assert_eq!((lambda.len(), lambda[0].len()), (14, 9), "rows = n, columns = m");
    // The formulas of METHOD.md, written out independently of the library.
    let pi = std::f64::consts::PI;
    for n in 0..14 {
        for m in 0..9 {
            let l = 4.0 * (pi * n as f64 / 28.0).sin().powi(2) + 4.0 * (pi * m as f64 / 18.0).sin().powi(2);
            assert!((lambda[n][m] - l).abs() < 1e-6);
            assert!((heat[n][m] - (-kappa * tau * l).exp()).abs() < 1e-6);
            let w = (-gamma * tau * l.sqrt()).exp() * (c * tau * l.sqrt()).cos();
            assert!((wave[n][m] - w).abs() < 1e-6);
            assert!((poisson[n][m] - eps / (l + eps)).abs() < 1e-6);
        }
    }
    for prior in ["heat", "wave", "poisson"] {
        let r = grid(&v["impulse"][prior]);
        assert_eq!((r.len(), r[0].len()), (14, 9), "impulse.{prior}");
    }
    // The heat impulse response is IDCT2(G ⊙ DCT2(δ)): a kernel summing to 1 peaked at (7, 4).
    let r = grid(&v["impulse"]["heat"]);
    let total: f64 = r.iter().flatten().sum();
    assert!((total - 1.0).abs() < 1e-9);
    let peak = r.iter().flatten().copied().fold(f64::MIN, f64::max);
    assert_eq!(r[7][4], peak);
}

#[test]
fn filters_defaults_and_csv() {
    let out = moppa(&["filters", "--grid", "3", "--format", "csv"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("field,n,m,value"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 7 * 9, "7 fields × 9 cells");
    let fields: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.split(',').next().unwrap()).collect();
    let want = [
        "heat",
        "impulse_heat",
        "impulse_poisson",
        "impulse_wave",
        "lambda",
        "poisson",
        "wave",
    ];
    assert_eq!(fields.into_iter().collect::<Vec<_>>(), want);
    // Defaults: κ 0.1, c 0.5, ε 1, τ 1, γ 0.
    let json = moppa(&["filters", "--grid", "2"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(
        v["coeffs"],
        serde_json::json!({"kappa": 0.1, "c": 0.5, "eps": 1.0, "tau": 1.0, "gamma": 0.0})
    );
}

#[test]
fn bad_coefficients_exit_2_with_one_line_naming_the_value() {
    for (flag, value) in [
        ("--kappa", "-1"),
        ("--c", "0"),
        ("--eps", "nan"),
        ("--tau", "-0.5"),
        ("--gamma", "-2"),
        // Finite in f64, not in f32 (inf, and 0): refused, not passed on as a poisoned filter.
        ("--kappa", "1e39"),
        ("--eps", "1e-50"),
        ("--tau", "1e300"),
    ] {
        let out = moppa(&["filters", "--grid", "4", flag, value]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(
            err.contains(flag) && err.to_lowercase().contains(&value.to_lowercase()),
            "{err}"
        );
        assert!(err.contains(", 1e8]"), "the range is named: {err}");
    }
    let out = moppa(&["filters", "--grid", "0"]);
    assert_eq!(out.status.code(), Some(2), "grid 0 is a usage error");
}

#[test]
fn apply_writes_filtered_images_and_reports_bad_paths() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.png");
    let img = image::RgbImage::from_fn(48, 32, |x, y| {
        image::Rgb([
            if (x / 6 + y / 6) % 2 == 0 { 250 } else { 10 },
            (x * 5) as u8,
            (y * 7) as u8,
        ])
    });
    img.save(&input).unwrap();
    let inp = input.to_str().unwrap();
    for (prior, flag, value) in [
        ("heat", "--kappa", "4"),
        ("wave", "--c", "4"),
        ("poisson", "--eps", "0.05"),
    ] {
        let output = dir.path().join(format!("{prior}.png"));
        let out = moppa(&["apply", "--prior", prior, flag, value, inp, output.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{prior}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let result = image::open(&output).unwrap().to_rgb8();
        assert_eq!(result.dimensions(), (48, 32));
        assert_ne!(result.as_raw(), img.as_raw(), "{prior} must change the image");
    }
    // Missing input: runtime failure (exit 1), one line naming the path.
    let missing = dir.path().join("nope.png");
    let unused = dir.path().join("x.png");
    let unused = unused.to_str().unwrap();
    let out = moppa(&["apply", "--prior", "heat", missing.to_str().unwrap(), unused]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("nope.png") && err.trim_end().lines().count() == 1, "{err}");
    // Undecodable input.
    let junk = dir.path().join("junk.png");
    std::fs::write(&junk, b"not an image").unwrap();
    let out = moppa(&["apply", "--prior", "heat", junk.to_str().unwrap(), unused]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr).unwrap().contains("junk.png"));
    // Unwritable output: exit 1, nothing left behind.
    let bad_out = dir.path().join("no-such-dir").join("out.png");
    let out = moppa(&["apply", "--prior", "heat", inp, bad_out.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr).unwrap().contains("out.png"));
    // Non-positive coefficient: exit 2.
    let out = moppa(&["apply", "--prior", "heat", "--kappa", "0", inp, unused]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!Path::new(unused).exists(), "no output for refused inputs");
}

#[test]
fn a_run_config_toml_with_values_outside_their_ranges_exits_2_naming_the_range() {
    let dir = tempfile::tempdir().unwrap();
    for (line, message) in [
        ("tau = 1e39", "tau = 1e39 is outside its range [1e-8, 1e8]"),
        (
            "temperature = 1e-50",
            "temperature = 1e-50 is outside its range [1e-8, 1e8]",
        ),
        (
            "route_weight = 2e4",
            "route_weight = 20000 is outside its range [0, 1e4]",
        ),
        ("lr = 5000.0", "--lr = 5000 is outside its range (0, 1e3]"),
    ] {
        let path = dir.path().join("run.toml");
        std::fs::write(&path, format!("{line}\n")).unwrap();
        let out = moppa(&["train", "--config", path.to_str().unwrap(), "--steps", "1"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{line}: {err}");
        assert!(err.contains(message), "{line}: {err}");
    }
}
