//! The paper-style table of a VTAB-1K plan (`moppa compare --collect DIR`): a column per task,
//! each group's mean and the mean of the group means, then every task × method with its chosen
//! rate, interval and n.

use super::plan::Plan;
use super::result_of;
use super::select::{SELECTED_JSON, Selected};
use super::table::{Acc, SMALL_TEST_SET, acc_cell, lr_text};
use super::vtab::GROUPS;
use crate::stats::t_interval;
use crate::util::group_digits;
use std::fmt::Write as _;
use std::path::Path;

/// Per task and method, the final runs' test accuracies (and the chosen rate).
struct Cellset {
    accs: Vec<Acc>,
    lr: Option<f64>,
}

/// `moppa compare --collect DIR` of a VTAB-1K plan: the paper-style table.
pub(super) fn collect(dir: &Path, plan: &Plan) -> (String, usize) {
    let mut methods: Vec<(&str, &str)> = Vec::new();
    for r in &plan.runs {
        if !methods.iter().any(|(n, _)| *n == r.name) {
            methods.push((&r.name, &r.label));
        }
    }
    let mut absent = Vec::new();
    let mut cells: Vec<Vec<Cellset>> = Vec::new();
    for (name, _) in &methods {
        let mut row = Vec::new();
        for task in &plan.tasks {
            let chosen: Vec<Selected> = std::fs::read_to_string(dir.join(task).join(SELECTED_JSON))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            let lr = chosen.iter().find(|s| s.name == *name).and_then(|s| s.lr);
            let mut accs = Vec::new();
            for run in plan.runs.iter().filter(|r| r.name == *name && r.dir.starts_with(task)) {
                match result_of(&dir.join(&run.dir)) {
                    Ok(r) => accs.extend(r.test),
                    Err(why) => absent.push(format!("{} ({}): {why}", run.dir.display(), run.label)),
                }
            }
            row.push(Cellset { accs, lr });
        }
        cells.push(row);
    }
    let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    let mut out = plan
        .header
        .as_ref()
        .map_or_else(String::new, |h| format!("Note: {h}.\n\n"));
    out.push_str("| method |");
    for task in &plan.tasks {
        let _ = write!(out, " {task} |");
    }
    out.push_str(" Natural | Specialized | Structured | mean |\n|---|");
    out.push_str(&"---:|".repeat(plan.tasks.len() + 4));
    out.push('\n');
    let mut marked = false;
    for ((_, label), row) in methods.iter().zip(&cells) {
        let _ = write!(out, "| {label} |");
        let task_means: Vec<Option<f64>> = row
            .iter()
            .map(|c| mean(&c.accs.iter().map(|a| a.acc).collect::<Vec<_>>()))
            .collect();
        for c in row {
            let accs: Vec<f64> = c.accs.iter().map(|a| a.acc).collect();
            // One seed: its accuracy; several: mean ± sample std (the t-interval is in the detail table).
            let text = match (t_interval(&accs), mean(&accs)) {
                (Some(t), _) => format!("{:.1} ± {:.1}", 100.0 * t.mean, 100.0 * t.std),
                (None, Some(m)) => format!("{:.1}", 100.0 * m),
                (None, None) => "–".to_owned(),
            };
            let _ = write!(out, " {text} |");
        }
        let mut group_means = Vec::new();
        let mut partial = false;
        for (_, group) in GROUPS {
            let present: Vec<f64> = plan
                .tasks
                .iter()
                .zip(&task_means)
                .filter(|(t, _)| group.contains(&t.as_str()))
                .filter_map(|(_, m)| *m)
                .collect();
            if let Some(m) = mean(&present) {
                let short = present.len() < group.len();
                partial |= short;
                let _ = write!(out, " {:.1}{} |", 100.0 * m, if short { "*" } else { "" });
                group_means.push(m);
            } else {
                partial = true;
                out.push_str(" – |");
            }
        }
        marked |= partial;
        match mean(&group_means) {
            Some(m) => {
                let _ = writeln!(out, " {:.1}{} |", 100.0 * m, if partial { "*" } else { "" });
            }
            None => out.push_str(" – |\n"),
        }
    }
    out.push('\n');
    if marked {
        let counts: Vec<String> = GROUPS
            .iter()
            .map(|(g, tasks)| {
                let k = plan.tasks.iter().filter(|t| tasks.contains(&t.as_str())).count();
                format!("{g} {k} of {}", tasks.len())
            })
            .collect();
        let _ = writeln!(
            out,
            "* over the tasks present only (tasks in this plan: {}); the mean is over the groups present.",
            counts.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "Test accuracy (%) of the final runs (train800val200 at the chosen rate), mean ± std over seeds; a group's mean is over its tasks, the last column the mean of the group means.\n"
    );
    // Every accuracy with its images and interval, and the rate chosen.
    let _ = writeln!(
        out,
        "| task | method | lr | test acc [95% interval] | n |\n|---|---|---:|---:|---:|"
    );
    for (t, task) in plan.tasks.iter().enumerate() {
        for ((_, label), row) in methods.iter().zip(&cells) {
            let c = &row[t];
            let n = c.accs.iter().map(|a| a.n).max().unwrap_or(0);
            let _ = writeln!(
                out,
                "| {task} | {label} | {} | {} | {} |",
                c.lr.map_or_else(|| "–".to_owned(), lr_text),
                acc_cell(&c.accs),
                if n > 0 {
                    group_digits(n as usize)
                } else {
                    "?".to_owned()
                }
            );
        }
    }
    let small: Vec<String> = plan
        .tasks
        .iter()
        .enumerate()
        .filter_map(|(t, task)| {
            let n = cells.iter().flat_map(|row| row[t].accs.iter().map(|a| a.n)).max()?;
            (n > 0 && n < SMALL_TEST_SET).then(|| format!("{task} ({n})"))
        })
        .collect();
    if !small.is_empty() {
        let _ = writeln!(
            out,
            "\nWarning: test sets under {} images: {} — one image moves such a task's accuracy by a point or more.",
            SMALL_TEST_SET,
            small.join(", ")
        );
    }
    let _ = writeln!(out, "\n{}", plan.footer);
    if !absent.is_empty() {
        let _ = writeln!(
            out,
            "\nNot in the table ({} of {} final runs):",
            absent.len(),
            plan.runs.len()
        );
        for a in &absent {
            let _ = writeln!(out, "- {a}");
            eprintln!("not collected: {a}");
        }
    }
    (out, absent.len())
}
