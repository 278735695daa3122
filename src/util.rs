//! Small helpers shared by every layer: number formatting, memory figures, allocator set-up, and
//! the one atomic file write.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// `12345678` → `12,345,678`.
#[must_use]
pub fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A number as a user typed it, kept short: `1e308` rather than 309 digits.
#[must_use]
pub fn short_number(v: f64) -> String {
    if v != 0.0 && v.is_finite() && !(1e-4..1e7).contains(&v.abs()) {
        format!("{v:e}")
    } else {
        format!("{v}")
    }
}

/// Resident memory of this process in MiB (Linux; `None` elsewhere).
#[must_use]
pub fn resident_mib() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0 / (1024.0 * 1024.0))
}

/// Makes glibc keep freed memory for reuse instead of handing it back to the kernel at once.
///
/// A training step frees and reallocates the same multi-MB activation and gradient buffers every
/// step. By default glibc serves large blocks with `mmap` and unmaps them on free, and trims the
/// heap top beyond 128 KiB, so every step pays page faults and the kernel's zeroing of fresh pages
/// again (~12% of the tiny LoRA step in `perf`). With the largest `mmap` threshold glibc accepts
/// (32 MiB) and no trimming below 1 GiB, 30 LoRA steps take 212k page faults instead of 601k and
/// the tiny step at batch 64 on 2 cores is 4-13% shorter for full fine-tuning and the adapters
/// (linear probing: ~2% longer); README, Performance. The process keeps up to 1 GiB of freed heap
/// until it exits. Call once, first thing in `main`, before other threads exist; a no-op where
/// the C library is not glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: `mallopt` only sets allocator parameters, and it runs before any other thread
    // exists; a rejected value leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Lowers the calling thread's scheduling priority by `by` nice steps from the one it has
/// (inherited from the thread that started it; Linux: 0 normal … 19 lowest, capped at 19), so
/// that a display's thread on the same cores runs first whenever it has a frame to draw and the
/// thread takes every cycle the display leaves — also when the whole process was started under
/// `nice`. Only this thread changes (Linux keeps a nice value per thread); threads it starts later
/// inherit it. Best effort: where the call is refused or the platform has no per-thread nice
/// value the priority stays as it was, and `false` says so.
#[must_use]
pub fn lower_thread_priority(by: i32) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let Some(current) = thread_nice() else { return false };
        let target = (current + by.max(0)).min(19);
        #[allow(unsafe_code)]
        // SAFETY: `gettid` has no preconditions; `setpriority` on this thread's own id changes
        // only its nice value, and raising a nice value needs no privilege.
        unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, target) == 0
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = by;
        false
    }
}

/// The calling thread's nice value (Linux: field 19 of `/proc/thread-self/stat`, the 17th after
/// the parenthesised name); `None` elsewhere.
#[must_use]
pub fn thread_nice() -> Option<i32> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    let (_, after_name) = stat.rsplit_once(')')?;
    after_name.split_whitespace().nth(16)?.parse().ok()
}

/// A file written to a temporary name next to its destination and synced, waiting to be put in
/// place by [`StagedFile::commit`]; dropped uncommitted, the temporary file is removed. Staging
/// several files before committing any lets a group of files (a checkpoint's adapter and state)
/// replace the previous group only once every new file is complete on disk.
#[derive(Debug)]
pub struct StagedFile {
    tmp: PathBuf,
    path: PathBuf,
    done: bool,
}

impl StagedFile {
    /// Writes `path`'s new content to `.NAME.tmpPID` in the same folder and syncs it.
    pub fn write(
        path: &Path,
        write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
    ) -> std::io::Result<Self> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
        let staged = Self {
            tmp: dir.join(format!(".{name}.tmp{}", std::process::id())),
            path: path.to_owned(),
            done: false,
        };
        let mut buf = std::io::BufWriter::new(std::fs::File::create(&staged.tmp)?);
        write(&mut buf)?;
        buf.flush()?;
        let file = buf.into_inner().map_err(std::io::IntoInnerError::into_error)?;
        file.sync_all()?;
        Ok(staged)
    }

    /// Renames the temporary file over the destination.
    pub fn commit(mut self) -> std::io::Result<()> {
        std::fs::rename(&self.tmp, &self.path)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.done {
            std::fs::remove_file(&self.tmp).ok();
        }
    }
}

/// Writes a file atomically: `write` fills a temporary file in the same folder, which is synced
/// and renamed over `path`. On any failure the temporary file is removed and `path` is left as
/// it was, so a reader never sees half a file.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    StagedFile::write(path, write)?.commit()
}

/// The machine's physical memory in bytes (Linux `MemTotal`; `None` where unknown).
#[must_use]
pub fn physical_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Compute threads for a request: at most the machine's available parallelism (more only
/// oversubscribes the cores and slows every step). Returns the count and, when the request was
/// lowered, a warning saying so.
#[must_use]
pub fn clamp_threads(requested: Option<usize>) -> (usize, Option<String>) {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    match requested {
        Some(n) if n > cores => (
            cores,
            Some(format!(
                "--threads {n} is more than the {cores} this machine can run at once; using {cores}"
            )),
        ),
        Some(n) => (n.max(1), None),
        None => (cores, None),
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 (with padding).
#[must_use]
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional); `None` for anything else.
#[must_use]
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = text
        .bytes()
        .filter(|c| *c != b'=')
        .map(|c| B64.iter().position(|x| *x == c).map(|p| p as u8))
        .collect::<Option<_>>()?;
    if digits.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let mut n = 0u32;
        for (i, d) in chunk.iter().enumerate() {
            n |= u32::from(*d) << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

/// `YYYY-MM-DD_HHMMSS` in UTC for a time since the Unix epoch (for folder names that sort by
/// date).
#[must_use]
pub fn utc_stamp(since_epoch: std::time::Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm, proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}_{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::utc_stamp;
    use std::time::Duration;

    #[test]
    #[allow(clippy::duration_suboptimal_units)] // the seconds `date -u -d @S` takes
    fn utc_stamps_match_known_dates() {
        // `date -u -d @0 +%F_%H%M%S`, `date -u -d @951782400 …` (a leap day), `@1796132096`.
        assert_eq!(utc_stamp(Duration::from_secs(0)), "1970-01-01_000000");
        assert_eq!(utc_stamp(Duration::from_secs(951_782_400)), "2000-02-29_000000");
        assert_eq!(utc_stamp(Duration::from_secs(1_796_132_096)), "2026-12-01_133456");
    }
}
