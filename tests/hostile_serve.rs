//! A served run against hostile peers (INTERFACES.md "Remote runs", limits): raw clients that
//! announce 16 MiB and send nothing, trickle bytes, crowd the listener, guess tokens, send values
//! that are valid in f64 but not in f32, name a probe with a megabyte, or stop reading. Each case
//! failed on the binary before the limits (issue "No byte from outside can hurt a run", items 1,
//! 2, 6, 7, 10, 11); the run must go on, train exactly as without the attack, and keep its memory.
#![allow(clippy::unwrap_used, clippy::pedantic)]

mod common;

use common::served::{Served, comparable, progress_lines, s, tempdir, train_args, wait_until};
use moppa_studio::config::Coeff;
use moppa_studio::train::protocol::{
    Command, Event, FinishReason, Hyper, PROTOCOL_VERSION, ProbeOrigin, Rgb, SetMode, Target,
};
use moppa_studio::train::serve::RemoteLink;
use moppa_studio::train::serve::frame::{Hello, read_value, write_frame};
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const TOKEN: &str = "hostile-token-0123456789";

fn serve_args() -> [&'static str; 4] {
    ["--serve", "127.0.0.1:0", "--token", TOKEN]
}

/// The resident memory of process `pid`, in MB.
fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Whether the server closed `c` (end of stream or a reset) within `within`, and any handshake
/// refusal it sent first.
fn closed_within(c: &mut TcpStream, within: Duration) -> (bool, Option<String>) {
    c.set_read_timeout(Some(within)).unwrap();
    let mut why = None;
    loop {
        match read_value::<Hello>(c) {
            Ok(h) => why = h.error.or(why),
            Err(e) => {
                let text = e.to_string();
                let timed_out =
                    text.contains("timed out") || text.contains("would block") || text.contains("Resource temporarily");
                return (!timed_out, why);
            }
        }
    }
}

/// A handshake with `token`, and the server's answer.
fn shake(addr: &str, token: &str) -> (TcpStream, Hello) {
    let mut c = TcpStream::connect(addr).unwrap();
    write_frame(
        &mut c,
        &Hello {
            protocol: PROTOCOL_VERSION,
            token: Some(token.into()),
            ..Hello::default()
        },
    )
    .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let h: Hello = read_value(&mut c).unwrap();
    (c, h)
}

/// Item 1: 500 connections that announce a 16 MiB handshake and send nothing, then 500 that send
/// one byte and stall, cost the served run no memory worth the name (≤ 64 MB over its quiet
/// level; before: 2.77 GB) and change none of its metrics.
#[test]
fn a_flood_before_the_handshake_costs_no_memory_and_changes_no_metric() {
    let tmp = tempdir("hostile-flood");
    let micro = common::micro_backbone(&tmp);
    let (attacked, plain) = (tmp.join("attacked"), tmp.join("plain"));
    let served = Served::spawn(&train_args(&micro, &attacked, 500, &serve_args()));
    wait_until("20 steps", || progress_lines(&attacked) >= 20);
    let pid = served.child.id();
    let quiet = rss_mb(pid);
    let mut peak = quiet;
    let mut held = Vec::new();
    for i in 0..1000 {
        let Ok(mut c) = TcpStream::connect(&served.addr) else {
            continue;
        };
        if i < 500 {
            c.write_all(&(16u32 << 20).to_be_bytes()).ok();
        } else {
            c.write_all(&[0]).ok();
        }
        held.push(c);
        if i % 50 == 0 {
            peak = peak.max(rss_mb(pid));
        }
    }
    for _ in 0..20 {
        peak = peak.max(rss_mb(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(held);
    let (code, log) = served.wait();
    assert_eq!(code, 0, "{log}");
    assert!(
        peak - quiet <= 64.0,
        "resident memory went from {quiet:.0} MB to {peak:.0} MB under the flood"
    );
    assert!(
        log.contains("closed") && log.contains("at once"),
        "the operator hears of it: {log}"
    );
    let o = common::moppa(
        &train_args(&micro, &plain, 500, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (comparable(&attacked), comparable(&plain));
    assert!(
        !a.is_empty() && a == b,
        "the attacked run trains exactly as one without --serve"
    );
    println!("rss quiet {quiet:.1} MB, peak under 1000 connections {peak:.1} MB");
}

/// Items 1 and 10: one deadline for the whole handshake (a byte every half second does not keep
/// a connection), at most N waiting for a handshake and M in all (more are closed at once), and
/// a handshake over 64 KiB refused before it is read.
#[test]
fn the_handshake_has_one_deadline_and_connections_are_bounded() {
    let tmp = tempdir("hostile-limits");
    let micro = common::micro_backbone(&tmp);
    let dir = tmp.join("run");
    let served = Served::spawn_with(
        &train_args(&micro, &dir, 1_000_000, &serve_args()),
        &[
            ("MOPPA_SERVE_HANDSHAKE_S", "2"),
            ("MOPPA_SERVE_MAX_PENDING", "4"),
            ("MOPPA_SERVE_MAX_CONNECTIONS", "6"),
        ],
    );
    let addr = served.addr.clone();
    // A trickle: one byte every 0.4 s, within the old per-read timeout, is cut at the deadline
    // (answered, or closed: either ends it).
    let mut trickle = TcpStream::connect(&addr).unwrap();
    let t0 = Instant::now();
    let mut cut = None;
    for b in 4000u32.to_be_bytes().into_iter().chain([b' '; 20]) {
        if trickle.write_all(&[b]).is_err() {
            cut = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(400));
        let mut probe = [0u8; 1];
        trickle.set_nonblocking(true).unwrap();
        let r = trickle.peek(&mut probe);
        trickle.set_nonblocking(false).unwrap();
        if r.is_ok() {
            cut = Some(t0.elapsed());
            break;
        }
    }
    let cut = cut.expect("a trickling handshake was never cut");
    assert!(cut < Duration::from_secs(6), "cut after {cut:?}");
    let (closed, why) = closed_within(&mut trickle, Duration::from_secs(5));
    assert!(closed, "the trickle is closed");
    assert!(why.is_some_and(|w| w.contains("in time")), "and told why");
    // Four idle connections fill the handshake slots: the fifth is closed at once.
    let mut idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut fifth = TcpStream::connect(&addr).unwrap();
    let (closed, why) = closed_within(&mut fifth, Duration::from_millis(1500));
    assert!(
        closed && why.is_none(),
        "the fifth waiting connection is closed at once, unanswered"
    );
    // The idle ones are answered at the deadline, and the slots free again.
    for c in &mut idle {
        let (closed, why) = closed_within(c, Duration::from_secs(5));
        assert!(closed && why.is_some_and(|w| w.contains("in time")));
    }
    // Six in all: six clients watch and steer, a seventh is closed at once.
    std::thread::sleep(Duration::from_millis(300));
    let links: Vec<RemoteLink> = (0..6)
        .map(|_| RemoteLink::connect(&addr, Some(TOKEN)).unwrap())
        .collect();
    let mut seventh = TcpStream::connect(&addr).unwrap();
    let (closed, _) = closed_within(&mut seventh, Duration::from_millis(1500));
    assert!(closed, "the seventh connection is closed at once");
    // A handshake announced over 64 KiB is refused without waiting for its bytes.
    drop(links);
    std::thread::sleep(Duration::from_millis(300));
    let mut big = TcpStream::connect(&addr).unwrap();
    big.write_all(&((64u32 << 10) + 1).to_be_bytes()).unwrap();
    let (closed, why) = closed_within(&mut big, Duration::from_secs(1));
    assert!(
        closed && why.as_deref().is_some_and(|w| w.contains("64 KiB")),
        "{why:?}"
    );
    let ok = RemoteLink::connect(&addr, Some(TOKEN)).unwrap();
    ok.send(&Command::Stop).unwrap();
    let (code, log) = served.wait();
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("at once (limits: 4 waiting for a handshake, 6 in all)"),
        "{log}"
    );
}

/// Item 10: after 5 wrong tokens from one address, its refusals wait 2 s, each logged once per
/// burst with a count (a burst ends after 5 s without one); the right token from the same address is never delayed. Tokens shorter
/// than 16 characters are refused at start (exit 2); item 11: a non-loopback address warns.
#[test]
fn wrong_tokens_slow_their_peer_but_never_the_right_token() {
    let tmp = tempdir("hostile-tokens");
    let micro = common::micro_backbone(&tmp);
    let dir = tmp.join("run");
    let served = Served::spawn(&train_args(&micro, &dir, 1_000_000, &serve_args()));
    let addr = served.addr.clone();
    let mut times = Vec::new();
    for i in 0..8 {
        let t0 = Instant::now();
        let (_, h) = shake(&addr, &format!("wrong-guess-number-{i}"));
        times.push(t0.elapsed());
        assert!(h.error.is_some_and(|e| e.contains("wrong token")));
    }
    assert!(times[..5].iter().all(|t| *t < Duration::from_secs(1)), "{times:?}");
    assert!(
        times[6..].iter().all(|t| *t >= Duration::from_millis(1500)),
        "{times:?}"
    );
    // Locked out, the same address with the right token is answered at once.
    let t0 = Instant::now();
    let (_, h) = shake(&addr, TOKEN);
    assert!(h.control == Some(true) && h.error.is_none());
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "the right token waited {:?}",
        t0.elapsed()
    );
    // The burst is over after 5 s without a refusal: its count is logged.
    std::thread::sleep(Duration::from_millis(6500));
    let link = RemoteLink::connect(&addr, Some(TOKEN)).unwrap();
    link.send(&Command::Stop).unwrap();
    let (code, log) = served.wait();
    assert_eq!(code, 0, "{log}");
    assert_eq!(
        log.matches("wrong token").count(),
        1,
        "one line per burst: {}",
        log.lines()
            .filter(|l| l.contains("serve"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(log.contains("7 more refusal(s) of 127.0.0.1"), "{log}");

    // Short tokens: refused before anything starts.
    for (args, env) in [
        (vec!["--token", "a"], None),
        (vec!["--token", "fifteen-chars!!"], None),
        (vec![], Some("short")),
    ] {
        let out = tmp.join("short");
        let mut a = train_args(&micro, &out, 2, &["--serve", "127.0.0.1:0"]);
        a.extend(args.iter().map(|s| (*s).to_owned()));
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_moppa"));
        c.args(&a);
        match env {
            Some(t) => c.env("MOPPA_SERVE_TOKEN", t),
            None => c.env_remove("MOPPA_SERVE_TOKEN"),
        };
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().filter(|l| l.starts_with("error:")).count(), 1, "{err}");
        assert!(err.contains("at least 16 characters"), "{err}");
        assert!(!out.join("metrics.jsonl").exists(), "nothing started");
    }
    // Beyond loopback: one warning line.
    let served = Served::spawn(&train_args(
        &micro,
        &tmp.join("public"),
        1_000_000,
        &["--serve", "0.0.0.0:0", "--token", TOKEN],
    ));
    let port = served.addr.rsplit(':').next().unwrap().to_owned();
    let link = RemoteLink::connect(&format!("127.0.0.1:{port}"), Some(TOKEN)).unwrap();
    link.send(&Command::Stop).unwrap();
    let (code, log) = served.wait();
    assert_eq!(code, 0, "{log}");
    assert_eq!(log.matches("listens beyond this machine").count(), 1, "{log}");
}

/// A command as JSON with its one number spelled `number` (values JSON cannot hold a float of).
fn with_number(cmd: &Command, number: &str) -> Vec<u8> {
    let text = serde_json::to_string(cmd).unwrap();
    assert!(text.contains("12345.5"), "{text}");
    text.replace("12345.5", number).into_bytes()
}

fn send_raw(c: &mut TcpStream, body: &[u8]) {
    c.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
    c.write_all(body).unwrap();
}

/// The next answer to a command on `c`: an applied change or a refusal (progress, snapshots and
/// the history's own notices skipped).
fn answer(c: &mut TcpStream) -> Event {
    loop {
        let ev: Event = read_value(c).unwrap();
        match &ev {
            Event::Applied(_) => return ev,
            Event::Warning(n) if n.message.contains("outside its range") || n.message.contains("must be") => {
                return ev;
            }
            _ => {}
        }
    }
}

/// Item 2: every value a remote client sends is checked in f32 against its range (1e39 is
/// infinite in f32, 1e-50 and subnormals are zero), bounds included, malformed numbers drop the
/// client; the run goes on and its checkpoint pair stays finite. Item 6: a probe image's name
/// from outside is cut to 256 bytes without control characters.
#[test]
fn hostile_values_and_names_are_refused_or_bounded() {
    let tmp = tempdir("hostile-values");
    let micro = common::micro_backbone(&tmp);
    let dir = tmp.join("run");
    let served = Served::spawn(&train_args(&micro, &dir, 1_000_000, &serve_args()));
    let (mut c, h) = shake(&served.addr, TOKEN);
    assert_eq!(h.control, Some(true));
    let coeff = |coeff: Coeff, mode: SetMode| Command::SetCoeff {
        coeff,
        target: Target::All,
        mode,
    };
    let hyper = |hyper: Hyper| Command::SetHyper { hyper, value: 12345.5 };
    let set = SetMode::Set(12345.5);
    let scale = SetMode::Scale(12345.5);
    // (command, number, accepted)
    let cases: Vec<(Command, &str, bool)> = vec![
        (coeff(Coeff::Kappa, set), "1e39", false),
        (coeff(Coeff::Kappa, set), "1e-50", false),
        (coeff(Coeff::Eps, set), "1e-50", false),
        (coeff(Coeff::Eps, set), "1e-310", false),
        (coeff(Coeff::C, set), "-1", false),
        (coeff(Coeff::C, set), "0", false),
        (coeff(Coeff::Kappa, set), "100000001", false),
        (coeff(Coeff::Eps, set), "9.9e-9", false),
        (coeff(Coeff::Kappa, scale), "1e30", false),
        (coeff(Coeff::Kappa, scale), "0", false),
        (coeff(Coeff::Kappa, scale), "1e-320", false),
        (hyper(Hyper::Tau), "1e300", false),
        (hyper(Hyper::Tau), "1e-50", false),
        (hyper(Hyper::Temperature), "1e39", false),
        (hyper(Hyper::Gamma), "-1e-3", false),
        (hyper(Hyper::RouteWeight), "10001", false),
        (hyper(Hyper::Lr), "0", false),
        (hyper(Hyper::Lr), "1001", false),
        (coeff(Coeff::Kappa, set), "1e8", true),
        (coeff(Coeff::Eps, set), "1e-8", true),
        (hyper(Hyper::Tau), "1e-8", true),
        (hyper(Hyper::Gamma), "0", true),
        (hyper(Hyper::RouteWeight), "1e4", true),
        (coeff(Coeff::Kappa, set), "0.5", true),
        (coeff(Coeff::Eps, set), "0.1", true),
        (hyper(Hyper::Tau), "1", true),
        (hyper(Hyper::RouteWeight), "0.01", true),
    ];
    // Paused: values at the bounds are applied, but no step trains with them.
    write_frame(&mut c, &Command::Pause).unwrap();
    for (cmd, number, accepted) in &cases {
        send_raw(&mut c, &with_number(cmd, number));
        match answer(&mut c) {
            Event::Applied(a) => assert!(*accepted, "{number} was applied: {a:?}"),
            Event::Warning(n) => assert!(!accepted, "{number} was refused: {}", n.message),
            _ => unreachable!(),
        }
    }
    write_frame(&mut c, &Command::Resume).unwrap();
    // A probe image with a 1 MiB name full of control characters.
    let name = format!("{}\n\u{1b}[31m{}", "x".repeat(1 << 20), "\u{7}");
    write_frame(
        &mut c,
        &Command::SetProbeImage {
            name,
            image: Rgb {
                size: 16,
                pixels: vec![128; 16 * 16 * 3],
            },
        },
    )
    .unwrap();
    let probe_name = loop {
        let ev: Event = read_value(&mut c).unwrap();
        if let Event::Snapshot(s) = ev
            && let Some(p) = &s.probe
            && let ProbeOrigin::File { name } = &p.origin
        {
            break name.clone();
        }
    };
    assert!(probe_name.len() <= 256, "{} bytes", probe_name.len());
    assert!(!probe_name.chars().any(char::is_control), "{probe_name:?}");
    // Numbers JSON cannot carry as f64: that client is dropped, the run goes on.
    for bad in ["NaN", "Infinity", "1e400", "\"inf\""] {
        let (mut d, _) = shake(&served.addr, TOKEN);
        send_raw(&mut d, &with_number(&coeff(Coeff::Kappa, set), bad));
        let mut dropped = false;
        while let Ok(ev) = read_value::<Event>(&mut d) {
            if let Event::Warning(n) = ev {
                dropped |= n.message.contains("dropped: a frame that is not a command");
            }
        }
        assert!(dropped, "{bad}");
    }
    write_frame(&mut c, &Command::Stop).unwrap();
    loop {
        if let Event::Finished(f) = read_value::<Event>(&mut c).unwrap() {
            assert_eq!(f.reason, FinishReason::Stopped);
            break;
        }
    }
    let (code, log) = served.wait();
    assert_eq!(code, 0, "{log}");
    // The pair written at the end is finite, and no record line carries the long name.
    let eval = common::moppa(&["eval", "--run", &s(&dir)]);
    let text = String::from_utf8_lossy(&eval.stdout).to_string() + &String::from_utf8_lossy(&eval.stderr);
    assert!(eval.status.success() && !text.contains("NaN"), "{text}");
    let longest = std::fs::read_to_string(dir.join("snapshots.jsonl"))
        .unwrap()
        .lines()
        .map(str::len)
        .max()
        .unwrap();
    assert!(longest < 256 << 10, "a snapshot line of {longest} bytes");
}

/// Item 7: a client that asks for the run's files thousands of times and never reads is dropped
/// once its queue passes its bound in bytes (here 1 MiB), with a last message and a `serve:` line.
#[test]
fn a_client_that_does_not_read_is_dropped_with_a_message() {
    let tmp = tempdir("hostile-queue");
    let micro = common::micro_backbone(&tmp);
    let dir = tmp.join("run");
    let served = Served::spawn_with(
        &train_args(&micro, &dir, 1_000_000, &serve_args()),
        &[("MOPPA_SERVE_QUEUE_MIB", "1")],
    );
    wait_until("a checkpoint", || dir.join("adapter.safetensors").exists());
    let (mut c, _) = shake(&served.addr, TOKEN);
    for _ in 0..3000 {
        if write_frame(&mut c, &Command::FetchRunFiles).is_err() {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut last = None;
    let mut files = 0;
    while let Ok(ev) = read_value::<Event>(&mut c) {
        match ev {
            Event::RunFile { .. } => files += 1,
            Event::Warning(n) => last = Some(n.message),
            _ => {}
        }
    }
    let last = last.unwrap_or_default();
    assert!(
        last.contains("dropped: more than 1 MiB"),
        "{last} (after {files} files)"
    );
    let link = RemoteLink::connect(&served.addr, Some(TOKEN)).unwrap();
    link.send(&Command::Stop).unwrap();
    let (code, log) = served.wait();
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("serve: dropped") && log.contains("more than 1 MiB queued"),
        "{log}"
    );
}

/// Item 7: four viewers receiving the history of a run with a large `snapshots.jsonl` at once
/// cost the server little memory: the history is streamed from the files, never read whole.
#[test]
fn four_viewers_of_a_long_history_cost_little_memory() {
    let tmp = tempdir("hostile-history");
    let micro = common::micro_backbone(&tmp);
    let dir = tmp.join("run");
    let o = common::moppa(
        &train_args(&micro, &dir, 20, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Grow snapshots.jsonl to about 48 MB (MOPPA_TEST_HISTORY_MB: the note's 200) with copies of
    // its snapshot records.
    let mb: usize = std::env::var("MOPPA_TEST_HISTORY_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    let text = std::fs::read_to_string(dir.join("snapshots.jsonl")).unwrap();
    let snaps: Vec<&str> = text.lines().filter(|l| l.contains("\"snapshot\"")).collect();
    assert!(!snaps.is_empty());
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("snapshots.jsonl"))
        .unwrap();
    let mut written = 0usize;
    while written < mb << 20 {
        for l in &snaps {
            f.write_all(l.as_bytes()).unwrap();
            f.write_all(b"\n").unwrap();
            written += l.len() + 1;
        }
    }
    drop(f);
    let mut args = train_args(&micro, &dir, 1_000_000, &serve_args());
    let at = args.iter().position(|a| a == "--out").unwrap();
    args[at] = "--resume".into();
    let served = Served::spawn(&args);
    std::thread::sleep(Duration::from_millis(500));
    let pid = served.child.id();
    let quiet = rss_mb(pid);
    let viewers: Vec<_> = (0..4)
        .map(|_| {
            let addr = served.addr.clone();
            std::thread::spawn(move || {
                let (mut c, h) = shake(&addr, TOKEN);
                assert_eq!(h.control, Some(true));
                let mut n = 0usize;
                let mut buf = vec![0u8; 1 << 16];
                // Read slowly at first, so that the four histories overlap.
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(4) {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k,
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                n
            })
        })
        .collect();
    let mut peak = quiet;
    while !viewers.iter().all(|v| v.is_finished()) {
        peak = peak.max(rss_mb(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    let bytes: usize = viewers.into_iter().map(|v| v.join().unwrap()).sum();
    assert!(bytes > 4 << 20, "the viewers received {bytes} bytes of history");
    let link = RemoteLink::connect(&served.addr, Some(TOKEN)).unwrap();
    link.send(&Command::Stop).unwrap();
    let (code, log) = served.wait();
    assert_eq!(code, 0, "{log}");
    assert!(
        peak - quiet <= 64.0,
        "four viewers of a {} MB history took the server from {quiet:.0} MB to {peak:.0} MB",
        written >> 20
    );
    println!("rss quiet {quiet:.1} MB, peak with four viewers {peak:.1} MB");
}
