//! Bad inputs and faults against the real binary: every case asserts the exit code, a one-line
//! message naming the file or flag, that nothing panicked, and the state of the output files.
//! The case IDs name the item of the reliability issue they cover (`i1`..`i15`, with a letter
//! per sub-item) or the subcommand they probe (`train-`, `eval-`, …). Fixtures are made here.
//! The kill -9 loop, the full disk (tmpfs), Ctrl-C and the parsers' property tests follow the
//! table.

// Tests: unwrap is the assertion; pedantic style lints are for the library.
#![allow(clippy::unwrap_used, clippy::pedantic)]

mod common;

use candle_core::Device;
use common::micro_backbone;
use moppa_studio::config::VitConfig;
use moppa_studio::model::Vit;
use moppa_studio::model::tensor_file::{HostTensor, StoreAs, TensorFile, write_atomic};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// Everything the cases read, made once per test process under cargo's target tmp folder.
struct Fixture {
    root: PathBuf,
    /// The micro backbone (16 px, D 32, depth 3) and a second one of the same shapes.
    micro: PathBuf,
    micro2: PathBuf,
    /// An ImageFolder: classes a, b, c of 8 grey 16×16 PNGs each.
    images: PathBuf,
    /// A finished run on `micro` + `images` (6 steps, evaluations every 2).
    run: PathBuf,
    /// A "backbone" whose patch embedding is an int64 tensor.
    int64: PathBuf,
}

fn png(path: &Path, seed: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::GrayImage::from_fn(16, 16, |x, y| image::Luma([((x * 7 + y * 13 + seed * 31) % 251) as u8]));
    img.save(path).unwrap();
}

fn class_folder(dir: &Path, classes: &[&str], per: u32) {
    for (c, name) in classes.iter().enumerate() {
        for i in 0..per {
            png(&dir.join(name).join(format!("{i}.png")), c as u32 * 100 + i);
        }
    }
}

/// The binary under test: this build's, or `MOPPA_RELIABILITY_BIN` (to show that the cases fail
/// on an older build).
fn binary() -> PathBuf {
    std::env::var_os("MOPPA_RELIABILITY_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_moppa")), PathBuf::from)
}

/// Runs the binary; a run that does not end within two minutes is killed (its output then says
/// so: a hang is a failure like any other).
fn moppa_in(cwd: Option<&Path>, args: &[&str]) -> Output {
    let mut c = Command::new(binary());
    c.args(args)
        .env("HOME", fixture().root.join("home"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    let mut child = c.spawn().expect("run moppa");
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(120) {
        if child.try_wait().ok().flatten().is_some() {
            return child.wait_with_output().expect("moppa's output");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().ok();
    let mut out = child.wait_with_output().expect("moppa's output");
    out.stderr
        .extend(b"\nerror: [test] killed after 120 s without finishing\n");
    out
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        // Earlier processes' fixtures, only those whose process has ended (under nextest each
        // test is a process of its own, running beside the others).
        for e in std::fs::read_dir(&tmp).into_iter().flatten().filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            let dead = name
                .strip_prefix("reliability-")
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists());
            if dead {
                std::fs::remove_dir_all(e.path()).ok();
            }
        }
        let root = tmp.join(format!("reliability-{}", std::process::id()));
        std::fs::create_dir_all(root.join("home")).unwrap();
        let micro = micro_backbone(&root);
        let micro2 = root.join("micro2.safetensors");
        let cfg = Vit::from_file(&micro, &Default::default(), &Device::Cpu).unwrap().cfg;
        let other = Vit::random(&VitConfig { ..cfg.clone() }, 8, &Device::Cpu).unwrap();
        let meta: HashMap<String, String> =
            [("moppa.backbone".to_owned(), serde_json::to_string(&cfg).unwrap())].into();
        write_atomic(&micro2, &other.to_host().unwrap(), &meta, StoreAs::F32).unwrap();
        let images = root.join("images");
        class_folder(&images, &["a", "b", "c"], 8);
        let run = root.join("run");
        let out = Command::new(env!("CARGO_BIN_EXE_moppa"))
            .args([
                "train",
                "--backbone",
                micro.to_str().unwrap(),
                "--data",
                images.to_str().unwrap(),
            ])
            .args([
                "--steps",
                "6",
                "--eval-every",
                "2",
                "--batch",
                "8",
                "--threads",
                "1",
                "--plain",
            ])
            .args(["--out", run.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fixture run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let int64 = root.join("int64.safetensors");
        {
            use safetensors::tensor::TensorView;
            let data: Vec<u8> = (0..32i64 * 48).flat_map(i64::to_le_bytes).collect();
            let view = TensorView::new(safetensors::Dtype::I64, vec![32, 3, 4, 4], &data).unwrap();
            std::fs::write(
                &int64,
                safetensors::serialize([("patch_embed.proj.weight", view)], None).unwrap(),
            )
            .unwrap();
        }
        Fixture {
            root,
            micro,
            micro2,
            images,
            run,
            int64,
        }
    })
}

/// A fresh folder for one case.
fn case_dir(id: &str) -> PathBuf {
    let d = fixture().root.join("cases").join(id);
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// An IDX image file with the given dimensions (and matching labels when `n > 0`).
fn idx_dir(dir: &Path, dims: [u32; 3]) {
    std::fs::create_dir_all(dir).unwrap();
    for prefix in ["train", "t10k"] {
        let mut img = vec![0u8, 0, 8, 3];
        for d in dims {
            img.extend(d.to_be_bytes());
        }
        img.extend(vec![7u8; (dims[0] * dims[1] * dims[2]) as usize]);
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).unwrap();
        let mut lab = vec![0u8, 0, 8, 1];
        lab.extend(dims[0].to_be_bytes());
        lab.extend((0..dims[0]).map(|i| (i % 10) as u8));
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
    }
}

/// A VTAB task folder over `fixture().images` with the given split-file texts.
fn vtab(dir: &Path, train: &str, val: &str, test: Option<&str>) {
    class_folder(&dir.join("img"), &["a", "b"], 4);
    std::fs::write(dir.join("train800.txt"), train).unwrap();
    std::fs::write(dir.join("train800val200.txt"), train).unwrap();
    std::fs::write(dir.join("val200.txt"), val).unwrap();
    if let Some(t) = test {
        std::fs::write(dir.join("test.txt"), t).unwrap();
    }
}

/// A copy of the fixture run folder.
fn copy_run(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(&fixture().run).unwrap() {
        let e = e.unwrap();
        if e.file_name() != ".lock" {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    // The copy's config must point at itself when resumed.
}

/// Rewrites a safetensors file with one value of tensor `name` replaced.
fn poison(path: &Path, name: &str, value: f32) {
    let tf = TensorFile::read(path).unwrap();
    let mut tensors: BTreeMap<String, HostTensor> = tf.tensors.clone();
    let t = tensors
        .get_mut(name)
        .unwrap_or_else(|| panic!("{name} in {}", path.display()));
    t.data[0] = value;
    write_atomic(path, &tensors, &tf.metadata, StoreAs::F32).unwrap();
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

// ---------------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------------

type Check = Box<dyn Fn(&Output) -> Result<(), String>>;

/// One case: arguments (with the folder it runs in), expected exit code, a needle its message
/// must contain (the file or flag), and a check of the files it leaves.
struct Case {
    id: &'static str,
    args: Vec<String>,
    cwd: Option<PathBuf>,
    code: i32,
    needle: String,
    check: Option<Check>,
}

impl Case {
    fn with(mut self, check: impl Fn(&Output) -> Result<(), String> + 'static) -> Self {
        self.check = Some(Box::new(check));
        self
    }

    fn in_dir(mut self, d: &Path) -> Self {
        self.cwd = Some(d.to_owned());
        self
    }
}

fn run_cases(cases: Vec<Case>) -> usize {
    let mut failures = Vec::new();
    let n = cases.len();
    for c in cases {
        let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
        let started = Instant::now();
        let out = moppa_in(c.cwd.as_deref(), &args);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let mut problems = Vec::new();
        let code = out.status.code().unwrap_or(-1);
        if code != c.code {
            problems.push(format!("exit {code}, expected {}", c.code));
        }
        if stderr.contains("panicked") || stdout.contains("panicked") {
            problems.push("panicked".into());
        }
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        if c.code != 0 {
            if errors.len() != 1 {
                problems.push(format!("{} error lines, expected one", errors.len()));
            }
            if !errors.first().is_some_and(|l| l.contains(&c.needle)) {
                problems.push(format!("the error does not name '{}'", c.needle));
            }
            if errors.iter().any(|l| l.matches("(os error").count() > 1) {
                problems.push("an OS error said twice".into());
            }
        } else if !c.needle.is_empty() && !stderr.contains(&c.needle) && !stdout.contains(&c.needle) {
            problems.push(format!("no mention of '{}'", c.needle));
        }
        if stderr
            .chars()
            .any(|ch| ch.is_control() && ch != '\n' && ch != '\r' && ch != '\t')
        {
            problems.push("control characters in the messages".into());
        }
        if let Some(check) = &c.check
            && let Err(e) = check(&out)
        {
            problems.push(e);
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{} ({:.1} s): {}\n    args: {}\n    stderr: {}",
                c.id,
                started.elapsed().as_secs_f64(),
                problems.join("; "),
                c.args.join(" "),
                stderr.lines().rev().take(4).collect::<Vec<_>>().join(" | ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    n
}

fn exists(p: PathBuf) -> impl Fn(&Output) -> Result<(), String> {
    move |_| {
        if p.exists() {
            Ok(())
        } else {
            Err(format!("{} was not written", p.display()))
        }
    }
}

fn absent(p: PathBuf) -> impl Fn(&Output) -> Result<(), String> {
    move |_| {
        if p.exists() {
            Err(format!("{} exists", p.display()))
        } else {
            Ok(())
        }
    }
}

/// Arguments of a short training run on the micro backbone and the small image folder; a flag
/// in `extra` replaces the default of the same name.
fn micro_run(extra: &[&str]) -> Vec<String> {
    let f = fixture();
    let (micro, images) = (s(&f.micro), s(&f.images));
    let defaults = [
        ("--backbone", micro.as_str()),
        ("--data", images.as_str()),
        ("--steps", "2"),
        ("--eval-every", "0"),
        ("--batch", "8"),
        ("--threads", "1"),
    ];
    let mut v = vec!["train".to_owned(), "--plain".to_owned()];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            v.push(flag.to_owned());
            v.push(value.to_owned());
        }
    }
    v.extend(extra.iter().map(|a| (*a).to_owned()));
    v
}

fn train_case(id: &'static str, extra: &[&str], code: i32, needle: &str) -> Case {
    let args = micro_run(extra);
    Case {
        id,
        args,
        cwd: None,
        code,
        needle: needle.to_owned(),
        check: None,
    }
}

#[test]
fn train_refuses_bad_inputs_and_keeps_the_run_folder_rules() {
    let f = fixture();
    let mut cases = Vec::new();

    // i2: --out on a run folder.
    let d = case_dir("i2a");
    copy_run(&d.join("r"));
    let before = lines(&d.join("r/metrics.jsonl"));
    let r = d.join("r");
    cases.push(
        train_case("i2a-out-on-a-run-folder", &["--out", &s(&r)], 2, "--resume").with(move |_| {
            if lines(&r.join("metrics.jsonl")) == before {
                Ok(())
            } else {
                Err("the old run's log changed".into())
            }
        }),
    );
    let d = case_dir("i2b");
    copy_run(&d.join("r"));
    cases.push(
        train_case(
            "i2b-overwrite-keeps-the-old-folder",
            &["--out", &s(&d.join("r")), "--overwrite"],
            0,
            "",
        )
        .with(exists(d.join("r.old-1/metrics.jsonl"))),
    );
    let d = case_dir("i2c");
    copy_run(&d.join("r"));
    cases.push(train_case(
        "i2c-auto-resume-of-a-finished-run",
        &["--out", &s(&d.join("r")), "--auto-resume"],
        0,
        "nothing to do",
    ));
    let d = case_dir("i2d");
    cases.push(
        train_case(
            "i2d-auto-resume-of-nothing-starts",
            &["--out", &s(&d.join("r")), "--auto-resume"],
            0,
            "",
        )
        .with(exists(d.join("r/state.safetensors"))),
    );

    // i3: a learning rate that would overflow the first update (1e308) is refused up front, with
    // its range, before any file is written (the optimizer's own refusal of an overflowing update
    // is tested in src/train/optim.rs).
    let d = case_dir("i3");
    let r = d.join("r");
    cases.push(
        train_case(
            "i3-overflowing-lr-refused",
            &["--lr", "1e308", "--out", &s(&r)],
            2,
            "--lr = 1e308 is outside its range (0, 1e3]",
        )
        .with(absent(r.clone())),
    );

    // i4: temporary files of dead writers are removed by the next lock holder; a live one's kept.
    let d = case_dir("i4");
    copy_run(&d.join("r"));
    let dead = d.join("r/.state.safetensors.tmp999999999");
    let live = d.join(format!("r/.adapter.safetensors.tmp{}", std::process::id()));
    std::fs::write(&dead, b"partial").unwrap();
    std::fs::write(&live, b"partial").unwrap();
    cases.push(
        train_case(
            "i4-stale-temporary-files",
            &["--resume", &s(&d.join("r")), "--steps", "8"],
            0,
            "",
        )
        .with(move |_| match (dead.exists(), live.exists()) {
            (false, true) => Ok(()),
            (d, l) => Err(format!("dead writer's temp kept: {d}, live writer's temp kept: {l}")),
        }),
    );

    // i5: a symlink loop inside a class folder is walked once.
    let d = case_dir("i5");
    class_folder(&d.join("ds"), &["a", "b"], 6);
    #[cfg(unix)]
    std::os::unix::fs::symlink("..", d.join("ds/a/up")).unwrap();
    cases.push(train_case(
        "i5-symlink-loop",
        &["--data", &s(&d.join("ds"))],
        0,
        "reached again through a link",
    ));

    // i6 / i13d: IDX files with a zero dimension, with no images.
    let d = case_dir("i6");
    idx_dir(&d.join("h0"), [5, 0, 28]);
    idx_dir(&d.join("n0"), [0, 28, 28]);
    cases.push(train_case(
        "i6-idx-zero-dimension",
        &["--data", &format!("idx:{}", s(&d.join("h0")))],
        1,
        "train-images-idx3-ubyte",
    ));
    cases.push(train_case(
        "i13d-idx-without-images",
        &["--data", &format!("idx:{}", s(&d.join("n0")))],
        1,
        "holds no image",
    ));

    // i7: absurd ranks are refused before anything is allocated.
    cases.push(train_case("i7a-rank-4e9", &["--rank", "4000000000"], 2, "--rank"));
    cases.push(train_case("i7b-rank-above-width", &["--rank", "33"], 2, "--rank"));
    cases.push(train_case(
        "i7c-batch-beyond-memory",
        &["--batch", "100000000000"],
        2,
        "--batch",
    ));

    // i8: more threads than cores are clamped with a warning.
    cases.push(train_case(
        "i8-threads-10000",
        &["--threads", "10000"],
        0,
        "is more than the",
    ));

    // i12: nonsense accepted silently before.
    cases.push(train_case("i12a-steps-with-epochs", &["--epochs", "1"], 2, "--epochs"));
    cases.push(train_case(
        "i12b-batch-above-the-training-set",
        &["--batch", "500"],
        0,
        "larger than the",
    ));
    let d = case_dir("i12c");
    class_folder(&d.join("ds/train"), &["a", "b"], 6);
    cases.push(train_case(
        "i12c-empty-test-split",
        &["--data", &s(&d.join("ds"))],
        0,
        "test split",
    ));
    let d = case_dir("i12d");
    class_folder(&d.join("ds"), &["a", "b"], 6);
    std::fs::create_dir_all(d.join("ds/c")).unwrap();
    cases.push(train_case(
        "i12d-empty-class-folder",
        &["--data", &s(&d.join("ds"))],
        0,
        "have no training image",
    ));
    let d = case_dir("i12e");
    vtab(
        &d,
        "img/a/0.png 0\nimg/a/1.png 0\nimg/b/0.png 300\nimg/b/1.png 300\n",
        "img/a/2.png 0\n",
        Some("img/b/2.png 300\n"),
    );
    cases.push(train_case(
        "i12e-vtab-label-gaps",
        &["--data", &s(&d)],
        0,
        "not contiguous",
    ));
    let d = case_dir("i12f");
    vtab(
        &d,
        "img/a/0.png 0\nimg/a/0.png 0\nimg/b/0.png 1\n",
        "img/a/2.png 0\n",
        Some("img/b/2.png 1\n"),
    );
    cases.push(train_case(
        "i12f-vtab-duplicate-lines",
        &["--data", &s(&d)],
        0,
        "duplicate line",
    ));
    let d = case_dir("i12g");
    let outside = s(&f.images.join("a/0.png"));
    vtab(
        &d,
        &format!("{outside} 0\nimg/b/0.png 1\n"),
        "img/a/2.png 0\n",
        Some("img/b/2.png 1\n"),
    );
    cases.push(train_case(
        "i12g-vtab-path-outside-the-folder",
        &["--data", &s(&d)],
        0,
        "outside the task folder",
    ));
    let d = case_dir("i12h");
    vtab(&d, "img/a/0.png 0\nimg/b/0.png 1\n", "img/a/2.png 0\n", None);
    cases.push(train_case(
        "i12h-vtab-without-test-txt",
        &["--data", &s(&d)],
        0,
        "no test.txt",
    ));
    let d = case_dir("i12i");
    class_folder(&d.join("ds"), &["a", "b"], 6);
    let jpg = d.join("ds/a/cut.jpg");
    image::GrayImage::from_fn(16, 16, |x, _| image::Luma([x as u8 * 9]))
        .save(&jpg)
        .unwrap();
    let bytes = std::fs::read(&jpg).unwrap();
    std::fs::write(&jpg, &bytes[..bytes.len() * 2 / 3]).unwrap();
    cases.push(train_case(
        "i12i-truncated-jpeg",
        &["--data", &s(&d.join("ds"))],
        0,
        "truncated JPEG",
    ));
    let d = case_dir("i12k");
    copy_run(&d.join("r"));
    poison(&d.join("r/state.safetensors"), "param.head.bias", f32::NAN);
    cases.push(train_case(
        "i12k-resume-a-nan-state",
        &["--resume", &s(&d.join("r")), "--steps", "8"],
        1,
        "NaN",
    ));

    // i13: messages.
    cases.push(train_case(
        "i13a-runtime-error-said-once",
        &["--data", "/no/such/folder"],
        1,
        "/no/such/folder",
    ));
    let int_file = f.int64.clone();
    cases.push(train_case(
        "i13b-int64-weights",
        &["--backbone", &s(&int_file)],
        1,
        "holds integers",
    ));
    let d = case_dir("i13c");
    vtab(&d, "", "img/a/2.png 0\n", Some("img/b/2.png 1\n"));
    cases.push(train_case(
        "i13c-empty-train800",
        &["--data", &s(&d)],
        1,
        "train800.txt",
    ));
    cases.push(train_case(
        "i13g-resume-a-missing-folder",
        &["--resume", "/no/such/run"],
        2,
        "/no/such/run",
    ));
    let d = case_dir("i13h");
    class_folder(&d.join("ds"), &["a", "b"], 6);
    let bad = d.join("ds/b/garbage.png");
    std::fs::write(
        &bad,
        [0x89u8, 0x50, 0x4e, 0x47, 0x00, 0x01, 0x02, 0x1b, 0x5b, 0x07, 0xff, 0x80],
    )
    .unwrap();
    cases.push(train_case(
        "i13h-skip-warnings-name-the-file",
        &["--data", &s(&d.join("ds"))],
        0,
        &s(&bad),
    ));
    let d = case_dir("i13i");
    class_folder(&d.join("ds"), &["a", "b"], 2);
    for cls in ["a", "b"] {
        for i in 0..2 {
            std::fs::write(
                d.join(format!("ds/{cls}/{i}.png")),
                [0x89u8, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x1b, 0x07, 0x00],
            )
            .unwrap();
        }
    }
    cases.push(train_case(
        "i13i-corrupt-pngs-printable-message",
        &["--data", &s(&d.join("ds"))],
        1,
        "no usable training image",
    ));
    let d = case_dir("i13j");
    copy_run(&d.join("r"));
    cases.push(train_case(
        "i13j-resume-with-another-rank",
        &["--resume", &s(&d.join("r")), "--rank", "16"],
        2,
        "trained with rank = 8",
    ));

    // i14: exit codes.
    cases.push(train_case(
        "i14a-unknown-random-preset",
        &["--backbone", "random:huge"],
        2,
        "random:huge",
    ));
    cases.push(train_case(
        "i14b-unknown-builtin-dataset",
        &["--data", "builtin:letters"],
        2,
        "builtin:letters",
    ));
    let d = case_dir("i14d");
    let r = d.join("r");
    let ds = d.join("ds");
    class_folder(&ds, &["a", "b"], 2);
    for e in walk(&ds) {
        std::fs::write(e, b"not an image").unwrap();
    }
    cases.push(
        train_case(
            "i14d-failed-record-has-message-and-path",
            &["--data", &s(&ds), "--out", &s(&r)],
            1,
            "no usable training image",
        )
        .with(move |_| {
            let text = std::fs::read_to_string(r.join("metrics.jsonl")).map_err(|e| e.to_string())?;
            let last: serde_json::Value =
                serde_json::from_str(text.lines().last().unwrap_or("{}")).map_err(|e| e.to_string())?;
            if last["kind"] == "finished"
                && last["reason"] == "failed"
                && last["message"].is_string()
                && last["path"].is_string()
            {
                Ok(())
            } else {
                Err(format!("last record {last}"))
            }
        }),
    );

    // i15: what is kept.
    let d = case_dir("i15a");
    let r = d.join("r");
    cases.push(
        train_case(
            "i15a-best-adapter-kept",
            &["--steps", "8", "--eval-every", "2", "--out", &s(&r)],
            0,
            "",
        )
        .with(move |_| {
            let tf = TensorFile::read_header(&r.join("adapter-best.safetensors")).map_err(|e| e.to_string())?;
            let step: u64 = tf
                .metadata
                .get("moppa.step")
                .and_then(|s| s.parse().ok())
                .ok_or("no step")?;
            let text = std::fs::read_to_string(r.join("metrics.jsonl")).map_err(|e| e.to_string())?;
            let mut best = (-1.0, 0);
            for v in text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            {
                if v["kind"] == "eval" && v["split"] == "val" && v["acc"].as_f64().unwrap_or(-1.0) > best.0 {
                    best = (v["acc"].as_f64().unwrap_or(0.0), v["step"].as_u64().unwrap_or(0));
                }
            }
            if best.1 == step {
                Ok(())
            } else {
                Err(format!("best at step {}, adapter-best from step {step}", best.1))
            }
        }),
    );
    let d = case_dir("i15b");
    copy_run(&d.join("r"));
    std::fs::write(d.join("r/.lock"), format!("{} {}\n", hostname(), std::process::id())).unwrap();
    cases.push(train_case(
        "i15b-second-writer",
        &["--resume", &s(&d.join("r")), "--steps", "8"],
        1,
        "being written by process",
    ));

    // More train flags and files.
    cases.push(train_case(
        "train-config-missing",
        &["--config", "/no/run.toml"],
        1,
        "/no/run.toml",
    ));
    let d = case_dir("train-config-bad");
    std::fs::write(d.join("bad.toml"), "ranks = 3\n").unwrap();
    cases.push(train_case(
        "train-config-unknown-key",
        &["--config", &s(&d.join("bad.toml"))],
        2,
        "ranks",
    ));
    let d = case_dir("train-resume-not-a-run");
    cases.push(train_case(
        "train-resume-not-a-run-folder",
        &["--resume", &s(&d)],
        2,
        "--resume",
    ));
    cases.push(train_case("train-few-shot-0", &["--few-shot", "0"], 2, "--few-shot"));
    cases.push(train_case("train-negative-lr", &["--lr", "-1"], 2, "--lr"));
    cases.push(train_case("train-rotate-200", &["--rotate", "200"], 2, "--rotate"));
    cases.push(train_case("train-bad-method", &["--method", "magic"], 2, "magic"));
    cases.push(train_case("train-bad-prior", &["--priors", "heat,sound"], 2, "sound"));
    cases.push(train_case(
        "train-missing-backbone-file",
        &["--backbone", "/no/b.safetensors"],
        2,
        "/no/b.safetensors",
    ));
    cases.push(train_case("train-negative-tau", &["--tau", "-1"], 2, "tau"));
    let d = case_dir("train-out-is-a-file");
    std::fs::write(d.join("f"), b"x").unwrap();
    cases.push(train_case(
        "train-out-is-a-file",
        &["--out", &s(&d.join("f"))],
        1,
        &s(&d.join("f")),
    ));
    let n = run_cases(cases);
    assert!(n >= 45, "{n} train cases");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().filter_map(Result::ok) {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

#[test]
fn other_commands_refuse_bad_inputs() {
    let f = fixture();
    let (micro, micro2, images, run) = (s(&f.micro), s(&f.micro2), s(&f.images), s(&f.run));
    let adapter = s(&f.run.join("adapter.safetensors"));
    let mut cases = Vec::new();

    // eval
    let d = case_dir("eval");
    let inf_adapter = d.join("inf.safetensors");
    std::fs::copy(f.run.join("adapter.safetensors"), &inf_adapter).unwrap();
    poison(&inf_adapter, "head.bias", f32::INFINITY);
    let eval = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["eval", "--backbone", &micro, "--data", &images]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
        v.extend(extra.iter().map(|a| (*a).to_owned()));
        v
    };
    let mk = |id: &'static str, args: Vec<String>, code: i32, needle: &str| Case {
        id,
        args,
        cwd: None,
        code,
        needle: needle.to_owned(),
        check: None,
    };
    cases.push(mk(
        "i12j-eval-an-adapter-with-inf",
        eval(&["--adapter", &s(&inf_adapter)]),
        1,
        "head.bias",
    ));
    cases.push(mk(
        "i12l-eval-force-warns",
        vec![
            "eval".into(),
            "--adapter".into(),
            adapter.clone(),
            "--backbone".into(),
            micro2.clone(),
            "--data".into(),
            images.clone(),
            "--force".into(),
            "--output".into(),
            s(&d.join("f.csv")),
        ],
        0,
        "--force:",
    ));
    cases.push(mk(
        "eval-other-backbone-without-force",
        vec![
            "eval".into(),
            "--adapter".into(),
            adapter.clone(),
            "--backbone".into(),
            micro2.clone(),
            "--data".into(),
            images.clone(),
        ],
        1,
        "--force",
    ));
    cases.push(mk(
        "eval-missing-run",
        vec!["eval".into(), "--run".into(), "/no/run".into()],
        1,
        "/no/run",
    ));
    cases.push(mk(
        "eval-bad-split",
        vec![
            "eval".into(),
            "--run".into(),
            run.clone(),
            "--split".into(),
            "train".into(),
        ],
        2,
        "--split",
    ));
    cases.push(mk("eval-nothing-to-evaluate", vec!["eval".into()], 2, "--run"));
    let junk = d.join("junk.safetensors");
    std::fs::write(&junk, b"not safetensors at all").unwrap();
    cases.push(mk(
        "eval-not-a-safetensors-adapter",
        eval(&["--adapter", &s(&junk)]),
        1,
        &s(&junk),
    ));
    cases.push(mk(
        "eval-class-count-differs",
        vec![
            "eval".into(),
            "--backbone".into(),
            micro.clone(),
            "--adapter".into(),
            adapter.clone(),
            "--data".into(),
            "builtin:digits".into(),
        ],
        1,
        "classes",
    ));

    // compare
    let d = case_dir("compare");
    let cmp = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "compare",
            "--backbone",
            &micro,
            "--data",
            &images,
            "--steps",
            "1",
            "--seeds",
            "1",
            "--batch",
            "8",
            "--eval-every",
            "0",
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        v.extend(extra.iter().map(|a| (*a).to_owned()));
        v
    };
    cases.push(mk("compare-unknown-method", cmp(&["--methods", "bogus"]), 2, "bogus"));
    cases.push(mk("compare-zero-seeds", cmp(&["--seeds", "0"]), 2, "--seeds"));
    cases.push(mk(
        "compare-rank-above-width",
        cmp(&["--rank", "1000", "--methods", "lora"]),
        2,
        "--rank",
    ));
    cases.push(mk(
        "compare-unknown-dataset",
        vec![
            "compare".into(),
            "--data".into(),
            "builtin:letters".into(),
            "--steps".into(),
            "1".into(),
        ],
        2,
        "builtin:letters",
    ));
    cases.push(Case {
        check: Some(Box::new(exists(d.join("c/linear-seed0/metrics.jsonl")))),
        ..mk(
            "compare-works",
            cmp(&["--methods", "linear", "--out", &s(&d.join("c"))]),
            0,
            "| linear |",
        )
    });
    cases.push(mk(
        "compare-run-folders-kept",
        cmp(&["--methods", "linear", "--out", &s(&d.join("c"))]),
        2,
        "--resume",
    ));

    // bench
    let bench = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["bench", "--steps", "1", "--batch", "2"]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
        v.extend(extra.iter().map(|a| (*a).to_owned()));
        v
    };
    cases.push(mk("bench-unknown-preset", bench(&["--preset", "huge"]), 2, "--preset"));
    cases.push(mk("bench-batch-0", bench(&["--batch", "0"]), 2, "--batch"));
    cases.push(mk(
        "bench-threads-10000",
        bench(&["--threads", "10000"]),
        0,
        "is more than the",
    ));
    cases.push(mk("bench-unknown-method", bench(&["--method", "magic"]), 2, "magic"));
    cases.push(mk("bench-unknown-kernels", bench(&["--kernels", "fast"]), 2, "fast"));
    cases.push(mk("bench-unknown-dtype", bench(&["--dtype", "f64"]), 2, "f64"));

    // pretrain
    let d = case_dir("pretrain");
    let pre = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "pretrain",
            "--data",
            &images,
            "--epochs",
            "1",
            "--batch",
            "8",
            "--threads",
            "1",
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        v.extend(extra.iter().map(|a| (*a).to_owned()));
        v
    };
    let out = d.join("b.safetensors");
    cases.push(mk(
        "i11a-mask-ratio-0",
        pre(&["--objective", "mae", "--mask-ratio", "0", "--output", &s(&out)]),
        2,
        "--mask-ratio",
    ));
    let cwd = d.clone();
    cases.push(
        mk(
            "i11b-pretrain-run-folder-next-to-the-output",
            pre(&["--objective", "mae", "--output", &s(&out)]),
            0,
            "run folder",
        )
        .in_dir(&d)
        .with(move |_| {
            if cwd.join("runs").exists() {
                Err("wrote ./runs in the working directory".into())
            } else if !cwd.join("b.run/metrics.jsonl").exists() {
                Err("no run folder next to the output".into())
            } else {
                Ok(())
            }
        }),
    );
    cases.push(mk(
        "pretrain-run-folder-kept",
        pre(&["--objective", "mae", "--output", &s(&out)]),
        2,
        "--run",
    ));
    cases.push(mk(
        "pretrain-unknown-preset",
        pre(&["--preset", "huge", "--output", &s(&out)]),
        2,
        "--preset",
    ));
    idx_dir(&d.join("h0"), [5, 0, 28]);
    cases.push(mk(
        "i6b-pretrain-idx-zero-dimension",
        vec![
            "pretrain".into(),
            "--data".into(),
            format!("idx:{}", s(&d.join("h0"))),
            "--output".into(),
            s(&d.join("h0.safetensors")),
        ],
        1,
        "train-images-idx3-ubyte",
    ));
    cases.push(mk(
        "pretrain-decoder-dim-33",
        pre(&["--objective", "mae", "--decoder-dim", "33", "--output", &s(&out)]),
        2,
        "--decoder-dim",
    ));
    cases.push(mk(
        "pretrain-export-without-a-run",
        pre(&["--export-only", "--run", "/no/run", "--output", &s(&out)]),
        1,
        "/no/run",
    ));

    // infer
    let d = case_dir("infer");
    let input = |n: usize, side: usize| -> PathBuf {
        let p = d.join(format!("in-{n}-{side}.safetensors"));
        let t: BTreeMap<String, HostTensor> = [(
            "images".to_owned(),
            HostTensor::new(vec![n, 3, side, side], vec![0.1; n * 3 * side * side]),
        )]
        .into();
        write_atomic(&p, &t, &HashMap::<String, String>::new(), StoreAs::F32).unwrap();
        p
    };
    let (empty, odd, good, big) = (input(0, 16), input(2, 30), input(2, 16), input(1, 32));
    let inf = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["infer", "--backbone", &micro, "--output", &s(&d.join("o.safetensors"))]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
        v.extend(extra.iter().map(|a| (*a).to_owned()));
        v
    };
    cases.push(mk(
        "i13e-infer-empty-input",
        inf(&["--adapter", &adapter, "--input", &s(&empty)]),
        1,
        "N = 0",
    ));
    cases.push(mk(
        "i13f-infer-30px-input",
        inf(&["--adapter", &adapter, "--input", &s(&odd)]),
        1,
        &s(&odd),
    ));
    cases.push(mk(
        "i14e-infer-accepts-builtin",
        vec![
            "infer".into(),
            "--backbone".into(),
            "builtin".into(),
            "--input".into(),
            s(&big),
            "--output".into(),
            s(&d.join("b.safetensors")),
        ],
        1,
        "no classifier head",
    ));
    cases.push(mk(
        "infer-missing-input",
        inf(&["--input", "/no/in.safetensors"]),
        1,
        "/no/in.safetensors",
    ));
    let noimg = d.join("noimg.safetensors");
    let t: BTreeMap<String, HostTensor> = [("pixels".to_owned(), HostTensor::new(vec![1], vec![0.0]))].into();
    write_atomic(&noimg, &t, &HashMap::<String, String>::new(), StoreAs::F32).unwrap();
    cases.push(mk("infer-no-images-tensor", inf(&["--input", &s(&noimg)]), 1, "images"));
    cases.push(mk(
        "infer-batch-0",
        inf(&["--input", &s(&good), "--batch", "0"]),
        2,
        "--batch",
    ));
    cases.push(Case {
        check: Some(Box::new(exists(d.join("o.safetensors")))),
        ..mk(
            "infer-works",
            inf(&["--adapter", &adapter, "--input", &s(&good)]),
            0,
            "",
        )
    });

    // params
    cases.push(mk(
        "i7d-params-rank-4e9",
        vec![
            "params".into(),
            "--backbone".into(),
            "tiny".into(),
            "--rank".into(),
            "4000000000".into(),
        ],
        2,
        "--rank",
    ));
    cases.push(mk(
        "params-unknown-backbone",
        vec!["params".into(), "--backbone".into(), "vit-zz".into()],
        2,
        "vit-zz",
    ));
    cases.push(mk(
        "params-zero-classes",
        vec!["params".into(), "--classes".into(), "0".into()],
        2,
        "--classes",
    ));
    cases.push(mk(
        "params-int64-backbone",
        vec!["params".into(), "--backbone".into(), s(&f.int64)],
        1,
        "holds integers",
    ));
    cases.push(
        mk(
            "params-percentages-at-most-100",
            vec![
                "params".into(),
                "--backbone".into(),
                "tiny".into(),
                "--rank".into(),
                "96".into(),
            ],
            0,
            "",
        )
        .with(|o| {
            let text = String::from_utf8_lossy(&o.stdout);
            for l in text
                .lines()
                .filter(|l| l.starts_with("| ") && !l.contains("---") && !l.contains("method"))
            {
                let pct: f64 = l
                    .trim_end_matches(" |")
                    .rsplit("| ")
                    .next()
                    .unwrap_or("0")
                    .trim()
                    .parse()
                    .unwrap_or(0.0);
                if pct > 100.0 {
                    return Err(l.to_string());
                }
            }
            Ok(())
        }),
    );

    // filters
    let fl = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["filters", "--grid", "4"].iter().map(|a| (*a).to_owned()).collect();
        v.extend(extra.iter().map(|a| (*a).to_owned()));
        v
    };
    cases.push(mk("i10b-filters-c-1e308", fl(&["--c", "1e308"]), 2, "--c"));
    cases.push(mk("filters-kappa-1e308", fl(&["--kappa", "1e308"]), 2, "--kappa"));
    cases.push(mk(
        "filters-grid-0",
        vec!["filters".into(), "--grid".into(), "0".into()],
        2,
        "--grid",
    ));
    cases.push(mk("filters-negative-kappa", fl(&["--kappa", "-1"]), 2, "--kappa"));
    cases.push(mk("filters-tau-0", fl(&["--tau", "0"]), 2, "--tau"));
    cases.push(mk("filters-format-xml", fl(&["--format", "xml"]), 2, "xml"));

    // apply
    let d = case_dir("apply");
    let photo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/sample-fruits.jpg");
    let ap = |prior: &str, extra: &[&str], output: &Path| -> Vec<String> {
        let mut v: Vec<String> = ["apply", "--prior", prior].iter().map(|a| (*a).to_owned()).collect();
        v.extend(extra.iter().map(|a| (*a).to_owned()));
        v.push(s(&photo));
        v.push(s(output));
        v
    };
    cases.push(Case {
        check: Some(Box::new(absent(d.join("w.png")))),
        ..mk(
            "i10a-apply-wave-c-1e308",
            ap("wave", &["--c", "1e308"], &d.join("w.png")),
            2,
            "--c",
        )
    });
    cases.push(mk(
        "i14c-apply-gif-output",
        ap("heat", &[], &d.join("x.gif")),
        2,
        "x.gif",
    ));
    cases.push(mk(
        "i14c-apply-bmp-output",
        ap("heat", &[], &d.join("x.bmp")),
        2,
        "x.bmp",
    ));
    cases.push(mk("apply-xyz-output", ap("heat", &[], &d.join("x.xyz")), 2, "x.xyz"));
    cases.push(mk(
        "apply-missing-input",
        vec![
            "apply".into(),
            "--prior".into(),
            "heat".into(),
            "/no/in.png".into(),
            s(&d.join("o.png")),
        ],
        1,
        "/no/in.png",
    ));
    let corrupt = d.join("corrupt.png");
    std::fs::write(&corrupt, [0x89u8, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 1, 2, 3]).unwrap();
    cases.push(mk(
        "apply-corrupt-input",
        vec![
            "apply".into(),
            "--prior".into(),
            "heat".into(),
            s(&corrupt),
            s(&d.join("o.png")),
        ],
        1,
        &s(&corrupt),
    ));
    let dir_missing = d.join("no/such/dir/o.png");
    cases.push(mk(
        "apply-output-folder-missing",
        ap("heat", &[], &dir_missing),
        1,
        &s(&dir_missing),
    ));

    // the app's command line (no window is opened for these)
    let d = case_dir("app");
    cases.push(mk(
        "i9-screenshot-unwritable",
        vec!["--screenshot".into(), "/proc/x.png".into()],
        1,
        "/proc/x.png",
    ));
    cases.push(mk(
        "app-unknown-tab",
        vec!["--tab".into(), "settings".into()],
        2,
        "--tab",
    ));
    cases.push(mk(
        "app-negative-frame-stats",
        vec!["--frame-stats=-1".into()],
        2,
        "--frame-stats",
    ));
    cases.push(mk(
        "app-unknown-renderer",
        vec!["--renderer".into(), "vulkan".into()],
        2,
        "--renderer",
    ));
    cases.push(mk(
        "app-missing-config",
        vec!["--config".into(), "/no/run.toml".into()],
        1,
        "/no/run.toml",
    ));
    std::fs::write(d.join("bad.toml"), "rank = \"eight\"\n").unwrap();
    cases.push(mk(
        "app-bad-config",
        vec!["--config".into(), s(&d.join("bad.toml"))],
        2,
        "bad.toml",
    ));
    let n = run_cases(cases);
    assert!(n >= 50, "{n} cases");
}

// ---------------------------------------------------------------------------------------------
// Faults: Ctrl-C, kill -9 during checkpoint writes, a full disk
// ---------------------------------------------------------------------------------------------

/// A child process killed when dropped (a failing assertion leaves nothing running).
struct Running(Option<std::process::Child>);

impl Running {
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, std::process::Child::id)
    }

    fn take(mut self) -> std::process::Child {
        self.0.take().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }
}

fn spawn_train(args: &[String]) -> Running {
    Running(Some(
        Command::new(binary())
            .args(args)
            .env("HOME", fixture().root.join("home"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    ))
}

fn sigint(child: &Running) {
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Waits for `child` up to `limit`; its output and how long it took.
fn wait_for(child: Running, limit: Duration) -> (Output, Duration) {
    let mut child = child.take();
    let t = Instant::now();
    while t.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            return (child.wait_with_output().unwrap(), t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().ok();
    child.wait().ok();
    panic!("still running after {limit:?}");
}

/// Like [`wait_until`] without sleeping between checks (for a window of a few milliseconds).
fn wait_until_busy(what: &str, limit: Duration, ok: impl Fn() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
    }
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn i15c_ctrl_c_checkpoints_without_evaluating_and_i8b_cuts_setup_short() {
    // Mid-run: a final checkpoint, no evaluation (test accuracy null), exit 130.
    let d = case_dir("ctrl-c");
    let r = d.join("r");
    let child = spawn_train(&micro_run(&[
        "--steps",
        "1000000",
        "--eval-every",
        "0",
        "--out",
        &s(&r),
    ]));
    wait_until("the first progress record", Duration::from_secs(60), || {
        lines(&r.join("metrics.jsonl")) > 2
    });
    sigint(&child);
    let (out, took) = wait_for(child, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(took < Duration::from_secs(5), "stopped after {took:?}");
    let text = std::fs::read_to_string(r.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["reason"], "interrupted");
    assert!(last["test_acc"].is_null());
    assert!(!text.contains("\"kind\":\"eval\""), "an interrupted run evaluated");
    assert!(TensorFile::read(&r.join("state.safetensors")).is_ok());

    // During setup (a split file that never finishes reading): exit 130 at once.
    let d = case_dir("ctrl-c-setup");
    vtab(&d, "", "img/a/2.png 0\n", Some("img/b/2.png 1\n"));
    std::fs::remove_file(d.join("train800.txt")).unwrap();
    let made = Command::new("mkfifo").arg(d.join("train800.txt")).status().unwrap();
    assert!(made.success());
    let child = spawn_train(&micro_run(&["--data", &s(&d)]));
    // Ready: the run has opened the split file for reading (a FIFO opens for writing without
    // blocking only once a reader has it). The writer stays open and silent: reading never ends.
    let fifo = d.join("train800.txt");
    let mut writer = None;
    wait_until("the run to open its split file", Duration::from_secs(60), || {
        use std::os::unix::fs::OpenOptionsExt as _;
        if writer.is_none() {
            writer = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fifo)
                .ok();
        }
        writer.is_some()
    });
    let t = Instant::now();
    sigint(&child);
    let (out, _) = wait_for(child, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "setup interrupt took {:?}",
        t.elapsed()
    );
}

/// The step recorded in a checkpoint file's metadata.
fn step_of(path: &Path) -> Option<u64> {
    TensorFile::read(path).ok()?.metadata.get("moppa.step")?.parse().ok()
}

fn all_finite(path: &Path) -> Result<(), String> {
    let tf = TensorFile::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    match tf.tensors.iter().find(|(_, t)| t.data.iter().any(|v| !v.is_finite())) {
        Some((n, _)) => Err(format!("{}: {n} is not finite", path.display())),
        None => Ok(()),
    }
}

#[test]
fn kill_9_during_checkpoint_writes_never_corrupts_and_resume_continues() {
    let d = case_dir("kill-9");
    let r = d.join("r");
    // A checkpoint at every step: the process is almost always writing one.
    let base = |resume: bool| -> Vec<String> {
        let mut a = micro_run(&["--steps", "1000000", "--eval-every", "1"]);
        if resume {
            a.extend(["--resume".to_owned(), s(&r)]);
        } else {
            a.extend(["--out".to_owned(), s(&r)]);
        }
        a
    };
    // Each process is killed once it wrote a checkpoint of its own (so not during its setup).
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut last_step = 0;
    let mut mid_write = 0;
    for kill in 0..10 {
        let state = r.join("state.safetensors");
        let before = step_of(&state).unwrap_or(0);
        let mut child = spawn_train(&base(kill > 0)).take();
        wait_until("a checkpoint of this process", Duration::from_secs(60), || {
            step_of(&state).is_some_and(|s| s > before)
        });
        // Then kill it as soon as a write is seen under way (a staged `.tmp` file), after a
        // seeded 0-500 µs more, so the kills fall at different points of the write.
        let staged = || {
            std::fs::read_dir(&r)
                .unwrap()
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().contains(".tmp"))
        };
        wait_until_busy("a checkpoint write", Duration::from_secs(30), staged);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let t = Instant::now();
        while t.elapsed() < Duration::from_micros(seed % 500) {
            std::hint::spin_loop();
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // A staged file of the killed writer left behind: the kill fell inside a checkpoint write.
        mid_write += usize::from(staged());
        for name in ["adapter.safetensors", "adapter-best.safetensors", "state.safetensors"] {
            if r.join(name).exists() {
                all_finite(&r.join(name)).unwrap();
            }
        }
        let step = step_of(&r.join("state.safetensors")).expect("the state names its step");
        assert!(
            step >= last_step,
            "kill {kill}: the state went back from step {last_step} to {step}"
        );
        last_step = step;
    }
    eprintln!("kill -9: {mid_write} of 10 kills fell inside a checkpoint write");
    assert!(
        mid_write >= 6,
        "only {mid_write} of 10 kills fell inside a checkpoint write: the test no longer tests them"
    );
    // A last resume to completion: it continues from the state, repairs the pair if a kill fell
    // between its two files, and leaves no temporary file behind.
    let mut args = micro_run(&["--steps", &(last_step + 3).to_string(), "--eval-every", "1"]);
    args.extend(["--resume".to_owned(), s(&r)]);
    let out = moppa_in(None, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(step_of(&r.join("state.safetensors")), Some(last_step + 3));
    assert_eq!(step_of(&r.join("adapter.safetensors")), Some(last_step + 3));
    let temps: Vec<String> = std::fs::read_dir(&r)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp") || n == ".lock")
        .collect();
    assert!(temps.is_empty(), "left behind: {temps:?}");
}

/// Unmounts the tmpfs when dropped.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let done = Command::new("umount").arg(&self.0).status().is_ok_and(|s| s.success());
        if !done {
            // Busy (a process still holds a file): detach it now, freed when released.
            Command::new("umount").arg("-l").arg(&self.0).status().ok();
        }
    }
}

#[test]
fn i1_full_disk_fails_the_run_and_keeps_the_previous_checkpoint_pair() {
    let d = case_dir("full-disk");
    let mnt = d.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&mnt)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !mounted {
        assert!(
            std::env::var_os("MOPPA_REQUIRE_TMPFS").is_none(),
            "cannot mount a tmpfs, and MOPPA_REQUIRE_TMPFS is set"
        );
        eprintln!("notice: cannot mount a tmpfs here (needs root): skipping the full-disk case");
        return;
    }
    let _guard = Mount(mnt.clone());
    let r = mnt.join("r");
    let child = spawn_train(&micro_run(&[
        "--steps",
        "1000000",
        "--eval-every",
        "5",
        "--out",
        &s(&r),
    ]));
    wait_until("a first checkpoint", Duration::from_secs(60), || {
        step_of(&r.join("state.safetensors")).is_some_and(|s| s >= 10)
    });
    // Fill the disk while the run goes on.
    let filler = mnt.join("filler");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let (out, _) = wait_for(child, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left") || err.contains("os error 28"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // The previous complete pair is in place and consistent.
    let (a, st) = (
        step_of(&r.join("adapter.safetensors")),
        step_of(&r.join("state.safetensors")),
    );
    assert!(a.is_some() && a == st, "adapter step {a:?}, state step {st:?}");
    all_finite(&r.join("state.safetensors")).unwrap();
    // With room again, the run resumes from that pair.
    std::fs::remove_file(&filler).unwrap();
    let mut args = micro_run(&["--steps", &(st.unwrap_or(0) + 2).to_string(), "--eval-every", "1"]);
    args.extend(["--resume".to_owned(), s(&r)]);
    let out = moppa_in(None, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(step_of(&r.join("state.safetensors")), Some(st.unwrap_or(0) + 2));
}

// ---------------------------------------------------------------------------------------------
// Parsers never panic: random and mutated bytes
// ---------------------------------------------------------------------------------------------

mod parsers {
    use super::*;
    use moppa_studio::config::RunConfig;
    use proptest::prelude::*;

    /// A valid IDX image file of `n` 2×3 images.
    fn idx_bytes(n: u32) -> Vec<u8> {
        let mut b = vec![0u8, 0, 8, 3];
        for d in [n, 2, 3] {
            b.extend(d.to_be_bytes());
        }
        b.extend(vec![1u8; (n * 6) as usize]);
        b
    }

    fn safetensors_bytes() -> Vec<u8> {
        let t: BTreeMap<String, HostTensor> = [
            ("a".to_owned(), HostTensor::new(vec![2, 3], vec![1.0; 6])),
            ("b".to_owned(), HostTensor::new(vec![4], vec![0.5; 4])),
        ]
        .into();
        let meta: HashMap<String, String> = [("moppa.step".to_owned(), "3".to_owned())].into();
        moppa_studio::model::tensor_file::encode(Path::new("x"), &t, &meta, StoreAs::F32).unwrap()
    }

    fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], cut: usize) -> Vec<u8> {
        for &(i, v) in edits {
            if !bytes.is_empty() {
                let n = bytes.len();
                bytes[i % n] = v;
            }
        }
        bytes.truncate(cut.min(bytes.len()));
        bytes
    }

    fn scratch(name: &str) -> PathBuf {
        let d = fixture().root.join("proptest");
        std::fs::create_dir_all(&d).unwrap();
        d.join(format!("{name}-{:?}", std::thread::current().id()).replace(['(', ')'], ""))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn idx_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = moppa_studio::data::parse_idx(Path::new("x"), &bytes);
        }

        #[test]
        fn idx_mutated(n in 0u32..5, edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6), cut in 0usize..80) {
            let _ = moppa_studio::data::parse_idx(Path::new("x"), &mutate(idx_bytes(n), &edits, cut));
        }

        #[test]
        fn safetensors_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = TensorFile::from_bytes(Path::new("x"), &bytes);
            let p = scratch("st-random");
            std::fs::write(&p, &bytes).unwrap();
            let _ = TensorFile::read_header(&p);
        }

        #[test]
        fn safetensors_mutated(edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8), cut in 0usize..400) {
            let bytes = mutate(safetensors_bytes(), &edits, cut);
            let _ = TensorFile::from_bytes(Path::new("x"), &bytes);
            let p = scratch("st-mutated");
            std::fs::write(&p, &bytes).unwrap();
            let _ = TensorFile::read_header(&p);
        }

        #[test]
        fn config_toml_text(text in "[a-z_ =\\[\\]\"0-9.\n-]{0,80}") {
            let _ = RunConfig::from_toml(&text);
        }

        #[test]
        fn config_toml_values(key in "(rank|batch|lr|steps|method|priors|tau|threads|out|final|augment)", value in "(-?[0-9]{1,25}(\\.[0-9]+)?(e[0-9]{1,3})?|\"[a-z,]{0,10}\"|true|\\[\\]|\\{\\})") {
            if let Ok(c) = RunConfig::from_toml(&format!("{key} = {value}\n")) {
                let _ = c.validate();
            }
        }

        // Structured: a valid magic number and element type, then hostile dimensions (0, small,
        // and sizes whose product overflows) over a short body. Ok exactly when the dimensions'
        // product fits in the body, with that many bytes.
        #[test]
        fn idx_valid_header_hostile_dims(
            dims in proptest::collection::vec(prop_oneof![Just(0u32), 1u32..4, Just(65_535u32), Just(u32::MAX)], 0..4),
            body in 0usize..48,
        ) {
            let mut bytes = vec![0u8, 0, 8, dims.len() as u8];
            for d in &dims {
                bytes.extend(d.to_be_bytes());
            }
            bytes.extend(vec![7u8; body]);
            let need = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d as usize));
            match moppa_studio::data::parse_idx(Path::new("x"), &bytes) {
                Ok((got, data)) => {
                    prop_assert_eq!(got.iter().map(|d| *d as u32).collect::<Vec<_>>(), dims);
                    prop_assert_eq!(Some(data.len()), need);
                }
                Err(_) => prop_assert!(need.is_none_or(|n| n > body)),
            }
        }

        // Structured: a well-formed safetensors frame (length prefix, JSON header) whose fields
        // are hostile: unknown dtypes, huge or empty shapes, offsets past the end or reversed.
        #[test]
        fn safetensors_valid_frame_hostile_fields(
            dtype in prop_oneof![Just("F32"), Just("F16"), Just("BF16"), Just("F64"), Just("I64"), Just("U8"), Just("Q4")],
            shape in proptest::collection::vec(prop_oneof![Just(0u64), 1u64..5, Just(1u64 << 31), Just(1u64 << 62)], 0..4),
            start in prop_oneof![Just(0u64), 0u64..64, Just(u64::MAX)],
            len in prop_oneof![0u64..64, Just(1u64 << 40)],
            body in 0usize..64,
        ) {
            let header = serde_json::json!({"t": {"dtype": dtype, "shape": shape, "data_offsets": [start, start.saturating_add(len)]}}).to_string();
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend(header.as_bytes());
            bytes.extend(vec![0u8; body]);
            if let Ok(tf) = TensorFile::from_bytes(Path::new("x"), &bytes) {
                for t in tf.tensors.values() {
                    prop_assert_eq!(t.data.len() as u64, t.shape.iter().map(|d| *d as u64).product::<u64>());
                }
            }
        }

        // Structured: a snapshot header with hostile shapes and a record with lists of any
        // length. Reading never panics or allocates what the header asks beyond the bounds; a
        // view, when there is one, has the header's shapes.
        #[test]
        fn snapshot_headers_with_hostile_fields(
            blocks in prop_oneof![0usize..4, Just(257usize), Just(1usize << 62)],
            rank in prop_oneof![0usize..5, Just(4097usize), Just(usize::MAX)],
            side in prop_oneof![0usize..6, Just(513usize), Just(1usize << 32)],
            priors in 0usize..5,
            values in proptest::collection::vec(-5.0f64..5.0, 0..40),
        ) {
            use moppa_studio::train::record::{Record, RecordReader};
            let names = ["heat", "wave", "poisson", "heat", "wave"];
            let header = serde_json::json!({"kind": "header", "format": 1, "blocks": blocks, "rank": rank,
                "grid": [side, side], "priors": &names[..priors]});
            let lists = serde_json::json!([values.clone(), values.clone()]);
            let record = serde_json::json!({"kind": "snapshot", "step": 3, "time_s": 1.0, "tau": 1.0,
                "kappa": lists, "c": lists, "eps": lists, "source": lists,
                "router": [{"mean": values, "entropy": 0.5, "share": values}], "probe": {"index": 0, "alpha": lists}});
            let text = format!("{header}\n{record}\n");
            let records: Vec<Record> = RecordReader::new(std::io::Cursor::new(text)).collect();
            if let [Record::Header(h), Record::Snapshot(rec)] = records.as_slice() {
                if let Some(view) = moppa_studio::train::snapfile::snapshot_view(rec, h, Some(0)) {
                    prop_assert!(h.check().is_ok());
                    prop_assert_eq!(view.blocks.len(), blocks);
                    for b in &view.blocks {
                        prop_assert!(b.filters_mean.iter().all(|f| f.len() == side * side));
                        prop_assert!(b.coeffs.kappa.len() <= rank);
                    }
                } else {
                    prop_assert!(h.check().is_err());
                }
            }
        }

        #[test]
        fn split_files(lines in proptest::collection::vec("[a-z/. 0-9-]{0,20}", 0..6)) {
            let d = scratch("vtab");
            std::fs::create_dir_all(d.join("img")).unwrap();
            png(&d.join("img/x.png"), 1);
            let text = lines.join("\n");
            for f in ["train800.txt", "val200.txt", "test.txt"] {
                std::fs::write(d.join(f), &text).unwrap();
            }
            let _ = moppa_studio::data::load(&s(&d), false, 0);
        }
    }
}
