//! The training engine through its public protocol: commands take effect at the next step and
//! show in the next snapshot, pause/resume/stop, locks, determinism, a reader that stops reading,
//! bad inputs, resume, and a run that learns.

// Tests: unwrap is the assertion; pedantic style lints are for the library.
#![allow(clippy::unwrap_used, clippy::pedantic)]

use moppa_studio::config::{Coeff, Lockable, MethodConfig, MethodKind, RunConfig};
use moppa_studio::train::protocol::{Command, Event, FinishReason, Finished, Hyper, SetMode, Snapshot, Target};
use moppa_studio::train::{WorkerHandle, WorkerOptions};
use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::micro_backbone;

fn config(dir: &Path) -> RunConfig {
    RunConfig {
        backbone: micro_backbone(dir).display().to_string(),
        steps: Some(30),
        batch: 32,
        eval_every: 0,
        threads: Some(2),
        snapshot_every: 1,
        ..RunConfig::default()
    }
}

fn spawn(cfg: RunConfig, autostart: bool) -> WorkerHandle {
    let opts = WorkerOptions {
        autostart,
        max_snapshots_per_s: 1000.0,
        ..WorkerOptions::default()
    };
    WorkerHandle::spawn(cfg, opts).unwrap()
}

/// Collects events until `until` says stop (or a timeout).
fn collect(h: &WorkerHandle, mut until: impl FnMut(&Event) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut out = Vec::new();
    while Instant::now() < deadline {
        if let Ok(ev) = h.events().recv_timeout(Duration::from_millis(200)) {
            let done = until(&ev);
            out.push(ev);
            if done {
                return out;
            }
        }
    }
    panic!(
        "timed out; last events: {:?}",
        out.iter().rev().take(5).collect::<Vec<_>>()
    );
}

fn finished(events: &[Event]) -> &Finished {
    events
        .iter()
        .find_map(|e| if let Event::Finished(f) = e { Some(f) } else { None })
        .expect("a Finished event")
}

fn progress_steps(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| if let Event::Progress(p) = e { Some(p.step) } else { None })
        .collect()
}

#[test]
fn set_kappa_on_one_block_changes_its_heat_filter_in_the_next_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let h = spawn(config(dir.path()), false);
    // Idle until Start: take the first snapshot.
    let first = collect(&h, |e| matches!(e, Event::Snapshot(_)));
    let Some(Event::Snapshot(before)) = first.last() else {
        panic!()
    };
    let heat = |s: &Snapshot, b: usize| s.blocks[b].filters_mean[0].clone();
    let kappa = 0.7;
    h.send(Command::SetCoeff {
        coeff: Coeff::Kappa,
        target: Target::Block(2),
        mode: SetMode::Set(kappa),
    })
    .unwrap();
    let evs = collect(&h, |e| matches!(e, Event::Snapshot(_)));
    let applied = evs
        .iter()
        .find_map(|e| {
            if let Event::Applied(a) = e {
                Some(a.clone())
            } else {
                None
            }
        })
        .expect("Applied event");
    assert_eq!((applied.command.as_str(), applied.target.as_str()), ("kappa", "2"));
    assert!((applied.new - kappa).abs() < 1e-9);
    let Some(Event::Snapshot(after)) = evs.last() else {
        panic!()
    };
    assert!(
        after.blocks[2].coeffs[Coeff::Kappa]
            .iter()
            .all(|k| (f64::from(*k) - kappa).abs() < 1e-5),
        "{:?}",
        after.blocks[2].coeffs[Coeff::Kappa]
    );
    // Every channel now has κ = 0.7: the channel-mean heat gain is exp(−κτΛ) exactly.
    let (gh, gw) = after.grid;
    let lambda = moppa_studio::physics::laplacian_eigenvalues(gh, gw);
    for (g, l) in heat(after, 2).iter().zip(&lambda) {
        assert!((f64::from(*g) - (-kappa * l).exp()).abs() < 1e-5);
    }
    assert_ne!(heat(before, 2), heat(after, 2));
    assert_eq!(heat(before, 1), heat(after, 1), "other blocks unchanged");
    // Scale mode multiplies every channel.
    h.send(Command::SetCoeff {
        coeff: Coeff::Kappa,
        target: Target::All,
        mode: SetMode::Scale(2.0),
    })
    .unwrap();
    let evs = collect(&h, |e| matches!(e, Event::Snapshot(_)));
    let Some(Event::Snapshot(scaled)) = evs.last() else {
        panic!()
    };
    assert!(
        scaled.blocks[2].coeffs[Coeff::Kappa]
            .iter()
            .all(|k| (f64::from(*k) - 1.4).abs() < 1e-4)
    );
    for (a, b) in scaled.blocks[0].coeffs[Coeff::Kappa]
        .iter()
        .zip(&after.blocks[0].coeffs[Coeff::Kappa])
    {
        assert!((a / b - 2.0).abs() < 1e-4);
    }
    // Bad values are refused with a warning, nothing changes.
    h.send(Command::SetCoeff {
        coeff: Coeff::C,
        target: Target::All,
        mode: SetMode::Set(-1.0),
    })
    .unwrap();
    let evs = collect(&h, |e| matches!(e, Event::Warning(_)));
    let Some(Event::Warning(w)) = evs.last() else { panic!() };
    assert_eq!(w.message, "c = -1 is outside its range [1e-8, 1e8]");
    h.send(Command::Stop).unwrap();
    let evs = collect(&h, |e| matches!(e, Event::Finished(_)));
    assert_eq!(finished(&evs).reason, FinishReason::Stopped);
    assert_eq!(finished(&evs).steps, 0);
}

#[test]
fn pause_single_step_resume_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let h = spawn(
        RunConfig {
            steps: Some(10_000),
            ..config(dir.path())
        },
        false,
    );
    collect(&h, |e| matches!(e, Event::Started(_)));
    h.send(Command::Step).unwrap();
    let evs = collect(&h, |e| matches!(e, Event::Paused { .. }));
    assert_eq!(progress_steps(&evs), vec![1], "exactly one step");
    // Paused: nothing happens.
    std::thread::sleep(Duration::from_millis(300));
    assert!(h.events().try_iter().all(|e| !matches!(e, Event::Progress(_))));
    h.send(Command::Resume).unwrap();
    let evs = collect(&h, |e| matches!(e, Event::Progress(p) if p.step >= 5));
    assert!(evs.iter().any(|e| matches!(e, Event::Resumed { .. })));
    h.send(Command::Pause).unwrap();
    let evs = collect(&h, |e| matches!(e, Event::Paused { .. }));
    let Some(Event::Paused { step }) = evs.last() else {
        panic!()
    };
    std::thread::sleep(Duration::from_millis(300));
    let later: Vec<u64> = progress_steps(&h.events().try_iter().collect::<Vec<_>>());
    assert!(
        later.iter().all(|s| s <= step),
        "no step after the pause: {later:?} > {step}"
    );
    h.send(Command::Stop).unwrap();
    let evs = collect(&h, |e| matches!(e, Event::Finished(_)));
    let f = finished(&evs);
    assert_eq!((f.reason, f.steps), (FinishReason::Stopped, *step));
    assert!(
        f.best_val_acc.is_some() && f.test_acc.is_some(),
        "a stop still evaluates"
    );
}

#[test]
fn a_locked_coefficient_does_not_move_while_others_do() {
    let dir = tempfile::tempdir().unwrap();
    let h = spawn(
        RunConfig {
            lr: Some(5e-2),
            ..config(dir.path())
        },
        false,
    );
    let evs = collect(&h, |e| matches!(e, Event::Snapshot(_)));
    let Some(Event::Snapshot(before)) = evs.last() else {
        panic!()
    };
    h.send(Command::Lock {
        what: Lockable::Kappa,
        target: Target::All,
        locked: true,
    })
    .unwrap();
    h.send(Command::Lock {
        what: Lockable::Source,
        target: Target::Block(0),
        locked: true,
    })
    .unwrap();
    h.send(Command::Start).unwrap();
    let evs = collect(&h, |e| matches!(e, Event::Finished(_)));
    let Some(after) = evs
        .iter()
        .rev()
        .find_map(|e| if let Event::Snapshot(s) = e { Some(s) } else { None })
    else {
        panic!()
    };
    assert!(after.step >= 30);
    for b in 0..3 {
        assert_eq!(
            before.blocks[b].coeffs[Coeff::Kappa],
            after.blocks[b].coeffs[Coeff::Kappa],
            "κ of block {b} is locked"
        );
        assert_ne!(
            before.blocks[b].coeffs[Coeff::C],
            after.blocks[b].coeffs[Coeff::C],
            "c of block {b} trains"
        );
        assert!(after.blocks[b].locked.contains(&Lockable::Kappa));
    }
    assert_eq!(
        before.blocks[0].source, after.blocks[0].source,
        "S of block 0 is locked"
    );
    assert_ne!(before.blocks[1].source, after.blocks[1].source, "S of block 1 trains");
}

/// Loss and accuracy of every logged step and evaluation (timings excluded).
fn curve(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            match v["kind"].as_str()? {
                "progress" => Some(format!(
                    "p {} {} {} {}",
                    v["step"], v["loss"], v["train_acc"], v["route_loss"]
                )),
                "eval" => Some(format!("e {} {} {} {}", v["step"], v["split"], v["loss"], v["acc"])),
                _ => None,
            }
        })
        .collect()
}

fn run_to_end(cfg: RunConfig) -> Vec<Event> {
    let h = spawn(cfg, true);
    collect(&h, |e| matches!(e, Event::Finished(_)))
}

#[test]
fn same_seed_same_metrics_and_resume_continues_the_same_curve() {
    let dir = tempfile::tempdir().unwrap();
    let base = RunConfig {
        steps: Some(24),
        eval_every: 8,
        ..config(dir.path())
    };
    let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
    run_to_end(RunConfig {
        out: Some(a.clone()),
        ..base.clone()
    });
    run_to_end(RunConfig {
        out: Some(b.clone()),
        ..base.clone()
    });
    let curve_a = curve(&a);
    assert_eq!(
        curve_a.len(),
        24 + 2 + 2,
        "24 steps, 2 periodic evals, final val + test: {curve_a:?}"
    );
    assert_eq!(curve_a, curve(&b), "same seed, same thread count: identical metrics");
    // Stop after 16 steps (at the eval checkpoint), then resume to 24.
    let h = spawn(
        RunConfig {
            out: Some(c.clone()),
            ..base.clone()
        },
        true,
    );
    collect(&h, |e| matches!(e, Event::Progress(p) if p.step == 16));
    h.send(Command::Pause).unwrap();
    collect(&h, |e| matches!(e, Event::Paused { .. }));
    drop(h); // abandons: no final evaluation; state.safetensors is the one from step 16
    let lines: Vec<String> = curve(&c)
        .into_iter()
        .filter(|l| !l.starts_with("p 17 ") && !l.starts_with("p 18 "))
        .collect();
    assert!(lines.iter().any(|l| l.starts_with("e 16 ")));
    // Keep the log up to the checkpoint, as a crash at that point would have left it.
    let keep: Vec<String> = std::fs::read_to_string(c.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap_or(0)
                <= 16
        })
        .map(str::to_owned)
        .collect();
    std::fs::write(c.join("metrics.jsonl"), keep.join("\n") + "\n").unwrap();
    let mut resumed = moppa_studio::train::evaluate::run_config(&c).unwrap();
    resumed.resume = Some(c.clone());
    let evs = run_to_end(resumed);
    assert_eq!(
        progress_steps(&evs).first(),
        Some(&17),
        "the resumed run continues at step 17"
    );
    assert_eq!(curve(&c), curve_a, "resumed run = uninterrupted run");
}

#[test]
fn a_reader_that_stops_reading_never_blocks_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cfg = RunConfig {
        steps: Some(400),
        out: Some(out.clone()),
        ..config(dir.path())
    };
    let opts = WorkerOptions {
        event_capacity: 8,
        max_snapshots_per_s: 1000.0,
        ..WorkerOptions::default()
    };
    let h = WorkerHandle::spawn(cfg, opts).unwrap();
    // Never read. The engine's own log shows the steps advancing regardless.
    let logged = || {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .map(|s| s.lines().filter(|l| l.contains("\"progress\"")).count())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while logged() < 200 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        logged() >= 200,
        "steps kept advancing with nobody reading ({} logged)",
        logged()
    );
    assert!(h.events().len() <= 8, "the queue stays bounded: {}", h.events().len());
    // What is delivered later is the latest progress, not a backlog of stale ones.
    let evs: Vec<Event> = h.events().try_iter().collect();
    let steps = progress_steps(&evs);
    assert!(steps.len() <= 8);
    h.stop();
    let evs = collect(&h, |e| matches!(e, Event::Finished(_)));
    assert!(
        evs.iter().any(|e| matches!(e, Event::Eval(_))),
        "evaluations are never dropped"
    );
}

fn expect_setup_error(cfg: RunConfig, needle: &str) -> String {
    let evs = run_to_end(cfg);
    assert_eq!(finished(&evs).reason, FinishReason::Failed);
    let msg = evs
        .iter()
        .find_map(|e| if let Event::Error(n) = e { Some(n.clone()) } else { None })
        .expect("an Error event");
    assert!(
        msg.message.contains(needle),
        "'{}' should mention '{needle}'",
        msg.message
    );
    msg.message
}

fn png(path: &Path, v: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_fn(12, 12, |x, y| image::Rgb([v, (x * 20) as u8, (y * 20) as u8]))
        .save(path)
        .unwrap();
}

#[test]
fn bad_data_gives_errors_naming_file_and_line_and_skips_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |data: &Path| RunConfig {
        data: data.display().to_string(),
        steps: Some(2),
        ..config(dir.path())
    };
    // A missing folder.
    expect_setup_error(cfg(&dir.path().join("nowhere")), "nowhere");
    // A folder with no usable image.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("cat")).unwrap();
    std::fs::write(empty.join("cat/notes.txt"), "x").unwrap();
    expect_setup_error(cfg(&empty), "no usable image");
    // VTAB split files: a missing image and an unknown label, by file and line.
    let vtab = dir.path().join("vtab");
    for i in 0..4 {
        png(&vtab.join(format!("img/{i}.png")), 10 * i as u8);
    }
    std::fs::write(vtab.join("train800.txt"), "img/0.png 0\nimg/1.png 1\n").unwrap();
    std::fs::write(vtab.join("train800val200.txt"), "img/0.png 0\n").unwrap();
    std::fs::write(vtab.join("val200.txt"), "img/2.png 1\n\nimg/9.png 0\n").unwrap();
    let msg = expect_setup_error(cfg(&vtab), "img/9.png");
    assert!(msg.contains("val200.txt:3"), "{msg}");
    std::fs::write(vtab.join("val200.txt"), "img/2.png 1\nimg/3.png 5\n").unwrap();
    let msg = expect_setup_error(cfg(&vtab), "unknown label 5");
    assert!(msg.contains("val200.txt:2"), "{msg}");
    // An ImageFolder with a zero-byte file and an undecodable one: skipped, counted, named.
    let folder = dir.path().join("folder");
    for c in ["a", "b"] {
        for i in 0..6 {
            png(
                &folder.join(format!("train/{c}/{i}.png")),
                if c == "a" { 30 } else { 200 },
            );
        }
        png(&folder.join(format!("val/{c}/v.png")), 100);
    }
    std::fs::write(folder.join("train/a/zero.png"), b"").unwrap();
    std::fs::write(folder.join("train/b/broken.png"), b"\x89PNG not really").unwrap();
    let evs = run_to_end(cfg(&folder));
    assert_eq!(finished(&evs).reason, FinishReason::Done);
    let warnings: Vec<String> = evs
        .iter()
        .filter_map(|e| {
            if let Event::Warning(n) = e {
                Some(n.message.clone())
            } else {
                None
            }
        })
        .collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("skipped 1 undecodable") && w.contains("broken.png")),
        "{warnings:?}"
    );
    let zero = evs.iter().any(|e| matches!(e, Event::Warning(n) if n.message.contains("zero bytes") && n.path.as_ref().is_some_and(|p| p.ends_with("zero.png"))));
    assert!(zero, "{warnings:?}");
    // A bad backbone file.
    std::fs::write(dir.path().join("bad.safetensors"), b"junk").unwrap();
    expect_setup_error(
        RunConfig {
            backbone: dir.path().join("bad.safetensors").display().to_string(),
            ..config(dir.path())
        },
        "bad.safetensors",
    );
}

#[test]
fn nan_pauses_with_the_coefficients_and_keeps_the_last_good_state() {
    let dir = tempfile::tempdir().unwrap();
    let h = spawn(
        RunConfig {
            steps: Some(1000),
            ..config(dir.path())
        },
        false,
    );
    collect(&h, |e| matches!(e, Event::Snapshot(_)));
    h.send(Command::Step).unwrap();
    collect(&h, |e| matches!(e, Event::Paused { .. }));
    // The largest learning rate and the sharpest router the ranges allow blow the weights up
    // within a few steps.
    h.send(Command::SetHyper {
        hyper: Hyper::Lr,
        value: 1e3,
    })
    .unwrap();
    h.send(Command::SetHyper {
        hyper: Hyper::Temperature,
        value: 1e-8,
    })
    .unwrap();
    h.send(Command::Resume).unwrap();
    let evs = collect(&h, |e| matches!(e, Event::Diverged(_)));
    let Some(Event::Diverged(err)) = evs.last() else {
        panic!()
    };
    assert!(
        err.message.contains("diverged") && err.message.contains("kappa in ["),
        "{}",
        err.message
    );
    collect(&h, |e| matches!(e, Event::Paused { .. }));
    h.send(Command::Stop).unwrap();
    let evs = collect(&h, |e| matches!(e, Event::Finished(_)));
    assert_eq!(finished(&evs).reason, FinishReason::Diverged);

    // A headless worker (nobody to steer it back) ends the run by itself.
    let mut cfg = RunConfig {
        lr: Some(1e3),
        steps: Some(1000),
        out: None,
        ..config(dir.path())
    };
    cfg.method.temperature = 1e-8;
    let opts = WorkerOptions {
        stop_on_divergence: true,
        ..WorkerOptions::default()
    };
    let h = WorkerHandle::spawn(cfg, opts).unwrap();
    let evs = collect(&h, |e| matches!(e, Event::Finished(_)));
    assert!(evs.iter().any(|e| matches!(e, Event::Diverged(_))));
    assert!(!evs.iter().any(|e| matches!(e, Event::Paused { .. })));
    assert_eq!(finished(&evs).reason, FinishReason::Diverged);
}

#[test]
fn training_on_digits_learns_and_the_checkpoint_reproduces_the_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cfg = RunConfig {
        steps: Some(200),
        lr: Some(2e-3),
        method: MethodConfig::of(MethodKind::Full),
        out: Some(out.clone()),
        eval_every: 50,
        ..config(dir.path())
    };
    let evs = run_to_end(cfg);
    let f = finished(&evs);
    assert_eq!(f.reason, FinishReason::Done);
    let val = f.best_val_acc.unwrap();
    assert!(val > 0.5, "val accuracy {val} should be far above chance (0.1)");
    // Metrics files are valid: every JSONL line parses with kind/step/time_s; CSV has its header.
    let jsonl = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    for line in jsonl.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(
            v["kind"].is_string() && v["step"].is_u64() && v["time_s"].is_number(),
            "{line}"
        );
    }
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().next(), Some(moppa_studio::train::runlog::CSV_HEADER));
    assert_eq!(csv.lines().filter(|l| l.starts_with("progress,")).count(), 200);
    // `moppa eval` on the run folder reproduces the final test accuracy.
    let test_acc = f.test_acc.unwrap();
    let o = common::moppa(&["eval", "--run", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.contains(&format!("test accuracy {test_acc:.4}")),
        "{text} vs {test_acc}"
    );
    assert!(out.join("eval-test.csv").exists());
}

/// The user's own image as the router probe, through the real worker (protocol 2's
/// `SetProbeImage`): the next snapshot carries it, its prediction, and every MoPPA block's
/// per-token router weights over it (H·W·k, rows summing to 1); a probe of the wrong size is
/// refused with a warning naming the size; `SetProbe` returns to the validation image.
#[test]
fn a_probe_image_sent_by_a_display_comes_back_with_every_blocks_token_maps() {
    use moppa_studio::train::probe::probe_rgb;
    use moppa_studio::train::protocol::{ProbeOrigin, Rgb};
    let dir = tempfile::tempdir().unwrap();
    let h = spawn(config(dir.path()), false);
    let info = match collect(&h, |e| matches!(e, Event::Started(_)))
        .into_iter()
        .find_map(|e| if let Event::Started(i) = e { Some(i) } else { None })
    {
        Some(i) => i,
        None => unreachable!("collect returned on Started"),
    };
    let size = info.backbone.img_size;
    // A PNG made here: left half red, right half blue.
    let png = dir.path().join("mine.png");
    image::RgbImage::from_fn(40, 30, |x, _| {
        if x < 20 {
            image::Rgb([220, 20, 20])
        } else {
            image::Rgb([20, 20, 220])
        }
    })
    .save(&png)
    .unwrap();
    let image = probe_rgb(&png, &std::fs::read(&png).unwrap(), &info.backbone).unwrap();
    assert_eq!((image.size, image.pixels.len()), (size, size * size * 3));
    h.send(Command::SetProbeImage {
        name: "mine.png".into(),
        image: image.clone(),
    })
    .unwrap();
    let events = collect(
        &h,
        |e| matches!(e, Event::Snapshot(s) if s.probe.as_ref().is_some_and(|p| matches!(p.origin, ProbeOrigin::File { .. }))),
    );
    let Some(Event::Snapshot(s)) = events.last() else {
        unreachable!("collect stops on it")
    };
    let probe = s.probe.as_ref().unwrap();
    assert_eq!(
        probe.origin,
        ProbeOrigin::File {
            name: "mine.png".into()
        }
    );
    assert_eq!(probe.image, image);
    assert!(s.probe_prediction.is_some_and(|p| (p as usize) < info.classes.len()));
    let (gh, gw) = s.grid;
    let k = s.priors.len();
    assert_eq!(s.blocks.len(), info.blocks);
    for b in &s.blocks {
        assert_eq!(b.probe_alpha.len(), gh * gw * k, "block {}", b.block);
        for row in b.probe_alpha.chunks_exact(k) {
            assert!(
                (row.iter().sum::<f32>() - 1.0).abs() < 1e-4,
                "block {}: {row:?}",
                b.block
            );
        }
    }
    // The two halves of the image route differently somewhere (the map depends on the image).
    let b0 = &s.blocks[0].probe_alpha;
    assert!(
        b0[..k] != b0[b0.len() - k..],
        "left and right tokens get the same weights"
    );

    // Wrong size: refused, named.
    h.send(Command::SetProbeImage {
        name: "tiny.png".into(),
        image: Rgb {
            size: 3,
            pixels: vec![0; 27],
        },
    })
    .unwrap();
    let events = collect(&h, |e| matches!(e, Event::Warning(n) if n.message.contains("tiny.png")));
    let Some(Event::Warning(n)) = events.last() else {
        unreachable!("collect stops on it")
    };
    assert!(n.message.contains(&format!("{size}×{size}")), "{}", n.message);

    // Back to the validation image.
    h.send(Command::SetProbe { index: 1 }).unwrap();
    collect(
        &h,
        |e| matches!(e, Event::Snapshot(s) if s.probe.as_ref().is_some_and(|p| p.origin != ProbeOrigin::File { name: "mine.png".into() })),
    );
    h.send(Command::Stop).unwrap();
}

/// A run opened from its folder is probed through its saved adapter (`AdapterProbe`, on its
/// own thread): the answer carries the image, a prediction and every MoPPA block's H·W·k router
/// weights, and it matches what the live run computes for the same image at the same weights
/// (the final snapshot of a run that ends with the image as its probe).
#[test]
fn a_saved_adapter_answers_probe_images_like_the_live_run() {
    use moppa_studio::train::probe::{AdapterProbe, probe_rgb};
    use moppa_studio::train::protocol::ProbeOrigin;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let cfg = RunConfig {
        steps: Some(6),
        out: Some(run.clone()),
        ..config(dir.path())
    };
    // The live run: paused at start, given the image, then run to its end.
    let h = spawn(cfg, false);
    let info = match collect(&h, |e| matches!(e, Event::Started(_)))
        .into_iter()
        .find_map(|e| if let Event::Started(i) = e { Some(i) } else { None })
    {
        Some(i) => i,
        None => unreachable!("collect returned on Started"),
    };
    let png = dir.path().join("stripes.png");
    image::RgbImage::from_fn(24, 24, |x, y| {
        image::Rgb([(x * 10) as u8, (y * 10) as u8, if x % 4 < 2 { 0 } else { 255 }])
    })
    .save(&png)
    .unwrap();
    let image = probe_rgb(&png, &std::fs::read(&png).unwrap(), &info.backbone).unwrap();
    h.send(Command::SetProbeImage {
        name: "stripes.png".into(),
        image: image.clone(),
    })
    .unwrap();
    h.send(Command::Start).unwrap();
    let events = collect(&h, |e| matches!(e, Event::Finished(_)));
    let live = events
        .iter()
        .rev()
        .find_map(|e| match e {
            Event::Snapshot(s) if s.step == 6 => Some(s.clone()),
            _ => None,
        })
        .expect("a snapshot at the last step");

    let probe = AdapterProbe::spawn(&run, std::sync::Arc::new(|| {}));
    assert!(probe.request("stripes.png".into(), image.clone()));
    let t0 = Instant::now();
    let answer = loop {
        if let Some(a) = probe.try_answer() {
            break a.unwrap();
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no answer");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        answer.probe.as_ref().unwrap().origin,
        ProbeOrigin::File {
            name: "stripes.png".into()
        }
    );
    assert_eq!(answer.probe_prediction, live.probe_prediction);
    assert_eq!(answer.blocks.len(), live.blocks.len());
    for (a, l) in answer.blocks.iter().zip(&live.blocks) {
        assert_eq!(a.block, l.block);
        assert_eq!(a.probe_alpha.len(), l.probe_alpha.len());
        let diff = a
            .probe_alpha
            .iter()
            .zip(&l.probe_alpha)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(
            diff < 1e-5,
            "block {}: saved adapter vs live run differ by {diff}",
            a.block
        );
    }
    // A folder without an adapter says so.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let none = AdapterProbe::spawn(&empty, std::sync::Arc::new(|| {}));
    assert!(none.request("x".into(), image));
    let t0 = Instant::now();
    let err = loop {
        if let Some(a) = none.try_answer() {
            break a.unwrap_err();
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no answer");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(err.contains("adapter.safetensors"), "{err}");
}

/// The curve with every evaluation's confusion counts and misclassified images too.
fn full_curve(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            match v["kind"].as_str()? {
                "progress" => Some(format!(
                    "p {} {} {} {} {}",
                    v["step"], v["loss"], v["train_acc"], v["route_loss"], v["lr"]
                )),
                "eval" => Some(format!(
                    "e {} {} {} {} {} {} {}",
                    v["step"], v["split"], v["loss"], v["acc"], v["per_class_acc"], v["confusion"], v["misclassified"]
                )),
                "finished" => Some(format!("f {} {} {}", v["step"], v["best_val_acc"], v["test_acc"])),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn an_ablation_on_a_live_run_leaves_its_metrics_as_they_would_have_been() {
    let dir = tempfile::tempdir().unwrap();
    let base = RunConfig {
        steps: Some(16),
        eval_every: 8,
        ..config(dir.path())
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    run_to_end(RunConfig {
        out: Some(a.clone()),
        ..base.clone()
    });
    let h = spawn(
        RunConfig {
            out: Some(b.clone()),
            ..base.clone()
        },
        true,
    );
    collect(&h, |e| matches!(e, Event::Progress(p) if p.step >= 3));
    h.send(Command::Ablate { images: 40 }).unwrap();
    let evs = collect(&h, |e| matches!(e, Event::Ablation(_)));
    let Some(Event::Ablation(abl)) = evs.last() else {
        panic!("no ablation: {evs:?}")
    };
    // Every prior × (all, each MoPPA block), on the 40 images asked for.
    let blocks = abl.usage.len();
    assert!(blocks > 0);
    assert_eq!(abl.n, 40);
    assert_eq!(abl.rows.len(), 3 * (1 + blocks));
    assert!(evs.iter().any(
        |e| matches!(e, Event::AblationProgress { done, total } if *done == *total && *total == 1 + abl.rows.len())
    ));
    let evs = collect(&h, |e| matches!(e, Event::Finished(_)));
    assert_eq!(finished(&evs).reason, FinishReason::Done);
    assert_eq!(full_curve(&b), full_curve(&a), "the ablation changed the run's metrics");
    // It is recorded, and reads back as the same ablation.
    let text = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    let line = text.lines().find(|l| l.contains("\"kind\":\"ablation\"")).unwrap();
    let rec: moppa_studio::train::record::Record = serde_json::from_str(line).unwrap();
    assert_eq!(rec.to_event(), Some(Event::Ablation(abl.clone())));
    // The run's final validation evaluation lists its misclassified images and confusion counts.
    let val = text
        .lines()
        .rfind(|l| l.contains("\"kind\":\"eval\"") && l.contains("\"val\""))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(val).unwrap();
    let conf = v["confusion"].as_array().unwrap();
    let total: u64 = conf
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(total, v["n"].as_u64().unwrap());
    let diag: u64 = (0..conf.len()).map(|i| conf[i][i].as_u64().unwrap()).sum();
    assert!((diag as f64 / total as f64 - v["acc"].as_f64().unwrap()).abs() < 1e-9);
    let wrong = v["misclassified"].as_array().unwrap();
    assert!(!wrong.is_empty() && wrong.len() <= 32);
    assert!(
        wrong.windows(2).all(|w| w[0]["prob"].as_f64() >= w[1]["prob"].as_f64()),
        "most confident first"
    );
}
