//! Hostile inputs to the command line (INTERFACES.md, "Bounds on what run files and plans may ask
//! for", "Backbones by name"): plan paths holding shell syntax or control characters, sweeps past
//! the bounds, `hf:` ids whose revision is a path, and a finished run whose log has a line that is
//! not UTF-8. Every refusal is exit 2 with one `error:` line free of control characters, checked
//! before anything is written. Case ids (`h1`..`h5`) name the item of the issue they cover.
//! `MOPPA_HOSTILE_BIN=PATH` runs the cases against another build (to show they fail on an old one).

// Tests: unwrap is the assertion; pedantic style lints are for the library.
#![allow(clippy::unwrap_used, clippy::pedantic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fresh folder under the target dir for one test.
fn tempdir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hostile").join(name);
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// The binary under test: this build's, or `MOPPA_HOSTILE_BIN`.
fn binary() -> PathBuf {
    std::env::var_os("MOPPA_HOSTILE_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_moppa")), PathBuf::from)
}

/// Runs the binary in `cwd` with an empty, offline Hugging Face cache under `root` (nothing is
/// ever downloaded).
fn moppa_in(root: &Path, cwd: &Path, args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .current_dir(cwd)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", root.join("hf-cache"))
        .env_remove("HF_HOME")
        .output()
        .unwrap()
}

/// Asserts a usage refusal: exit 2, exactly one `error:` line that contains `needle`, and no
/// control character in stderr but line ends.
fn assert_refused(id: &str, o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{id}: exit {:?}, stderr:\n{err}",
        o.status.code()
    );
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{id}: one error line:\n{err}");
    assert!(errors[0].contains(needle), "{id}: {needle:?} not in {:?}", errors[0]);
    assert!(
        !err.chars().any(|c| c.is_control() && c != '\n'),
        "{id}: a control character in stderr: {err:?}"
    );
    assert!(!err.contains("panicked"), "{id}: {err}");
}

/// The arguments of one `#SBATCH` line as sbatch reads them: Slurm's `_get_argument`
/// (src/sbatch/opt.c) — a backslash escapes the next character anywhere, `'…'` and `"…"` group,
/// an unquoted `#` ends the line.
fn sbatch_args(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return args;
        }
        let (mut arg, mut quote, mut escape) = (String::new(), None, false);
        while let Some(&c) = chars.peek() {
            if quote.is_none() && !escape && c.is_whitespace() {
                break;
            }
            chars.next();
            if escape {
                escape = false;
            } else if c == '\\' {
                escape = true;
                continue;
            } else if let Some(q) = quote {
                if c == q {
                    quote = None;
                    continue;
                }
            } else if c == '"' || c == '\'' {
                quote = Some(c);
                continue;
            } else if c == '#' {
                args.push(arg);
                return args;
            }
            arg.push(c);
        }
        assert!(quote.is_none(), "an unterminated quote in {line:?}");
        args.push(arg);
    }
}

/// h1: a plan folder named with shell syntax (`$(…)`, backticks, both quotes, spaces, `\`, `%`):
/// `jobs.txt` run as README says and `slurm.sh` run for a task in and past the array pass every
/// path through as data, and `#SBATCH --output` names the logs folder as sbatch reads it.
#[test]
fn h1_plan_paths_with_shell_syntax_stay_data() {
    let tmp = tempdir("h1");
    let micro = common::micro_backbone(&tmp);
    let cwd = tmp.join("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    // One `"` (an odd count broke the old script's quoting for every task), `'` twice, …
    let name = r#"q $(touch X1) `touch X2` "dq 'sq' \b 50% $HOME"#;
    let plan = tmp.join(name);
    let o = moppa_in(
        &tmp,
        &cwd,
        &[
            "compare",
            "--plan",
            &s(&plan),
            "--methods",
            "linear,lora",
            "--seeds",
            "1",
            "--backbone",
            &s(&micro),
            "--steps",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let root = std::fs::canonicalize(&plan).unwrap();
    let pwned = || {
        ["X1", "X2"]
            .iter()
            .any(|x| cwd.join(x).exists() || tmp.join(x).exists())
    };

    // A stand-in `moppa` that records its arguments, one per line.
    let bin = tmp.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let fake = bin.join("moppa");
    std::fs::write(&fake, "#!/bin/sh\nprintf '%s\\n' \"$@\" >> \"$ARGS_OUT\"\n").unwrap();
    Command::new("chmod").arg("+x").arg(&fake).status().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let expected = |runs: &[&str]| -> Vec<String> {
        runs.iter()
            .flat_map(|run| {
                let dir = root.join("runs").join(run);
                [
                    "train".to_owned(),
                    "--config".to_owned(),
                    s(&dir.join("config.toml")),
                    "--out".to_owned(),
                    s(&dir),
                    "--auto-resume".to_owned(),
                ]
            })
            .collect()
    };
    let recorded = |file: &Path| -> Vec<String> {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    };

    // jobs.txt, one at a time so the recorded order is the file's.
    let args_out = tmp.join("xargs.args");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "xargs -P 1 -d '\\n' -I{{}} sh -c {{}} < '{}'",
            s(&root.join("jobs.txt")).replace('\'', r"'\''")
        ))
        .current_dir(&cwd)
        .env("PATH", &path)
        .env("ARGS_OUT", &args_out)
        .output()
        .unwrap();
    assert!(o.status.success(), "h1 xargs: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        recorded(&args_out),
        expected(&["linear-seed0", "lora-seed0"]),
        "h1 jobs.txt"
    );
    assert!(!pwned(), "h1: jobs.txt ran part of the path");

    // slurm.sh: valid bash; task 1 runs line 2; task 99 names jobs.txt and runs nothing.
    let slurm = root.join("slurm.sh");
    let o = Command::new("bash").arg("-n").arg(&slurm).output().unwrap();
    assert!(o.status.success(), "h1 bash -n: {}", String::from_utf8_lossy(&o.stderr));
    let args_out = tmp.join("slurm.args");
    let o = Command::new("bash")
        .arg(&slurm)
        .current_dir(&cwd)
        .env("PATH", &path)
        .env("ARGS_OUT", &args_out)
        .env("SLURM_ARRAY_TASK_ID", "1")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "h1 slurm task 1: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(recorded(&args_out), expected(&["lora-seed0"]), "h1 slurm task 1");
    let o = Command::new("bash")
        .arg(&slurm)
        .current_dir(&cwd)
        .env("SLURM_ARRAY_TASK_ID", "99")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!pwned(), "h1: slurm.sh ran part of the path: {err}");
    assert!(!o.status.success(), "h1 slurm task 99 succeeded");
    assert!(
        err.contains(&format!("no job 99 in {}", s(&root.join("jobs.txt")))),
        "h1 slurm task 99: {err}"
    );

    // The logs folder as sbatch reads `#SBATCH --output=` (`%` doubled: Slurm's patterns).
    let text = std::fs::read_to_string(&slurm).unwrap();
    let line = text.lines().find(|l| l.starts_with("#SBATCH --output=")).unwrap();
    let args = sbatch_args(line.strip_prefix("#SBATCH ").unwrap());
    assert_eq!(
        args,
        [format!(
            "--output={}/%A_%a.out",
            s(&root.join("logs")).replace('%', "%%")
        )],
        "h1: {line}"
    );
}

/// h2: a plan path (or the working folder a relative one lies in) with a newline, tab, escape or
/// DEL is refused at plan time: exit 2, one escaped line, nothing written.
#[test]
fn h2_plan_paths_with_control_characters_exit_2() {
    let tmp = tempdir("h2");
    for (i, bad) in ["a\nb", "a\tb", "a\u{1b}[31mb", "a\u{7f}b", "a\rb"].iter().enumerate() {
        let plan = tmp.join(bad);
        let o = moppa_in(&tmp, &tmp, &["compare", "--plan", &s(&plan), "--steps", "1"]);
        assert_refused(&format!("h2.{i} {bad:?}"), &o, "control character");
        assert!(!plan.exists(), "h2.{i}: {plan:?} was created");
    }
    let cwd = tmp.join("c\nwd");
    std::fs::create_dir_all(&cwd).unwrap();
    let o = moppa_in(&tmp, &cwd, &["compare", "--plan", "p", "--steps", "1"]);
    assert_refused("h2.cwd", &o, "control character");
    assert!(!cwd.join("p").exists(), "h2.cwd: the plan was created");
}

/// h3: `--seeds` ≤ 1,000 and a sweep ≤ 100,000 runs, refused before any folder is written (or a
/// backbone resolved); the bounds themselves pass; a method named twice is refused too.
#[test]
fn h3_sweep_bounds_exit_2_before_anything_is_written() {
    let tmp = tempdir("h3");
    let plan = tmp.join("D");
    let o = moppa_in(&tmp, &tmp, &["compare", "--plan", &s(&plan), "--seeds", "1001"]);
    assert_refused("h3.seeds-plan", &o, "--seeds 1001");
    assert!(!plan.exists(), "h3.seeds-plan: {plan:?} was created");
    // A live compare too: nothing trains.
    let out = tmp.join("live");
    let o = moppa_in(&tmp, &tmp, &["compare", "--seeds", "1001", "--out", &s(&out)]);
    assert_refused("h3.seeds-live", &o, "--seeds 1001");
    assert!(!out.exists(), "h3.seeds-live: {out:?} was created");
    // 101 methods × 1,000 seeds = 101,000 runs; the backbone would fail later, not first.
    let methods = vec!["moppa"; 101].join(",");
    let o = moppa_in(
        &tmp,
        &tmp,
        &[
            "compare",
            "--plan",
            &s(&plan),
            "--seeds",
            "1000",
            "--methods",
            &methods,
            "--backbone",
            "hf:nobody/nothing",
        ],
    );
    assert_refused("h3.runs", &o, "100,000");
    assert!(!plan.exists(), "h3.runs: {plan:?} was created");
    let o = moppa_in(
        &tmp,
        &tmp,
        &["compare", "--plan", &s(&plan), "--methods", "lora,linear,lora"],
    );
    assert_refused("h3.twice", &o, "lora");
    assert!(!plan.exists(), "h3.twice: {plan:?} was created");
    // The bounds themselves pass (and fail later, for another reason, before writing anything):
    // 100 × 1,000 = 100,000 runs is refused only for naming moppa twice; 1,000 seeds only for a
    // backbone that is not in the (empty, offline) cache.
    let methods = vec!["moppa"; 100].join(",");
    let o = moppa_in(
        &tmp,
        &tmp,
        &["compare", "--plan", &s(&plan), "--seeds", "1000", "--methods", &methods],
    );
    assert_refused("h3.runs-bound", &o, "twice");
    let o = moppa_in(
        &tmp,
        &tmp,
        &[
            "compare",
            "--plan",
            &s(&plan),
            "--seeds",
            "1000",
            "--methods",
            "linear",
            "--backbone",
            "hf:nobody/nothing",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "h3.seeds-bound: {err}");
    assert!(err.contains("not in the Hugging Face cache"), "h3.seeds-bound: {err}");
    assert!(!plan.exists(), "h3.bounds: {plan:?} was created");
}

/// h4: an `hf:` id whose revision is a path (absolute, `..`), holds a backslash or a control
/// character, or whose repository is not ORG/NAME, is a usage error (exit 2, one escaped line),
/// for `train` and `compare` alike; a ref file outside the cache is never read.
#[test]
fn h4_malformed_hf_ids_exit_2() {
    let tmp = tempdir("h4");
    let micro = common::micro_backbone(&tmp);
    // What the old parser let through: `refs/` joined with an absolute revision is that path,
    // and the "commit" it holds, absolute too, a snapshot folder anywhere.
    let outside = tmp.join("outside");
    std::fs::create_dir_all(outside.join("snap")).unwrap();
    std::fs::copy(&micro, outside.join("snap/model.safetensors")).unwrap();
    std::fs::write(outside.join("ref"), s(&outside.join("snap"))).unwrap();
    let abs = format!("hf:a/b@{}", s(&outside.join("ref")));
    let cases: [(&str, &str, &str); 9] = [
        ("h4.abs-ref", &abs, "absolute"),
        ("h4.etc-passwd", "hf:a/b@/etc/passwd", "absolute"),
        ("h4.dotdot", "hf:a/b@../../x", ".."),
        ("h4.newline", "hf:a/b@ref\nname", "control character"),
        ("h4.escape", "hf:a/b@v1\u{1b}[2J", "control character"),
        ("h4.backslash", r"hf:a/b@..\x", "backslash"),
        ("h4.empty-part", "hf:a/b@pr//1", "empty part"),
        ("h4.no-name", "hf:timm", "ORG/NAME"),
        ("h4.three-parts", "hf:a/b/c", "ORG/NAME"),
    ];
    for (id, spec, needle) in cases {
        let out = tmp.join(id);
        let o = moppa_in(
            &tmp,
            &tmp,
            &[
                "train",
                "--backbone",
                spec,
                "--steps",
                "1",
                "--threads",
                "1",
                "--plain",
                "--out",
                &s(&out),
            ],
        );
        assert_refused(id, &o, needle);
        assert!(!out.join("metrics.jsonl").exists(), "{id}: it trained");
    }
    let plan = tmp.join("plan");
    let o = moppa_in(&tmp, &tmp, &["compare", "--plan", &s(&plan), "--backbone", &abs]);
    assert_refused("h4.compare", &o, "absolute");
    assert!(!plan.join("plan.json").exists(), "h4.compare: planned");
}

/// h5: a line that is not UTF-8 in the middle of a finished run's `metrics.jsonl` is skipped and
/// counted: `--collect` still lists the run (exit 0, a warning naming the skipped line) and
/// `--auto-resume` still finds it done.
#[test]
fn h5_a_non_utf8_line_leaves_a_finished_run_finished() {
    let tmp = tempdir("h5");
    let micro = common::micro_backbone(&tmp);
    let data = tmp.join("colours");
    common::colour_folder(&data);
    let cmp = tmp.join("cmp");
    let o = moppa_in(
        &tmp,
        &tmp,
        &[
            "compare",
            "--methods",
            "linear",
            "--seeds",
            "1",
            "--backbone",
            &s(&micro),
            "--data",
            &s(&data),
            "--steps",
            "2",
            "--batch",
            "8",
            "--eval-every",
            "0",
            "--threads",
            "1",
            "--out",
            &s(&cmp),
        ],
    );
    assert!(o.status.success(), "h5 train: {}", String::from_utf8_lossy(&o.stderr));
    let run = cmp.join("linear-seed0");
    let log = run.join("metrics.jsonl");
    let bytes = std::fs::read(&log).unwrap();
    let lines: Vec<&[u8]> = bytes.split_inclusive(|b| *b == b'\n').collect();
    assert!(lines.len() >= 3, "h5: a short log");
    let mut damaged = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if i == lines.len() / 2 {
            damaged.extend_from_slice(b"{\"kind\":\"warning\",\"message\":\"\xff\"}\n\xff\xfe\n");
        }
        damaged.extend_from_slice(l);
    }
    std::fs::write(&log, damaged).unwrap();

    let o = moppa_in(&tmp, &tmp, &["compare", "--collect", &s(&cmp)]);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(
        o.status.success(),
        "h5 collect: exit {:?}\n{out}\n{err}",
        o.status.code()
    );
    assert!(out.contains("| linear |"), "h5 collect: {out}");
    assert!(err.contains("skipped 2 line(s)"), "h5 collect: {err}");

    let o = moppa_in(&tmp, &tmp, &["train", "--out", &s(&run), "--auto-resume", "--plain"]);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "h5 auto-resume: {out}\n{err}");
    assert!(
        out.contains("this run has ended (done); nothing to do"),
        "h5 auto-resume: {out}\n{err}"
    );
}
