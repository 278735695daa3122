//! The run log: `metrics.jsonl` (every event but snapshots as a [`Record`], one per line, plus a
//! heartbeat at least every 10 s) and `metrics.csv` (progress and evaluations), written by the
//! engine itself so curves are complete whatever the display does. Resumed runs append; a line
//! cut by a crash is ended before the next one.

use super::protocol::Event;
use super::record::{HeartbeatRecord, Record};
use super::runfolder::{METRICS_CSV, METRICS_JSONL};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use super::record::CSV_HEADER;

/// A heartbeat is written when nothing else was for this long (INTERFACES.md: at least every
/// 10 s; a reader calls a run crashed after 30 s without a line).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// Appends events to the two files.
pub struct RunLog {
    jsonl: BufWriter<File>,
    csv: BufWriter<File>,
    last_write: Instant,
}

/// Opens a file for appending; whether it had content, and whether that content ends mid-line
/// (read from its last byte, not the whole file).
pub(crate) fn open_append(path: &Path) -> std::io::Result<(File, bool, bool)> {
    let mut f = OpenOptions::new().create(true).append(true).read(true).open(path)?;
    let len = f.metadata()?.len();
    let mut last = [0u8; 1];
    let cut = len > 0 && {
        f.seek(SeekFrom::Start(len - 1))?;
        f.read_exact(&mut last)?;
        last[0] != b'\n'
    };
    Ok((f, len > 0, cut))
}

impl RunLog {
    /// Starts `dir/metrics.jsonl` and `dir/metrics.csv` afresh (a pretraining run folder).
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        for name in [METRICS_JSONL, METRICS_CSV] {
            File::create(dir.join(name))?;
        }
        Self::open(dir)
    }

    /// Opens (or appends to) `dir/metrics.jsonl` and `dir/metrics.csv`.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let (jsonl, _, jsonl_cut) = open_append(&dir.join(METRICS_JSONL))?;
        let (csv, existed, csv_cut) = open_append(&dir.join(METRICS_CSV))?;
        let (mut jsonl, mut csv) = (BufWriter::new(jsonl), BufWriter::new(csv));
        // A line cut by a crash (kill -9 mid-write): end it, so the next record stands alone.
        if jsonl_cut {
            writeln!(jsonl)?;
        }
        if csv_cut {
            writeln!(csv)?;
        }
        if !existed {
            writeln!(csv, "{CSV_HEADER}")?;
        }
        Ok(Self {
            jsonl,
            csv,
            last_write: Instant::now(),
        })
    }

    /// Writes a heartbeat line if nothing was written for [`HEARTBEAT_EVERY`].
    pub fn heartbeat(&mut self, step: u64, time_s: f64) -> std::io::Result<()> {
        if self.last_write.elapsed() < HEARTBEAT_EVERY {
            return Ok(());
        }
        let beat = Record::Heartbeat(HeartbeatRecord {
            step,
            time_s,
            extra: super::record::Extra::new(),
        });
        writeln!(self.jsonl, "{}", beat.to_line())?;
        self.last_write = Instant::now();
        self.jsonl.flush()
    }

    /// Appends one event (snapshots are not logged here: [`super::snapfile::SnapshotLog`]).
    pub fn write(&mut self, event: &Event) -> std::io::Result<()> {
        let Some(record) = Record::from_event(event) else {
            return Ok(());
        };
        writeln!(self.jsonl, "{}", record.to_line())?;
        if let Some(row) = record.csv_row() {
            writeln!(self.csv, "{row}")?;
        }
        // One flush per event: a crash never leaves a half-written line.
        self.last_write = Instant::now();
        self.flush()
    }

    /// Flushes both files.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.jsonl.flush()?;
        self.csv.flush()
    }
}

impl Drop for RunLog {
    fn drop(&mut self) {
        self.flush().ok();
    }
}

/// The thread that keeps a run log's heartbeat going while the worker is busy (a long step) or
/// idle (paused): every second it writes one if nothing else was written for a while. Stops when
/// dropped.
pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    join: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeat {
    /// Starts beating into `log`, reading the step from `step` and the run's clock from `clock`
    /// (its start and the seconds before it: resumed runs continue the clock).
    pub fn start(log: Arc<Mutex<RunLog>>, step: Arc<AtomicU64>, clock: (Instant, f64)) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let join = std::thread::Builder::new()
            .name("moppa-heartbeat".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(200));
                    let mut log = log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let t = clock.1 + clock.0.elapsed().as_secs_f64();
                    // A failed heartbeat is a full disk the next real write reports.
                    log.heartbeat(step.load(Ordering::Relaxed), t).ok();
                }
            })?;
        Ok(Self { stop, join: Some(join) })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(j) = self.join.take() {
            j.join().ok();
        }
    }
}
