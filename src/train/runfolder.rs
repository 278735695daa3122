//! The run folder (INTERFACES.md): its files, what makes a folder a run folder, what `--out` does
//! with an existing one (`--resume`, `--overwrite`, `--auto-resume`), the one-writer lock, and the
//! removal of temporary files that a killed writer left behind.

use super::protocol::FinishReason;
use super::record::reader::last_of;
use super::record::{FinishedRecord, ReadStats, Record, RecordReader, StartedRecord};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Every event but snapshots, one JSON object per line (what makes a folder a run folder).
pub const METRICS_JSONL: &str = "metrics.jsonl";
/// Progress and evaluations as CSV.
pub const METRICS_CSV: &str = "metrics.csv";
/// The resolved run configuration.
pub const CONFIG_TOML: &str = "config.toml";
/// The latest adapter checkpoint.
pub const ADAPTER: &str = "adapter.safetensors";
/// The adapter at the best validation accuracy so far.
pub const ADAPTER_BEST: &str = "adapter-best.safetensors";
/// Everything `--resume` needs, for the same step as [`ADAPTER`].
pub const STATE: &str = "state.safetensors";
/// The one-writer lock (`host pid`).
pub const LOCK: &str = ".lock";
/// The live internals of a MoPPA run (a header, then one record per snapshot).
pub const SNAPSHOTS_JSONL: &str = "snapshots.jsonl";

/// Why a run folder cannot be used as asked.
#[derive(Debug, thiserror::Error)]
pub enum RunFolderError {
    /// A flag combination that cannot work (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Another process is writing the folder (exit 1).
    #[error("{0}")]
    Busy(String),
    /// A file operation failed (exit 1).
    #[error("{}: {error}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the OS said (shown in the message, not a separate cause, so it is said once).
        error: std::io::Error,
    },
}

fn io(path: &Path, source: std::io::Error) -> RunFolderError {
    RunFolderError::Io {
        path: path.to_owned(),
        error: source,
    }
}

/// Whether `dir` is a run folder: it holds `metrics.jsonl`.
#[must_use]
pub fn is_run_folder(dir: &Path) -> bool {
    dir.join(METRICS_JSONL).is_file()
}

/// The last `finished` record of a run folder's log, if it has one (a half-written last line
/// is ignored).
#[must_use]
pub fn last_finished(dir: &Path) -> Option<FinishedRecord> {
    last_of(&dir.join(METRICS_JSONL), |r| match r {
        Record::Finished(f) => Some(f),
        _ => None,
    })
}

/// The last `started` record of a run folder's log, if it has one.
#[must_use]
pub fn last_started(dir: &Path) -> Option<Box<StartedRecord>> {
    last_of(&dir.join(METRICS_JSONL), |r| match r {
        Record::Started(s) => Some(s),
        _ => None,
    })
}

/// How a run ended, as its log tells it, read in one pass.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The last `finished` record.
    pub finished: Option<FinishedRecord>,
    /// The last `started` record.
    pub started: Option<Box<StartedRecord>>,
    /// What was read and skipped (lines that are not UTF-8 or not JSON are skipped, never fatal).
    pub stats: ReadStats,
}

/// Reads a run folder's `metrics.jsonl` for its [`Outcome`].
pub fn read_outcome(dir: &Path) -> std::io::Result<Outcome> {
    let mut reader = RecordReader::open(&dir.join(METRICS_JSONL))?;
    let mut out = Outcome::default();
    for record in reader.by_ref() {
        match record {
            Record::Finished(f) => out.finished = Some(f),
            Record::Started(s) => out.started = Some(s),
            _ => {}
        }
    }
    out.stats = reader.stats();
    Ok(out)
}

/// Whether a run folder's log records at least one training step.
#[must_use]
pub fn has_progress(dir: &Path) -> bool {
    RecordReader::open(&dir.join(METRICS_JSONL)).is_ok_and(|mut r| r.any(|r| matches!(r, Record::Progress(_))))
}

/// What `--out DIR` does with what is there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutPlan {
    /// Start a new run in DIR.
    Fresh,
    /// Continue the run in DIR.
    Resume,
    /// `--auto-resume` of a run that already ended (the reason): nothing to do.
    AlreadyFinished(String),
}

/// How the flags ask to treat an existing run folder.
#[derive(Clone, Copy, Debug, Default)]
pub struct OutFlags {
    /// `--resume DIR` names this folder.
    pub resume: bool,
    /// `--overwrite`.
    pub overwrite: bool,
    /// `--auto-resume`.
    pub auto_resume: bool,
}

/// Decides what `--out` does with `dir` (INTERFACES.md). `--overwrite` renames the old folder to
/// `DIR.old-N` here (never deletes it); `--auto-resume` of a folder without a checkpoint sets it
/// aside the same way and starts afresh.
pub fn plan_out(dir: &Path, flags: OutFlags) -> Result<OutPlan, RunFolderError> {
    if flags.resume {
        if !dir.join(CONFIG_TOML).is_file() || !dir.join(STATE).is_file() {
            return Err(RunFolderError::Usage(format!(
                "--resume {}: not a run folder with a checkpoint (no {CONFIG_TOML} or {STATE})",
                dir.display()
            )));
        }
        return Ok(OutPlan::Resume);
    }
    if !is_run_folder(dir) {
        return Ok(OutPlan::Fresh);
    }
    if flags.overwrite {
        set_aside(dir)?;
        return Ok(OutPlan::Fresh);
    }
    if flags.auto_resume {
        if let Some(f) = last_finished(dir).filter(|f| matches!(f.reason, FinishReason::Done | FinishReason::Stopped)) {
            return Ok(OutPlan::AlreadyFinished(f.reason.name().into()));
        }
        if dir.join(STATE).is_file() && dir.join(CONFIG_TOML).is_file() {
            return Ok(OutPlan::Resume);
        }
        set_aside(dir)?;
        return Ok(OutPlan::Fresh);
    }
    Err(RunFolderError::Usage(format!(
        "--out {0} is a run folder already: pass --resume {0} to continue it, --overwrite to start afresh (the old one is kept as {0}.old-N), or --auto-resume",
        dir.display()
    )))
}

/// Renames `dir` to the first free `DIR.old-N`; refuses while another process writes it.
fn set_aside(dir: &Path) -> Result<PathBuf, RunFolderError> {
    if let Some(holder) = live_holder(dir) {
        return Err(RunFolderError::Busy(format!(
            "{}: {holder}; not moved aside",
            dir.display()
        )));
    }
    let name = dir
        .file_name()
        .map_or_else(|| "run".into(), |n| n.to_string_lossy().into_owned());
    let mut n = 1;
    loop {
        let to = dir.with_file_name(format!("{name}.old-{n}"));
        if !to.exists() {
            std::fs::rename(dir, &to).map_err(|e| io(dir, e))?;
            return Ok(to);
        }
        n += 1;
    }
}

/// This machine's name (for lock files).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Whether process `pid` of this machine is alive (conservatively true where it cannot be told).
fn pid_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        // A killed process whose parent has not reaped it yet (a zombie, state Z) holds nothing.
        match std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")) {
            Ok(stat) => stat
                .rsplit_once(')')
                .is_none_or(|(_, rest)| !rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    } else {
        true
    }
}

/// `host pid` from a lock file.
fn read_lock(path: &Path) -> Option<(String, u32)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut it = text.split_whitespace();
    let host = it.next()?.to_owned();
    let pid = it.next()?.parse().ok()?;
    Some((host, pid))
}

/// Who holds `dir`'s lock, when that is a live process other than this one (or another machine,
/// which cannot be checked and is assumed alive).
fn live_holder(dir: &Path) -> Option<String> {
    let (host, pid) = read_lock(&dir.join(LOCK))?;
    let here = hostname();
    if host == here && (pid == std::process::id() || !pid_alive(pid)) {
        return None;
    }
    Some(format!("being written by process {pid} on {host}"))
}

/// The one-writer lock of a run folder, held for the whole run and released when dropped.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

impl RunLock {
    /// Takes `dir`'s lock (creating the folder), then removes the temporary files of writers that
    /// are no longer alive. A live holder is an error naming it.
    pub fn acquire(dir: &Path) -> Result<Self, RunFolderError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let path = dir.join(LOCK);
        for _ in 0..2 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    writeln!(f, "{} {}", hostname(), std::process::id()).map_err(|e| io(&path, e))?;
                    let lock = Self { path };
                    remove_stale_temps(dir);
                    return Ok(lock);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if let Some(holder) = live_holder(dir) {
                        return Err(RunFolderError::Busy(format!("{}: {holder}", dir.display())));
                    }
                    // A lock left by a process that died: take it over.
                    std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
                }
                Err(e) => return Err(io(&path, e)),
            }
        }
        Err(RunFolderError::Busy(format!(
            "{}: another process took the lock at the same moment",
            dir.display()
        )))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        if read_lock(&self.path).is_some_and(|(_, pid)| pid == std::process::id()) {
            std::fs::remove_file(&self.path).ok();
        }
    }
}

/// The writer's PID in a temporary file's name (`.NAME.tmpPID`, `util::write_atomic`).
fn temp_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, pid) = rest.rsplit_once(".tmp")?;
    pid.parse().ok()
}

/// Removes the temporary files in `dir` whose writer is no longer alive; returns how many.
/// Only the lock holder calls this, so a viewer never touches a live writer's files.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = temp_pid(&name)
            && pid != std::process::id()
            && !pid_alive(pid)
            && std::fs::remove_file(e.path()).is_ok()
        {
            n += 1;
        }
    }
    n
}
