//! A thread that panics is a failed run: the trainer and the data loader panic on purpose (the
//! test-only `fault-injection` feature, `MOPPA_FAULT`), and the CLI exits 1 with a `finished`
//! record saying `failed` with the panic's message and location, the last checkpoint pair
//! untouched (the run resumes from it); the app shows the run as failed with the message.
#![allow(clippy::unwrap_used, clippy::pedantic)]

mod common;

use moppa_studio::train::protocol::FinishReason;
use moppa_studio::train::record::{FinishedRecord, Record, RecordReader};
use std::path::Path;
use std::process::Command;

fn train(out: &Path, fault: Option<&str>, extra: &[&str]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_moppa"));
    c.args([
        "train",
        "--steps",
        "12",
        "--eval-every",
        "4",
        "--batch",
        "16",
        "--threads",
        "2",
        "--plain",
    ])
    .args(extra)
    .arg("--out")
    .arg(out);
    match fault {
        Some(f) => c.env("MOPPA_FAULT", f),
        None => c.env_remove("MOPPA_FAULT"),
    };
    c.output().unwrap()
}

fn last_finished(dir: &Path) -> FinishedRecord {
    RecordReader::open(&dir.join("metrics.jsonl"))
        .unwrap()
        .filter_map(|r| match r {
            Record::Finished(f) => Some(f),
            _ => None,
        })
        .last()
        .expect("a finished record")
}

/// Trains into `out` with `fault` armed: the run must exit 1 and end `failed`; its stderr, its
/// `finished` message and the step it ended at.
fn failed_run(out: &Path, fault: &str) -> (String, String, u64) {
    let o = train(out, Some(fault), &[]);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    let f = last_finished(out);
    assert_eq!(f.reason, FinishReason::Failed, "{stderr}");
    (stderr, f.message.unwrap_or_default(), f.step)
}

#[test]
fn a_trainer_panic_fails_the_run_keeps_the_checkpoint_and_the_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // Step 4's evaluation writes the checkpoint pair; the trainer panics before step 6.
    let (_, message, step) = failed_run(&out, "worker-panic@5");
    assert!(
        message.contains("the trainer panicked: fault injection") && message.contains("src/train/worker/run.rs:"),
        "the message names the panic and where: {message}"
    );
    assert_eq!(step, 5, "the run ends at the last step it finished");
    // The pair of step 4 is what a resume continues from.
    let o = train(&out, None, &["--resume", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = last_finished(&out);
    assert_eq!((f.reason, f.step), (FinishReason::Done, 12));
    let progress_steps: Vec<u64> = RecordReader::open(&out.join("metrics.jsonl"))
        .unwrap()
        .filter_map(|r| match r {
            Record::Progress(p) => Some(p.step),
            _ => None,
        })
        .collect();
    assert_eq!(
        progress_steps,
        [1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 10, 11, 12],
        "resumed at step 4's checkpoint"
    );
}

/// A state with a NaN in it is never written: the run fails naming the tensor, the pair of the
/// last good checkpoint stays on disk, and the run resumes from it (issue "No byte from outside
/// can hurt a run", item 2).
#[test]
fn a_non_finite_state_is_never_written_and_the_last_good_pair_stays() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // Step 4's evaluation writes a good pair; step 8's state holds a NaN.
    let (_, message, step) = failed_run(&out, "nonfinite-state@8");
    assert!(
        message.contains("state.safetensors") && message.contains("is not finite"),
        "{message}"
    );
    assert_eq!(step, 8);
    let step_of = |name: &str| {
        moppa_studio::model::tensor_file::TensorFile::read_header(&out.join(name))
            .unwrap()
            .metadata
            .get(moppa_studio::model::checkpoint::KEY_STEP)
            .cloned()
    };
    assert_eq!(
        step_of("adapter.safetensors").as_deref(),
        Some("4"),
        "the adapter of the pair stays"
    );
    let o = train(&out, None, &["--resume", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = last_finished(&out);
    assert_eq!((f.reason, f.step), (FinishReason::Done, 12));
}

#[test]
fn a_loader_panic_fails_the_run_with_its_message() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (stderr, message, _) = failed_run(&out, "loader-panic@2");
    assert!(
        message.contains("the data loader panicked: fault injection") && message.contains("src/data/loader.rs:"),
        "{message}"
    );
    assert!(stderr.contains("the data loader panicked"), "the CLI says so: {stderr}");
}

#[cfg(feature = "gui")]
#[test]
fn the_app_shows_a_panicked_run_as_failed_with_the_message() {
    use egui_kittest::Harness;
    use egui_kittest::kittest::Queryable as _;
    use moppa_studio::app::link::worker_launcher;
    use moppa_studio::app::panels::RunStatus;
    use moppa_studio::app::state::Settings;
    use moppa_studio::app::{AppOptions, StudioApp};
    // The only in-process use of the variable in this test binary; the other tests set theirs on
    // the child processes they start.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("MOPPA_FAULT", "worker-panic@3");
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut settings = Settings::default();
    settings.config.steps = Some(8);
    settings.config.batch = 16;
    let runs = tmp.path().to_owned();
    let mut h = Harness::builder()
        .with_size(egui::vec2(1440.0, 900.0))
        .with_max_steps(16)
        .build_eframe(move |cc| {
            StudioApp::with_launcher(
                &cc.egui_ctx,
                settings,
                worker_launcher(),
                AppOptions {
                    stable_display: true,
                    runs_dir: Some(runs),
                    ..AppOptions::default()
                },
            )
        });
    // The app prepares its run when it opens; Start once the run is ready.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while h.state().status() != RunStatus::Ready {
        assert!(std::time::Instant::now() < deadline, "status {:?}", h.state().status());
        std::thread::sleep(std::time::Duration::from_millis(50));
        h.run_steps(1);
    }
    h.get_by_label("Start").click();
    while h.state().status() != RunStatus::Failed {
        assert!(std::time::Instant::now() < deadline, "status {:?}", h.state().status());
        std::thread::sleep(std::time::Duration::from_millis(50));
        h.run_steps(1);
    }
    h.run_steps(2);
    assert!(
        h.query_all_by_label_contains("the trainer panicked: fault injection")
            .count()
            >= 1,
        "the message is visible"
    );
}
