//! The app's dialogs: the Connect… form, and file dialogs. A native dialog runs on a thread of
//! its own, so the window keeps drawing (and its runs keep showing) while one is open; the answer
//! comes back with the action that asked for it and wakes the window. Where no native dialog can
//! open (neither xdg-desktop-portal nor zenity, checked once at start without blocking; or
//! `MOPPA_TYPED_PATHS=1`), every file action asks for a typed path in the window instead, with
//! completion and the recent runs; the app says once why.

use super::panels::Action;
use crate::train::worker::Waker;
use crossbeam_channel::{Receiver, Sender, bounded};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A dialog answered faster than this without a choice is taken as one that never opened.
const NEVER_OPENED: Duration = Duration::from_millis(150);

/// Set to `1` to type paths in the window instead of native file dialogs.
pub const TYPED_PATHS_ENV: &str = "MOPPA_TYPED_PATHS";

/// Whether a native file dialog can open here: on Linux, rfd asks xdg-desktop-portal over the
/// session bus, else runs zenity. Looks at files only (the portal's D-Bus service file, zenity on
/// `PATH`): it never blocks.
#[must_use]
pub fn native_dialogs_available() -> bool {
    if std::env::var(TYPED_PATHS_ENV).is_ok_and(|v| v == "1") {
        return false;
    }
    if !cfg!(target_os = "linux") {
        return true;
    }
    let on_path =
        |exe: &str| std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(exe).is_file()));
    let data_dirs = std::env::var("XDG_DATA_DIRS").unwrap_or_else(|_| "/usr/local/share:/usr/share".into());
    let portal = std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some()
        && data_dirs.split(':').any(|d| {
            std::path::Path::new(d)
                .join("dbus-1/services/org.freedesktop.portal.Desktop.service")
                .is_file()
        });
    portal || on_path("zenity")
}

/// The in-window form that asks for a path where no native dialog opens.
#[derive(Clone, Debug)]
pub struct PathForm {
    /// The action that asked.
    pub action: Action,
    /// What it picks.
    pub pick: Pick,
    /// The path typed so far.
    pub text: String,
    /// What the form says it is for.
    pub title: String,
    /// File extensions offered (empty: any).
    pub extensions: &'static [&'static str],
    /// The completions of the text they were listed for (the folder is read when it changes,
    /// not every frame).
    listed: Option<(String, Vec<String>)>,
}

impl PathForm {
    /// Entries of the typed path's folder that start with its last part (folders end with `/`),
    /// at most `max`, sorted; files only where a file is asked for and matches the filter. Read
    /// again only when the text changed.
    pub fn completions(&mut self, max: usize) -> &[String] {
        if self.listed.as_ref().is_none_or(|(t, _)| *t != self.text) {
            self.listed = Some((self.text.clone(), self.list(max)));
        }
        self.listed.as_ref().map_or(&[], |(_, l)| l.as_slice())
    }

    fn list(&self, max: usize) -> Vec<String> {
        let extensions = self.extensions;
        let typed = expand_home(&self.text);
        let (dir, prefix) = if typed.ends_with('/') || typed.is_empty() {
            (
                PathBuf::from(if typed.is_empty() { "." } else { typed.as_str() }),
                String::new(),
            )
        } else {
            let p = PathBuf::from(&typed);
            let prefix = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let dir = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), PathBuf::from);
            (dir, prefix)
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let folders_only = matches!(self.pick, Pick::Folder | Pick::Folders);
        let mut out: Vec<String> = entries
            .flatten()
            .take(10_000)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.starts_with(&prefix) || (name.starts_with('.') && !prefix.starts_with('.')) {
                    return None;
                }
                let is_dir = e.path().is_dir();
                let ext_ok = extensions.is_empty()
                    || e.path()
                        .extension()
                        .is_some_and(|x| extensions.iter().any(|w| x.eq_ignore_ascii_case(w)));
                if !is_dir && (folders_only || !ext_ok) {
                    return None;
                }
                let full = if typed.is_empty() {
                    name
                } else {
                    dir.join(name).display().to_string()
                };
                let full = full.strip_prefix("./").map(str::to_owned).unwrap_or(full);
                Some(if is_dir { format!("{full}/") } else { full })
            })
            .collect();
        out.sort();
        out.truncate(max);
        out
    }

    /// The path typed (`~` expanded), if any.
    #[must_use]
    pub fn path(&self) -> Option<PathBuf> {
        let t = self.text.trim();
        (!t.is_empty()).then(|| PathBuf::from(expand_home(t)))
    }
}

/// `~/x` as the home folder's `x`.
fn expand_home(s: &str) -> String {
    match (s.strip_prefix("~/"), std::env::var("HOME")) {
        (Some(rest), Ok(home)) => format!("{home}/{rest}"),
        _ => s.to_owned(),
    }
}

/// The Connect… dialog's fields.
#[derive(Clone, Debug, Default)]
pub struct ConnectForm {
    /// Whether the dialog is open.
    pub open: bool,
    /// `HOST:PORT`.
    pub addr: String,
    /// The token (empty: watch only).
    pub token: String,
}

/// What a file dialog asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// One existing file.
    File,
    /// One folder.
    Folder,
    /// Several folders.
    Folders,
    /// A file to write.
    Save,
}

/// One file dialog: what it picks, its filter and the file name it suggests.
#[derive(Clone, Debug)]
pub struct FileRequest {
    /// What it picks.
    pub pick: Pick,
    /// A filter (`("CSV", &["csv"])`).
    pub filter: Option<(&'static str, &'static [&'static str])>,
    /// The name suggested for a file to write.
    pub file_name: Option<String>,
}

impl FileRequest {
    /// A request for `pick`.
    #[must_use]
    pub fn new(pick: Pick) -> Self {
        Self {
            pick,
            filter: None,
            file_name: None,
        }
    }

    /// With a filter.
    #[must_use]
    pub fn filter(mut self, name: &'static str, extensions: &'static [&'static str]) -> Self {
        self.filter = Some((name, extensions));
        self
    }

    /// With a suggested file name.
    #[must_use]
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.file_name = Some(name.into());
        self
    }

    /// Runs the dialog (blocking this thread): the paths chosen, empty when cancelled.
    fn run(&self) -> Vec<PathBuf> {
        let mut d = rfd::AsyncFileDialog::new();
        if let Some((name, ext)) = self.filter {
            d = d.add_filter(name, ext);
        }
        if let Some(n) = &self.file_name {
            d = d.set_file_name(n);
        }
        let one = |h: Option<rfd::FileHandle>| h.map(|h| vec![h.path().to_owned()]).unwrap_or_default();
        let many = |h: Option<Vec<rfd::FileHandle>>| {
            h.map(|v| v.iter().map(|h| h.path().to_owned()).collect())
                .unwrap_or_default()
        };
        match self.pick {
            Pick::File => one(pollster::block_on(d.pick_file())),
            Pick::Folder => one(pollster::block_on(d.pick_folder())),
            Pick::Folders => many(pollster::block_on(d.pick_folders())),
            Pick::Save => one(pollster::block_on(d.save_file())),
        }
    }
}

/// What came back from a file dialog.
#[derive(Debug)]
pub enum Answer {
    /// The action that asked, with the paths chosen.
    Chosen(Action, Vec<PathBuf>),
    /// Cancelled by the user.
    Cancelled,
    /// Closed at once without a choice: no dialog could be shown here (the action that asked).
    NeverOpened(Action),
}

/// The Connect… form and the file dialog in flight (native, or the typed-path form).
pub struct Dialogs {
    /// The Connect… dialog.
    pub connect: ConnectForm,
    /// The typed-path form, while one is open.
    pub typed: Option<PathForm>,
    /// Whether native dialogs are used (else every file action asks for a typed path).
    pub native: bool,
    /// Whether the app said why it asks for typed paths.
    pub told: bool,
    answers: (Sender<Answer>, Receiver<Answer>),
    open: bool,
}

impl Default for Dialogs {
    fn default() -> Self {
        Self::new(true)
    }
}

impl Dialogs {
    /// Dialogs, native ones if `native`.
    #[must_use]
    pub fn new(native: bool) -> Self {
        Self {
            connect: ConnectForm::default(),
            typed: None,
            native,
            told: false,
            answers: bounded(4),
            open: false,
        }
    }

    /// The typed path form's answer: the path (when `ok`) or a cancel.
    pub fn answer_typed(&mut self, ok: bool) {
        let Some(form) = self.typed.take() else { return };
        let answer = match form.path() {
            Some(p) if ok => Answer::Chosen(form.action, vec![p]),
            _ => Answer::Cancelled,
        };
        self.answers.0.try_send(answer).ok();
    }

    /// Asks for a file with a native dialog on a thread of its own, or with the typed-path form
    /// where none opens (one at a time: false while another is open, or when no thread could be
    /// started).
    pub fn ask(&mut self, action: Action, request: FileRequest, waker: Waker) -> bool {
        if self.open || self.typed.is_some() {
            return false;
        }
        if !self.native {
            let title = match request.pick {
                Pick::File => "Open a file",
                Pick::Folder => "Choose a folder",
                Pick::Folders => "Open a run folder",
                Pick::Save => "Save as",
            };
            let text = match (&request.pick, &request.file_name) {
                (Pick::Save, Some(n)) => n.clone(),
                _ => String::new(),
            };
            self.typed = Some(PathForm {
                action,
                pick: request.pick,
                text,
                title: title.into(),
                extensions: request.filter.map_or(&[][..], |f| f.1),
                listed: None,
            });
            return true;
        }
        let tx = self.answers.0.clone();
        let started = std::thread::Builder::new()
            .name("moppa-file-dialog".into())
            .spawn(move || {
                let t = Instant::now();
                let paths = request.run();
                let answer = match (paths.is_empty(), t.elapsed() < NEVER_OPENED) {
                    (false, _) => Answer::Chosen(action, paths),
                    (true, true) => Answer::NeverOpened(action),
                    (true, false) => Answer::Cancelled,
                };
                tx.send(answer).ok();
                waker();
            });
        self.open = started.is_ok();
        self.open
    }

    /// The answer of the dialog in flight, once it came back.
    pub fn answer(&mut self) -> Option<Answer> {
        let a = self.answers.1.try_recv().ok()?;
        self.open = false;
        Some(a)
    }
}
