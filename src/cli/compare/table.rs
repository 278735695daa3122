//! The comparison table: one row per method, every accuracy with its number of images and its
//! 95% interval (one run: Wilson; several seeds: mean ± sample std and a t-interval over seeds),
//! the best method of a column marked only where its interval clears the next one's, and — with
//! `--lr-grid` — the learning rate chosen per method on validation and the grid it came from.

use crate::stats::{t_interval, wilson_acc};
use crate::util::group_digits;
use std::fmt::Write as _;

/// Below this many test images the table warns that one image moves the accuracy a lot.
pub(super) const SMALL_TEST_SET: u64 = 100;

/// One run's accuracy on `n` images (`n` = 0: not recorded, an older run folder).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Acc {
    pub(super) acc: f64,
    pub(super) n: u64,
}

/// A finished run's figures: the final model's validation and test accuracy.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct RunResult {
    pub(super) trainable: usize,
    pub(super) val: Option<Acc>,
    pub(super) test: Option<Acc>,
    pub(super) steps_per_s: f64,
}

/// One table row: a method over its seeds, at one learning rate.
pub(super) struct Row {
    pub(super) label: String,
    /// The learning rate of its runs (`None`: not known, e.g. an older plan).
    pub(super) lr: Option<f64>,
    pub(super) results: Vec<RunResult>,
}

/// A learning rate as every name, table and message spells it: the shortest text that reads back
/// as the same number, in exponent form (`1e-3`, `2.5e-4`, `1e0`).
#[must_use]
pub(super) fn lr_text(lr: f64) -> String {
    format!("{lr:e}")
}

/// What one column shows for one row.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Cell {
    mean: f64,
    /// Sample std over seeds (`None` for one run).
    std: Option<f64>,
    /// The 95% interval, clipped to 0..1 (`None` when a single run's n is unknown).
    interval: Option<(f64, f64)>,
}

impl Cell {
    fn of(accs: &[Acc]) -> Option<Self> {
        match accs {
            [] => None,
            [one] => Some(Self {
                mean: one.acc,
                std: None,
                interval: wilson_acc(one.acc, one.n),
            }),
            many => {
                let t = t_interval(&many.iter().map(|a| a.acc).collect::<Vec<_>>())?;
                Some(Self {
                    mean: t.mean,
                    std: Some(t.std),
                    interval: Some((t.low.max(0.0), t.high.min(1.0))),
                })
            }
        }
    }

    fn text(&self) -> String {
        let mut s = format!("{:.2}", 100.0 * self.mean);
        if let Some(sd) = self.std {
            let _ = write!(s, " ± {:.2}", 100.0 * sd);
        }
        match self.interval {
            Some((lo, hi)) => {
                let _ = write!(s, " [{:.1}, {:.1}]", 100.0 * lo, 100.0 * hi);
            }
            None => s.push_str(" [n?]"),
        }
        s
    }
}

/// One cell's text for `accs` (one run: its Wilson interval; several: mean ± std and the
/// t-interval), or "–".
#[must_use]
pub(super) fn acc_cell(accs: &[Acc]) -> String {
    Cell::of(accs).map_or_else(|| "–".to_owned(), |c| c.text())
}

/// How one column's images are counted, for its header: `n = 500`, or the range when runs differ.
fn n_text(accs: &[Acc]) -> String {
    let known: Vec<u64> = accs.iter().map(|a| a.n).filter(|n| *n > 0).collect();
    match (known.iter().min(), known.iter().max()) {
        (Some(lo), Some(hi)) if lo == hi => format!("n = {}", group_digits(*lo as usize)),
        (Some(lo), Some(hi)) => format!("n = {}–{}", group_digits(*lo as usize), group_digits(*hi as usize)),
        _ => "n unknown".to_owned(),
    }
}

/// Which row of a column is best, if its interval clears the runner-up's; else why not (one line).
fn winner(label: &str, cells: &[(usize, &str, Cell)]) -> Result<Option<usize>, String> {
    if cells.len() < 2 {
        return Ok(None);
    }
    let mut order: Vec<&(usize, &str, Cell)> = cells.iter().collect();
    order.sort_by(|a, b| b.2.mean.total_cmp(&a.2.mean));
    let (best, next) = (order[0], order[1]);
    match (best.2.interval, next.2.interval) {
        (Some((lo, _)), Some((_, hi))) if lo > hi => Ok(Some(best.0)),
        _ => Err(format!(
            "{label}: no clear winner — the 95% intervals of {} and {} overlap.",
            best.1, next.1
        )),
    }
}

/// The markdown table and the lines under it: winners or "no clear winner", a warning for a
/// small test set, how learning rates were chosen (`tuning`), and the run settings (`footer`).
#[must_use]
pub(super) fn table(rows: &[Row], tuning: &str, footer: &str) -> String {
    let all = |f: fn(&RunResult) -> Option<Acc>| -> Vec<Acc> {
        rows.iter().flat_map(|r| r.results.iter().filter_map(f)).collect()
    };
    let (vals, tests) = (all(|r| r.val), all(|r| r.test));
    let cells = |f: fn(&RunResult) -> Option<Acc>| -> Vec<Option<Cell>> {
        rows.iter()
            .map(|r| Cell::of(&r.results.iter().filter_map(f).collect::<Vec<_>>()))
            .collect()
    };
    let (val_cells, test_cells) = (cells(|r| r.val), cells(|r| r.test));
    let mut notes = Vec::new();
    let mut marked = [None, None];
    for (i, (name, column)) in [("val acc", &val_cells), ("test acc", &test_cells)].iter().enumerate() {
        let present: Vec<(usize, &str, Cell)> = column
            .iter()
            .enumerate()
            .filter_map(|(r, c)| c.map(|c| (r, rows[r].label.as_str(), c)))
            .collect();
        match winner(name, &present) {
            Ok(w) => marked[i] = w,
            Err(note) => notes.push(note),
        }
    }
    let mut out = format!(
        "| method | lr | trainable | val acc ({}) | test acc ({}) | steps/s |\n|---|---:|---:|---:|---:|---:|\n",
        n_text(&vals),
        n_text(&tests)
    );
    for (r, row) in rows.iter().enumerate() {
        let shown = |c: Option<Cell>, col: usize| match c {
            Some(c) if marked[col] == Some(r) => format!("**{}**", c.text()),
            Some(c) => c.text(),
            None => "–".to_owned(),
        };
        let speed = row.results.iter().map(|r| r.steps_per_s).sum::<f64>() / row.results.len().max(1) as f64;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {speed:.1} |",
            row.label,
            row.lr.map_or_else(|| "?".to_owned(), lr_text),
            group_digits(row.results.last().map_or(0, |r| r.trainable)),
            shown(val_cells[r], 0),
            shown(test_cells[r], 1),
        );
    }
    out.push('\n');
    if let Some(n) = tests.iter().map(|a| a.n).filter(|n| *n > 0).min()
        && n < SMALL_TEST_SET
    {
        let _ = writeln!(
            out,
            "Warning: the test set has only {n} images — one image is {:.2} points; read the intervals, not the means.",
            100.0 / n as f64
        );
    }
    for note in notes {
        let _ = writeln!(out, "{note}");
    }
    let _ = writeln!(out, "{tuning}");
    let _ = writeln!(
        out,
        "val / test = the final model's accuracy (%) on the validation / test images; one seed: [95% Wilson interval]; several: mean ± sample std [95% t-interval over seeds]; **bold**: best, its interval clear of the next."
    );
    let _ = writeln!(out, "{footer}");
    out
}

/// Per method, the learning rate of the grid with the best mean final validation accuracy over
/// the seeds present (ties: the smaller rate); `None` when no run of the grid has one.
#[must_use]
pub(super) fn choose_lr(by_lr: &[(f64, Vec<f64>)]) -> Option<f64> {
    let mut best: Option<(f64, f64)> = None;
    let mut sorted: Vec<&(f64, Vec<f64>)> = by_lr.iter().collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (lr, vals) in sorted {
        let vals: Vec<f64> = vals.iter().copied().filter(|v| v.is_finite()).collect();
        if vals.is_empty() {
            continue;
        }
        let mean = vals.iter().sum::<f64>() / vals.len() as f64;
        // Ascending rates: only a strictly better mean displaces the smaller rate.
        if best.is_none_or(|(_, m)| mean > m) {
            best = Some((*lr, mean));
        }
    }
    best.map(|(lr, _)| lr)
}

/// A method's grid: per rate, the final validation accuracies present and the runs missing.
pub(super) type GridCells = Vec<(f64, Vec<f64>, usize)>;

/// The grid itself: mean final validation accuracy over seeds per method and rate, the chosen
/// rate in bold, a run that is missing counted in its cell.
#[must_use]
pub(super) fn grid_table(grid: &[f64], methods: &[(String, GridCells)], chosen: &[Option<f64>]) -> String {
    let mut out = String::from("| val acc by lr |");
    for lr in grid {
        let _ = write!(out, " {} |", lr_text(*lr));
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(grid.len()));
    out.push('\n');
    for ((label, cells), pick) in methods.iter().zip(chosen) {
        let _ = write!(out, "| {label} |");
        for lr in grid {
            let text = match cells.iter().find(|(l, _, _)| l.total_cmp(lr).is_eq()) {
                Some((_, vals, missing)) if !vals.is_empty() => {
                    let mean = 100.0 * vals.iter().sum::<f64>() / vals.len() as f64;
                    let mut t = format!("{mean:.2}");
                    if *pick == Some(*lr) {
                        t = format!("**{t}**");
                    }
                    if *missing > 0 {
                        let _ = write!(t, " ({missing} missing)");
                    }
                    t
                }
                _ => "–".to_owned(),
            };
            let _ = write!(out, " {text} |");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(val: f64, test: f64, n: u64) -> RunResult {
        RunResult {
            trainable: 1234,
            val: Some(Acc { acc: val, n: 200 }),
            test: Some(Acc { acc: test, n }),
            steps_per_s: 10.0,
        }
    }

    /// Reference (SciPy 1.17): mean of (0.9, 0.8) = 0.85, sample std 0.0707107, t(1) = 12.7062:
    /// `stats.t.interval(0.95, 1, loc=0.85, scale=stats.sem([0.9, 0.8]))` = (0.2147, 1.4853),
    /// clipped to 100; test (0.8, 0.6): (-0.5706, 1.9706).
    #[test]
    fn rows_are_mean_std_and_interval_with_n_in_the_header() {
        let rows = [Row {
            label: "moppa r8".into(),
            lr: Some(3e-2),
            results: vec![run(0.9, 0.8, 500), run(0.8, 0.6, 500)],
        }];
        let t = table(&rows, "tuning", "footer");
        assert!(
            t.contains("| method | lr | trainable | val acc (n = 200) | test acc (n = 500) | steps/s |"),
            "{t}"
        );
        assert!(
            t.contains("| moppa r8 | 3e-2 | 1,234 | 85.00 ± 7.07 [21.5, 100.0] | 70.00 ± 14.14 [0.0, 100.0] | 10.0 |"),
            "{t}"
        );
        assert!(t.ends_with("\ntuning\n") || t.contains("\ntuning\n"), "{t}");
        assert!(t.ends_with("footer\n"), "{t}");
        assert!(!t.contains("Warning"), "{t}");
    }

    /// One run: the Wilson interval of 83/100 from SciPy 1.17,
    /// `stats.binomtest(83, 100).proportion_ci(0.95, method='wilson')` = (0.74452, 0.89106).
    #[test]
    fn one_run_has_its_wilson_interval_and_a_small_test_set_is_warned() {
        let rows = [Row {
            label: "lora r8".into(),
            lr: Some(1e-2),
            results: vec![run(0.5, 0.83, 100)],
        }];
        let t = table(&rows, "", "");
        assert!(t.contains("| 83.00 [74.5, 89.1] |"), "{t}");
        let rows = [Row {
            label: "lora r8".into(),
            lr: Some(1e-2),
            results: vec![run(0.5, 1.0, 12)],
        }];
        let t = table(&rows, "", "");
        assert!(t.contains("100.00 [75.8, 100.0]"), "{t}");
        assert!(
            t.contains("Warning: the test set has only 12 images — one image is 8.33 points"),
            "{t}"
        );
    }

    #[test]
    fn the_best_is_marked_only_when_its_interval_clears_the_next() {
        let row = |label: &str, test: f64| Row {
            label: label.into(),
            lr: Some(1e-2),
            results: vec![run(0.5, test, 1000)],
        };
        // 95% Wilson of 900/1000 = [0.880, 0.917]; of 800/1000 = [0.774, 0.824]: clear.
        let t = table(&[row("a", 0.9), row("b", 0.8)], "", "");
        assert!(t.contains("| **90.00 [88.0, 91.7]** |"), "{t}");
        assert!(!t.contains("test acc: no clear winner"), "{t}");
        // Equal validation accuracies: no winner there.
        assert!(t.contains("val acc: no clear winner — the 95% intervals of"), "{t}");
        // 900 vs 890 of 1000 overlap.
        let t = table(&[row("a", 0.9), row("b", 0.89)], "", "");
        assert!(!t.contains("**90.00"), "{t}");
        assert!(
            t.contains("test acc: no clear winner — the 95% intervals of a and b overlap."),
            "{t}"
        );
        // A single row has nothing to beat.
        let t = table(&[row("a", 0.9)], "", "");
        assert!(!t.contains("**") || t.contains("**bold**"), "{t}");
        assert!(!t.contains("no clear winner"), "{t}");
    }

    #[test]
    fn the_rate_with_the_best_mean_validation_is_chosen_ties_the_smaller() {
        let grid = vec![
            (3e-2, vec![0.8, 0.9]),
            (1e-3, vec![0.7, 0.7]),
            (1e-2, vec![0.9, 0.8]),
            (3e-3, vec![]),
        ];
        // 1e-2 and 3e-2 tie at 0.85: the smaller.
        assert_eq!(choose_lr(&grid), Some(1e-2));
        assert_eq!(choose_lr(&[(1e-3, vec![0.5]), (1e-2, vec![0.6, f64::NAN])]), Some(1e-2));
        assert_eq!(choose_lr(&[(1e-3, vec![])]), None);
    }

    #[test]
    fn rates_are_spelled_one_way() {
        assert_eq!(lr_text(0.001), "1e-3");
        assert_eq!(lr_text(3e-2), "3e-2");
        assert_eq!(lr_text(0.00025), "2.5e-4");
        assert_eq!(lr_text(1.0), "1e0");
        for s in ["1e-3", "3e-2", "2.5e-4", "1e0"] {
            assert_eq!(lr_text(s.parse().unwrap()), s);
        }
    }
}
