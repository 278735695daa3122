//! Comparisons you can trust: learning rates chosen on validation (`--lr-grid`), every accuracy
//! with its images and interval, and the VTAB-1K protocol as one plan (grid → select → final,
//! chained) with the paper-style table. Constructed run folders with known accuracies check the
//! choices and the arithmetic; a generated VTAB-layout fixture runs the protocol end to end on a
//! micro backbone.

// Tests: unwrap is the assertion; pedantic style lints are for the library.
#![allow(clippy::unwrap_used, clippy::pedantic)]

mod common;

use common::served::{s, tempdir};
use serde_json::json;
use std::path::Path;
use std::process::Command as Process;

/// A finished run folder whose final model scored `val` on 200 validation images and `test` on
/// `n_test` test images (`None`: the run diverged).
fn run_folder(dir: &Path, val_test: Option<(f64, f64)>, n_test: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut lines = vec![
        json!({"kind": "progress", "step": 1, "time_s": 0.1, "loss": 1.0, "route_loss": 0.0,
        "train_acc": 0.5, "lr": 0.01, "img_per_s": 100.0}),
    ];
    match val_test {
        Some((val, test)) => {
            // An earlier, better validation: the choice must use the final model's, not the best.
            lines.push(
                json!({"kind": "eval", "step": 5, "time_s": 0.5, "split": "val", "loss": 0.5,
                "acc": 0.99, "per_class_acc": [], "n": 200}),
            );
            lines.push(
                json!({"kind": "eval", "step": 10, "time_s": 1.0, "split": "val", "loss": 0.5,
                "acc": val, "per_class_acc": [], "n": 200}),
            );
            lines.push(
                json!({"kind": "eval", "step": 10, "time_s": 1.0, "split": "test", "loss": 0.5,
                "acc": test, "per_class_acc": [], "n": n_test}),
            );
            lines.push(json!({"kind": "finished", "step": 10, "time_s": 2.0, "reason": "done",
                "best_val_acc": 0.99, "test_acc": test}));
        }
        None => lines.push(
            json!({"kind": "finished", "step": 3, "time_s": 1.0, "reason": "diverged",
            "message": "loss is NaN"}),
        ),
    }
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The data row of `label` in a markdown table.
fn row<'a>(table: &'a str, label: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(&format!("| {label} |")))
        .unwrap_or_else(|| panic!("no row {label} in\n{table}"))
}

#[test]
fn the_grid_chooses_each_methods_rate_on_final_validation_and_reports_its_test() {
    let tmp = tempdir("cmp-grid");
    // method, lr, seed → (final val, test); 1e-2 wins for moppa on mean val (0.80 vs 0.75),
    // although 3e-2 has the better test and the better best-ever val (0.99 everywhere);
    // lora ties at 0.70 between 1e-3 and 1e-2 → the smaller; at 3e-2 one seed diverged (0).
    let runs = [
        ("moppa", 1e-3, 0, Some((0.60, 0.61))),
        ("moppa", 1e-3, 1, Some((0.62, 0.63))),
        ("moppa", 1e-2, 0, Some((0.78, 0.70))),
        ("moppa", 1e-2, 1, Some((0.82, 0.74))),
        ("moppa", 3e-2, 0, Some((0.75, 0.90))),
        ("moppa", 3e-2, 1, Some((0.75, 0.92))),
        ("lora", 1e-3, 0, Some((0.70, 0.50))),
        ("lora", 1e-3, 1, Some((0.70, 0.52))),
        ("lora", 1e-2, 0, Some((0.65, 0.80))),
        ("lora", 1e-2, 1, Some((0.75, 0.80))),
        ("lora", 3e-2, 0, Some((0.95, 0.95))),
        ("lora", 3e-2, 1, None),
    ];
    let spell = |lr: f64| format!("{lr:e}");
    let mut planned = Vec::new();
    for (m, lr, seed, r) in runs {
        let dir = format!("runs/{m}-lr{}-seed{seed}", spell(lr));
        run_folder(&tmp.join(&dir), r, 500);
        planned.push(json!({"name": m, "label": format!("{m} r8"), "seed": seed, "dir": dir, "lr": lr}));
    }
    // A planned run that never ran: counted in its grid cell, listed, status 1.
    planned.push(json!({"name": "lora", "label": "lora r8", "seed": 2, "dir": "runs/lora-lr1e-2-seed2", "lr": 1e-2}));
    let plan = json!({"format": 2, "seeds": 2, "lr_grid": [1e-3, 1e-2, 3e-2], "runs": planned, "footer": "fixtures"});
    std::fs::write(tmp.join("plan.json"), plan.to_string()).unwrap();
    let o = common::moppa(&["compare", "--collect", &s(&tmp)]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    // moppa at 1e-2: test (0.70, 0.74) → 72.00 ± 2.83; t(1) interval clipped.
    // SciPy 1.17: stats.t.interval(0.95, 1, loc=0.72, scale=stats.sem([0.70, 0.74])) = (0.4659, 0.9741)
    assert!(
        row(&out, "moppa r8")
            .starts_with("| moppa r8 | 1e-2 | 0 | 80.00 ± 2.83 [54.6, 100.0] | 72.00 ± 2.83 [46.6, 97.4] |"),
        "{out}"
    );
    // lora: 1e-3 (0.70) ties 1e-2 (0.70, seed 2 missing); 3e-2 has 0.95 and a divergence (0) → 0.475.
    assert!(
        row(&out, "lora r8").starts_with("| lora r8 | 1e-3 | 0 | 70.00 ± 0.00 "),
        "{out}"
    );
    assert!(out.contains("| test acc (n = 500) |"), "{out}");
    // The grid table: chosen rates bold, the missing run counted, the divergence as 0.
    let grid = out.split("| val acc by lr |").nth(1).unwrap();
    assert!(grid.starts_with(" 1e-3 | 1e-2 | 3e-2 |"), "{out}");
    assert!(grid.contains("| moppa r8 | 61.00 | **80.00** | 75.00 |"), "{out}");
    assert!(
        grid.contains("| lora r8 | **70.00** | 70.00 (1 missing) | 47.50 |"),
        "{out}"
    );
    assert!(out.contains("Not in the table (2 of 13 runs)"), "{out}");
    assert!(out.contains("lora-lr3e-2-seed1 (lora r8): ended diverged"), "{out}");
    assert!(out.contains("lora-lr1e-2-seed2 (lora r8): missing"), "{out}");
    assert!(!out.contains("not tuned"), "{out}");
}

#[test]
fn without_a_grid_the_table_says_rates_were_not_tuned_and_warns_of_a_small_test_set() {
    let tmp = tempdir("cmp-untuned");
    let mut planned = Vec::new();
    for (m, test) in [("moppa", 1.0), ("linear", 0.5)] {
        let dir = format!("runs/{m}-seed0");
        run_folder(&tmp.join(&dir), Some((0.5, test)), 12);
        planned.push(json!({"name": m, "label": m, "seed": 0, "dir": dir, "lr": 3e-2}));
    }
    let plan = json!({"format": 2, "seeds": 1, "runs": planned, "footer": "fixtures"});
    std::fs::write(tmp.join("plan.json"), plan.to_string()).unwrap();
    let o = common::moppa(&["compare", "--collect", &s(&tmp)]);
    let out = stdout(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("Learning rates were not tuned"), "{out}");
    assert!(
        out.contains("the test set has only 12 images — one image is 8.33 points"),
        "{out}"
    );
    // 12/12 vs 6/12: Wilson [75.8, 100] vs [25.4, 74.6] (SciPy 1.17 binomtest(...).proportion_ci
    // (method='wilson')): clear, so the best is marked.
    assert!(row(&out, "moppa").contains("| **100.00 [75.8, 100.0]** |"), "{out}");
    assert!(row(&out, "linear").contains("| 50.00 [25.4, 74.6] |"), "{out}");
    // A plan from a newer format is refused, not misread.
    let plan = json!({"format": 9, "seeds": 1, "runs": [], "footer": ""});
    std::fs::write(tmp.join("plan.json"), plan.to_string()).unwrap();
    let o = common::moppa(&["compare", "--collect", &s(&tmp)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("plan format 9"));
}

#[test]
fn a_planned_grid_names_each_run_by_its_rate_and_refuses_bad_grids() {
    let tmp = tempdir("cmp-plan-grid");
    let micro = common::micro_backbone(&tmp);
    let plan = tmp.join("plan");
    let flags = [
        "--backbone",
        &s(&micro),
        "--steps",
        "2",
        "--seeds",
        "2",
        "--methods",
        "moppa,lora",
    ];
    let mut args = vec!["compare", "--plan", plan.to_str().unwrap(), "--lr-grid", "0.01,3e-3"];
    args.extend(flags);
    let o = common::moppa(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let jobs = std::fs::read_to_string(plan.join("jobs.txt")).unwrap();
    assert_eq!(jobs.lines().count(), 8, "{jobs}");
    for m in ["moppa", "lora"] {
        for (lr, toml) in [("3e-3", "lr = 0.003"), ("1e-2", "lr = 0.01")] {
            for seed in 0..2 {
                let dir = plan.join(format!("runs/{m}-lr{lr}-seed{seed}"));
                let cfg = std::fs::read_to_string(dir.join("config.toml")).unwrap();
                assert!(cfg.contains(toml) && cfg.contains(&format!("seed = {seed}")), "{cfg}");
                assert!(jobs.contains(&format!("--out {}", dir.display())), "{jobs}");
            }
        }
    }
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(plan.join("plan.json")).unwrap()).unwrap();
    assert_eq!(recorded["lr_grid"], json!([0.003, 0.01]));
    // lr_grid in a compare TOML does the same.
    let toml = tmp.join("cmp.toml");
    std::fs::write(
        &toml,
        format!("steps = 2\nbackbone = \"{}\"\nlr_grid = [1e-3, 1e-2]\n", s(&micro)),
    )
    .unwrap();
    let plan2 = tmp.join("plan2");
    let o = common::moppa(&[
        "compare",
        "--plan",
        &s(&plan2),
        "--config",
        &s(&toml),
        "--methods",
        "linear",
        "--seeds",
        "1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(plan2.join("runs/linear-lr1e-3-seed0/config.toml").is_file());
    assert!(plan2.join("runs/linear-lr1e-2-seed0/config.toml").is_file());
    // The same rate twice, a rate out of range, --lr beside a grid: exit 2, nothing written.
    for (extra, says) in [
        (&["--lr-grid", "1e-2,0.01"][..], "names 1e-2 twice"),
        (&["--lr-grid", "1e-2,0"][..], "--lr-grid = 0 is outside its range"),
        (&["--lr-grid", "1e-2,x"][..], "\"x\" is not a number"),
        (
            &["--lr-grid", "1e-2", "--lr", "1e-3"][..],
            "--lr (or lr in --config) and --lr-grid",
        ),
    ] {
        let bad = tmp.join("bad");
        let mut args = vec!["compare", "--plan", bad.to_str().unwrap()];
        args.extend(extra);
        args.extend(flags);
        let o = common::moppa(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains(says), "{extra:?}: {err}");
        assert!(!bad.join("plan.json").exists());
    }
}

/// A VTAB-1K task folder in the NOAH layout: `images/` and the four split files, labels 0..2,
/// each class a colour leaning to one channel (a short run learns some of it).
fn vtab_task(dir: &Path, seed: u32) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let mut state = 0x9e37_79b9u32 ^ seed;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    let mut lines = |split: &str, count: u32| {
        let mut text = String::new();
        for i in 0..count {
            let label = i % 3;
            let name = format!("images/{split}{i}.png");
            let mut px = [0u8; 3];
            for (k, v) in px.iter_mut().enumerate() {
                *v = (30 + next() % 120 + if k as u32 == label { 90 } else { 0 }) as u8;
            }
            image::RgbImage::from_pixel(8, 8, image::Rgb(px))
                .save(dir.join(&name))
                .unwrap();
            text.push_str(&format!("{name} {label}\n"));
        }
        text
    };
    let train = lines("train", 12);
    let val = lines("val", 6);
    let test = lines("test", 9);
    std::fs::write(dir.join("train800.txt"), &train).unwrap();
    std::fs::write(dir.join("val200.txt"), &val).unwrap();
    std::fs::write(dir.join("train800val200.txt"), format!("{train}{val}")).unwrap();
    std::fs::write(dir.join("test.txt"), &test).unwrap();
}

#[test]
fn the_vtab1k_protocol_plans_runs_selects_and_collects_the_paper_table() {
    let tmp = tempdir("cmp-vtab");
    let micro = common::micro_backbone(&tmp);
    let data = tmp.join("vtab-1k");
    for (i, task) in ["dsprites_loc", "dtd", "eurosat", "not_a_task"].iter().enumerate() {
        vtab_task(&data.join(task), i as u32);
    }
    let plan = tmp.join("plan");
    let o = common::moppa(&[
        "compare",
        "--protocol",
        "vtab1k",
        "--data",
        &s(&data),
        "--plan",
        &s(&plan),
        "--lr-grid",
        "1e-2,3e-2",
        "--methods",
        "linear,lora",
        "--seeds",
        "1",
        "--backbone",
        &s(&micro),
        "--steps",
        "3",
        "--batch",
        "6",
        "--eval-every",
        "0",
        "--threads",
        "1",
    ]);
    let (out, err) = (stdout(&o), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "{out}{err}");
    assert!(err.contains("not VTAB-1K task names, left out: not_a_task"), "{err}");
    assert!(
        out.contains("3 task(s) (dtd, eurosat, dsprites_loc), 12 grid runs, 3 select steps, 6 final runs"),
        "{out}"
    );
    let read = |f: &str| std::fs::read_to_string(plan.join(f)).unwrap();
    assert_eq!(read("grid.txt").lines().count(), 12);
    assert_eq!(read("select.txt").lines().count(), 3);
    assert_eq!(read("final.txt").lines().count(), 6);
    let grid_cfg = read("dtd/grid/lora-lr3e-2-seed0/config.toml");
    assert!(
        grid_cfg.contains("lr = 0.03") && !grid_cfg.contains("final = true"),
        "{grid_cfg}"
    );
    assert!(
        grid_cfg.contains(&format!("data = \"{}\"", s(&data.join("dtd")))),
        "{grid_cfg}"
    );
    // Slurm: three arrays chained with afterany (a fake sbatch records what it was given).
    for f in [
        "slurm-grid.sh",
        "slurm-select.sh",
        "slurm-final.sh",
        "submit.sh",
        "run-local.sh",
    ] {
        assert!(
            Process::new("bash")
                .arg("-n")
                .arg(plan.join(f))
                .status()
                .unwrap()
                .success(),
            "{f}"
        );
    }
    assert!(read("slurm-grid.sh").contains("#SBATCH --array=0-11"));
    let fake = tmp.join("fakebin");
    std::fs::create_dir_all(&fake).unwrap();
    let log = tmp.join("sbatch.log");
    std::fs::write(
        fake.join("sbatch"),
        format!("#!/bin/sh\necho \"$@\" >> '{}'\necho $$\n", s(&log)),
    )
    .unwrap();
    Process::new("chmod")
        .arg("+x")
        .arg(fake.join("sbatch"))
        .status()
        .unwrap();
    let path = format!("{}:{}", fake.display(), std::env::var("PATH").unwrap_or_default());
    let o = Process::new("bash")
        .arg(plan.join("submit.sh"))
        .env("PATH", &path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let calls = std::fs::read_to_string(&log).unwrap();
    let calls: Vec<&str> = calls.lines().collect();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(
        calls[0].ends_with("slurm-grid.sh") && !calls[0].contains("dependency"),
        "{calls:?}"
    );
    assert!(
        calls[1].contains("--dependency=afterany:") && calls[1].ends_with("slurm-select.sh"),
        "{calls:?}"
    );
    assert!(
        calls[2].contains("--dependency=afterany:") && calls[2].ends_with("slurm-final.sh"),
        "{calls:?}"
    );
    // Run it here: the three stages in order, two jobs at a time.
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_moppa")).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let o = Process::new("bash")
        .arg(plan.join("run-local.sh"))
        .arg("2")
        .env("PATH", &path)
        .output()
        .unwrap();
    let ran = format!("{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{ran}");
    assert!(ran.contains("dtd: lora r8 → lr "), "{ran}");
    let final_cfg = read("dtd/final/lora-seed0/config.toml");
    assert!(final_cfg.contains("final = true"), "{final_cfg}");
    let o = common::moppa(&["compare", "--collect", &s(&plan)]);
    let table = stdout(&o);
    assert!(o.status.success(), "{table}{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        table.contains("| method | dtd | eurosat | dsprites_loc | Natural | Specialized | Structured | mean |"),
        "{table}"
    );
    // The row's figures are the final runs' recorded test accuracies: per task, then the group
    // means (one task each: marked partial), then the mean of the three.
    for (m, label) in [("linear", "linear"), ("lora", "lora r8")] {
        let acc = |task: &str| -> f64 {
            let text = read(&format!("{task}/final/{m}-seed0/metrics.jsonl"));
            let fin: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
            assert_eq!(fin["kind"], "finished", "{text}");
            100.0 * fin["test_acc"].as_f64().unwrap()
        };
        let (a, b, c) = (acc("dtd"), acc("eurosat"), acc("dsprites_loc"));
        let want = format!(
            "| {label} | {a:.1} | {b:.1} | {c:.1} | {a:.1}* | {b:.1}* | {c:.1}* | {:.1}* |",
            (a + b + c) / 3.0
        );
        assert_eq!(row(&table, label), want, "{table}");
    }
    assert!(
        table.contains("Natural 1 of 7, Specialized 1 of 4, Structured 1 of 8"),
        "{table}"
    );
    // A task plan naming a folder outside the task: refused before anything is written.
    let task_json = plan.join("dtd/task.json");
    let text = std::fs::read_to_string(&task_json).unwrap();
    std::fs::write(
        &task_json,
        text.replacen("\"final/linear-seed0\"", "\"../../escaped\"", 1),
    )
    .unwrap();
    let o = common::moppa(&["compare", "--select", &s(&plan.join("dtd"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not a plain path inside the task folder"));
    assert!(!tmp.join("escaped").exists());
    // The select step of a folder that is no task: exit 2 naming it.
    let o = common::moppa(&["compare", "--select", &s(&tmp)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("task.json"));
}

#[test]
fn the_vtab_table_averages_tasks_into_groups_and_groups_into_the_mean() {
    // Constructed final runs with known test accuracies (2 seeds): cifar and dtd (Natural),
    // eurosat (Specialized), no Structured task.
    let tmp = tempdir("cmp-vtab-table");
    let accs = [
        ("cifar", [0.80, 0.90]),
        ("dtd", [0.60, 0.62]),
        ("eurosat", [0.95, 0.99]),
    ];
    let mut runs = Vec::new();
    for (task, pair) in accs {
        for (seed, acc) in pair.iter().enumerate() {
            let dir = format!("{task}/final/moppa-seed{seed}");
            run_folder(&tmp.join(&dir), Some((0.5, *acc)), 1000);
            runs.push(json!({"name": "moppa", "label": "moppa r8", "seed": seed, "dir": dir}));
        }
        std::fs::write(
            tmp.join(task).join("selected.json"),
            json!([{"name": "moppa", "label": "moppa r8", "lr": 0.01, "used": 4, "missing": []}]).to_string(),
        )
        .unwrap();
    }
    let plan = json!({"format": 2, "seeds": 2, "runs": runs, "lr_grid": [0.001, 0.01], "protocol": "vtab1k",
        "tasks": ["cifar", "dtd", "eurosat"], "footer": "fixtures"});
    std::fs::write(tmp.join("plan.json"), plan.to_string()).unwrap();
    let o = common::moppa(&["compare", "--collect", &s(&tmp)]);
    let table = stdout(&o);
    assert!(o.status.success(), "{table}");
    // cifar 85.0 ± 7.1, dtd 61.0 ± 1.4, eurosat 97.0 ± 2.8; Natural (85 + 61) / 2 = 73 (2 of 7),
    // Specialized 97 (1 of 4), Structured none; the mean of the two groups present: 85.
    assert_eq!(
        row(&table, "moppa r8"),
        "| moppa r8 | 85.0 ± 7.1 | 61.0 ± 1.4 | 97.0 ± 2.8 | 73.0* | 97.0* | – | 85.0* |",
        "{table}"
    );
    // t(1) = 12.706 × 0.01414 / √2 = 0.127 (SciPy 1.17: stats.t.interval(0.95, 1, loc=0.61,
    // scale=stats.sem([0.60, 0.62])) = (0.4829, 0.7371)).
    assert!(
        table.contains("| dtd | moppa r8 | 1e-2 | 61.00 ± 1.41 [48.3, 73.7] | 1,000 |"),
        "{table}"
    );
}
