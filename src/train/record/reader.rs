//! Reading records back: a streaming iterator over a whole file ([`RecordReader`]) and the new
//! complete lines of a file another process is still writing ([`RecordTail`]). Memory is bounded
//! by the longest line allowed ([`MAX_LINE`], INTERFACES.md "Bounds"): a longer line is skipped
//! without being held. A line that is not UTF-8 or not a record, a record of a kind this version
//! does not know, and fields it does not know are skipped and counted ([`ReadStats`]), never fatal.

use super::Record;
use std::collections::hash_map::DefaultHasher;
use std::fs::File;
use std::hash::Hasher as _;
use std::io::{BufRead, BufReader, Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

/// The longest record line read (64 MiB); longer lines are skipped and counted.
pub const MAX_LINE: usize = 64 << 20;

/// What a reader skipped, and how much it read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Records read (of known kinds).
    pub records: u64,
    /// Lines that were not UTF-8, not JSON, or not a record.
    pub malformed: u64,
    /// Lines longer than [`MAX_LINE`].
    pub oversized: u64,
    /// Records of a kind this version does not know.
    pub unknown_kinds: u64,
    /// Fields this version does not know, over all records read.
    pub unknown_fields: u64,
}

impl ReadStats {
    /// Lines skipped for any reason.
    #[must_use]
    pub fn skipped(&self) -> u64 {
        self.malformed + self.oversized + self.unknown_kinds
    }

    /// One line saying what was skipped in `path`, if anything was.
    #[must_use]
    pub fn summary(&self, path: &Path) -> Option<String> {
        let mut parts = Vec::new();
        for (n, what) in [
            (self.malformed, "unreadable"),
            (self.oversized, "longer than 64 MiB"),
            (self.unknown_kinds, "of an unknown kind"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        (!parts.is_empty()).then(|| {
            format!(
                "{}: skipped {} line(s) ({})",
                path.display(),
                self.skipped(),
                parts.join(", ")
            )
        })
    }

    /// Parses one line (without its newline) and counts what it was.
    fn parse(&mut self, line: &[u8]) -> Option<Record> {
        let text = std::str::from_utf8(line).ok();
        let text = match text.map(str::trim) {
            Some("") => return None,
            Some(t) => t,
            None => {
                self.malformed += 1;
                return None;
            }
        };
        match serde_json::from_str::<Record>(text) {
            Ok(Record::Unknown) => {
                self.unknown_kinds += 1;
                None
            }
            Ok(r) => {
                self.records += 1;
                self.unknown_fields += r.unknown_fields() as u64;
                Some(r)
            }
            Err(_) => {
                self.malformed += 1;
                None
            }
        }
    }
}

/// The records of a file, one at a time.
pub struct RecordReader<R> {
    inner: R,
    stats: ReadStats,
    line: Vec<u8>,
}

impl RecordReader<BufReader<File>> {
    /// Opens `path` for reading.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self::new(BufReader::with_capacity(1 << 16, File::open(path)?)))
    }
}

/// How one line read ended.
enum Line {
    /// A line (possibly the last, without a newline) is in the buffer.
    Read,
    /// A line longer than [`MAX_LINE`] was skipped.
    Oversized,
    /// The end of the input.
    End,
}

impl<R: BufRead> RecordReader<R> {
    /// Reads records from `inner`.
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            stats: ReadStats::default(),
            line: Vec::new(),
        }
    }

    /// What was read and skipped so far.
    #[must_use]
    pub fn stats(&self) -> ReadStats {
        self.stats
    }

    /// Reads the next line into `self.line`, holding at most [`MAX_LINE`] bytes of it. A read
    /// error ends the input (what was read stays read).
    fn next_line(&mut self) -> Line {
        self.line.clear();
        let mut oversized = false;
        loop {
            let Ok(chunk) = self.inner.fill_buf() else {
                return Line::End;
            };
            if chunk.is_empty() {
                return match (oversized, self.line.is_empty()) {
                    (true, _) => Line::Oversized,
                    (false, true) => Line::End,
                    (false, false) => Line::Read,
                };
            }
            let (part, done) = match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => (&chunk[..i], Some(i + 1)),
                None => (chunk, None),
            };
            if !oversized && self.line.len() + part.len() <= MAX_LINE {
                self.line.extend_from_slice(part);
            } else if !oversized {
                oversized = true;
                self.line = Vec::new();
            }
            let used = done.unwrap_or(chunk.len());
            self.inner.consume(used);
            if done.is_some() {
                return if oversized { Line::Oversized } else { Line::Read };
            }
        }
    }
}

impl<R: BufRead> Iterator for RecordReader<R> {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        loop {
            match self.next_line() {
                Line::End => return None,
                Line::Oversized => self.stats.oversized += 1,
                Line::Read => {
                    let line = std::mem::take(&mut self.line);
                    let record = self.stats.parse(&line);
                    self.line = line;
                    if record.is_some() {
                        return record;
                    }
                }
            }
        }
    }
}

/// The last record of `path` that `pick` accepts (a half-written last line is ignored), read
/// without holding the file.
pub fn last_of<T>(path: &Path, mut pick: impl FnMut(Record) -> Option<T>) -> Option<T> {
    RecordReader::open(path).ok()?.filter_map(&mut pick).last()
}

/// How a followed file was found changed under its reader, which then read it again from its
/// start (the records of the new content come again; what was read of the old is not undone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// Another file now has the name (a rename over it, a delete and create).
    Replaced,
    /// The file is shorter than what was read of it.
    Truncated,
    /// Its first bytes are no longer those read (rewritten in place).
    Rewritten,
}

impl Restart {
    /// What happened, for a notice ("`metrics.jsonl` was …").
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Self::Replaced => "replaced by another file",
            Self::Truncated => "truncated",
            Self::Rewritten => "rewritten from its start",
        }
    }
}

/// How many of a file's first bytes a tail keeps to notice a rewrite in place.
const PREFIX: usize = 4096;

/// The identity of an open file (device and inode where the platform has them).
#[cfg_attr(unix, allow(clippy::unnecessary_wraps, reason = "None on platforms without inodes"))]
fn file_id(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt as _;
        Some((meta.dev(), meta.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        None
    }
}

/// The new complete records of a file that another process appends to. A file replaced under
/// the tail (another device/inode), truncated, or rewritten from its start (its first bytes
/// differ from those read) is read again from its start, and [`RecordTail::take_restart`] says so;
/// a file replaced by one that holds the same bytes and more (a copy renamed over it, as rsync
/// does) is followed on where it was, as the same file.
#[derive(Debug)]
pub struct RecordTail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    /// The line being read is longer than [`MAX_LINE`]: drop bytes until its end.
    skipping: bool,
    stats: ReadStats,
    /// The device and inode of the file read (unix).
    identity: Option<(u64, u64)>,
    /// The file's first bytes as read (up to [`PREFIX`]).
    prefix: Vec<u8>,
    /// Set when the file was found changed, until taken.
    restart: Option<Restart>,
    /// A hash of the bytes read (`..offset`), to tell a replacement that continues them.
    read_hash: DefaultHasher,
}

impl RecordTail {
    /// Follows `path` from its start (it need not exist yet).
    #[must_use]
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            offset: 0,
            partial: Vec::new(),
            skipping: false,
            stats: ReadStats::default(),
            identity: None,
            prefix: Vec::new(),
            restart: None,
            read_hash: DefaultHasher::new(),
        }
    }

    /// The file followed.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What was read and skipped so far (of the file as it is now: a restart clears it).
    #[must_use]
    pub fn stats(&self) -> ReadStats {
        self.stats
    }

    /// Bytes read so far.
    #[must_use]
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether (and how) the file was found changed since the last call: the records of the
    /// last [`Self::poll`] then start again from the file's start.
    pub fn take_restart(&mut self) -> Option<Restart> {
        self.restart.take()
    }

    /// How the open file `f` differs from what was read, if it does.
    fn changed(&self, f: &mut File, meta: &std::fs::Metadata) -> Option<Restart> {
        if self.offset == 0 {
            return None;
        }
        if meta.len() < self.offset {
            return Some(Restart::Truncated);
        }
        let id = file_id(meta);
        if self.identity.is_some() && id.is_some() && id != self.identity {
            return (!self.continues(f)).then_some(Restart::Replaced);
        }
        let mut head = vec![0u8; self.prefix.len()];
        let same = f.seek(SeekFrom::Start(0)).is_ok() && f.read_exact(&mut head).is_ok() && head == self.prefix;
        (!same).then_some(Restart::Rewritten)
    }

    /// Whether `f` starts with the bytes read so far (read once more, hashed).
    fn continues(&self, f: &mut File) -> bool {
        if f.seek(SeekFrom::Start(0)).is_err() {
            return false;
        }
        let mut hash = DefaultHasher::new();
        let mut reader = BufReader::with_capacity(1 << 16, f.take(self.offset));
        let mut seen = 0u64;
        while let Ok(chunk) = reader.fill_buf() {
            if chunk.is_empty() {
                break;
            }
            hash.write(chunk);
            let n = chunk.len();
            seen += n as u64;
            reader.consume(n);
        }
        seen == self.offset && hash.finish() == self.read_hash.finish()
    }

    /// Records appended since the last call (a line without its newline yet waits). A file
    /// replaced, truncated or rewritten is read again from its start (see [`Self::take_restart`]).
    pub fn poll(&mut self) -> Vec<Record> {
        self.poll_within(u64::MAX)
    }

    /// As [`Self::poll`], reading at most `max_bytes` of the file (the rest waits for the next
    /// call; a line cut by the limit is completed then).
    pub fn poll_within(&mut self, max_bytes: u64) -> Vec<Record> {
        let mut out = Vec::new();
        let Ok(mut f) = File::open(&self.path) else { return out };
        let Ok(meta) = f.metadata() else { return out };
        if let Some(how) = self.changed(&mut f, &meta) {
            self.offset = 0;
            self.partial.clear();
            self.skipping = false;
            self.stats = ReadStats::default();
            self.prefix.clear();
            self.restart = Some(how);
            self.read_hash = DefaultHasher::new();
        }
        self.identity = file_id(&meta);
        let len = meta.len();
        if len <= self.offset || f.seek(SeekFrom::Start(self.offset)).is_err() {
            return out;
        }
        let mut reader = BufReader::with_capacity(1 << 16, f.take((len - self.offset).min(max_bytes)));
        while let Ok(chunk) = reader.fill_buf() {
            if chunk.is_empty() {
                break;
            }
            let n = chunk.len();
            if self.prefix.len() < PREFIX && self.prefix.len() as u64 == self.offset {
                self.prefix
                    .extend_from_slice(&chunk[..n.min(PREFIX - self.prefix.len())]);
            }
            let mut start = 0;
            while let Some(i) = chunk[start..].iter().position(|b| *b == b'\n') {
                let end = start + i;
                if self.skipping {
                    self.stats.oversized += 1;
                    self.skipping = false;
                } else if self.partial.len() + (end - start) > MAX_LINE {
                    self.stats.oversized += 1;
                    self.partial = Vec::new();
                } else {
                    self.partial.extend_from_slice(&chunk[start..end]);
                    let line = std::mem::take(&mut self.partial);
                    out.extend(self.stats.parse(&line));
                }
                start = end + 1;
            }
            let rest = &chunk[start..];
            if !self.skipping {
                if self.partial.len() + rest.len() > MAX_LINE {
                    self.skipping = true;
                    self.partial = Vec::new();
                } else {
                    self.partial.extend_from_slice(rest);
                }
            }
            self.read_hash.write(chunk);
            reader.consume(n);
            self.offset += n as u64;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat(step: u64) -> String {
        format!("{{\"kind\":\"heartbeat\",\"step\":{step},\"time_s\":1.0}}\n")
    }

    #[test]
    fn skips_and_counts_what_it_cannot_read() {
        let text = format!(
            "{}not json\n{{\"kind\":\"gradient_norms\"}}\n\u{0}\u{ff}\n{}{{\"kind\":\"progress\"}}\n",
            heartbeat(1),
            heartbeat(2)
        );
        let mut bytes = text.into_bytes();
        bytes.extend_from_slice(&[0xff, 0xfe, b'\n']);
        let mut r = RecordReader::new(std::io::Cursor::new(bytes));
        let steps: Vec<u64> = r
            .by_ref()
            .filter_map(|rec| match rec {
                Record::Heartbeat(h) => Some(h.step),
                _ => None,
            })
            .collect();
        assert_eq!(steps, [1, 2]);
        let s = r.stats();
        // "not json", the NUL line, the progress without a step, the non-UTF-8 line.
        assert_eq!((s.records, s.malformed, s.unknown_kinds, s.oversized), (2, 4, 1, 0));
    }

    #[test]
    fn a_tail_waits_for_the_end_of_a_line_and_restarts_on_a_shorter_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("metrics.jsonl");
        let mut tail = RecordTail::new(path.clone());
        assert!(tail.poll().is_empty(), "no file yet");
        let one = heartbeat(1);
        let two = heartbeat(2);
        std::fs::write(&path, format!("{one}{}", &two[..10])).expect("write");
        assert_eq!(tail.poll().len(), 1);
        std::fs::write(&path, format!("{one}{two}")).expect("write");
        let got = tail.poll();
        assert!(
            matches!(got.as_slice(), [Record::Heartbeat(h)] if h.step == 2),
            "{got:?}"
        );
        std::fs::write(&path, heartbeat(9)).expect("write");
        let got = tail.poll();
        assert!(
            matches!(got.as_slice(), [Record::Heartbeat(h)] if h.step == 9),
            "{got:?}"
        );
    }
}
