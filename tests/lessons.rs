//! Every built-in lesson walked from start to end in the app (egui_kittest, headless) with the
//! real engine: each step's action performed through the lesson panel's "Do it" button (the same
//! actions the views' own controls send), its check awaited, then Next (or Finish) clicked. A
//! broken lesson file is reported by file and line while the others still load.

// Tests: unwrap is the assertion; pedantic style lints are for the library.
#![allow(clippy::unwrap_used, clippy::pedantic)]
#![cfg(feature = "gui")]

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable as _;
use moppa_studio::app::lessons::{BUILT_IN, Catalogue, resolve};
use moppa_studio::app::link::worker_launcher;
use moppa_studio::app::state::Settings;
use moppa_studio::app::{AppOptions, StudioApp};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Runs that never send anything (the menu test needs no engine).
fn fake_launcher() -> moppa_studio::app::link::Launcher {
    let (_tx, rx) = crossbeam_channel::bounded(1);
    Box::new(move |_, _, _| {
        Ok(Box::new(moppa_studio::app::link::FakeLink {
            sent: Default::default(),
            events: rx.clone(),
        }) as Box<dyn moppa_studio::app::link::Link>)
    })
}

/// A fresh folder for the runs of one app (left for the system's temp cleanup).
fn runs_dir() -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("moppa-lessons-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn app() -> Harness<'static, StudioApp> {
    Harness::builder()
        .with_size(egui::vec2(1440.0, 900.0))
        .with_max_steps(16)
        .build_eframe(move |cc| {
            StudioApp::with_launcher(
                &cc.egui_ctx,
                Settings::default(),
                worker_launcher(),
                AppOptions {
                    stable_display: true,
                    // As the app does (its data folder's runs/): a finished run keeps its folder,
                    // whose saved adapter a prior ablation reads.
                    runs_dir: Some(runs_dir()),
                    ..AppOptions::default()
                },
            )
        })
}

/// Steps the app (real time passes: the engine trains) until `ok`, within `limit`.
fn until(h: &mut Harness<'static, StudioApp>, what: &str, limit: Duration, ok: impl Fn(&StudioApp) -> bool) {
    let t0 = Instant::now();
    while !ok(h.state()) {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        h.run_steps(1);
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn every_built_in_lesson_can_be_walked_to_the_end() {
    let mut report = Vec::new();
    for (name, _) in BUILT_IN {
        let lesson = resolve(name).unwrap();
        let steps = lesson.steps.len();
        let t0 = Instant::now();
        let mut h = app();
        h.state_mut().start_lesson(lesson);
        for i in 0..steps {
            h.run_steps(2);
            assert_eq!(
                h.state().lesson.as_ref().map(|p| p.step),
                Some(i),
                "{name}: at step {}",
                i + 1
            );
            let has_action = h.state().lesson.as_ref().unwrap().current().action.is_some();
            if has_action {
                h.get_by_label("Do it").click();
                h.run_steps(2);
            }
            until(
                &mut h,
                &format!("{name} step {}'s check", i + 1),
                Duration::from_secs(150),
                |a| a.lesson_step_done(),
            );
            // Panels take their new size a frame late: let the layout settle before clicking.
            h.run_steps(5);
            // A step that breaks the run on purpose raises the error dialog: dismiss it first.
            while h.query_by_label("Dismiss").is_some() {
                h.get_by_label("Dismiss").click();
                // The dialog fades out over a few frames, holding the input meanwhile.
                h.run_steps(10);
            }
            let label = if i + 1 == steps { "Finish" } else { "Next" };
            h.get_by_label(label).click();
            h.run_steps(2);
        }
        assert!(h.state().lesson.is_none(), "{name}: Finish closes the lesson");
        assert_eq!(
            h.state().settings.config,
            Settings::default().config,
            "{name}: the launch settings are given back"
        );
        // The runs the lesson trained (seconds each, from their own clocks).
        let runs: Vec<String> = h
            .state()
            .runs
            .all()
            .iter()
            .filter(|r| r.history.step > 0)
            .map(|r| format!("{} steps in {:.1} s", r.history.step, r.history.time_s))
            .collect();
        report.push(format!(
            "{name}: {steps} steps walked in {:.1} s; runs: {}",
            t0.elapsed().as_secs_f64(),
            if runs.is_empty() {
                "none".to_owned()
            } else {
                runs.join(", ")
            }
        ));
    }
    // The closing note quotes these.
    println!("{}", report.join("\n"));
    let prefix = format!("moppa-lessons-{}-", std::process::id());
    for e in std::fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[test]
fn a_broken_lesson_file_is_named_with_its_line_and_the_others_still_load() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lessons-user");
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("good.toml"),
        "title = \"Mine\"\n[[step]]\ntext = \"Open the router.\"\naction = { tab = \"router\" }\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("broken.toml"),
        "title = \"Broken\"\n[[step]]\ntext = \"Hm.\"\naction = { press = \"launch\" }\n",
    )
    .unwrap();
    let c = Catalogue::load(Some(&dir));
    assert_eq!(c.lessons.len(), BUILT_IN.len() + 1, "{:?}", c.errors);
    assert!(c.lessons.iter().any(|l| l.title == "Mine"));
    assert_eq!(c.errors.len(), 1);
    let e = &c.errors[0];
    assert!(e.contains("broken.toml:4: unknown button 'launch'"), "{e}");
    // The Lessons menu lists the good ones and shows the error.
    let mut h = Harness::builder()
        .with_size(egui::vec2(1440.0, 900.0))
        .build_eframe(move |cc| {
            StudioApp::with_launcher(
                &cc.egui_ctx,
                Settings::default(),
                fake_launcher(),
                AppOptions {
                    stable_display: true,
                    lessons_dir: Some(dir.clone()),
                    ..AppOptions::default()
                },
            )
        });
    h.run_steps(2);
    h.get_by_label("Lessons").click();
    h.run_steps(2);
    assert!(h.query_by_label("Mine").is_some());
    assert!(h.query_by_label("Heat is a low-pass filter").is_some());
    assert!(h.query_all_by_label_contains("broken.toml:4").count() >= 1);
    // The teacher's lesson plays: its action switches the view, and Finish closes it.
    h.get_by_label("Mine").click();
    // The menu's choice starts the lesson after that frame; its panel settles in the next ones.
    h.run_steps(4);
    h.get_by_label("Do it").click();
    h.run_steps(2);
    assert_eq!(h.state().settings.tab, moppa_studio::app::state::Tab::Router);
    h.get_by_label("Finish").click();
    h.run_steps(2);
    assert!(h.state().lesson.is_none());
}

#[test]
fn lesson_names_resolve_and_unknown_ones_list_the_built_ins() {
    assert_eq!(resolve("waves-ring").unwrap().title, "Waves ring");
    let e = resolve("quantum").unwrap_err();
    assert!(e.contains("heat-low-pass") && e.contains("breaking-it"), "{e}");
    let e = resolve("/no/such/lesson.toml").unwrap_err();
    assert!(e.contains("/no/such/lesson.toml"), "{e}");
}

#[test]
fn the_lesson_flag_refuses_unknown_names_and_broken_files_before_opening_a_window() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_moppa"))
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&["--lesson", "quantum"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--lesson: no lesson named 'quantum'") && err.contains("the-router"),
        "{err}"
    );
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lessons-flag");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("typo.toml");
    std::fs::write(
        &file,
        "title = \"T\"\n[[step]]\ntext = \"a\"\ncheck = { tab = \"settings\" }\n",
    )
    .unwrap();
    let o = run(&["--lesson", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("typo.toml:4: unknown view 'settings'"), "{err}");
    let o = run(&["--lesson-step", "2"]);
    assert_eq!(o.status.code(), Some(2), "--lesson-step needs --lesson");
}
