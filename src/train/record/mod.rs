//! The run record: one serde type ([`Record`]) for every line of a run folder's `metrics.jsonl`
//! and `snapshots.jsonl` (INTERFACES.md "Run folder"), used by the one writer ([`super::runlog`],
//! [`super::snapfile::SnapshotLog`]) and by every reader through [`reader`]: replay and follow,
//! `compare --collect`, `--auto-resume`, `moppa eval --run`, pretraining's report and the app's
//! folder cleanup.
//!
//! What the files hold beyond INTERFACES.md's list is kept, so every folder written before this
//! type still reads and a parse → write round trip of its lines is JSON-equal: `epoch` and
//! `class_loss` in progress, `checkpoints` in finished, a divergence written as `kind:"error"`
//! with `diverged:true`, the whole [`RunInfo`] under `started.info` (absent in older folders),
//! NaN written as `null` (MAE's `train_acc`), 5 significant digits in snapshots. Fields this
//! version does not know are kept in each record's `extra` (and written back); lines of a kind it
//! does not know become [`Record::Unknown`]. Neither is fatal: the reader counts them.

mod bounds;
pub mod reader;
pub mod snapshot;

pub use bounds::{check_ablation, check_info};

pub use reader::{ReadStats, RecordReader, RecordTail, Restart};
pub use snapshot::{ProbeRecord, RouterRecord, SnapshotHeader, SnapshotRecord};

use super::protocol::{
    Ablation, Applied, EvalResult, Event, FinishReason, Finished, Misclassified, Notice, Progress, RunInfo,
};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use std::path::PathBuf;

/// Fields of a record this version does not know, kept as read (and written back).
pub type Extra = Map<String, Value>;

/// One line of `metrics.jsonl` or `snapshots.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// The first line of `snapshots.jsonl`: what every snapshot's arrays are shaped by.
    Header(SnapshotHeader),
    /// The live internals at one step (`snapshots.jsonl`).
    Snapshot(Box<SnapshotRecord>),
    /// The run (or a resumed part of it) started.
    Started(Box<StartedRecord>),
    /// One optimizer step's numbers.
    Progress(ProgressRecord),
    /// An evaluation.
    Eval(EvalRecord),
    /// A live command took effect.
    Applied(AppliedRecord),
    /// Something worth knowing; the run went on.
    Warning(NoticeRecord),
    /// Something went wrong (a divergence carries `diverged: true`).
    Error(NoticeRecord),
    /// The run ended.
    Finished(FinishedRecord),
    /// The worker is alive (at least every 10 s).
    Heartbeat(HeartbeatRecord),
    /// A prior ablation (INTERFACES.md "Router diagnostics").
    Ablation(Box<Ablation>),
    /// A kind this version does not know (skipped and counted by the reader).
    #[serde(other)]
    Unknown,
}

/// `null` (how serde_json writes NaN and infinities) reads back as NaN.
pub(crate) fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// A number that may have been written as `null`.
#[derive(Deserialize)]
#[serde(transparent)]
struct Lenient(#[serde(deserialize_with = "nan_if_null")] f64);

/// A list of numbers, `null` entries read as NaN.
pub(crate) fn nan_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    Ok(Vec::<Lenient>::deserialize(d)?.into_iter().map(|x| x.0).collect())
}

fn nan() -> f64 {
    f64::NAN
}

fn unknown_device() -> String {
    "?".into()
}

fn val_split() -> String {
    "val".into()
}

/// `started`: the run's facts. Folders written before `info` was recorded carry only the first
/// four fields; the replay then takes the rest from `config.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StartedRecord {
    /// The step the run (or its resumed part) starts at.
    #[serde(default)]
    pub step: u64,
    /// Seconds since the run started (0 for a fresh run).
    #[serde(default, deserialize_with = "nan_if_null")]
    pub time_s: f64,
    /// Method label.
    #[serde(default)]
    pub method: String,
    /// Trainable scalars.
    #[serde(default)]
    pub trainable: usize,
    /// `cpu` or `cuda:0`.
    #[serde(default = "unknown_device")]
    pub device: String,
    /// CPU threads.
    #[serde(default)]
    pub threads: usize,
    /// Everything a display needs (absent, or unreadable, in older folders).
    #[serde(default, deserialize_with = "lenient_info", skip_serializing_if = "Option::is_none")]
    pub info: Option<Box<RunInfo>>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// An `info` that an older version wrote in another shape reads as absent, not as a bad line.
fn lenient_info<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RunInfo>>, D::Error> {
    let v = Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

/// `progress`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgressRecord {
    /// Steps done.
    pub step: u64,
    /// Seconds since start.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub time_s: f64,
    /// Epoch (fractional).
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub epoch: f64,
    /// Total loss.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub loss: f64,
    /// Route loss (× λ).
    #[serde(default, deserialize_with = "nan_if_null")]
    pub route_loss: f64,
    /// Batch accuracy 0..1 (NaN for pretraining without a classifier).
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub train_acc: f64,
    /// Learning rate used.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub lr: f64,
    /// Throughput.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub img_per_s: f64,
    /// SupMAE: the classifier's cross-entropy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_loss: Option<f64>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `eval`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Step.
    pub step: u64,
    /// Seconds since start.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub time_s: f64,
    /// `val` or `test`.
    #[serde(default = "val_split")]
    pub split: String,
    /// Mean loss.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub loss: f64,
    /// Accuracy 0..1 (NaN without a classifier).
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub acc: f64,
    /// Accuracy per class.
    #[serde(default, deserialize_with = "nan_list")]
    pub per_class_acc: Vec<f64>,
    /// Images evaluated (0 in records written before it was recorded; then left out).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub n: u64,
    /// Counts, `confusion[true][predicted]` (absent in older records).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub confusion: Vec<Vec<u64>>,
    /// Validation: misclassified images, the most confident first (absent in older records).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub misclassified: Vec<Misclassified>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `applied`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppliedRecord {
    /// Step at which it applies.
    #[serde(default)]
    pub step: u64,
    /// Seconds since start.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub time_s: f64,
    /// What changed.
    #[serde(default)]
    pub command: String,
    /// `all` or a block index.
    #[serde(default)]
    pub target: String,
    /// Old value.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub old: f64,
    /// New value.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub new: f64,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `warning` and `error`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NoticeRecord {
    /// Step.
    #[serde(default)]
    pub step: u64,
    /// Seconds since start.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub time_s: f64,
    /// One line.
    #[serde(default)]
    pub message: String,
    /// An error that is a divergence (the loss or a gradient was not finite).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub diverged: bool,
    /// File involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Line in that file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `finished`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinishedRecord {
    /// Steps done.
    #[serde(default)]
    pub step: u64,
    /// Seconds since start.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub time_s: f64,
    /// Why it ended.
    pub reason: FinishReason,
    /// Best validation accuracy seen.
    #[serde(default)]
    pub best_val_acc: Option<f64>,
    /// Final test accuracy.
    #[serde(default)]
    pub test_acc: Option<f64>,
    /// Checkpoints written.
    #[serde(default)]
    pub checkpoints: Vec<String>,
    /// For a failed run: what failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// For a failed run: the file involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `heartbeat`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatRecord {
    /// The step the worker is at.
    #[serde(default)]
    pub step: u64,
    /// Seconds since start.
    #[serde(default = "nan", deserialize_with = "nan_if_null")]
    pub time_s: f64,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

fn path_text(p: Option<&PathBuf>) -> Option<String> {
    p.map(|p| p.display().to_string())
}

impl NoticeRecord {
    fn from_notice(n: &Notice, diverged: bool) -> Self {
        Self {
            step: n.step,
            time_s: n.time_s,
            message: n.message.clone(),
            diverged,
            path: path_text(n.path.as_ref()),
            line: n.line,
            extra: Extra::new(),
        }
    }

    fn to_notice(&self) -> Notice {
        Notice {
            step: self.step,
            time_s: self.time_s,
            message: self.message.clone(),
            path: self.path.as_ref().map(PathBuf::from),
            line: self.line,
        }
    }
}

impl Record {
    /// The record of an event, as `metrics.jsonl` holds it (`None` for what is not logged there:
    /// snapshots, which `snapshots.jsonl` holds in its own form, pauses and file transfers).
    #[must_use]
    pub fn from_event(event: &Event) -> Option<Self> {
        Some(match event {
            Event::Started(info) => Self::Started(Box::new(StartedRecord {
                step: info.start_step,
                time_s: 0.0,
                method: info.method.clone(),
                trainable: info.trainable,
                device: info.device.clone(),
                threads: info.threads,
                info: Some(info.clone()),
                extra: Extra::new(),
            })),
            Event::Progress(p) => Self::Progress(ProgressRecord {
                step: p.step,
                time_s: p.time_s,
                epoch: p.epoch,
                loss: p.loss,
                route_loss: p.route_loss,
                train_acc: p.train_acc,
                lr: p.lr,
                img_per_s: p.img_per_s,
                class_loss: p.class_loss,
                extra: Extra::new(),
            }),
            Event::Eval(e) => Self::Eval(EvalRecord {
                step: e.step,
                time_s: e.time_s,
                split: e.split.clone(),
                loss: e.loss,
                acc: e.acc,
                per_class_acc: e.per_class_acc.clone(),
                n: e.n,
                confusion: e.confusion.clone(),
                misclassified: e.misclassified.clone(),
                extra: Extra::new(),
            }),
            Event::Ablation(a) => Self::Ablation(a.clone()),
            Event::Applied(a) => Self::Applied(AppliedRecord {
                step: a.step,
                time_s: a.time_s,
                command: a.command.clone(),
                target: a.target.clone(),
                old: a.old,
                new: a.new,
                extra: Extra::new(),
            }),
            Event::Warning(n) => Self::Warning(NoticeRecord::from_notice(n, false)),
            Event::Error(n) => Self::Error(NoticeRecord::from_notice(n, false)),
            Event::Diverged(n) => Self::Error(NoticeRecord::from_notice(n, true)),
            Event::Finished(f) => Self::Finished(FinishedRecord {
                step: f.steps,
                time_s: f.time_s,
                reason: f.reason,
                best_val_acc: f.best_val_acc,
                test_acc: f.test_acc,
                checkpoints: f.checkpoints.iter().map(|p| p.display().to_string()).collect(),
                message: f.message.clone(),
                path: path_text(f.path.as_ref()),
                extra: Extra::new(),
            }),
            Event::Snapshot(_)
            | Event::Paused { .. }
            | Event::Resumed { .. }
            | Event::RunFile { .. }
            | Event::AblationProgress { .. } => return None,
        })
    }

    /// The event a `metrics.jsonl` record stands for (`None` for headers, snapshots,
    /// heartbeats and unknown kinds; `started` needs the run folder's config for older folders,
    /// so the replay turns it into an event itself).
    #[must_use]
    pub fn to_event(&self) -> Option<Event> {
        Some(match self {
            Self::Started(s) => Event::Started(s.info.clone()?),
            Self::Progress(p) => Event::Progress(Progress {
                step: p.step,
                epoch: p.epoch,
                loss: p.loss,
                route_loss: p.route_loss,
                train_acc: p.train_acc,
                lr: p.lr,
                img_per_s: p.img_per_s,
                time_s: p.time_s,
                class_loss: p.class_loss,
            }),
            Self::Eval(e) => Event::Eval(EvalResult {
                step: e.step,
                split: e.split.clone(),
                loss: e.loss,
                acc: e.acc,
                per_class_acc: e.per_class_acc.clone(),
                n: e.n,
                time_s: e.time_s,
                confusion: e.confusion.clone(),
                misclassified: e.misclassified.clone(),
            }),
            Self::Ablation(a) => Event::Ablation(a.clone()),
            Self::Applied(a) => Event::Applied(Applied {
                step: a.step,
                command: a.command.clone(),
                target: a.target.clone(),
                old: a.old,
                new: a.new,
                time_s: a.time_s,
            }),
            Self::Warning(n) => Event::Warning(n.to_notice()),
            Self::Error(n) if n.diverged => Event::Diverged(n.to_notice()),
            Self::Error(n) => Event::Error(n.to_notice()),
            Self::Finished(f) => Event::Finished(Finished {
                reason: f.reason,
                steps: f.step,
                best_val_acc: f.best_val_acc,
                test_acc: f.test_acc,
                checkpoints: f.checkpoints.iter().map(PathBuf::from).collect(),
                time_s: f.time_s,
                message: f.message.clone(),
                path: f.path.as_ref().map(PathBuf::from),
            }),
            Self::Header(_) | Self::Snapshot(_) | Self::Heartbeat(_) | Self::Unknown => return None,
        })
    }

    /// How many fields of this record this version did not know.
    #[must_use]
    pub fn unknown_fields(&self) -> usize {
        match self {
            Self::Header(h) => h.extra.len(),
            Self::Snapshot(s) => s.extra.len(),
            Self::Started(s) => s.extra.len(),
            Self::Progress(p) => p.extra.len(),
            Self::Eval(e) => e.extra.len(),
            Self::Applied(a) => a.extra.len(),
            Self::Warning(n) | Self::Error(n) => n.extra.len(),
            Self::Finished(f) => f.extra.len(),
            Self::Heartbeat(h) => h.extra.len(),
            Self::Ablation(_) | Self::Unknown => 0,
        }
    }

    /// The record as one line of JSON (without the newline), keys sorted and f32 values widened
    /// to f64 as every earlier version wrote them (through a `serde_json::Value`), so a line
    /// read and written again is the same JSON. Serialising plain data cannot fail; were it
    /// ever to, the line says so rather than vanishing.
    #[must_use]
    pub fn to_line(&self) -> String {
        serde_json::to_value(self).map_or_else(
            |e| format!("{{\"kind\":\"warning\",\"message\":\"unwritable record: {e}\"}}"),
            |v| v.to_string(),
        )
    }

    /// The record's `metrics.csv` row (progress and evaluations; the app's export writes the
    /// same rows).
    #[must_use]
    pub fn csv_row(&self) -> Option<String> {
        match self {
            Self::Progress(p) => Some(format!(
                "progress,{},{:.4},,{},{},{},{},{:.2}",
                p.step, p.time_s, p.loss, p.route_loss, p.train_acc, p.lr, p.img_per_s
            )),
            Self::Eval(e) => Some(format!(
                "eval,{},{:.4},{},{},,{},,",
                e.step, e.time_s, e.split, e.loss, e.acc
            )),
            _ => None,
        }
    }
}

/// The header of `metrics.csv`.
pub const CSV_HEADER: &str = "kind,step,time_s,split,loss,route_loss,acc,lr,img_per_s";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_is_written_as_null_and_read_back() {
        let line = r#"{"kind":"progress","step":3,"time_s":1.5,"epoch":0.1,"loss":2.0,"route_loss":0.0,"train_acc":null,"lr":0.01,"img_per_s":100.0}"#;
        let r: Record = serde_json::from_str(line).expect("a progress line");
        let Record::Progress(p) = &r else { panic!("{r:?}") };
        assert!(p.train_acc.is_nan());
        let back: Value = serde_json::from_str(&r.to_line()).expect("json");
        assert_eq!(back, serde_json::from_str::<Value>(line).expect("json"));
    }

    #[test]
    fn an_ablation_line_reads_back_and_a_hostile_one_is_refused() {
        use crate::train::protocol::USAGE_BINS;
        let line = format!(
            r#"{{"kind":"ablation","step":40,"time_s":2.0,"split":"val","n":8,"base":{{"acc":0.5,"loss":1.0,"per_class_acc":[0.5,0.5]}},"rows":[{{"prior":"wave","block":"all","acc":0.25,"loss":2.0,"per_class_acc":[0.0,0.5]}},{{"prior":"wave","block":1,"acc":0.5,"loss":1.1,"per_class_acc":[0.5,0.5]}}],"usage":[{{"block":1,"class_share":[[0.2,0.8],[]],"hf_corr":[null,0.3],"hist":[{h},{h}]}}],"seconds":0.5}}"#,
            h = serde_json::to_string(&vec![0u32; USAGE_BINS * USAGE_BINS]).unwrap_or_default()
        );
        let Ok(Record::Ablation(a)) = serde_json::from_str::<Record>(&line) else {
            panic!("not an ablation: {line}")
        };
        assert_eq!(a.rows[0].block, crate::train::protocol::AblationBlock::ALL);
        assert_eq!(a.rows[1].block, crate::train::protocol::AblationBlock::One(1));
        assert!(a.usage[0].hf_corr[0].is_nan());
        assert!(check_ablation(&a).is_ok());
        // Written back: the same JSON (null for NaN, "all" for every block).
        let again: serde_json::Value = serde_json::from_str(&Record::Ablation(a.clone()).to_line()).unwrap_or_default();
        let first: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        assert_eq!(again, first);
        let mut bad = a.clone();
        bad.usage[0].hist[0].push(1);
        assert!(check_ablation(&bad).is_err(), "a histogram of the wrong size");
        let mut bad = a;
        bad.rows[0].score.per_class_acc.push(1.0);
        assert!(check_ablation(&bad).is_err(), "per-class lists of different lengths");
    }

    #[test]
    fn unknown_kinds_and_fields_are_kept_apart() {
        let r: Record = serde_json::from_str(r#"{"kind":"gradient_norms","step":1}"#).expect("any kind reads");
        assert_eq!(r, Record::Unknown);
        let r: Record = serde_json::from_str(r#"{"kind":"heartbeat","step":1,"time_s":2.0,"gpu_temp":71}"#)
            .expect("a heartbeat with a new field");
        assert_eq!(r.unknown_fields(), 1);
        assert!(r.to_line().contains("\"gpu_temp\":71"), "written back: {}", r.to_line());
    }

    #[test]
    fn a_divergence_is_an_error_line_with_diverged_true() {
        let n = Notice {
            step: 7,
            time_s: 1.0,
            message: "loss is NaN".into(),
            path: None,
            line: None,
        };
        let r = Record::from_event(&Event::Diverged(n.clone())).expect("logged");
        let v: Value = serde_json::from_str(&r.to_line()).expect("json");
        assert_eq!(
            (&v["kind"], &v["step"], &v["diverged"]),
            (&"error".into(), &7.into(), &true.into())
        );
        assert_eq!(r.to_event(), Some(Event::Diverged(n.clone())));
        let plain = Record::from_event(&Event::Error(n)).expect("logged");
        assert!(!plain.to_line().contains("diverged"));
    }
}
