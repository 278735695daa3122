//! The run record against folders written before it existed: `tests/fixtures/runs/` holds five
//! run folders written by the binary of commit de936cb (the hand-written writer; commands in
//! `tests/fixtures/runs/README.md`). Every line of them reads as a record and writes back
//! JSON-equal; each folder opens, resumes (where it can), collects and evaluates.
#![allow(clippy::unwrap_used, clippy::pedantic)]

mod common;

use common::moppa;
use moppa_studio::train::protocol::{Event, FinishReason};
use moppa_studio::train::record::{Record, RecordReader};
use moppa_studio::train::replay::RunFolderReader;
use serde_json::Value;
use std::path::PathBuf;

/// The five fixture folders and how each ended.
const FIXTURES: [(&str, FinishReason); 5] = [
    ("moppa", FinishReason::Done),
    ("resumed", FinishReason::Done),
    ("diverged", FinishReason::Diverged),
    ("lora", FinishReason::Done),
    ("mae", FinishReason::Done),
];

/// Where two JSON values first differ (a path and both values), if they do.
fn first_difference(a: &Value, b: &Value, at: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(p), Some(q)) => first_difference(p, q, format!("{at}.{k}")),
                (p, q) => Some(format!("{at}.{k}: {p:?} vs {q:?}")),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_difference(p, q, format!("{at}[{i}]"))),
        _ => (a != b).then(|| format!("{at}: {a} vs {b}")),
    }
}

#[test]
fn every_fixture_line_reads_as_a_record_and_writes_back_json_equal() {
    let mut lines = 0;
    for (name, _) in FIXTURES {
        for file in ["metrics.jsonl", "snapshots.jsonl"] {
            let path = common::fixture("runs").join(name).join(file);
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            for (i, line) in text.lines().enumerate() {
                let record: Record =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1));
                assert_ne!(record, Record::Unknown, "{}:{}", path.display(), i + 1);
                assert_eq!(record.unknown_fields(), 0, "{}:{}: {line}", path.display(), i + 1);
                let back: Value = serde_json::from_str(&record.to_line()).unwrap();
                let original: Value = serde_json::from_str(line).unwrap();
                if let Some(d) = first_difference(&back, &original, String::new()) {
                    panic!("{}:{}: written back differently at {d}", path.display(), i + 1);
                }
                lines += 1;
            }
            let stats = {
                let mut r = RecordReader::open(&path).unwrap();
                let n = r.by_ref().count();
                assert_eq!(n, text.lines().count(), "{}", path.display());
                r.stats()
            };
            assert_eq!(stats.skipped(), 0, "{}: {stats:?}", path.display());
        }
    }
    assert!(lines > 100, "only {lines} lines: are the fixtures there?");
}

#[test]
fn every_fixture_opens_as_the_run_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, reason) in FIXTURES {
        let dir = common::copy_run_fixture(name, tmp.path());
        let mut reader = RunFolderReader::open(&dir).unwrap();
        let events = reader.poll();
        let count = |f: fn(&Event) -> bool| events.iter().filter(|e| f(e)).count();
        let starts = count(|e| matches!(e, Event::Started(_)));
        assert_eq!(starts, if name == "resumed" { 2 } else { 1 }, "{name}");
        assert!(count(|e| matches!(e, Event::Progress(_))) >= 4, "{name}");
        let finished: Vec<FinishReason> = events
            .iter()
            .filter_map(|e| match e {
                Event::Finished(f) => Some(f.reason),
                _ => None,
            })
            .collect();
        assert_eq!(finished.last(), Some(&reason), "{name}");
        let info = reader.info().unwrap();
        assert_eq!(
            info.out.as_deref(),
            Some(dir.as_path()),
            "{name}: info.out is where it was opened"
        );
        let snapshots: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::Snapshot(s) => Some(s),
                _ => None,
            })
            .collect();
        if ["moppa", "resumed", "diverged"].contains(&name) {
            assert_eq!(info.priors.len(), 3, "{name}");
            let last = snapshots.last().unwrap_or_else(|| panic!("{name}: no snapshot"));
            assert_eq!(last.blocks.len(), info.blocks, "{name}");
            assert!(last.blocks[0].filters_mean.iter().all(|f| f.len() == 64), "{name}");
            assert!(
                last.blocks[0].filters_mean[0].iter().all(|g| g.is_finite()),
                "{name}: filters recomputed from the coefficients"
            );
        } else {
            assert!(snapshots.is_empty(), "{name}");
        }
        if name == "diverged" {
            assert!(
                events
                    .iter()
                    .any(|e| matches!(e, Event::Diverged(n) if n.message.contains("diverged"))),
                "the divergence reads back as a divergence"
            );
        }
        if name == "mae" {
            let nan_acc = events
                .iter()
                .any(|e| matches!(e, Event::Progress(p) if p.train_acc.is_nan()));
            assert!(nan_acc, "MAE's train_acc (written as null) reads back as NaN");
        }
        assert!(reader.skipped().is_empty(), "{name}: {:?}", reader.skipped());
    }
}

#[test]
fn fixtures_resume_collect_and_evaluate() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["moppa", "lora", "resumed", "diverged"] {
        common::copy_run_fixture(name, tmp.path());
    }
    // Resume the finished MoPPA run for 4 more steps: it goes on from step 20.
    let dir = tmp.path().join("moppa");
    let d = dir.to_str().unwrap();
    let out = moppa(&["train", "--resume", d, "--steps", "24", "--plain"]);
    let log = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{log}");
    let last = RecordReader::open(&dir.join("metrics.jsonl"))
        .unwrap()
        .filter_map(|r| match r {
            Record::Finished(f) => Some(f),
            _ => None,
        })
        .last()
        .unwrap();
    assert_eq!((last.reason, last.step), (FinishReason::Done, 24), "{log}");

    // Evaluate two of them: the accuracy with its n (builtin:digits has 1000 test images) and
    // its 95% Wilson interval, on the line and per class in the CSV.
    for name in ["lora", "resumed"] {
        let run = tmp.path().join(name);
        let out = moppa(&["eval", "--run", run.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {err}");
        assert!(text.contains("acc"), "{name}: {text}");
        let line = text.lines().find(|l| l.starts_with("test accuracy ")).unwrap();
        let acc: f64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
        let (low, high) = moppa_studio::stats::wilson((acc * 1000.0).round() as u64, 1000).unwrap();
        assert!(low < acc && acc < high, "{name}: {line}");
        let want = format!("(n = 1000, 95% CI {low:.4}-{high:.4})");
        assert!(line.ends_with(&want), "{name}: {line} vs {want}");
        assert!(!err.contains("one image is"), "1000 images are not few: {err}");
        let csv = std::fs::read_to_string(run.join("eval-test.csv")).unwrap();
        let mut rows = csv.lines();
        assert_eq!(rows.next(), Some("class,name,acc,n,ci_low,ci_high"));
        let rows: Vec<Vec<&str>> = rows.map(|r| r.split(',').collect()).collect();
        assert_eq!(rows.len(), 10, "{csv}");
        for r in &rows {
            let class_acc: f64 = r[2].parse().unwrap();
            let (lo, hi) = moppa_studio::stats::wilson((class_acc * 100.0).round() as u64, 100).unwrap();
            assert_eq!(
                r[3..],
                ["100".to_owned(), format!("{lo:.6}"), format!("{hi:.6}")],
                "{name}: {csv}"
            );
        }
    }

    // Collect a plan over the four folders: three rows, the diverged run listed as such.
    let plan = serde_json::json!({"format": 1, "seeds": 1, "footer": "fixtures", "runs": [
        {"name": "moppa", "label": "moppa r8", "seed": 0, "dir": "moppa"},
        {"name": "lora", "label": "lora r8", "seed": 0, "dir": "lora"},
        {"name": "moppa", "label": "moppa r8", "seed": 1, "dir": "resumed"},
        {"name": "moppa", "label": "moppa r8", "seed": 2, "dir": "diverged"},
    ]});
    std::fs::write(tmp.path().join("plan.json"), plan.to_string()).unwrap();
    let out = moppa(&["compare", "--collect", tmp.path().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a run that diverged makes the status 1: {text}"
    );
    assert!(text.contains("lora r8") && text.contains("moppa r8"), "{text}");
    assert!(text.contains("diverged (moppa r8): ended diverged"), "{text}");
}

#[test]
fn every_logged_event_reads_back_as_itself() {
    use moppa_studio::train::protocol::{Applied, EvalResult, Finished, Notice, Progress};
    use moppa_studio::train::runlog::RunLog;
    let tmp = tempfile::tempdir().unwrap();
    let notice = |message: &str, path: Option<&str>, line: Option<usize>| Notice {
        step: 3,
        time_s: 0.25,
        message: message.into(),
        path: path.map(PathBuf::from),
        line,
    };
    let events = vec![
        Event::Progress(Progress {
            step: 1,
            epoch: 0.125,
            loss: 2.5,
            route_loss: 0.01,
            train_acc: 0.5,
            lr: 1e-3,
            img_per_s: 400.0,
            time_s: 0.1,
            class_loss: Some(1.75),
        }),
        Event::Eval(EvalResult {
            step: 2,
            split: "test".into(),
            loss: 0.5,
            acc: 0.875,
            per_class_acc: vec![1.0, 0.75],
            n: 100,
            time_s: 0.2,
            ..EvalResult::default()
        }),
        Event::Applied(Applied {
            step: 2,
            command: "kappa scale".into(),
            target: "1".into(),
            old: 0.1,
            new: 0.2,
            time_s: 0.2,
        }),
        Event::Warning(notice("skipped 2 images", Some("/data/x.png"), Some(7))),
        Event::Error(notice("cannot write", Some("/out/adapter.safetensors"), None)),
        Event::Diverged(notice("training diverged: loss is NaN", None, None)),
        Event::Finished(Finished {
            reason: FinishReason::Failed,
            steps: 3,
            best_val_acc: Some(0.5),
            test_acc: None,
            checkpoints: vec![PathBuf::from("/out/adapter.safetensors")],
            time_s: 0.3,
            message: Some("cannot write".into()),
            path: Some(PathBuf::from("/out/adapter.safetensors")),
        }),
    ];
    {
        let mut log = RunLog::create(tmp.path()).unwrap();
        for e in &events {
            log.write(e).unwrap();
        }
    }
    let mut reader = RunFolderReader::open(tmp.path()).unwrap();
    assert_eq!(reader.poll(), events);
    let csv = std::fs::read_to_string(tmp.path().join("metrics.csv")).unwrap();
    assert_eq!(
        csv.lines().collect::<Vec<_>>(),
        [
            moppa_studio::train::record::CSV_HEADER,
            "progress,1,0.1000,,2.5,0.01,0.5,0.001,400.00",
            "eval,2,0.2000,test,0.5,,0.875,,"
        ]
    );
}
