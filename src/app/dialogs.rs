//! The app's dialogs: the Connect… form, and native file dialogs run on a thread of their own, so
//! the window keeps drawing (and its runs keep showing) while one is open. The answer comes back
//! with the action that asked for it and wakes the window. A dialog that closes at once without
//! a choice most likely never opened (no xdg-desktop-portal or zenity on this desktop): the app
//! says so instead of doing nothing.

use super::panels::Action;
use crate::train::worker::Waker;
use crossbeam_channel::{Receiver, Sender, bounded};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A dialog answered faster than this without a choice is taken as one that never opened.
const NEVER_OPENED: Duration = Duration::from_millis(150);

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
    /// Closed at once without a choice: no dialog could be shown here.
    NeverOpened,
}

/// The Connect… form and the file dialog in flight.
pub struct Dialogs {
    /// The Connect… dialog.
    pub connect: ConnectForm,
    answers: (Sender<Answer>, Receiver<Answer>),
    open: bool,
}

impl Default for Dialogs {
    fn default() -> Self {
        Self {
            connect: ConnectForm::default(),
            answers: bounded(4),
            open: false,
        }
    }
}

impl Dialogs {
    /// Opens a file dialog for `action` on a thread of its own (one at a time: false while
    /// another is open, or when no thread could be started).
    pub fn ask(&mut self, action: Action, request: FileRequest, waker: Waker) -> bool {
        if self.open {
            return false;
        }
        let tx = self.answers.0.clone();
        let started = std::thread::Builder::new()
            .name("moppa-file-dialog".into())
            .spawn(move || {
                let t = Instant::now();
                let paths = request.run();
                let answer = match (paths.is_empty(), t.elapsed() < NEVER_OPENED) {
                    (false, _) => Answer::Chosen(action, paths),
                    (true, true) => Answer::NeverOpened,
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
