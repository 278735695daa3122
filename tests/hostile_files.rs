//! Run folders and data specs written to hurt their readers (INTERFACES.md "Bounds on what run
//! files and plans may ask for"): snapshot headers and records with hostile shapes, `started` and
//! `eval` records past the bound on classes, a followed file replaced or rewritten under its
//! reader, unreadable and oversized lines, a data spec of `/`, and `view --screenshot` on a
//! folder whose run never starts. Each is refused or reread with a notice naming the file and
//! the bound; none panics, allocates what it asks or waits forever.
#![allow(clippy::unwrap_used, clippy::pedantic)]

mod common;

use moppa_studio::train::protocol::Event;
use moppa_studio::train::replay::RunFolderReader;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The lines of a fixture file, as JSON values.
fn fixture_lines(run: &str, file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(common::fixture("runs").join(run).join(file)).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn write_lines(path: &Path, lines: &[Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// Every event of a folder as it is now.
fn read_all(dir: &Path) -> (RunFolderReader, Vec<Event>) {
    let mut reader = RunFolderReader::open(dir).unwrap();
    let events = reader.poll();
    (reader, events)
}

/// The warnings among `events`: (message, path).
fn warnings(events: &[Event]) -> Vec<(String, Option<PathBuf>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Warning(n) => Some((n.message.clone(), n.path.clone())),
            _ => None,
        })
        .collect()
}

fn snapshots(events: &[Event]) -> usize {
    events.iter().filter(|e| matches!(e, Event::Snapshot(_))).count()
}

fn progress_steps(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Progress(p) => Some(p.step),
            _ => None,
        })
        .collect()
}

/// The one warning about `file` whose message holds `needle` (all the warnings, if not one).
fn the_warning<'a>(w: &'a [(String, Option<PathBuf>)], file: &Path, needle: &str) -> &'a str {
    let hits: Vec<&(String, Option<PathBuf>)> = w
        .iter()
        .filter(|(m, p)| m.contains(needle) && p.as_deref() == Some(file))
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "one warning about {} with '{needle}' in {w:#?}",
        file.display()
    );
    &hits[0].0
}

#[test]
fn hostile_snapshot_headers_are_refused_with_a_warning_naming_the_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let records = &fixture_lines("moppa", "snapshots.jsonl")[1..];
    let big = 1u64 << 62;
    let wide = 1u64 << 32;
    let cases = [
        (
            "grid-100000",
            json!({"grid": [100_000, 100_000]}),
            "grid 100000×100000 is outside 1×1 … 512×512",
        ),
        (
            "blocks-2-62",
            json!({"blocks": big}),
            "4611686018427387904 blocks (at most 256)",
        ),
        (
            "grid-2-32",
            json!({"grid": [wide, wide]}),
            "grid 4294967296×4294967296 is outside",
        ),
        ("rank", json!({"rank": 1u64 << 40}), "(at most 4096)"),
        (
            "priors",
            json!({"priors": ["heat", "wave", "poisson", "heat"]}),
            "4 priors (at most 3)",
        ),
    ];
    for (name, change, bound) in cases {
        let dir = common::copy_run_fixture("moppa", &tmp.path().join(name));
        let mut header = fixture_lines("moppa", "snapshots.jsonl")[0].clone();
        for (k, v) in change.as_object().unwrap() {
            header[k] = v.clone();
        }
        let mut lines = vec![header];
        lines.extend(records.iter().cloned());
        let file = dir.join("snapshots.jsonl");
        write_lines(&file, &lines);
        let (_, events) = read_all(&dir);
        assert_eq!(snapshots(&events), 0, "{name}: no snapshot under a hostile header");
        assert!(
            matches!(events.first(), Some(Event::Started(_))),
            "{name}: the run still opens"
        );
        let w = warnings(&events);
        let m = the_warning(&w, &file, bound);
        assert!(m.contains("snapshots.jsonl"), "{name}: {m}");
    }
}

#[test]
fn snapshot_records_beyond_their_header_are_skipped_with_one_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = fixture_lines("moppa", "snapshots.jsonl");
    let (header, good) = (&fixture[0], &fixture[1]);
    // The header: 4 blocks, rank 8, an 8×8 grid, 3 priors.
    type Case = (&'static str, fn(&mut Value), &'static str);
    let hostile: [Case; 6] = [
        (
            "kappa-blocks",
            |r| r["kappa"].as_array_mut().unwrap().push(json!([1.0])),
            "kappa holds 5 blocks (the header says 4)",
        ),
        (
            "c-rank",
            |r| r["c"][0].as_array_mut().unwrap().push(json!(1.0)),
            "c of block 0 holds 9 values (at most 8: the rank)",
        ),
        (
            "source-cells",
            |r| r["source"][2].as_array_mut().unwrap().push(json!(0.0)),
            "source of block 2 holds 65 values (at most 64",
        ),
        (
            "router-priors",
            |r| r["router"][1]["mean"].as_array_mut().unwrap().push(json!(0.1)),
            "router of block 1 holds 4 values (at most 3",
        ),
        (
            "probe-alpha",
            |r| r["probe"]["alpha"][3].as_array_mut().unwrap().push(json!(0.1)),
            "probe alpha of block 3 holds 193 values (at most 192",
        ),
        (
            "router-blocks",
            |r| {
                let first = r["router"][0].clone();
                r["router"].as_array_mut().unwrap().push(first);
            },
            "router holds 5 blocks (the header says 4)",
        ),
    ];
    for (name, spoil, bound) in hostile {
        let dir = common::copy_run_fixture("moppa", &tmp.path().join(name));
        let mut bad = good.clone();
        spoil(&mut bad);
        bad["step"] = json!(20);
        let mut worse = bad.clone();
        worse["step"] = json!(30);
        let file = dir.join("snapshots.jsonl");
        write_lines(&file, &[header.clone(), good.clone(), bad, worse]);
        let (reader, events) = read_all(&dir);
        assert_eq!(snapshots(&events), 1, "{name}: only the record that fits is shown");
        let w = warnings(&events);
        let m = the_warning(&w, &file, bound);
        assert!(m.contains("step 20"), "{name}: the first refused record is named: {m}");
        assert!(
            reader
                .skipped()
                .iter()
                .any(|s| s.contains("2 record(s) beyond the bounds")),
            "{name}: the rest are counted: {:?}",
            reader.skipped()
        );
    }
}

#[test]
fn started_and_eval_records_past_the_bounds_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::copy_run_fixture("moppa", tmp.path());
    let mut lines = fixture_lines("moppa", "metrics.jsonl");
    // 100,001 class names, and a recorded input size that would make a 30 GB probe picture.
    let classes: Vec<String> = (0..100_001).map(|i| i.to_string()).collect();
    lines[0]["info"]["classes"] = json!(classes);
    lines[0]["info"]["backbone"]["img_size"] = json!(100_000);
    let first_eval = lines.iter().position(|l| l["kind"] == "eval").unwrap();
    lines[first_eval]["per_class_acc"] = json!(vec![0.5; 100_001]);
    let evals = lines.iter().filter(|l| l["kind"] == "eval").count();
    let file = dir.join("metrics.jsonl");
    write_lines(&file, &lines);
    let (reader, events) = read_all(&dir);
    let w = warnings(&events);
    the_warning(&w, &file, "100001 classes (at most 100000)");
    // The run still opens, with its facts taken as an older folder gives them.
    let Some(Event::Started(info)) = events.first() else {
        panic!("{events:?}")
    };
    assert!(info.classes.len() <= 100_000);
    assert_eq!(info.blocks, 4);
    assert_eq!(
        events.iter().filter(|e| matches!(e, Event::Eval(_))).count(),
        evals - 1,
        "the evaluation past the bound is skipped"
    );
    assert!(
        reader.skipped().iter().any(|s| s.contains("2 record(s)")),
        "{:?}",
        reader.skipped()
    );
    // A recorded input size alone (within the other bounds) draws the probe at a bounded size.
    let mut lines = fixture_lines("moppa", "metrics.jsonl");
    lines[0]["info"]["backbone"]["img_size"] = json!(100_000);
    write_lines(&file, &lines);
    let (_, events) = read_all(&dir);
    let probes: Vec<usize> = events
        .iter()
        .filter_map(|e| match e {
            Event::Snapshot(s) => s.probe.as_ref().map(|p| p.image.size),
            _ => None,
        })
        .collect();
    assert_eq!(probes, [1024, 1024], "{:?}", warnings(&events));
}

/// `metrics.jsonl` lines: the fixture's `started`, then progress at `steps`.
fn run_lines(steps: impl IntoIterator<Item = u64>) -> Vec<Value> {
    let mut lines = vec![fixture_lines("moppa", "metrics.jsonl")[0].clone()];
    for s in steps {
        lines.push(
            json!({"kind": "progress", "step": s, "time_s": s as f64 * 0.1, "epoch": 0.0,
            "loss": 2.0, "route_loss": 0.0, "train_acc": 0.5, "lr": 0.01, "img_per_s": 100.0}),
        );
    }
    lines
}

#[test]
fn a_followed_metrics_file_replaced_by_a_rename_is_read_again_from_its_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("metrics.jsonl");
    write_lines(&file, &run_lines(1..=2));
    let mut reader = RunFolderReader::open(&dir).unwrap();
    let events = reader.poll();
    assert_eq!(progress_steps(&events), [1, 2]);
    assert!(
        warnings(&events).iter().all(|(m, _)| !m.contains("read again")),
        "{events:?}"
    );
    // A longer, different file renamed over the followed one.
    let new = dir.join("metrics.jsonl.new");
    write_lines(&new, &run_lines(101..=120));
    std::fs::rename(&new, &file).unwrap();
    let events = reader.poll();
    let w = warnings(&events);
    let m = the_warning(&w, &file, "read again from its start");
    assert!(m.contains("replaced"), "{m}");
    assert!(
        matches!(events.first(), Some(Event::Warning(_))),
        "the notice comes first: {events:?}"
    );
    assert!(events.iter().any(|e| matches!(e, Event::Started(_))), "{events:?}");
    assert_eq!(progress_steps(&events), (101..=120).collect::<Vec<_>>(), "none lost");
    assert_eq!(reader.starts(), 1, "the run read again is not a resumed one");
    assert_eq!(reader.rereads(), 1);
    // A copy of it with one more line renamed over it (rsync's way): followed on, no notice, no
    // event twice.
    let mut more = std::fs::read_to_string(&file).unwrap();
    more.push_str(&format!("{}\n", run_lines([121])[1]));
    std::fs::write(dir.join("next"), more).unwrap();
    std::fs::rename(dir.join("next"), &file).unwrap();
    let events = reader.poll();
    assert_eq!(progress_steps(&events), [121]);
    assert!(warnings(&events).is_empty(), "{events:?}");
    assert_eq!(reader.rereads(), 1);
    assert!(reader.poll().is_empty(), "nothing new");
}

#[test]
fn a_followed_metrics_file_rewritten_in_place_is_read_again_from_its_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("metrics.jsonl");
    let mut lines = run_lines(1..=3);
    write_lines(&file, &lines);
    let mut reader = RunFolderReader::open(&dir).unwrap();
    assert_eq!(progress_steps(&reader.poll()), [1, 2, 3]);
    // The same file (same inode) truncated and written longer, from a different first line.
    lines = run_lines(201..=230);
    lines[0]["time_s"] = json!(0.5);
    lines[0]["trainable"] = json!(1);
    write_lines(&file, &lines);
    let events = reader.poll();
    let w = warnings(&events);
    the_warning(&w, &file, "read again from its start");
    assert_eq!(progress_steps(&events), (201..=230).collect::<Vec<_>>());
    // Appended lines still follow, without a notice.
    let mut f = std::fs::OpenOptions::new().append(true).open(&file).unwrap();
    std::io::Write::write_all(&mut f, format!("{}\n", run_lines([231])[1]).as_bytes()).unwrap();
    let events = reader.poll();
    assert_eq!(progress_steps(&events), [231]);
    assert!(warnings(&events).is_empty(), "{events:?}");
}

#[test]
fn unreadable_and_oversized_lines_are_noted_once_per_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("metrics.jsonl");
    let lines = run_lines(1..=2);
    let mut bytes = format!("{}\n{}\n", lines[0], lines[1]).into_bytes();
    bytes.extend_from_slice(b"\xff\xfe not UTF-8\n");
    // A line longer than 64 MiB (a string field, so it would be JSON if it were read).
    bytes.extend_from_slice(b"{\"kind\":\"warning\",\"message\":\"");
    bytes.extend(std::iter::repeat_n(b'x', 65 << 20));
    bytes.extend_from_slice(b"\"}\n");
    bytes.extend_from_slice(format!("{}\n", lines[2]).as_bytes());
    std::fs::write(&file, &bytes).unwrap();
    let mut reader = RunFolderReader::open(&dir).unwrap();
    let events = reader.poll();
    assert_eq!(progress_steps(&events), [1, 2], "the lines around them are read");
    let w = warnings(&events);
    let m = the_warning(&w, &file, "skipped 2 line(s)");
    assert!(m.contains("1 unreadable") && m.contains("1 longer than 64 MiB"), "{m}");
    // Another bad line: counted, not noted again.
    let mut f = std::fs::OpenOptions::new().append(true).open(&file).unwrap();
    std::io::Write::write_all(&mut f, b"\xff\n").unwrap();
    let events = reader.poll();
    assert!(warnings(&events).is_empty(), "noted once: {events:?}");
    assert!(
        reader.skipped()[0].contains("skipped 3 line(s)"),
        "{:?}",
        reader.skipped()
    );
}

fn png(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([(x * 30) as u8, (y * 30) as u8, 90]))
        .save(path)
        .unwrap();
}

#[test]
fn a_data_spec_that_is_no_dataset_is_refused_without_a_walk() {
    use moppa_studio::data::{MAX_WALK_DEPTH, check_folder_layout, load};
    // `/` is looked at, not walked: refused at once.
    let e = check_folder_layout(Path::new("/")).unwrap_err().to_string();
    assert!(e.contains("not a dataset folder") && e.contains("not searched"), "{e}");
    let e = load("/", false, 0).unwrap_err().to_string();
    assert!(e.contains("not a dataset folder"), "{e}");
    // A home-like folder: one of three subfolders holds a picture.
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir_all(home.join("docs")).unwrap();
    std::fs::write(home.join("docs/a.txt"), "x").unwrap();
    std::fs::create_dir_all(home.join("src/deep")).unwrap();
    png(&home.join("pictures/holiday.png"));
    let e = check_folder_layout(&home).unwrap_err().to_string();
    assert!(e.contains("1 of its 3 subfolder(s)"), "{e}");
    // Class folders with images at their top, or one folder below, are a dataset.
    let ds = tmp.path().join("ds");
    png(&ds.join("cat/0.png"));
    png(&ds.join("dog/2024/0.png"));
    check_folder_layout(&ds).unwrap();
    assert_eq!(
        load(&ds.display().to_string(), false, 0).unwrap().classes,
        ["cat", "dog"]
    );
    // A walk stops past the depth bound, naming it.
    let mut deep = ds.join("dog");
    for i in 0..=MAX_WALK_DEPTH {
        deep = deep.join(format!("d{i}"));
    }
    png(&deep.join("lost.png"));
    let e = load(&ds.display().to_string(), false, 0).unwrap_err().to_string();
    assert!(e.contains(&format!("more than {MAX_WALK_DEPTH} folders deep")), "{e}");
    // A VTAB label past the bound on classes is an error on its line (not 2^32 class names).
    let vtab = tmp.path().join("vtab");
    png(&vtab.join("img/0.png"));
    std::fs::write(vtab.join("train800.txt"), "img/0.png 0\nimg/0.png 4294967295\n").unwrap();
    std::fs::write(vtab.join("val200.txt"), "img/0.png 0\n").unwrap();
    let e = load(&vtab.display().to_string(), false, 0).unwrap_err().to_string();
    assert!(e.contains("train800.txt:2") && e.contains("at most 100000"), "{e}");
}

#[test]
fn a_reopened_run_whose_data_is_the_root_has_no_probe_images_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::copy_run_fixture("moppa", tmp.path());
    let cfg = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    std::fs::write(
        dir.join("config.toml"),
        cfg.replace("data = \"builtin:digits\"", "data = \"/\""),
    )
    .unwrap();
    let (_, events) = read_all(&dir);
    assert_eq!(snapshots(&events), 2);
    assert!(
        events
            .iter()
            .all(|e| !matches!(e, Event::Snapshot(s) if s.probe.is_some())),
        "no probe picture"
    );
    let w = warnings(&events);
    let m = the_warning(&w, &dir.join("config.toml"), "probe images unavailable");
    assert!(m.contains("not a dataset folder"), "{m}");
}

/// Runs `moppa` with `args` and `envs`, killed after `limit` (a hang is a failure, not a stuck
/// test): status code and stderr.
fn moppa_within(args: &[&str], envs: &[(&str, &str)], limit: Duration) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_moppa"))
        .args(args)
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return (status.code(), err);
        }
        if start.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            panic!("moppa {args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn view_screenshot_of_a_run_that_never_starts_fails_before_any_window() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty-run");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("metrics.jsonl"), "").unwrap();
    let linked = tmp.path().join("linked-run");
    std::fs::create_dir_all(&linked).unwrap();
    let unrelated = tmp.path().join("notes.txt");
    std::fs::write(&unrelated, "shopping list\neggs\n").unwrap();
    std::os::unix::fs::symlink(&unrelated, linked.join("metrics.jsonl")).unwrap();
    let out = tmp.path().join("out.png");
    let wait = [("MOPPA_SCREENSHOT_WAIT_S", "1")];
    for (dir, why) in [
        (&empty, "metrics.jsonl is empty"),
        (&linked, "2 line(s) that are not run records"),
    ] {
        let args = ["--screenshot", out.to_str().unwrap(), "view", dir.to_str().unwrap()];
        let (code, err) = moppa_within(&args, &wait, Duration::from_secs(30));
        assert_eq!(code, Some(1), "{err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {err}");
        assert!(lines[0].starts_with("error: "), "{err}");
        assert!(lines[0].contains(&dir.display().to_string()), "names the folder: {err}");
        assert!(
            lines[0].contains(why) && lines[0].contains("no run started within 1 s"),
            "{err}"
        );
        assert!(!out.exists());
    }
    let (_, err) = moppa_within(
        &["--screenshot", out.to_str().unwrap(), "view", linked.to_str().unwrap()],
        &wait,
        Duration::from_secs(30),
    );
    assert!(err.contains(&format!("a link to {}", unrelated.display())), "{err}");
    // A wait that is not a number of seconds is a usage error.
    let (code, err) = moppa_within(
        &["--screenshot", out.to_str().unwrap(), "view", empty.to_str().unwrap()],
        &[("MOPPA_SCREENSHOT_WAIT_S", "soon")],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("MOPPA_SCREENSHOT_WAIT_S"), "{err}");
}

#[test]
fn a_history_read_in_small_steps_holds_the_same_events() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::copy_run_fixture("moppa", tmp.path());
    let (_, whole) = read_all(&dir);
    let mut reader = RunFolderReader::open(&dir).unwrap();
    let mut steps = Vec::new();
    let mut calls = 0;
    loop {
        let events = reader.poll_some(1000);
        if events.is_empty() {
            break;
        }
        calls += 1;
        steps.extend(events);
    }
    assert!(calls > 3, "read in steps: {calls}");
    // The same events of each file in the same order (the two files' events interleave).
    let split =
        |v: &[Event]| -> (Vec<Event>, Vec<Event>) { v.iter().cloned().partition(|e| !matches!(e, Event::Snapshot(_))) };
    assert_eq!(split(&steps), split(&whole));
}
