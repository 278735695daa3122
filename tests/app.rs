//! The desktop app, headless (egui_kittest), driven by a fake engine: Start sends the start
//! command, moving κ sends a set-coefficient command, events update the curves and the router,
//! an error event shows its message; snapshot tests of the main views (Mesa's lavapipe in CI).

// Tests: unwrap is the assertion; pedantic style lints are for the library.
#![allow(clippy::unwrap_used, clippy::pedantic)]
#![cfg(feature = "gui")]

use crossbeam_channel::{Sender, bounded};
use egui_kittest::kittest::NodeT as _;
use egui_kittest::kittest::Queryable as _;
use egui_kittest::{Harness, SnapshotOptions};
use moppa_studio::app::link::{FakeLink, Launcher, Link};
use moppa_studio::app::state::{Settings, Tab};
use moppa_studio::app::{AppOptions, StudioApp};
use moppa_studio::config::{PerCoeff, Prior, RunConfig, VitConfig};
use moppa_studio::physics::{PriorCoeffs, laplacian_eigenvalues};
use moppa_studio::train::protocol::*;
use moppa_studio::train::worker::Waker;
use std::sync::{Arc, Mutex};

struct Fake {
    sent: Arc<Mutex<Vec<Command>>>,
    events: Sender<Event>,
    /// The waker the app handed to its latest run (what a real engine calls after events).
    waker: Arc<Mutex<Option<Waker>>>,
}

fn launcher() -> (Launcher, Fake) {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let waker = Arc::new(Mutex::new(None));
    let (tx, rx) = bounded(10_000);
    let (s2, w2) = (sent.clone(), waker.clone());
    let launcher: Launcher = Box::new(move |_cfg: &RunConfig, waker, _autostart| {
        *w2.lock().unwrap() = Some(waker);
        Ok(Box::new(FakeLink {
            sent: s2.clone(),
            events: rx.clone(),
        }) as Box<dyn Link>)
    });
    (
        launcher,
        Fake {
            sent,
            events: tx,
            waker,
        },
    )
}

fn info() -> RunInfo {
    RunInfo {
        method: "moppa r4".into(),
        trainable: 8662,
        device: "cpu".into(),
        threads: 1,
        classes: (0..10).map(|i| i.to_string()).collect(),
        blocks: 2,
        grid: (8, 8),
        priors: Prior::ALL.to_vec(),
        rank: 4,
        total_steps: 300,
        split_sizes: [3000, 1000, 1000],
        config: serde_json::to_value(RunConfig {
            lr: Some(3e-3),
            ..RunConfig::default()
        })
        .unwrap(),
        out: None,
        start_step: 0,
        backbone: VitConfig::tiny(),
        probes: 1000,
        run_id: "test-run".into(),
    }
}

/// A snapshot with the exact filters of scalar coefficients, two routed blocks and a probe.
fn snapshot(step: u64, kappa: f64) -> Snapshot {
    let (h, w) = (8, 8);
    let c = PriorCoeffs {
        kappa,
        c: 0.9,
        eps: 0.5,
        ..PriorCoeffs::default()
    };
    let l = laplacian_eigenvalues(h, w);
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    let gains = vec![
        f(moppa_studio::physics::heat_filter(&l, c.kappa, 1.0)),
        f(moppa_studio::physics::wave_filter(&l, c.c, 1.0, 0.0)),
        f(moppa_studio::physics::poisson_filter(&l, c.eps, None).unwrap()),
    ];
    let block = |b: usize, alpha: [f32; 3]| BlockSnapshot {
        block: b,
        filters_mean: gains.clone(),
        filters_channel: Vec::new(),
        mix: (0..h * w)
            .map(|i| gains.iter().zip(alpha).map(|(g, a)| g[i] * a).sum())
            .collect(),
        coeffs: PerCoeff {
            kappa: vec![kappa as f32; 4],
            c: vec![0.9; 4],
            eps: vec![0.5; 4],
        },
        source: vec![1.0; h * w],
        router: Some(RouterStats {
            mean_alpha: alpha.to_vec(),
            entropy: 1.0,
            entropy_norm: 0.91,
            argmax_share: alpha.to_vec(),
        }),
        probe_alpha: (0..h * w)
            .flat_map(|i| if i % 3 == 0 { [0.7, 0.2, 0.1] } else { [0.2, 0.3, 0.5] })
            .collect(),
        locked: Vec::new(),
    };
    Snapshot {
        step,
        grid: (h, w),
        priors: Prior::ALL.to_vec(),
        channel: None,
        tau: 1.0,
        gamma: 0.0,
        route_weight: 0.01,
        temperature: 1.0,
        blocks: vec![block(0, [0.5, 0.3, 0.2]), block(1, [0.2, 0.2, 0.6])],
        probe: Some(Probe {
            image: Rgb {
                size: 32,
                pixels: (0..32 * 32 * 3).map(|i| (i % 251) as u8).collect(),
            },
            origin: ProbeOrigin::Val { index: 3, label: 7 },
        }),
        probe_prediction: Some(7),
    }
}

fn progress(step: u64) -> Event {
    let s = step as f64;
    Event::Progress(Progress {
        step,
        epoch: s / 47.0,
        loss: 2.3 * (-s / 80.0).exp() + 0.05,
        route_loss: 1e-3,
        train_acc: 1.0 - 0.9 * (-s / 60.0).exp(),
        lr: 3e-3,
        img_per_s: 400.0,
        time_s: s * 0.15,
        class_loss: None,
    })
}

fn harness(tab: Tab) -> (Harness<'static, StudioApp>, Fake) {
    harness_on(tab, None)
}

/// The app at the snapshot tests' window size (numbers that change every frame hidden).
fn app(
    settings: Settings,
    launcher: Launcher,
    opts: AppOptions,
    renderer: Option<egui_kittest::wgpu::WgpuTestRenderer>,
) -> Harness<'static, StudioApp> {
    let mut builder = Harness::builder()
        .with_size(egui::vec2(1440.0, 900.0))
        .with_max_steps(16);
    if let Some(r) = renderer {
        builder = builder.renderer(r);
    }
    builder.build_eframe(move |cc| {
        StudioApp::with_launcher(
            &cc.egui_ctx,
            settings,
            launcher,
            AppOptions {
                stable_display: true,
                ..opts
            },
        )
    })
}

/// The app on a fake engine; with a wgpu renderer for snapshot tests.
fn harness_on(tab: Tab, renderer: Option<egui_kittest::wgpu::WgpuTestRenderer>) -> (Harness<'static, StudioApp>, Fake) {
    let (launcher, fake) = launcher();
    let settings = Settings {
        tab,
        ..Settings::default()
    };
    (app(settings, launcher, AppOptions::default(), renderer), fake)
}

/// A run with history: started, 200 steps, evaluations, a κ change, snapshots.
fn feed_run(fake: &Fake) {
    fake.events.send(Event::Started(Box::new(info()))).unwrap();
    for step in 1..=200 {
        fake.events.send(progress(step)).unwrap();
        if step % 50 == 0 {
            fake.events
                .send(Event::Eval(EvalResult {
                    step,
                    split: "val".into(),
                    loss: 0.4,
                    acc: 0.8 + step as f64 / 2000.0,
                    per_class_acc: vec![0.9; 10],
                    n: 100,
                    time_s: step as f64 * 0.15,
                    ..EvalResult::default()
                }))
                .unwrap();
        }
        if step == 120 {
            fake.events
                .send(Event::Applied(Applied {
                    step,
                    command: "kappa".into(),
                    target: "all".into(),
                    old: 0.1,
                    new: 0.5,
                    time_s: 18.0,
                }))
                .unwrap();
        }
        if step % 20 == 0 {
            fake.events
                .send(Event::Snapshot(Box::new(snapshot(
                    step,
                    if step >= 120 { 0.5 } else { 0.1 },
                ))))
                .unwrap();
        }
    }
}

#[test]
fn while_a_run_trains_the_window_is_drawn_only_when_its_data_changes() {
    let (mut h, fake) = harness(Tab::Curves);
    fake.events.send(Event::Started(Box::new(info()))).unwrap();
    fake.events.send(progress(1)).unwrap();
    h.run_steps(8);
    assert_eq!(h.state().status(), moppa_studio::app::panels::RunStatus::Running);
    // Nothing new: no frame asked for (no steady cadence while training).
    assert!(
        !h.ctx.has_requested_repaint(),
        "a frame asked for with nothing new to show"
    );
    // New data: the run's waker asks for one frame (at once, or when 33 ms have passed since the last).
    let waker = fake
        .waker
        .lock()
        .unwrap()
        .clone()
        .expect("the app handed its run a waker");
    waker();
    assert!(h.ctx.has_requested_repaint(), "new data must be drawn");
}

#[test]
fn start_sends_the_start_command() {
    let (mut h, fake) = harness(Tab::Filters);
    fake.events.send(Event::Started(Box::new(info()))).unwrap();
    h.run_steps(3);
    h.get_by_label("Start").click();
    h.run_steps(3);
    assert!(
        fake.sent.lock().unwrap().contains(&Command::Start),
        "{:?}",
        fake.sent.lock().unwrap()
    );
    // Space toggles pause while training.
    fake.events.send(progress(1)).unwrap();
    h.run_steps(2);
    h.key_press(egui::Key::Space);
    h.run_steps(2);
    assert!(fake.sent.lock().unwrap().contains(&Command::Pause));
}

#[test]
fn moving_the_kappa_slider_sends_a_set_coefficient_command() {
    let (mut h, fake) = harness(Tab::Filters);
    fake.events.send(Event::Started(Box::new(info()))).unwrap();
    fake.events.send(Event::Snapshot(Box::new(snapshot(0, 0.1)))).unwrap();
    h.run_steps(3);
    h.get_by_role_and_label(egui::Role::Slider, "κ heat")
        .set_value_accesskit(0.5);
    h.run_steps(3);
    let sent = fake.sent.lock().unwrap().clone();
    let hit = sent.iter().any(|c| matches!(c, Command::SetCoeff { coeff: Coeff::Kappa, target: Target::All, mode: SetMode::Set(v) } if (v - 0.5).abs() < 1e-9));
    assert!(hit, "{sent:?}");
}

#[test]
fn events_update_the_curves_and_the_router() {
    let (mut h, fake) = harness(Tab::Router);
    feed_run(&fake);
    h.run_steps(4);
    let app = h.state();
    let run = app.runs.all().last().unwrap();
    assert_eq!(run.history.loss.points.len(), 200);
    assert_eq!(run.history.val.len(), 4);
    assert_eq!(run.history.applied.len(), 1);
    assert_eq!(run.history.snapshots.len(), 10);
    assert_eq!(
        run.history.shares[1][2].last(),
        Some(0.6f32 as f64),
        "block 1's Poisson share"
    );
    // The router view lists the blocks' weights.
    assert!(
        h.query_by_label("0.600 (60%)").is_some(),
        "router table shows block 1's Poisson weight"
    );
}

#[test]
fn an_error_event_shows_its_message_until_dismissed() {
    let (mut h, fake) = harness(Tab::Curves);
    fake.events.send(Event::Started(Box::new(info()))).unwrap();
    let msg = "training diverged: loss is NaN at step 7";
    fake.events
        .send(Event::Error(Notice {
            step: 7,
            time_s: 1.0,
            message: msg.into(),
            path: None,
            line: None,
        }))
        .unwrap();
    h.run_steps(3);
    assert!(
        h.query_all_by_label_contains(msg).count() >= 1,
        "the message is visible"
    );
    h.get_by_label("Dismiss").click();
    h.run_steps(3);
    assert!(h.query_by_label("Dismiss").is_none(), "the modal is gone after Dismiss");
}

/// A wgpu renderer if an adapter exists (Mesa's lavapipe in CI); `MOPPA_REQUIRE_SNAPSHOTS=1`
/// turns a missing adapter into a failure.
fn gpu() -> Option<egui_kittest::wgpu::WgpuTestRenderer> {
    let r = std::panic::catch_unwind(egui_kittest::wgpu::WgpuTestRenderer::new).ok();
    if r.is_none() {
        if std::env::var("MOPPA_REQUIRE_SNAPSHOTS").is_ok_and(|v| v == "1") {
            panic!("no wgpu adapter, and MOPPA_REQUIRE_SNAPSHOTS=1 (install mesa-vulkan-drivers)");
        }
        eprintln!("notice: no wgpu adapter: skipping snapshot tests");
    }
    r
}

fn snapshot_of(tab: Tab) {
    let Some(renderer) = gpu() else { return };
    let (mut h, fake) = harness_on(tab, Some(renderer));
    feed_run(&fake);
    h.run_steps(6);
    let opts = SnapshotOptions::new().threshold(2.0).output_path("tests/snapshots");
    h.snapshot_options(format!("app_{}", tab.label().to_lowercase()), &opts);
}

#[test]
fn snapshot_filters_view() {
    snapshot_of(Tab::Filters);
}

#[test]
fn snapshot_router_view() {
    snapshot_of(Tab::Router);
}

#[test]
fn snapshot_curves_view() {
    snapshot_of(Tab::Curves);
}

// ---- Run folders opened in the app (`moppa view`, File → Open run…) ----

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};

/// The JSON lines of a run folder file (complete lines only).
fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn count(recs: &[Value], kind: &str) -> usize {
    recs.iter().filter(|r| r["kind"] == kind).count()
}

/// A short real run (micro backbone, built-in digits) into `dir/{method}-seed0`.
fn real_run(dir: &Path, method: &str, extra: &[&str]) -> PathBuf {
    let backbone = common::micro_backbone(dir);
    let out = dir.join(format!("{method}-seed0"));
    let mut args = vec![
        "train",
        "--backbone",
        backbone.to_str().unwrap(),
        "--method",
        method,
        "--rank",
        "4",
        "--steps",
        "40",
        "--eval-every",
        "20",
        "--batch",
        "16",
        "--threads",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = common::moppa(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// The app (fake launcher: nothing of its own runs) with run folders opened at start.
fn viewer(tab: Tab, open: Vec<PathBuf>) -> Harness<'static, StudioApp> {
    let settings = Settings {
        tab,
        ..Settings::default()
    };
    let opts = AppOptions {
        open,
        ..AppOptions::default()
    };
    app(settings, launcher().0, opts, None)
}

/// Mean of block 0's α for `prior` in a snapshot record, as the router table prints it.
fn router_cell(rec: &Value, prior: usize) -> String {
    let router = &rec["router"][0];
    let a = router["mean"][prior].as_f64().unwrap();
    let s = router["share"][prior].as_f64().unwrap();
    format!("{a:.3} ({:.0}%)", 100.0 * s)
}

#[test]
fn a_finished_run_folder_opens_with_its_curves_filters_and_router() {
    let tmp = tempdir("open-finished");
    let dir = real_run(&tmp, "moppa", &[]);
    let metrics = records(&dir.join("metrics.jsonl"));
    let snaps = records(&dir.join("snapshots.jsonl"));
    let last = snaps.last().unwrap().clone();
    assert_eq!(last["kind"], "snapshot");
    let mut h = viewer(Tab::Filters, vec![dir.clone()]);
    h.run_steps(4);
    {
        let app = h.state();
        assert_eq!(
            app.runs.len(),
            1,
            "nothing of the app's own is launched by `moppa view`"
        );
        let run = &app.runs.all()[0].history;
        assert_eq!(
            run.loss.points.len(),
            count(&metrics, "progress"),
            "every progress record is a curve point"
        );
        let vals = metrics
            .iter()
            .filter(|r| r["kind"] == "eval" && r["split"] == "val")
            .count();
        assert_eq!(run.val.len(), vals);
        assert_eq!(run.test.len(), 1);
        assert_eq!(run.snapshots.len(), count(&snaps, "snapshot"), "every snapshot record");
        // The filters follow from the recorded coefficients: κ of channel 0, block 0.
        let kappa = last["kappa"][0][0].as_f64().unwrap();
        let shown = f64::from(run.snapshots.last().unwrap().blocks[0].coeffs.kappa[0]);
        assert!((shown - kappa).abs() <= 1e-6 * kappa.abs(), "{shown} vs {kappa}");
        let finished = metrics.iter().find(|r| r["kind"] == "finished").unwrap();
        assert_eq!(run.best_val(), finished["best_val_acc"].as_f64());
    }
    // Filters: the scrubber shows the last snapshot's step, and its coefficient summary.
    let step = last["step"].as_u64().unwrap();
    assert!(
        h.query_by_label(&format!("step {step}")).is_some(),
        "the snapshot scrubber is at step {step}"
    );
    let kappas: Vec<f64> = (0..4).map(|c| last["kappa"][0][c].as_f64().unwrap()).collect();
    let mean = kappas.iter().sum::<f64>() / kappas.len() as f64;
    assert!(
        h.query_all_by_label_contains(&format!("κ: mean {mean:.4}")).count() >= 1,
        "the κ summary of block 0 (mean {mean:.4})"
    );
    // Router: block 0's weights from the last record.
    h.state_mut().settings.tab = Tab::Router;
    h.run_steps(3);
    for p in 0..3 {
        let cell = router_cell(&last, p);
        assert!(h.query_by_label(&cell).is_some(), "router table cell {cell}");
    }
    // Curves: the finished run's state is shown.
    h.state_mut().settings.tab = Tab::Curves;
    h.run_steps(3);
    assert!(h.query_all_by_label_contains("finished (done)").count() >= 1);
}

#[test]
fn two_runs_are_listed_in_the_runs_table() {
    let tmp = tempdir("open-two");
    let a = real_run(&tmp, "moppa", &[]);
    let b = real_run(&tmp, "lora", &[]);
    // A parent folder opens every run under it.
    let mut h = viewer(Tab::Runs, vec![tmp.clone()]);
    h.run_steps(4);
    assert_eq!(h.state().runs.len(), 2);
    for (dir, method) in [(&a, "moppa r4"), (&b, "lora r4")] {
        let name = dir.file_name().unwrap().to_str().unwrap();
        // The runs table lists it (the left panel names the one shown too).
        assert!(h.query_all_by_label(name).count() >= 1, "runs table lists {name}");
        assert!(
            h.query_by_label(method).is_some(),
            "runs table shows the method {method}"
        );
        let started = records(&dir.join("metrics.jsonl"))
            .into_iter()
            .find(|r| r["kind"] == "started")
            .unwrap();
        let trainable = moppa_studio::util::group_digits(started["trainable"].as_u64().unwrap() as usize);
        assert!(
            h.query_by_label(&trainable).is_some(),
            "trainable {trainable} of {name}"
        );
    }
    // The first MoPPA run is the one the filter and router views show.
    assert_eq!(h.state().sel().unwrap().history.label, "moppa-seed0");
}

#[test]
fn a_run_killed_mid_write_reopens_with_every_complete_record() {
    use std::io::Write as _;
    let tmp = tempdir("open-killed");
    let backbone = common::micro_backbone(&tmp);
    let dir = tmp.join("killed");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_moppa"))
        .args([
            "train",
            "--backbone",
            backbone.to_str().unwrap(),
            "--steps",
            "1000000",
            "--eval-every",
            "50",
        ])
        .args(["--batch", "16", "--threads", "1", "--out", dir.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(dir.join("snapshots.jsonl")).map_or(0, |t| t.lines().count()) < 6 {
        assert!(t0.elapsed().as_secs() < 120, "the run wrote no snapshots");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // A write cut short: half a record at the end of both files.
    for f in ["metrics.jsonl", "snapshots.jsonl"] {
        let mut file = std::fs::OpenOptions::new().append(true).open(dir.join(f)).unwrap();
        file.write_all(br#"{"kind":"progress","step":99999999,"lo"#).unwrap();
    }
    let metrics = records(&dir.join("metrics.jsonl"));
    let snaps = records(&dir.join("snapshots.jsonl"));
    let mut h = viewer(Tab::Curves, vec![dir]);
    h.run_steps(4);
    let app = h.state();
    let run = &app.runs.all()[0].history;
    assert_eq!(run.loss.points.len(), count(&metrics, "progress"));
    assert_eq!(run.snapshots.len(), count(&snaps, "snapshot"));
    assert!(run.snapshots.len() >= 5);
    let evals = metrics
        .iter()
        .filter(|r| r["kind"] == "eval" && r["split"] == "val")
        .count();
    assert_eq!(run.val.len(), evals);
    assert!(
        app.runs.all()[0]
            .liveness()
            .is_some_and(|l| !matches!(l, moppa_studio::train::replay::Liveness::Finished(_))),
        "a killed run has not finished"
    );
}

/// A fresh folder under the target dir for one test.
fn tempdir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The app with the real engine, its runs written under `runs_dir`.
fn real_app(settings: Settings, runs_dir: PathBuf, autostart: bool) -> Harness<'static, StudioApp> {
    let opts = AppOptions {
        autostart,
        runs_dir: Some(runs_dir),
        ..AppOptions::default()
    };
    app(settings, moppa_studio::app::link::worker_launcher(), opts, None)
}

/// Steps the app until its selected run reaches `status` (two minutes at most).
fn wait_for_status(h: &mut Harness<'static, StudioApp>, status: moppa_studio::app::panels::RunStatus) {
    let t0 = std::time::Instant::now();
    while h.state().status() != status {
        assert!(t0.elapsed().as_secs() < 120, "the app's run never became {status:?}");
        h.run_steps(1);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn micro_settings(dir: &Path) -> Settings {
    let mut config = RunConfig {
        backbone: common::micro_backbone(dir).to_str().unwrap().to_owned(),
        steps: Some(30),
        eval_every: 15,
        batch: 16,
        threads: Some(1),
        ..RunConfig::default()
    };
    config.method.rank = 4;
    Settings {
        config,
        ..Settings::default()
    }
}

#[test]
fn a_run_started_in_the_app_leaves_a_run_folder_and_an_unstarted_one_none() {
    use moppa_studio::app::panels::RunStatus;
    let tmp = tempdir("app-run-folder");
    let runs = tmp.join("runs");
    // Started: trains to the end and leaves a complete run folder behind.
    let mut h = real_app(micro_settings(&tmp), runs.clone(), true);
    wait_for_status(&mut h, RunStatus::Finished);
    drop(h);
    let folders: Vec<PathBuf> = std::fs::read_dir(&runs).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(folders.len(), 1, "{folders:?}");
    let name = folders[0].file_name().unwrap().to_str().unwrap().to_owned();
    assert!(
        name.ends_with("-moppa-r4") && name.starts_with("20"),
        "named by date and method: {name}"
    );
    let metrics = records(&folders[0].join("metrics.jsonl"));
    assert_eq!(count(&metrics, "progress"), 30);
    assert_eq!(metrics.last().unwrap()["kind"], "finished");
    assert!(count(&records(&folders[0].join("snapshots.jsonl")), "snapshot") >= 3);
    // Start with the defaults trains the built-in digits with their default rotations, named in
    // the run's config.toml as the CLI's runs are.
    let cfg: toml::Value = toml::from_str(&std::fs::read_to_string(folders[0].join("config.toml")).unwrap()).unwrap();
    assert_eq!(cfg["augment"]["rotate_deg"].as_integer(), Some(10), "{cfg}");
    // Prepared but never started (the app opened and closed): nothing is left behind.
    let idle = tmp.join("idle");
    let mut h = real_app(micro_settings(&tmp), idle.clone(), false);
    wait_for_status(&mut h, RunStatus::Ready);
    assert_eq!(
        std::fs::read_dir(&idle).unwrap().count(),
        1,
        "the prepared run holds its folder"
    );
    drop(h);
    assert_eq!(
        std::fs::read_dir(&idle).unwrap().count(),
        0,
        "an unstarted run leaves nothing"
    );
}

/// The backbone picker: the Hugging Face cache's models are listed (one that does not load is
/// greyed, its reason on hover); choosing one makes it the run's backbone and shows its family,
/// token grid and each method's trainable parameters before Start; a hub id downloads through a
/// (local) hub with a progress bar and becomes the backbone; Cancel stops a download and says the
/// part downloaded is kept.
#[test]
fn the_backbone_picker_lists_the_cache_and_downloads_by_id() {
    use common::hub_server::{NAME, hub_files, python_cache, serve, serve_slowly};
    use moppa_studio::config::{MethodConfig, count_trainable};
    use moppa_studio::train::backbone::describe_backbone;
    use moppa_studio::train::hub::Hub;

    let (mut h, _fake) = harness(Tab::Curves);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    python_cache(&cache, &format!("timm/{NAME}"), "augreg");
    python_cache(&cache, "timm/vit_base_patch16_siglip_224.v2_webli", "siglip");
    h.state_mut().picker.hub = Hub {
        cache: cache.clone(),
        endpoint: "http://127.0.0.1:9".into(),
        offline: true,
    };
    h.get_by_label("From the cache").click();
    h.run_steps(3);
    assert!(
        h.query_by_label_contains("does not load").is_some(),
        "SigLIP listed as not loading"
    );
    h.get_by_label_contains(NAME).click();
    h.run_steps(3);
    let spec = format!("hf:timm/{NAME}");
    assert_eq!(h.state().settings.config.backbone, spec);
    let weights = cache
        .join(format!("models--timm--{NAME}"))
        .join("snapshots/0123456789abcdef0123456789abcdef01234567/model.safetensors");
    let b = describe_backbone(weights.to_str().unwrap(), None).unwrap();
    let params = moppa_studio::util::group_digits(b.params);
    assert!(
        h.query_by_label_contains(&format!("ViT · {params} parameters"))
            .is_some()
    );
    assert!(h.query_by_label_contains("224 px, patch 16, 14×14 tokens").is_some());
    let lora = count_trainable(&b.cfg, &MethodConfig::of(moppa_studio::config::MethodKind::Lora), 10);
    let n = moppa_studio::util::group_digits(lora);
    assert!(h.query_by_label(&n).is_some(), "LoRA's count {n} shown before Start");

    // Offline (HF_HUB_OFFLINE): Download says so and downloads nothing.
    h.get_by_label("Hub id").click();
    h.run_steps(1);
    h.state_mut().picker.hub_id = "hf:timm/elsewhere".into();
    h.get_by_label("Download").click();
    h.run_steps(2);
    assert!(h.state().picker.download.is_none());
    assert!(h.query_by_label_contains("HF_HUB_OFFLINE is set").is_some());

    // Download by id from a local hub into an empty cache.
    let server = serve(hub_files().0, false);
    let empty = dir.path().join("hub2");
    h.state_mut().picker.hub = Hub {
        cache: empty.clone(),
        endpoint: format!("http://127.0.0.1:{}", server.port),
        offline: false,
    };
    h.state_mut().settings.config.backbone = "builtin".into();
    h.get_by_label("Hub id").click();
    h.run_steps(2);
    h.state_mut().picker.hub_id = spec.clone();
    h.get_by_label("Download").click();
    let t0 = std::time::Instant::now();
    while h.state().settings.config.backbone != spec {
        assert!(t0.elapsed().as_secs() < 20, "download did not finish");
        std::thread::sleep(std::time::Duration::from_millis(20));
        h.run_steps(1);
    }
    assert!(empty.join(format!("models--timm--{NAME}")).is_dir());

    // A slow download, cancelled.
    let slow = serve_slowly(hub_files().0);
    let third = dir.path().join("hub3");
    h.state_mut().picker.hub = Hub {
        cache: third.clone(),
        endpoint: format!("http://127.0.0.1:{}", slow.port),
        offline: false,
    };
    h.get_by_label("Hub id").click();
    h.run_steps(1);
    h.get_by_label("Download").click();
    let t0 = std::time::Instant::now();
    while h
        .state()
        .picker
        .download
        .as_ref()
        .is_none_or(|d| d.snapshot().done == 0)
    {
        assert!(t0.elapsed().as_secs() < 20, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(20));
        h.run_steps(1);
    }
    // The progress was seen in the state after the last frame: draw it.
    h.run_steps(1);
    assert!(
        h.query_by_label_contains("model.safetensors").is_some(),
        "the progress bar names the file"
    );
    h.get_by_label("Cancel").click();
    while h.state().picker.download.is_some() {
        assert!(t0.elapsed().as_secs() < 20, "cancel did not stop the download");
        std::thread::sleep(std::time::Duration::from_millis(20));
        h.run_steps(1);
    }
    assert!(h.query_by_label_contains("download cancelled").is_some());
    assert_eq!(
        h.state().settings.config.backbone,
        spec,
        "the backbone chosen before stays"
    );
}

/// The Router view probed with the user's image: an image file becomes a `SetProbeImage` at the
/// run's input size (what Your image… and a drop on the window send); the snapshot that comes
/// back shows the file's name, its prediction and every block's token map; a file that is not an
/// image is a visible error naming it.
#[test]
fn the_router_view_probes_with_your_image_and_shows_every_blocks_map() {
    let (mut h, fake) = harness(Tab::Router);
    h.get_by_label("Start").click();
    h.run_steps(2);
    fake.events.send(Event::Started(Box::new(info()))).unwrap();
    fake.events.send(Event::Snapshot(Box::new(snapshot(10, 0.1)))).unwrap();
    h.run_steps(3);
    assert!(h.query_by_label("Your image…").is_some());

    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("cat.png");
    image::RgbImage::from_fn(50, 40, |x, y| image::Rgb([x as u8 * 5, y as u8 * 6, 128]))
        .save(&png)
        .unwrap();
    h.state_mut().probe_with(&png);
    let sent = fake.sent.lock().unwrap().clone();
    let Some(Command::SetProbeImage { name, image }) = sent.last() else {
        panic!("sent {sent:?}");
    };
    assert_eq!(name, "cat.png");
    let size = info().backbone.img_size;
    assert_eq!((image.size, image.pixels.len()), (size, size * size * 3));

    let mut snap = snapshot(11, 0.1);
    snap.probe = Some(Probe {
        image: image.clone(),
        origin: ProbeOrigin::File { name: "cat.png".into() },
    });
    snap.probe_prediction = Some(4);
    fake.events.send(Event::Snapshot(Box::new(snap))).unwrap();
    h.run_steps(3);
    assert!(h.query_by_label("cat.png: predicted 4 (4)").is_some());
    // The every-block row: one labelled map per block (the entropy plot's legend names them too).
    assert!(h.query_by_label("every block").is_some());
    assert!(h.query_all_by_label("block 1").count() >= 2);
    assert!(h.query_by_label("back to val #0").is_some());

    let bad = dir.path().join("notes.txt");
    std::fs::write(&bad, "not an image").unwrap();
    h.state_mut().probe_with(&bad);
    h.run_steps(2);
    assert!(
        h.query_all_by_label_contains("notes.txt").count() >= 1,
        "the error names the file"
    );
    assert!(
        h.query_all_by_label_contains("cannot decode").count() >= 1,
        "and says why"
    );
}

/// A run opened from its folder is probed through its saved adapter: Your image… is offered,
/// the answer (computed off the UI thread) shows the file's name, prediction and every block's
/// map, and "back to val" returns to the recorded probe.
#[test]
fn a_run_opened_from_its_folder_is_probed_through_its_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let run = real_run(dir.path(), "moppa", &[]);
    let mut h = viewer(Tab::Router, vec![run]);
    let t0 = std::time::Instant::now();
    while h.state().info().is_none() || h.state().sel().is_none_or(|r| r.history.snapshots.is_empty()) {
        assert!(t0.elapsed().as_secs() < 30, "the folder did not load");
        h.run_steps(1);
    }
    h.run_steps(2);
    assert!(
        h.query_by_label("Your image…").is_some(),
        "offered for a folder with an adapter"
    );
    let png = dir.path().join("dog.png");
    image::RgbImage::from_fn(30, 30, |x, y| image::Rgb([(x * 8) as u8, 90, (y * 8) as u8]))
        .save(&png)
        .unwrap();
    h.state_mut().probe_with(&png);
    while h.state().sel().is_none_or(|r| r.probed.is_none()) {
        assert!(t0.elapsed().as_secs() < 60, "no answer from the adapter");
        std::thread::sleep(std::time::Duration::from_millis(20));
        h.run_steps(1);
    }
    h.run_steps(2);
    assert!(h.query_by_label_contains("dog.png: predicted").is_some());
    assert!(h.query_by_label("every block").is_some());
    h.get_by_label("back to val #0").click();
    h.run_steps(2);
    assert!(h.state().sel().unwrap().probed.is_none());
    assert!(h.query_by_label_contains("dog.png").is_none());
}

/// Start with an `hf:` backbone that is not in the cache downloads it first (the picker's
/// progress bar), then launches the run; nothing is launched before the file is there.
#[test]
fn start_with_a_backbone_not_in_the_cache_downloads_it_first() {
    use common::hub_server::{NAME, hub_files, serve};
    use moppa_studio::train::hub::{Hub, HubId, find_cached};
    let (mut h, fake) = harness(Tab::Curves);
    // The app's first run is ready (on the built-in backbone); the backbone setting then changes.
    fake.events.send(Event::Started(Box::new(info()))).unwrap();
    h.run_steps(2);
    let server = serve(hub_files().0, false);
    let dir = tempfile::tempdir().unwrap();
    h.state_mut().picker.hub = Hub {
        cache: dir.path().to_owned(),
        endpoint: format!("http://127.0.0.1:{}", server.port),
        offline: false,
    };
    let spec = format!("hf:timm/{NAME}");
    h.state_mut().settings.config.backbone = spec.clone();
    let before = h.state().runs.len();
    h.get_by_label("Start").click();
    h.run_steps(1);

    assert_eq!(
        h.state().runs.len(),
        before,
        "nothing is launched before the backbone is there"
    );
    assert!(h.state().picker.download.is_some(), "Start began the download");
    let t0 = std::time::Instant::now();
    while h.state().runs.len() == before {
        assert!(
            h.state().picker.message.is_none(),
            "download failed: {:?}",
            h.state().picker.message
        );
        assert!(
            t0.elapsed().as_secs() < 20,
            "the run was not launched after the download"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        h.run_steps(1);
    }
    let id = HubId::parse(&spec).unwrap().unwrap();
    assert!(
        find_cached(dir.path(), &id).is_some(),
        "the backbone is in the cache before the run"
    );
    assert_eq!(h.state().settings.config.backbone, spec);
}

#[test]
fn the_filter_view_computes_its_profiles_once_per_snapshot_not_per_frame() {
    let (mut h, fake) = harness(Tab::Filters);
    feed_run(&fake);
    h.run_steps(4);
    let computed = |h: &Harness<'static, StudioApp>| h.state().sel().unwrap().history.filter_cache.computed();
    let first = computed(&h);
    assert!(first >= 1, "the view of the newest snapshot was computed");
    h.run_steps(12);
    assert_eq!(computed(&h), first, "frames without a new snapshot compute nothing");
    fake.events.send(Event::Snapshot(Box::new(snapshot(220, 0.7)))).unwrap();
    h.run_steps(4);
    assert_eq!(computed(&h), first + 1, "a new snapshot is computed once");
    h.run_steps(8);
    assert_eq!(computed(&h), first + 1);
}

#[test]
fn the_live_panel_takes_every_value_in_range_without_clamping() {
    // The breaking-it lesson asks for lr 50 typed in the live panel: the slider must send it (it
    // used to clamp to 0.1), and values from 1e-8 to 1e8 go as typed.
    let (mut h, fake) = harness(Tab::Filters);
    feed_run(&fake);
    h.run_steps(4);
    for (label, v) in [("lr", 50.0), ("τ time", 1e-8), ("T router", 1e8)] {
        h.get_by_role_and_label(egui::Role::Slider, label)
            .set_value_accesskit(v);
        h.run_steps(2);
    }
    let sent = fake.sent.lock().unwrap().clone();
    for (hyper, value) in [(Hyper::Lr, 50.0), (Hyper::Tau, 1e-8), (Hyper::Temperature, 1e8)] {
        assert!(
            sent.contains(&Command::SetHyper { hyper, value }),
            "{hyper:?} {value}: {sent:?}"
        );
    }
}

#[test]
fn export_csv_writes_every_step_from_the_records() {
    use moppa_studio::app::history::RunHistory;
    use moppa_studio::app::metrics_csv;
    // A run whose folder is on this machine (here an MAE pretraining run written by an earlier
    // version: NaN training accuracy): its records give exactly the rows of its metrics.csv.
    let dir = tempfile::tempdir().unwrap();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/runs/mae");
    std::fs::copy(fixture.join("metrics.jsonl"), dir.path().join("metrics.jsonl")).unwrap();
    let mut h = RunHistory::new("mae".into());
    h.info = Some(RunInfo {
        out: Some(dir.path().to_owned()),
        ..info()
    });
    let csv = metrics_csv(&h).unwrap();
    assert_eq!(csv, std::fs::read_to_string(fixture.join("metrics.csv")).unwrap());
    // A served run (its folder on another machine): every step received, not the thinned
    // series the plots draw; before any, it says why there is nothing.
    let mut h = RunHistory::new("served".into());
    h.info = Some(RunInfo {
        out: Some("/nonexistent/served-run".into()),
        ..info()
    });
    assert!(metrics_csv(&h).unwrap_err().contains("not on this machine"));
    for step in 1..=5000 {
        let ev = progress(step);
        h.keep_row(&ev);
        let Event::Progress(p) = ev else { unreachable!() };
        h.on_progress(&p);
    }
    assert!(h.loss.points.len() < 5000, "the plotted series is thinned");
    let csv = metrics_csv(&h).unwrap();
    assert_eq!(csv.lines().count(), 1 + 5000);
    assert!(csv.lines().nth(5000).unwrap().starts_with("progress,5000,"));
}

// ---- Every view shows the run you look at -------------------------------------------------

/// A run config as a started record carries it.
fn config_json(f: impl FnOnce(&mut RunConfig)) -> serde_json::Value {
    let mut c = RunConfig {
        lr: Some(3e-3),
        ..RunConfig::default()
    };
    f(&mut c);
    serde_json::to_value(c).unwrap()
}

/// The live panel's slider labelled `label`: its value.
fn slider_value(h: &Harness<'static, StudioApp>, label: &str) -> f64 {
    h.get_by_role_and_label(egui::Role::Slider, label)
        .accesskit_node()
        .numeric_value()
        .unwrap()
}

#[test]
fn the_live_panel_shows_the_selected_runs_values_and_targets_until_they_apply() {
    let (mut h, fake) = harness(Tab::Filters);
    fake.events
        .send(Event::Started(Box::new(RunInfo {
            config: config_json(|c| c.method.route_weight = 0.01),
            ..info()
        })))
        .unwrap();
    // Channels of different κ: the slider shows their mean (all blocks, then one block).
    let mut snap = snapshot(10, 0.1);
    snap.blocks[0].coeffs.kappa = vec![0.2, 0.3, 0.4, 0.6];
    snap.blocks[1].coeffs.kappa = vec![0.1, 0.1, 0.1, 0.1];
    fake.events.send(progress(10)).unwrap();
    fake.events.send(Event::Snapshot(Box::new(snap.clone()))).unwrap();
    h.run_steps(4);
    let mean = |v: &[f32]| v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64;
    let all: Vec<f32> = snap.blocks.iter().flat_map(|b| b.coeffs.kappa.clone()).collect();
    assert_eq!(slider_value(&h, "κ heat"), mean(&all), "κ is the run's channel mean");
    assert_eq!(slider_value(&h, "lr"), 3e-3, "lr is the run's own");
    assert_eq!(slider_value(&h, "λ route"), 0.01);
    h.state_mut().settings.controls.block = Some(0);
    h.run_steps(2);
    assert_eq!(
        slider_value(&h, "κ heat"),
        mean(&snap.blocks[0].coeffs.kappa),
        "block 0's mean"
    );
    // A value moved is a target until the run applies it.
    h.get_by_role_and_label(egui::Role::Slider, "lr")
        .set_value_accesskit(50.0);
    h.run_steps(3);
    assert!(fake.sent.lock().unwrap().contains(&Command::SetHyper {
        hyper: Hyper::Lr,
        value: 50.0
    }));
    assert_eq!(slider_value(&h, "lr"), 50.0);
    assert!(
        h.query_by_label_contains("target · now 0.003").is_some(),
        "the target is shown as such"
    );
    fake.events
        .send(Event::Applied(Applied {
            step: 11,
            command: "lr".into(),
            target: "all".into(),
            old: 3e-3,
            new: 22.4,
            time_s: 2.0,
        }))
        .unwrap();
    h.run_steps(3);
    assert_eq!(slider_value(&h, "lr"), 22.4, "what the run applied, not what was typed");
    assert!(h.query_by_label_contains("target · now").is_none());
}

#[test]
fn a_run_that_trained_shows_its_settings_read_only_and_new_run_copies_them() {
    let (mut h, fake) = harness(Tab::Filters);
    assert!(
        h.query_by_label("New run from these settings").is_none(),
        "an unstarted run is edited"
    );
    fake.events
        .send(Event::Started(Box::new(RunInfo {
            config: config_json(|c| {
                c.batch = 7;
                c.seed = 41;
            }),
            ..info()
        })))
        .unwrap();
    fake.events.send(progress(1)).unwrap();
    h.run_steps(4);
    assert!(h.query_by_label("41").is_some(), "the run's seed in its settings");
    assert!(
        h.query_by_label_contains("#1 moppa r8 · ").is_some(),
        "the status bar names it"
    );
    // The launch settings changed meanwhile (a lesson, an edit): Reset and New run give back
    // the run's own.
    h.state_mut().settings.config.batch = 99;
    h.get_by_label("New run from these settings").click();
    h.run_steps(3);
    let app = h.state();
    assert_eq!((app.settings.config.batch, app.settings.config.seed), (7, 41));
    assert_eq!(app.runs.len(), 2, "a new run of this app's, selected");
    assert!(app.sel().unwrap().editable());
}

#[test]
fn a_lessons_settings_are_never_persisted_and_reset_gives_back_the_runs() {
    let (mut h, _fake) = harness(Tab::Filters);
    let user = h.state().settings.config.clone();
    let i = h
        .state()
        .lessons
        .lessons
        .iter()
        .position(|l| l.title.contains("Breaking"))
        .unwrap();
    let lesson = h.state().lessons.lessons[i].clone();
    h.state_mut().start_lesson(lesson);
    h.run_steps(3);
    let app = h.state();
    assert_eq!(app.settings.config.batch, 32, "the lesson's run settings are in force");
    assert_eq!(
        app.persisted_settings().config,
        user,
        "what eframe saves is the user's own"
    );
    assert_eq!(app.persisted_settings().controls, app.settings.controls);
}

/// A run folder written as `moppa train` writes one: a started record (with `config`), progress
/// every `every` steps to `steps`, validation every 20, finished.
fn write_run(dir: &Path, config: serde_json::Value, steps: u64, every: u64, offset: f64) {
    use moppa_studio::train::record::Record;
    std::fs::create_dir_all(dir).unwrap();
    let mut lines = vec![
        Record::from_event(&Event::Started(Box::new(RunInfo {
            config,
            out: Some(dir.to_owned()),
            total_steps: steps,
            ..info()
        })))
        .unwrap(),
    ];
    for step in (every..=steps).step_by(every as usize) {
        let Event::Progress(mut p) = progress(step) else {
            unreachable!()
        };
        p.loss += offset;
        lines.push(Record::from_event(&Event::Progress(p)).unwrap());
        if step % 20 == 0 {
            lines.push(
                Record::from_event(&Event::Eval(EvalResult {
                    step,
                    split: "val".into(),
                    loss: 0.5,
                    acc: 0.5 + offset / 10.0 + step as f64 / 1000.0,
                    per_class_acc: vec![0.5; 10],
                    n: 100,
                    time_s: step as f64,
                    ..EvalResult::default()
                }))
                .unwrap(),
            );
        }
    }
    let text: String = lines.iter().map(|r| r.to_line() + "\n").collect();
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
}

#[test]
fn seeds_of_two_methods_draw_two_groups_with_bands_and_a_hidden_run_draws_nothing() {
    let tmp = tempdir("app-groups");
    // 2 methods × 3 seeds (seeds of different lengths and record cadences), and one run of its
    // own setting (another lr).
    for (m, method) in ["moppa", "lora"].into_iter().enumerate() {
        for seed in 0..3u64 {
            let cfg = serde_json::json!({"method": method, "seed": seed, "lr": 0.01, "out": format!("{method}-{seed}"), "eval_every": 20 + seed});
            write_run(
                &tmp.join(format!("{method}-seed{seed}")),
                cfg,
                100 + 20 * seed,
                1 + seed,
                m as f64 + seed as f64 * 0.1,
            );
        }
    }
    write_run(
        &tmp.join("other-lr"),
        serde_json::json!({"method": "moppa", "seed": 0, "lr": 0.1}),
        100,
        1,
        2.0,
    );
    let mut h = viewer(Tab::Curves, vec![tmp.clone()]);
    h.run_steps(3);
    assert_eq!(h.state().runs.len(), 7);
    let drawn = h.state().frame.curves_drawn.clone();
    let groups: std::collections::BTreeSet<&String> = drawn.bands.iter().collect();
    assert_eq!(drawn.bands.len(), 4, "2 groups × (loss, val): {drawn:?}");
    assert_eq!(groups.len(), 4);
    assert!(drawn.lines.iter().any(|l| l.starts_with("other-lr")), "{drawn:?}");
    // Hide the run of its own setting: it draws nothing. Hide a group: neither band.
    let other = h
        .state()
        .runs
        .all()
        .iter()
        .position(|r| r.history.label == "other-lr")
        .unwrap();
    h.state_mut().runs.select(0);
    h.state_mut().runs.set_shown(&[other], false);
    h.run_steps(2);
    let drawn = h.state().frame.curves_drawn.clone();
    assert!(!drawn.lines.iter().any(|l| l.contains("other-lr")), "{drawn:?}");
    // Each seed on its own: six lines per plot, no band.
    h.state_mut().settings.curves.group_seeds = false;
    h.run_steps(2);
    let drawn = h.state().frame.curves_drawn.clone();
    assert!(drawn.bands.is_empty());
    assert_eq!(drawn.lines.len(), 12, "{drawn:?}");
}

#[test]
fn open_run_through_the_typed_path() {
    let tmp = tempdir("app-typed-path");
    let run = tmp.join("a-run");
    write_run(&run, config_json(|_| {}), 40, 1, 0.0);
    let (launcher, _fake) = launcher();
    let opts = AppOptions {
        typed_paths: true,
        ..AppOptions::default()
    };
    let mut h = app(Settings::default(), launcher, opts, None);
    h.run_steps(2);
    h.get_by_label("File").click();
    h.run_steps(2);
    h.get_by_label("Open run…").click();
    h.run_steps(3);
    assert!(h.state().dialogs.typed.is_some(), "the typed-path form is open");
    assert!(
        h.query_all_by_label_contains("type the path").count() >= 1,
        "the app says once why"
    );
    let focused = h
        .query_all_by_role(egui::Role::TextInput)
        .find(|n| n.is_focused())
        .expect("the path field has the focus");
    focused.type_text(run.to_str().unwrap());
    h.run_steps(2);
    h.get_by_label("OK").click();
    h.run_steps(4);
    let app = h.state();
    assert!(app.dialogs.typed.is_none());
    assert!(
        app.runs.all().iter().any(|r| r.history.label == "a-run"),
        "the run folder opened"
    );
}

#[test]
fn the_final_test_evaluation_shows_as_testing() {
    let (mut h, fake) = harness(Tab::Curves);
    fake.events.send(Event::Started(Box::new(info()))).unwrap();
    fake.events.send(progress(299)).unwrap();
    h.run_steps(3);
    assert!(h.query_by_label_contains("testing").is_none());
    fake.events.send(progress(300)).unwrap();
    h.run_steps(3);
    assert!(
        h.query_by_label_contains("testing: the final model on 1000 test images")
            .is_some(),
        "the state after the last step"
    );
}

#[test]
fn a_served_run_is_named_by_its_folder_and_shows_its_settings() {
    use std::io::BufRead as _;
    let tmp = tempdir("app-served");
    let backbone = common::micro_backbone(&tmp);
    let out = tmp.join("served-run-folder");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_moppa"))
        .args([
            "train",
            "--backbone",
            backbone.to_str().unwrap(),
            "--steps",
            "100000",
            "--batch",
            "7",
            "--threads",
            "1",
            "--out",
            out.to_str().unwrap(),
            "--serve",
            "127.0.0.1:0",
            "--token",
            "a-token-of-16-chars",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read stderr to its end (a closed pipe would end the run), the address from its line.
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = bounded(1);
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            if let Some(a) = l.strip_prefix("serving on ") {
                tx.send(a.trim().to_owned()).ok();
            }
        }
    });
    let addr: String = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("a serving on line");
    let (launcher, _fake) = launcher();
    let mut h = app(Settings::default(), launcher, AppOptions::default(), None);
    h.state_mut().connect_to(&addr, "a-token-of-16-chars");
    assert_eq!(h.state().runs.len(), 2, "connected: {:?}", h.state().messages);
    let t0 = std::time::Instant::now();
    while h.state().sel().is_none_or(|r| r.history.config.is_none()) {
        assert!(t0.elapsed().as_secs() < 60, "no started event from the served run");
        h.run_steps(1);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    h.run_steps(2);
    child.kill().ok();
    child.wait().ok();
    let run = h.state().sel().unwrap();
    assert_eq!(
        run.history.label, "served-run-folder",
        "named by its folder, not its address"
    );
    assert_eq!(run.history.config.as_ref().unwrap().batch, 7);
    assert!(
        h.query_by_label("New run from these settings").is_some(),
        "its settings, read-only"
    );
    assert!(h.query_by_label("7").is_some(), "its batch in the left panel");
}

#[test]
fn a_vit_s16_run_at_real_size_opens_in_every_view() {
    // ViT-S/16 at 224 px: 12 blocks, 14×14 tokens, rank 64 (random weights; the fixture's 64
    // IDX digits), two steps of batch 2.
    let tmp = tempdir("app-vit-s16");
    let run = tmp.join("vit-s16");
    let data = format!("idx:{}", common::fixture("runs/idx").display());
    let o = common::moppa(&[
        "train",
        "--backbone",
        "random:vit-s16",
        "--data",
        &data,
        "--batch",
        "2",
        "--steps",
        "2",
        "--rank",
        "64",
        "--threads",
        "2",
        "--eval-every",
        "0",
        "--plain",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut h = viewer(Tab::Filters, vec![run]);
    h.run_steps(4);
    let r = h.state().sel().unwrap();
    let info = r.info().unwrap();
    assert_eq!((info.blocks, info.grid, info.rank), (12, (14, 14), 64));
    let snap = r.history.snapshots.last().unwrap();
    assert_eq!(snap.blocks.len(), 12);
    assert!(r.history.filter_cache.computed() >= 1, "the filter view drew block 0");
    assert!(
        h.query_by_label_contains("κ: mean").is_some(),
        "a summary over the 64 channels"
    );
    h.state_mut().settings.tab = Tab::Router;
    h.run_steps(3);
    assert!(
        h.query_all_by_label("block 11").count() >= 2,
        "every block's map and entropy key, to the twelfth"
    );
}

#[test]
fn the_runs_table_sorts_by_a_column_and_filters_by_text() {
    let tmp = tempdir("app-table");
    for (name, steps) in [("lora-a", 100), ("lora-b", 140), ("moppa-c", 120)] {
        write_run(&tmp.join(name), config_json(|c| c.seed = steps), steps, 1, 0.0);
    }
    let mut h = viewer(Tab::Runs, vec![tmp.clone()]);
    h.run_steps(3);
    // A run's row: its name's button in the table.
    let y =
        |h: &Harness<'static, StudioApp>, name: &str| h.get_by_role_and_label(egui::Role::Button, name).rect().min.y;
    // Steps, descending on the first click (a number column), then ascending.
    h.get_by_role_and_label(egui::Role::Button, "steps").click();
    h.run_steps(2);
    assert!(y(&h, "lora-b") < y(&h, "moppa-c") && y(&h, "moppa-c") < y(&h, "lora-a"));
    h.get_by_role_and_label(egui::Role::Button, "steps (desc)").click();
    h.run_steps(2);
    assert!(y(&h, "lora-a") < y(&h, "moppa-c") && y(&h, "moppa-c") < y(&h, "lora-b"));
    // Filtered by any text in a row.
    h.state_mut().settings.runs_table.filter = "LORA".into();
    h.run_steps(2);
    assert!(h.query_by_role_and_label(egui::Role::Button, "moppa-c").is_none());
    assert!(h.query_by_role_and_label(egui::Role::Button, "lora-b").is_some());
    assert!(h.query_by_label_contains("2 of 3 runs match").is_some());
}

/// Issue 31 item 3: the runs table's accuracy cells say on hover how many images they were
/// measured on and the 95% Wilson interval; a set under 100 images shows its n in the cell and
/// says what one image is worth; a folder recorded before n was says n unknown; the headers say what the
/// interval is.
#[test]
fn the_runs_tables_accuracies_carry_their_n_and_wilson_interval() {
    let tmp = tempdir("app-table-n");
    // Validation on 100 images (best 0.6, at step 100), then a test on only 12.
    let small = tmp.join("small-test");
    write_run(&small, config_json(|c| c.seed = 1), 100, 10, 0.0);
    let test = moppa_studio::train::record::Record::from_event(&Event::Eval(EvalResult {
        step: 100,
        split: "test".into(),
        loss: 0.5,
        acc: 0.75,
        per_class_acc: vec![0.75; 10],
        n: 12,
        time_s: 100.0,
        ..EvalResult::default()
    }))
    .unwrap();
    let mut text = std::fs::read_to_string(small.join("metrics.jsonl")).unwrap();
    text.push_str(&(test.to_line() + "\n"));
    std::fs::write(small.join("metrics.jsonl"), text).unwrap();
    // A folder of an earlier version: no n in its records (best validation 0.67).
    let old = tmp.join("old-folder");
    write_run(&old, config_json(|c| c.seed = 2), 120, 10, 0.5);
    let stripped: String = records(&old.join("metrics.jsonl"))
        .into_iter()
        .map(|mut r| {
            r.as_object_mut().unwrap().remove("n");
            r.to_string() + "\n"
        })
        .collect();
    assert!(!stripped.contains("\"n\""));
    std::fs::write(old.join("metrics.jsonl"), stripped).unwrap();

    let mut h = viewer(Tab::Runs, vec![tmp.clone()]);
    h.run_steps(3);
    assert_eq!(h.state().runs.len(), 2);
    let shows = |h: &mut Harness<'static, StudioApp>, cell: &str, tip: &str| {
        h.get_by_label(cell).hover();
        h.run_steps(4);
        assert!(
            h.query_by_label_contains(tip).is_some(),
            "hovering {cell} shows \"{tip}\""
        );
    };
    // 60/100: Wilson (0.502003, 0.690599); 9/12: (0.467695, 0.911058).
    shows(&mut h, "60.00%", "60.0% of 100 validation images; 95% CI 50.2–69.1%");
    shows(
        &mut h,
        "75.00% (n = 12)",
        "75.0% of 12 test images; 95% CI 46.8–91.1%; only 12 test images: one image is 8.3 points",
    );
    shows(&mut h, "67.00%", "67.0%; n unknown");
    assert!(
        h.query_by_label_contains("67.0% of").is_none(),
        "no n is made up for the old folder"
    );
    h.get_by_role_and_label(egui::Role::Button, "best val").hover();
    h.run_steps(4);
    assert!(
        h.query_by_label_contains("Wilson score interval of one run's accuracy on n images")
            .is_some(),
        "the header says what the interval is"
    );
}

/// A followed run folder whose `metrics.jsonl` is replaced (renamed over) by another run's is
/// shown as that run from its start, once: not appended to the old one, not a resume (issue "No
/// byte from outside can hurt a run", item 8).
#[test]
fn a_followed_folder_replaced_under_the_app_is_shown_again_from_its_start() {
    let tmp = tempdir("app-replaced-folder");
    let dir = common::copy_run_fixture("moppa", &tmp);
    let (mut h, _fake) = harness(Tab::Curves);
    h.state_mut().open_folder(&dir);
    h.run_steps(2);
    let shown = |h: &Harness<'static, StudioApp>| {
        let run = h.state().runs.all().last().unwrap();
        (
            run.history.loss.points.len(),
            run.history.resumes,
            run.history.val.len(),
        )
    };
    let (points, resumes, evals) = shown(&h);
    assert!(points > 0 && resumes == 0, "{points} {resumes}");
    // Another file under the name: the same records with the first one's time changed.
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    first["time_s"] = serde_json::json!(123.25);
    lines[0] = first.to_string();
    std::fs::write(dir.join("metrics.new"), lines.join("\n") + "\n").unwrap();
    std::fs::rename(dir.join("metrics.new"), dir.join("metrics.jsonl")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    h.run_steps(3);
    assert_eq!(shown(&h), (points, 0, evals), "the run shown once, from its start");
    let said = format!("{:?}", h.state().messages);
    assert!(said.contains("replaced"), "{said}");
}

/// Issue 30 item 5: the router alerts read a span of steps, not a count of snapshots, so the live
/// event stream (snapshots time-gated and coalesced) and the folder reopened (the file's own
/// cadence) give the same verdicts at the end of a run. A low temperature routes every token
/// nearly one-hot: a collapse both must see.
#[test]
fn router_alerts_agree_live_and_reopened() {
    use moppa_studio::app::panels::alerts::alerts;
    use moppa_studio::app::state::RouterSettings;
    use moppa_studio::train::WorkerHandle;
    use moppa_studio::train::replay::RunFolderReader;
    use moppa_studio::train::worker::WorkerOptions;
    let tmp = tempdir("alerts-live-reopened");
    let dir = tmp.join("run");
    let mut cfg = RunConfig {
        steps: Some(200),
        batch: 16,
        eval_every: 0,
        threads: Some(1),
        out: Some(dir.clone()),
        ..RunConfig::default()
    };
    cfg.method.temperature = 0.05;
    cfg.method.route_weight = 0.0;
    let h = WorkerHandle::spawn(
        cfg,
        WorkerOptions {
            autostart: true,
            ..WorkerOptions::default()
        },
    )
    .unwrap();
    let mut live = Vec::new();
    for ev in h.events() {
        match ev {
            Event::Snapshot(s) => live.push(*s),
            Event::Finished(f) => {
                assert_eq!(f.reason, FinishReason::Done);
                break;
            }
            _ => {}
        }
    }
    h.join();
    let mut reader = RunFolderReader::open(&dir).unwrap();
    let reopened: Vec<Snapshot> = reader
        .poll()
        .into_iter()
        .filter_map(|e| match e {
            Event::Snapshot(s) => Some(*s),
            _ => None,
        })
        .collect();
    assert_eq!(live.last().map(|s| s.step), reopened.last().map(|s| s.step));
    let settings = RouterSettings::default();
    let (a, b) = (alerts(&live, &settings), alerts(&reopened, &settings));
    assert_eq!(
        a,
        b,
        "live ({} snapshots) and reopened ({})",
        live.len(),
        reopened.len()
    );
    assert!(
        a.iter().any(|x| x.message().contains("collapsed onto")),
        "T = 0.05 routes one-hot: {a:?}"
    );
}

// ---- The router's diagnostics: ablation, tokens, classes, accuracy (issue 30) ----

use moppa_studio::app::panels::diagnose::DiagView;

/// An ablation of `info()`'s run (heat, wave, Poisson; 2 blocks; 10 classes) at step 200 on
/// 40 images: removing a prior costs 10 points per prior rank in all blocks, 2.5 in one block.
fn ablation_of_info() -> Ablation {
    // Per class: the whole model's 80% less a point per class index, less a share of the drop
    // that varies with the class and the prior.
    let score = |drop: f64, p: usize| AblationScore {
        acc: 0.8 - drop,
        loss: 0.5 + drop,
        per_class_acc: (0..10)
            .map(|c| 0.8 - 0.01 * c as f64 - drop * (0.4 + 0.6 * ((c + p) % 3) as f64))
            .collect(),
    };
    let mut rows = Vec::new();
    for (p, prior) in Prior::ALL.iter().enumerate() {
        for block in [AblationBlock::ALL, AblationBlock::One(0), AblationBlock::One(1)] {
            let drop = if block == AblationBlock::ALL { 0.1 } else { 0.025 } * (p + 1) as f64;
            rows.push(AblationRow {
                prior: *prior,
                block,
                score: score(drop, p),
            });
        }
    }
    let usage = (0..2)
        .map(|b| BlockUsage {
            block: b,
            class_share: (0..10)
                .map(|c| {
                    let heat = 0.2 + 0.05 * c as f64;
                    vec![heat, 0.3, 0.7 - heat]
                })
                .collect(),
            hf_corr: vec![-0.4, 0.3, f64::NAN],
            // Heat's α falls with hf, wave's rises, Poisson's stays: a band of tokens each.
            hist: (0..3)
                .map(|p| {
                    (0..USAGE_BINS * USAGE_BINS)
                        .map(|i| {
                            let (row, col) = ((i / USAGE_BINS) as f64, (i % USAGE_BINS) as f64);
                            let centre = [12.0 - 0.6 * col, 3.0 + 0.6 * col, 5.0][p];
                            (60.0 * (-(row - centre).powi(2) / 6.0).exp()).round() as u32
                        })
                        .collect()
                })
                .collect(),
        })
        .collect();
    Ablation {
        step: 200,
        time_s: 30.0,
        split: "val".into(),
        n: 40,
        base: score(0.0, 0),
        rows,
        class_n: vec![4; 10],
        usage,
        seconds: 1.5,
    }
}

/// An evaluation of `info()`'s 10 classes: each row 8 right, 2 taken for the next class;
/// validation lists two misclassified images.
fn eval_with_confusion(split: &str) -> EvalResult {
    EvalResult {
        step: 200,
        split: split.into(),
        loss: 0.45,
        acc: 0.8,
        per_class_acc: vec![0.8; 10],
        n: 100,
        time_s: 30.0,
        confusion: (0..10)
            .map(|i| {
                (0..10)
                    .map(|j| {
                        if j == i {
                            8
                        } else if j == (i + 1) % 10 {
                            2
                        } else {
                            0
                        }
                    })
                    .collect()
            })
            .collect(),
        misclassified: if split == "val" {
            vec![
                Misclassified {
                    index: 3,
                    predicted: 5,
                    prob: 0.93,
                },
                Misclassified {
                    index: 17,
                    predicted: 2,
                    prob: 0.71,
                },
            ]
        } else {
            Vec::new()
        },
    }
}

/// The app on a fake run with evaluations (confusion, misclassified) and an ablation, showing
/// the Router tab's `view`.
fn diagnosed(
    view: DiagView,
    renderer: Option<egui_kittest::wgpu::WgpuTestRenderer>,
) -> (Harness<'static, StudioApp>, Fake) {
    let (launcher, fake) = launcher();
    let mut settings = Settings {
        tab: Tab::Router,
        ..Settings::default()
    };
    settings.diagnose.view = view;
    let h = app(settings, launcher, AppOptions::default(), renderer);
    fake.events.send(Event::Started(Box::new(info()))).unwrap();
    fake.events.send(progress(200)).unwrap();
    fake.events.send(Event::Snapshot(Box::new(snapshot(200, 0.1)))).unwrap();
    fake.events.send(Event::Eval(eval_with_confusion("val"))).unwrap();
    fake.events.send(Event::Eval(eval_with_confusion("test"))).unwrap();
    fake.events.send(Event::Ablation(Box::new(ablation_of_info()))).unwrap();
    (h, fake)
}

#[test]
fn the_ablation_view_shows_each_priors_change_and_runs_and_cancels_through_the_worker() {
    let (mut h, fake) = diagnosed(DiagView::Routing, None);
    h.run_steps(3);
    h.get_by_label("Priors removed").click();
    h.run_steps(2);
    assert!(h.query_by_label("What does each prior do?").is_some());
    assert!(
        h.query_by_label("Whole model: accuracy 80.0%, loss 0.5000 on n = 40 val images, step 200; took 1.5 s")
            .is_some()
    );
    // One row per prior × (all, each block): heat −10 points in all blocks, Poisson −7.5 in one.
    assert_eq!(h.query_all_by_label("all blocks").count(), 3);
    assert_eq!(h.query_all_by_label("block 1").count(), 3);
    assert!(
        h.query_all_by_label("-7.5").count() >= 2,
        "Poisson in one block (accuracy and per class rows)"
    );
    assert!(
        h.query_all_by_label("+0.3000").count() == 1,
        "Poisson in all blocks: Δloss"
    );
    // Per class, each prior removed in all blocks.
    assert!(
        h.query_by_label("Per class: Δacc (points) with each prior removed in all blocks")
            .is_some()
    );
    assert!(h.query_by_label("-poisson").is_some(), "a column per prior");
    assert!(h.query_by_label("9 (71%)").is_some(), "class 9's whole accuracy");
    // Run: the command goes to the worker; its progress shows with Cancel.
    h.get_by_label("Run ablation").click();
    h.run_steps(2);
    assert!(fake.sent.lock().unwrap().contains(&Command::Ablate { images: 256 }));
    fake.events.send(Event::AblationProgress { done: 3, total: 9 }).unwrap();
    h.run_steps(3);
    assert_eq!(h.state().sel().unwrap().history.ablation_progress, Some((3, 9)));
    h.get_by_label("Cancel").click();
    h.run_steps(2);
    assert!(fake.sent.lock().unwrap().contains(&Command::CancelAblation));
    assert_eq!(h.state().sel().unwrap().history.ablation_progress, None);
}

#[test]
fn the_class_and_token_views_show_each_priors_share_and_hf_correlation() {
    let (mut h, _fake) = diagnosed(DiagView::Classes, None);
    h.run_steps(4);
    assert!(h.query_by_label("Which classes use each prior").is_some());
    // Class 9: heat 0.65, wave 0.30, Poisson 0.05 (the mean over blocks = each block's here).
    assert!(h.query_by_label("9 (n = 4)").is_some());
    assert!(h.query_by_label("0.65").is_some());
    assert_eq!(
        h.query_all_by_label("0.30").count(),
        12,
        "wave's share in every class, heat's in class 2, Poisson's in class 4"
    );
    h.get_by_label("Tokens").click();
    h.run_steps(3);
    assert!(h.query_by_label("Which tokens each prior takes").is_some());
    assert!(h.query_by_label("heat: mean r(α, hf) = -0.40").is_some());
    assert!(
        h.query_by_label("poisson: mean r(α, hf) = -").is_some(),
        "NaN prints as -"
    );
    // The probe's tokens: every third token weighs heat 0.7, the others 0.2.
    assert!(h.query_by_label("block 0, 64 tokens").is_some());
    assert!(h.query_by_label_contains("heat: r = ").is_some());
}

#[test]
fn the_accuracy_view_shows_the_confusion_matrix_and_a_misclassified_image_becomes_the_probe() {
    let (mut h, fake) = diagnosed(DiagView::Accuracy, None);
    h.run_steps(4);
    assert!(h.query_by_label("Accuracy where it fails").is_some());
    assert!(
        h.query_by_label("Last validation evaluation: step 200, accuracy 80.0% on n = 100 images")
            .is_some()
    );
    assert!(
        h.query_by_label("Confusion matrix: rows = true class, columns = predicted")
            .is_some()
    );
    assert!(h.query_all_by_label("8").count() >= 10, "the diagonal's counts");
    assert_eq!(h.query_all_by_label("80.0%").count(), 10, "per-class accuracy");
    h.get_by_label("test").click();
    h.run_steps(2);
    assert!(
        h.query_by_label("Last test evaluation: step 200, accuracy 80.0% on n = 100 images")
            .is_some()
    );
    // The gallery: the most confident first; a click makes the image the probe.
    assert!(h.query_by_label("predicted: 5 (93%)").is_some());
    assert!(h.query_by_label("predicted: 2 (71%)").is_some());
    h.get_by_label("val #17").click();
    h.run_steps(2);
    assert!(fake.sent.lock().unwrap().contains(&Command::SetProbe { index: 17 }));
    assert_eq!(h.state().settings.router.probe, 17);
}

#[test]
fn a_run_folder_is_ablated_here_without_writing_into_it_and_a_misclassified_image_probes_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = real_run(dir.path(), "moppa", &[]);
    let listing = |d: &Path| {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = listing(&run);
    let mut settings = Settings {
        tab: Tab::Router,
        ..Settings::default()
    };
    settings.diagnose.view = DiagView::Priors;
    settings.diagnose.images = 64;
    let opts = AppOptions {
        open: vec![run.clone()],
        ..AppOptions::default()
    };
    let mut h = app(settings, launcher().0, opts, None);
    h.run_steps(3);
    h.get_by_label("Run ablation").click();
    let t0 = std::time::Instant::now();
    h.run_steps(1);
    while h.state().sel().unwrap().history.ablation.is_none() {
        assert!(t0.elapsed().as_secs() < 60, "no ablation: {:?}", h.state().messages);
        std::thread::sleep(std::time::Duration::from_millis(20));
        h.run_steps(1);
    }
    h.run_steps(2);
    assert_eq!(
        h.query_all_by_label("all blocks").count(),
        3,
        "a row per prior in all blocks"
    );
    let a = h.state().sel().unwrap().history.ablation.clone().unwrap();
    assert_eq!(a.n, 64);
    assert_eq!(h.state().sel().unwrap().history.ablation_progress, None);
    // A misclassified validation image (read from the run's data here) becomes the probe.
    let wrong = h.state().sel().unwrap().history.last_val.clone().unwrap().misclassified;
    let first = wrong.first().expect("a 40-step run misclassifies some digits").index as usize;
    h.state_mut().settings.diagnose.view = DiagView::Accuracy;
    h.run_steps(2);
    while h
        .state()
        .sel()
        .unwrap()
        .jobs
        .images
        .as_ref()
        .is_none_or(|i| i.get(first).is_none())
    {
        assert!(t0.elapsed().as_secs() < 90, "the image was not read");
        std::thread::sleep(std::time::Duration::from_millis(20));
        h.run_steps(1);
    }
    h.run_steps(1);
    h.get_by_label(&format!("val #{first}")).click();
    h.run_steps(1);
    while h.state().sel().unwrap().probed.is_none() {
        assert!(t0.elapsed().as_secs() < 120, "no answer from the adapter");
        std::thread::sleep(std::time::Duration::from_millis(20));
        h.run_steps(1);
    }
    let probed = h.state().sel().unwrap().probed.clone().unwrap();
    assert_eq!(
        probed.probe.map(|p| p.origin),
        Some(ProbeOrigin::File {
            name: format!("val #{first}")
        })
    );
    assert_eq!(listing(&run), before, "nothing was written into the run folder");
}

/// The ablation view at the snapshot tests' size.
#[test]
fn snapshot_router_ablation_view() {
    let Some(renderer) = gpu() else { return };
    let (mut h, _fake) = diagnosed(DiagView::Priors, Some(renderer));
    h.run_steps(6);
    let opts = SnapshotOptions::new().threshold(2.0).output_path("tests/snapshots");
    h.snapshot_options("app_router_ablation", &opts);
}

/// The pictures of the diagnostics in docs/, written on demand:
/// `MOPPA_DOCS_PICTURES=1 cargo test --release --test app docs_pictures`.
#[test]
fn docs_pictures_of_the_router_diagnostics() {
    // MOPPA_DOCS_PICTURES=1: the pictures in docs/ from a constructed run; with
    // MOPPA_DOCS_RUN=DIR too, from that real run folder (its ablation made here, as a user would).
    if std::env::var("MOPPA_DOCS_PICTURES").is_err() {
        return;
    }
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let real = std::env::var("MOPPA_DOCS_RUN").ok().map(PathBuf::from);
    for (view, file) in [
        (DiagView::Priors, "router-ablation.png"),
        (DiagView::Classes, "router-classes.png"),
        (DiagView::Tokens, "router-tokens.png"),
        (DiagView::Accuracy, "accuracy-confusion.png"),
    ] {
        let renderer = Some(gpu().expect("a wgpu adapter"));
        let (mut h, _fake) = match &real {
            Some(run) => {
                let mut settings = Settings {
                    tab: Tab::Router,
                    ..Settings::default()
                };
                settings.diagnose.view = view;
                let opts = AppOptions {
                    open: vec![run.clone()],
                    ..AppOptions::default()
                };
                let (l, fake) = launcher();
                let mut h = app(settings, l, opts, renderer);
                h.run_steps(3);
                h.state_mut().settings.diagnose.view = DiagView::Priors;
                h.run_steps(2);
                h.get_by_label("Run ablation").click();
                h.run_steps(1);
                let t0 = std::time::Instant::now();
                while h.state().sel().unwrap().history.ablation.is_none() {
                    assert!(t0.elapsed().as_secs() < 600, "no ablation: {:?}", h.state().messages);
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    h.run_steps(1);
                }
                h.state_mut().settings.diagnose.view = view;
                (h, fake)
            }
            None => diagnosed(view, renderer),
        };
        h.run_steps(4);
        let t0 = std::time::Instant::now();
        while view == DiagView::Accuracy
            && h.state()
                .sel()
                .unwrap()
                .jobs
                .images
                .as_ref()
                .is_none_or(|i| i.got.len() < 2)
        {
            assert!(t0.elapsed().as_secs() < 60, "the thumbnails were not read");
            std::thread::sleep(std::time::Duration::from_millis(20));
            h.run_steps(1);
        }
        h.run_steps(4);
        h.render().unwrap().save(docs.join(file)).unwrap();
    }
}
