//! Runs beyond one window: `moppa train --serve` watched and steered through the client the app
//! uses (history first, then live events; refusals that leave the run going), and sweeps planned
//! with `moppa compare --plan`, run by `xargs -P 2` and collected into the table `moppa compare`
//! prints. Real runs on a micro backbone (16 px, D 32, depth 3).

// Tests: unwrap is the assertion; pedantic style lints are for the library.
#![allow(clippy::unwrap_used, clippy::pedantic)]

mod common;

use common::served::{Served, comparable, progress_lines, s, tempdir, train_args, wait_until};

use moppa_studio::config::Coeff;
use moppa_studio::train::protocol::{Command, Event, FinishReason, PROTOCOL_VERSION, SetMode, Target};
use moppa_studio::train::serve::RemoteLink;
use moppa_studio::train::serve::frame::{Hello, read_value, write_frame};
use serde_json::Value;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command as Process;

use std::time::{Duration, Instant};

/// A served run (token `sekrit-0123456789`) that trains until told to stop, and its run folder.
fn served_until_stopped(name: &str) -> (PathBuf, Served) {
    let tmp = tempdir(name);
    let micro = common::micro_backbone(&tmp);
    let dir = tmp.join("run");
    let served = Served::spawn(&train_args(
        &micro,
        &dir,
        1_000_000,
        &["--serve", "127.0.0.1:0", "--token", "sekrit-0123456789"],
    ));
    (dir, served)
}

/// The next event matching `want` (others are passed to `seen`), within a minute.
fn next_event(link: &RemoteLink, seen: &mut Vec<Event>, want: impl Fn(&Event) -> bool) -> Event {
    let t0 = Instant::now();
    loop {
        let left = Duration::from_secs(60).saturating_sub(t0.elapsed());
        let ev = link
            .events()
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no such event; got {} others", seen.len()));
        if want(&ev) {
            return ev;
        }
        seen.push(ev);
    }
}

#[test]
fn a_watched_run_receives_history_then_live_progress_and_trains_as_without_serve() {
    let tmp = tempdir("serve-watch");
    let micro = common::micro_backbone(&tmp);
    let (served_dir, plain_dir) = (tmp.join("served"), tmp.join("plain"));
    let served = Served::spawn(&train_args(
        &micro,
        &served_dir,
        1500,
        &["--serve", "127.0.0.1:0", "--token", "sekrit-0123456789"],
    ));
    // Connect mid-run: the history is on disk by then.
    wait_until("50 steps", || progress_lines(&served_dir) >= 50);
    // The app's waker: called after every event, so the window draws a served run's data at once.
    let wakes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = wakes.clone();
    let waker: moppa_studio::train::worker::Waker = std::sync::Arc::new(move || {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    let link = RemoteLink::connect_waking(&served.addr, Some("sekrit-0123456789"), Some(waker)).unwrap();
    assert!(link.can_control());
    assert!(!link.run_id().is_empty());
    let mut events = Vec::new();
    let finished = next_event(&link, &mut events, |e| matches!(e, Event::Finished(_)));
    // The reader wakes right after handing over each event: at most the last may still be on its way.
    let woken = wakes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        woken + 1 >= events.len() && woken > 0,
        "{woken} wakes for {} events",
        events.len()
    );
    let Event::Finished(f) = finished else { unreachable!() };
    assert_eq!(f.reason, FinishReason::Done);
    assert!(
        matches!(events.first(), Some(Event::Started(_))),
        "the history starts with the run's start"
    );
    let steps: Vec<u64> = events
        .iter()
        .filter_map(|e| if let Event::Progress(p) = e { Some(p.step) } else { None })
        .collect();
    assert_eq!(steps.first(), Some(&1), "history from the first step");
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "no step twice, none backwards");
    assert!(
        *steps.last().unwrap() > 50 && *steps.last().unwrap() <= 1500,
        "live progress after connecting"
    );
    assert!(events.iter().any(|e| matches!(e, Event::Snapshot(_))), "snapshots too");
    let vals = events
        .iter()
        .filter(|e| matches!(e, Event::Eval(r) if r.split == "val"))
        .count();
    assert_eq!(vals, 6, "every evaluation (every 250 of 1500 steps), none twice");
    drop(link);
    let (code, log) = served.wait();
    assert_eq!(code, 0, "{log}");
    // The same run without --serve: identical metrics.
    let o = common::moppa(
        &train_args(&micro, &plain_dir, 1500, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (comparable(&served_dir), comparable(&plain_dir));
    assert_eq!(a.len(), b.len());
    assert!(a == b, "a served run trains exactly as one without --serve");
}

#[test]
fn a_steered_run_applies_set_coeff_and_the_next_snapshot_shows_it() {
    let (dir, served) = served_until_stopped("serve-steer");
    let link = RemoteLink::connect(&served.addr, Some("sekrit-0123456789")).unwrap();
    let mut seen = Vec::new();
    next_event(&link, &mut seen, |e| matches!(e, Event::Snapshot(_)));
    link.send(&Command::SetCoeff {
        coeff: Coeff::Kappa,
        target: Target::All,
        mode: SetMode::Set(0.5),
    })
    .unwrap();
    let Event::Applied(applied) = next_event(&link, &mut seen, |e| matches!(e, Event::Applied(_))) else {
        unreachable!()
    };
    assert_eq!(applied.command, "kappa");
    assert_eq!(applied.target, "all");
    assert!((applied.new - 0.5).abs() < 1e-6, "{applied:?}");
    let Event::Snapshot(snap) = next_event(
        &link,
        &mut seen,
        |e| matches!(e, Event::Snapshot(s) if s.step > applied.step),
    ) else {
        unreachable!()
    };
    // Before: κ spread over [0.01, 1.2] per channel (MoPPA's initialisation). After: 0.5, moved
    // by the optimizer updates since (a step moves softplus(κ_raw) by at most ~lr = 0.01).
    let drift = 0.012 * (snap.step - applied.step) as f64;
    for b in &snap.blocks {
        for k in &b.coeffs.kappa {
            assert!(
                (f64::from(*k) - 0.5).abs() <= drift,
                "block {} κ {k} at step {} after setting 0.5 at step {}",
                b.block,
                snap.step,
                applied.step
            );
        }
    }
    // Values finite in f64 but not in f32 are refused, with the range; the run goes on.
    for (coeff, value, message) in [
        (Coeff::Kappa, 1e39, "kappa = 1e39 is outside its range [1e-8, 1e8]"),
        (Coeff::Eps, 1e-50, "eps = 1e-50 is outside its range [1e-8, 1e8]"),
    ] {
        link.send(&Command::SetCoeff {
            coeff,
            target: Target::All,
            mode: SetMode::Set(value),
        })
        .unwrap();
        let Event::Warning(w) = next_event(&link, &mut seen, |e| matches!(e, Event::Warning(_))) else {
            unreachable!()
        };
        assert_eq!(w.message, message);
    }
    link.send(&Command::Stop).unwrap();
    let Event::Finished(f) = next_event(&link, &mut seen, |e| matches!(e, Event::Finished(_))) else {
        unreachable!()
    };
    assert_eq!(f.reason, FinishReason::Stopped);
    let (code, log) = served.wait();
    assert_eq!(code, 0, "{log}");
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(
        metrics.contains(r#""command":"kappa""#),
        "the change is in metrics.jsonl"
    );
}

/// A handshake of this protocol version with `token`.
fn with_token(token: &str) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        token: Some(token.into()),
        ..Hello::default()
    }
}

/// Reads until the server closes the connection; the refusal it sent first, if any.
fn refusal(stream: &mut TcpStream) -> Option<String> {
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let answer = read_value::<Hello>(stream).ok().and_then(|h| h.error);
    let mut rest = Vec::new();
    // EOF (Ok) or a reset: the server is done with this client.
    let closed = stream.read_to_end(&mut rest);
    assert!(
        closed.is_ok()
            || closed
                .as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "the server kept the connection open: {closed:?}"
    );
    answer
}

#[test]
fn bad_clients_are_refused_or_dropped_while_the_run_goes_on() {
    let (dir, served) = served_until_stopped("serve-refuse");
    let addr = served.addr.clone();
    let good = RemoteLink::connect(&addr, Some("sekrit-0123456789")).unwrap();
    // A wrong token, and none on a run that is not public.
    let e = RemoteLink::connect(&addr, Some("guess")).err().unwrap();
    assert!(e.contains("wrong token"), "{e}");
    let e = RemoteLink::connect(&addr, None).err().unwrap();
    assert!(e.contains("not public"), "{e}");
    // Another protocol version: a clear message, not garbage.
    let mut c = TcpStream::connect(&addr).unwrap();
    write_frame(
        &mut c,
        &Hello {
            protocol: PROTOCOL_VERSION + 1,
            token: Some("sekrit-0123456789".into()),
            ..Hello::default()
        },
    )
    .unwrap();
    let why = refusal(&mut c).unwrap();
    assert!(why.contains(&format!("protocol {PROTOCOL_VERSION}")), "{why}");
    // Random bytes.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let noise: Vec<u8> = (0..512)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let mut c = TcpStream::connect(&addr).unwrap();
    c.write_all(&noise).unwrap();
    assert!(refusal(&mut c).is_some_and(|w| w.contains("handshake")));
    // A handshake over 64 KiB: refused before anything is allocated.
    let mut c = TcpStream::connect(&addr).unwrap();
    c.write_all(&0x7fff_ffffu32.to_be_bytes()).unwrap();
    let why = refusal(&mut c).unwrap();
    assert!(why.contains("64 KiB"), "{why}");
    // A good handshake, then a frame that is not a command: dropped with a notice.
    let mut c = TcpStream::connect(&addr).unwrap();
    write_frame(&mut c, &with_token("sekrit-0123456789")).unwrap();
    c.write_all(&8u32.to_be_bytes()).unwrap();
    c.write_all(b"not json").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut frames = Vec::new();
    while let Ok(ev) = read_value::<Value>(&mut c) {
        frames.push(ev.to_string());
    }
    assert!(
        frames
            .iter()
            .any(|f| f.contains("dropped: a frame that is not a command")),
        "the client is told why it was dropped: {:?}\n{}",
        &frames[frames.len().saturating_sub(3)..],
        served.log()
    );
    // A client that stops reading (handshake sent, nothing read ever after).
    let mut stalled = TcpStream::connect(&addr).unwrap();
    write_frame(&mut stalled, &with_token("sekrit-0123456789")).unwrap();
    // The run goes on: the good client still receives live progress, hundreds of steps on.
    let before = progress_lines(&dir);
    let mut seen = Vec::new();
    let target = before as u64 + 300;
    next_event(
        &good,
        &mut seen,
        |e| matches!(e, Event::Progress(p) if p.step >= target),
    );
    good.send(&Command::Stop).unwrap();
    next_event(
        &good,
        &mut seen,
        |e| matches!(e, Event::Finished(f) if f.reason == FinishReason::Stopped),
    );
    drop(stalled);
    let (code, log) = served.wait();
    assert_eq!(code, 0, "{log}");
    // The operator sees each refusal.
    assert!(
        log.contains("wrong token") && log.contains("expected a handshake") && log.contains("not a command"),
        "{log}"
    );
}

#[test]
fn serve_needs_out_and_a_free_address() {
    let tmp = tempdir("serve-usage");
    let micro = common::micro_backbone(&tmp);
    let o = common::moppa(&[
        "train",
        "--backbone",
        &s(&micro),
        "--steps",
        "5",
        "--serve",
        "127.0.0.1:0",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--serve needs --out"));
    // The address is taken: exit 1 naming it, before training.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let args = train_args(&micro, &tmp.join("run"), 5, &["--serve", &addr]);
    let o = common::moppa(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&format!("--serve {addr}")), "{err}");
    assert!(progress_lines(&tmp.join("run")) == 0, "nothing trained");
}

// ---- Sweeps ----

/// The markdown table's rows without the steps/s column (timings differ between runs).
fn table_rows(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| method"))
        .map(|l| l.split('|').take(6).collect::<Vec<_>>().join("|"))
        .collect()
}

#[test]
fn a_planned_sweep_run_by_xargs_collects_the_table_compare_prints() {
    let tmp = tempdir("sweep");
    let micro = common::micro_backbone(&tmp);
    let flags = [
        "--methods",
        "moppa,lora",
        "--seeds",
        "2",
        "--backbone",
        &s(&micro),
        "--steps",
        "30",
        "--eval-every",
        "15",
        "--batch",
        "16",
        "--threads",
        "1",
    ];
    let plan = tmp.join("plan");
    let mut args = vec!["compare", "--plan", plan.to_str().unwrap()];
    args.extend(flags);
    let o = common::moppa(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let jobs = std::fs::read_to_string(plan.join("jobs.txt")).unwrap();
    assert_eq!(jobs.lines().count(), 4);
    for (m, seed) in [("moppa", 0), ("moppa", 1), ("lora", 0), ("lora", 1)] {
        let cfg = std::fs::read_to_string(plan.join(format!("runs/{m}-seed{seed}/config.toml"))).unwrap();
        assert!(
            cfg.contains(&format!("method = \"{m}\"")) && cfg.contains(&format!("seed = {seed}")),
            "{cfg}"
        );
        assert!(
            jobs.contains(&format!("runs/{m}-seed{seed}/config.toml --out ")),
            "{jobs}"
        );
    }
    assert!(
        jobs.lines()
            .all(|l| l.starts_with("moppa train --config ") && l.ends_with(" --auto-resume"))
    );
    // Run the jobs two at a time, as a user with GNU xargs would.
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_moppa")).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let o = Process::new("sh")
        .arg("-c")
        .arg("xargs -P 2 -d '\\n' -I{} sh -c {} < jobs.txt")
        .current_dir(&plan)
        .env("PATH", &path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The Slurm script: valid bash; its body runs one job line (done already: it returns at once).
    let slurm = plan.join("slurm.sh");
    assert!(Process::new("bash").arg("-n").arg(&slurm).status().unwrap().success());
    let o = Process::new("bash")
        .arg(&slurm)
        .env("PATH", &path)
        .env("SLURM_ARRAY_TASK_ID", "3")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("lora-seed1: this run has ended (done)"));
    let o = Process::new("bash")
        .arg(&slurm)
        .env("SLURM_ARRAY_TASK_ID", "4")
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no job 4"));
    // Collect, and compare the same flags in one process.
    let collected = common::moppa(&["compare", "--collect", plan.to_str().unwrap()]);
    assert!(
        collected.status.success(),
        "{}",
        String::from_utf8_lossy(&collected.stderr)
    );
    let cmp_out = tmp.join("cmp");
    let mut args = vec!["compare", "--out", cmp_out.to_str().unwrap()];
    args.extend(flags);
    let direct = common::moppa(&args);
    assert!(direct.status.success(), "{}", String::from_utf8_lossy(&direct.stderr));
    let (a, b) = (
        String::from_utf8_lossy(&collected.stdout).into_owned(),
        String::from_utf8_lossy(&direct.stdout).into_owned(),
    );
    assert_eq!(table_rows(&a).len(), 2, "{a}");
    assert_eq!(table_rows(&a), table_rows(&b), "collected:\n{a}\ncompare:\n{b}");
    assert_eq!(a.lines().last(), b.lines().last(), "the same footer");
    // A run that is missing is listed, not silently dropped.
    std::fs::remove_dir_all(plan.join("runs/lora-seed1")).unwrap();
    let o = common::moppa(&["compare", "--collect", plan.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("Not in the table (1 of 4 runs)") && out.contains("lora-seed1"),
        "{out}"
    );
    // A plan is not overwritten.
    let mut args = vec!["compare", "--plan", plan.to_str().unwrap()];
    args.extend(flags);
    assert_eq!(common::moppa(&args).status.code(), Some(2));
}

#[test]
fn view_refuses_folders_without_runs() {
    let tmp = tempdir("view-usage");
    let o = common::moppa(&["view", tmp.join("nope").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope: no such folder"));
    let o = common::moppa(&["view", tmp.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no run folder below it"));
}

// ---- Following a folder another process writes ----

#[test]
fn a_followed_folder_shows_each_new_record_copes_with_half_lines_and_says_how_it_ended() {
    use moppa_studio::train::replay::{Liveness, RunFolderReader};
    let tmp = tempdir("follow");
    let micro = common::micro_backbone(&tmp);
    let done = tmp.join("done");
    let o = common::moppa(
        &train_args(&micro, &done, 40, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Replay the finished run into another folder, record by record, as a writer would.
    let dir = tmp.join("growing");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(done.join("config.toml"), dir.join("config.toml")).unwrap();
    let metrics = std::fs::read_to_string(done.join("metrics.jsonl")).unwrap();
    let lines: Vec<&str> = metrics.lines().collect();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("metrics.jsonl"))
        .unwrap();
    file.write_all(format!("{}\n", lines[0]).as_bytes()).unwrap();
    let mut reader = RunFolderReader::open(&dir).unwrap();
    assert!(matches!(reader.poll().first(), Some(Event::Started(_))));
    assert_eq!(reader.liveness(), Liveness::Running);
    let mut progress = 0;
    for line in &lines[1..] {
        // Half a record first: nothing until the rest of the line is there.
        let (a, b) = line.split_at(line.len() / 2);
        file.write_all(a.as_bytes()).unwrap();
        file.flush().unwrap();
        let none = reader.poll();
        assert!(
            none.iter().all(|e| matches!(e, Event::Warning(_))),
            "a half line is held back: {none:?}"
        );
        file.write_all(format!("{b}\n").as_bytes()).unwrap();
        file.flush().unwrap();
        let evs = reader.poll();
        let kind = serde_json::from_str::<Value>(line).unwrap()["kind"]
            .as_str()
            .unwrap()
            .to_owned();
        match kind.as_str() {
            "progress" => {
                progress += 1;
                assert!(
                    matches!(evs.as_slice(), [Event::Progress(p)] if p.step == progress),
                    "{evs:?}"
                );
            }
            "eval" => assert!(matches!(evs.as_slice(), [Event::Eval(_)]), "{evs:?}"),
            "finished" => assert!(matches!(evs.as_slice(), [Event::Finished(_)]), "{evs:?}"),
            _ => {}
        }
    }
    assert_eq!(progress, 40);
    assert_eq!(reader.liveness(), Liveness::Finished(FinishReason::Done));
    // A run that stopped writing without an end record: crashed after 30 s of silence.
    let crashed = tmp.join("crashed");
    std::fs::create_dir_all(&crashed).unwrap();
    std::fs::write(crashed.join("metrics.jsonl"), lines[..10].join("\n") + "\n").unwrap();
    let reader = RunFolderReader::open(&crashed).unwrap();
    assert_eq!(reader.liveness(), Liveness::Running, "recent: still running");
    let old = std::time::SystemTime::now() - Duration::from_secs(45);
    std::fs::File::options()
        .append(true)
        .open(crashed.join("metrics.jsonl"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    assert_eq!(reader.liveness(), Liveness::Crashed);
    // A resumed run: its second start is counted.
    let o = common::moppa(&["train", "--resume", done.to_str().unwrap(), "--steps", "50"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut reader = RunFolderReader::open(&done).unwrap();
    let evs = reader.poll();
    assert_eq!(reader.starts(), 2);
    let last = evs
        .iter()
        .rev()
        .find_map(|e| if let Event::Progress(p) = e { Some(p.step) } else { None });
    assert_eq!(last, Some(50));
}
