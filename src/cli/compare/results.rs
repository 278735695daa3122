//! What became of a sweep's runs: a finished run's figures read from its folder, and the table
//! of a sweep's outcomes (rows per method, at the rate a grid chose on validation).

use super::plan::PlannedRun;
use super::table::{self, Acc, Row, RunResult, choose_lr, grid_table, lr_text};
use crate::train::protocol::FinishReason;
use crate::train::record::{Record, RecordReader};
use crate::train::runfolder::{METRICS_JSONL, is_run_folder};
use std::fmt::Write as _;
use std::path::Path;

/// The final model's figures from a run folder (the last `val` and `test` evaluations, which the
/// run makes at its end), or why there are none. Lines of its log that are not records (not
/// UTF-8, not JSON) are skipped with a warning.
pub(super) fn result_of(dir: &Path) -> Result<RunResult, String> {
    if !is_run_folder(dir) {
        return Err("missing (no run folder yet)".into());
    }
    let path = dir.join(METRICS_JSONL);
    let mut reader = RecordReader::open(&path).map_err(|e| format!("unreadable {METRICS_JSONL}: {e}"))?;
    let (mut finished, mut trainable, mut val, mut test) = (None, 0, None, None);
    for record in reader.by_ref() {
        match record {
            Record::Finished(f) => finished = Some(f),
            Record::Started(s) => trainable = s.trainable,
            Record::Eval(e) if e.check().is_ok() => {
                let acc = Some(Acc { acc: e.acc, n: e.n });
                if e.split == "test" {
                    test = acc;
                } else {
                    val = acc;
                }
            }
            _ => {}
        }
    }
    if let Some(skipped) = reader.stats().summary(&path) {
        eprintln!("warning: {skipped}");
    }
    let Some(rec) = finished else {
        return Err("unfinished (still running, or crashed: `moppa view` tells which)".into());
    };
    if rec.reason != FinishReason::Done {
        let why = rec.message.as_ref().map_or(String::new(), |m| format!(": {m}"));
        return Err(format!("ended {}{why}", rec.reason.name()));
    }
    Ok(RunResult {
        trainable,
        val: val.filter(|a| a.acc.is_finite()),
        test: test.filter(|a| a.acc.is_finite()),
        steps_per_s: rec.step as f64 / rec.time_s.max(1e-9),
    })
}

/// How a run that diverged is named among the runs not in the table.
pub(super) const DIVERGED: &str = "ended diverged";

/// One run of a sweep and what became of it (`Err`: why it is not in the table).
pub(super) struct Outcome<'a> {
    pub(super) run: &'a PlannedRun,
    pub(super) result: Result<RunResult, String>,
}

/// The table of a sweep's outcomes: one row per method (in the order of the plan), at the rate
/// the grid chose on validation when there is a grid; the grid table under it; the runs that
/// are not in the table listed. Returns the text and how many runs were absent.
pub(super) fn report(outcomes: &[Outcome<'_>], grid: &[f64], header: Option<&str>, footer: &str) -> (String, usize) {
    let mut names: Vec<&str> = Vec::new();
    for o in outcomes {
        if !names.contains(&o.run.name.as_str()) {
            names.push(&o.run.name);
        }
    }
    let mut rows = Vec::new();
    let mut grid_rows = Vec::new();
    let mut chosen = Vec::new();
    for name in &names {
        let mine: Vec<&Outcome<'_>> = outcomes.iter().filter(|o| o.run.name == *name).collect();
        let label = mine.first().map_or_else(String::new, |o| o.run.label.clone());
        let lr = if grid.is_empty() {
            mine.first().and_then(|o| o.run.lr)
        } else {
            let by_lr: Vec<(f64, Vec<f64>, usize)> = grid
                .iter()
                .map(|lr| {
                    let at: Vec<&&Outcome<'_>> = mine.iter().filter(|o| o.run.lr == Some(*lr)).collect();
                    // A run that diverged at this rate is an outcome of the rate: accuracy 0.
                    let vals = at
                        .iter()
                        .filter_map(|o| match &o.result {
                            Ok(r) => r.val.map(|a| a.acc),
                            Err(why) => why.starts_with(DIVERGED).then_some(0.0),
                        })
                        .collect::<Vec<_>>();
                    let missing = at
                        .iter()
                        .filter(|o| o.result.as_ref().is_err_and(|why| !why.starts_with(DIVERGED)))
                        .count();
                    (*lr, vals, missing)
                })
                .collect();
            let pick = choose_lr(&by_lr.iter().map(|(l, v, _)| (*l, v.clone())).collect::<Vec<_>>());
            grid_rows.push((label.clone(), by_lr));
            chosen.push(pick);
            pick
        };
        let results = mine
            .iter()
            .filter(|o| grid.is_empty() || o.run.lr == lr)
            .filter_map(|o| o.result.as_ref().ok().cloned())
            .collect::<Vec<_>>();
        if !results.is_empty() {
            rows.push(Row { label, lr, results });
        }
    }
    let tuning = if grid.is_empty() {
        "Learning rates were not tuned: each method ran at its default (or --lr); `--lr-grid` chooses them on validation.".to_owned()
    } else {
        format!(
            "lr: chosen per method from the grid {} by the final models' mean validation accuracy over seeds (ties: the smaller; a run that diverged counts as 0); the table reports the test accuracy at that rate. The grid (mean val acc, %):\n\n{}",
            grid.iter().map(|l| lr_text(*l)).collect::<Vec<_>>().join(", "),
            grid_table(grid, &grid_rows, &chosen)
        )
    };
    let mut out = header.map_or_else(String::new, |h| format!("Note: {h}.\n\n"));
    out.push_str(&table::table(&rows, &tuning, footer));
    let absent: Vec<String> = outcomes
        .iter()
        .filter_map(|o| {
            o.result
                .as_ref()
                .err()
                .map(|why| format!("{} ({}): {why}", o.run.dir.display(), o.run.label))
        })
        .collect();
    if !absent.is_empty() {
        let _ = writeln!(out, "\nNot in the table ({} of {} runs):", absent.len(), outcomes.len());
        for a in &absent {
            let _ = writeln!(out, "- {a}");
            eprintln!("not collected: {a}");
        }
    }
    (out, absent.len())
}
