//! `moppa eval --ablate`: what each prior contributes to a saved MoPPA adapter, measured on the
//! fixed subset of the validation split every ablation uses (INTERFACES.md "Router diagnostics").

use super::eval::{Resolved, n_and_interval};
use super::{CliError, usage};
use crate::train::evaluate::ablate_adapter;
use crate::train::protocol::Ablation;
use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::path::Path;

/// Checks `--images` (1 to [`MAX_IMAGES`]).
pub fn check_images(images: usize) -> Result<(), CliError> {
    crate::train::ablation::check_images(images).map_err(|e| usage(format!("--images: {e}")))
}

/// Runs the ablation of `resolved`'s adapter on `data`, prints the table, and writes the CSV to
/// `output` when given.
pub fn ablate(
    resolved: &Resolved,
    data: &str,
    force: bool,
    batch: usize,
    images: usize,
    output: Option<&Path>,
) -> Result<(), CliError> {
    check_images(images)?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "ablation {bar:30.cyan/blue} {pos}/{len} passes · {elapsed_precise}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut progress = |done: usize, total: usize| {
        if let Some(b) = &bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }
    };
    let result = ablate_adapter(
        &resolved.adapter,
        resolved.on(),
        data,
        force,
        batch,
        images,
        &|| false,
        &mut progress,
    );
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let ab = result.map_err(|e| {
        let msg = e.to_string();
        let file = resolved.adapter.display().to_string();
        CliError::Failure(if msg.contains(&file) {
            anyhow::anyhow!("cannot ablate: {msg}")
        } else {
            anyhow::anyhow!("cannot ablate '{file}': {msg}")
        })
    })?;
    for w in &ab.warnings {
        eprintln!("warning: {w}");
    }
    let a = &ab.ablation;
    println!(
        "prior ablation of {} on {} validation images of {data} (its fixed subset)",
        resolved.adapter.display(),
        a.n
    );
    println!(
        "base accuracy {:.4} (loss {:.4}) {}",
        a.base.acc,
        a.base.loss,
        n_and_interval(a.base.acc, a.n)
    );
    print!("{}", table(a));
    println!("{} passes in {:.1} s", a.rows.len() + 1, a.seconds);
    if let Some(out) = output {
        std::fs::write(out, csv(a))
            .map_err(|e| CliError::Failure(anyhow::anyhow!("cannot write '{}': {e}", out.display())))?;
        println!("ablation: {}", out.display());
    }
    Ok(())
}

/// The table: `prior  block  acc  loss  Δacc  Δloss`, one row per prior × (all, each block), Δacc
/// in accuracy points, columns aligned.
#[must_use]
pub fn table(a: &Ablation) -> String {
    let header = ["prior", "block", "acc", "loss", "Δacc(pts)", "Δloss"].map(str::to_owned);
    let rows: Vec<[String; 6]> = a
        .rows
        .iter()
        .map(|r| {
            [
                r.prior.name().to_owned(),
                r.block.to_string(),
                format!("{:.4}", r.score.acc),
                format!("{:.4}", r.score.loss),
                format!("{:+.1}", (r.score.acc - a.base.acc) * 100.0),
                format!("{:+.4}", r.score.loss - a.base.loss),
            ]
        })
        .collect();
    let mut width = [0usize; 6];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(width).enumerate() {
            let pad = " ".repeat(w - cell.chars().count());
            if i > 0 {
                line.push_str("  ");
            }
            // Names left-aligned, numbers right-aligned.
            if i < 2 {
                let _ = write!(line, "{cell}{pad}");
            } else {
                let _ = write!(line, "{pad}{cell}");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The CSV: `prior,block,acc,loss,delta_acc,delta_loss`; first the whole model as prior `none`,
/// block `all` (deltas 0), then one row per prior × (all, each block). `delta_acc` is a fraction
/// like `acc` (the table shows points).
#[must_use]
pub fn csv(a: &Ablation) -> String {
    let mut out = String::from("prior,block,acc,loss,delta_acc,delta_loss\n");
    let base = std::iter::once(("none".to_owned(), "all".to_owned(), &a.base));
    let rows = a
        .rows
        .iter()
        .map(|r| (r.prior.name().to_owned(), r.block.to_string(), &r.score));
    for (prior, block, s) in base.chain(rows) {
        let _ = writeln!(
            out,
            "{prior},{block},{:.6},{:.6},{:.6},{:.6}",
            s.acc,
            s.loss,
            s.acc - a.base.acc,
            s.loss - a.base.loss
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Prior;
    use crate::train::protocol::{AblationBlock, AblationRow, AblationScore};

    fn sample() -> Ablation {
        let score = |acc, loss| AblationScore {
            acc,
            loss,
            per_class_acc: Vec::new(),
        };
        Ablation {
            n: 64,
            split: "val".into(),
            base: score(0.75, 0.5),
            rows: vec![
                AblationRow {
                    prior: Prior::Heat,
                    block: AblationBlock::ALL,
                    score: score(0.5, 1.25),
                },
                AblationRow {
                    prior: Prior::Poisson,
                    block: AblationBlock::One(11),
                    score: score(0.8, 0.4375),
                },
            ],
            ..Ablation::default()
        }
    }

    #[test]
    fn the_table_is_aligned_with_deltas_in_points() {
        let t = table(&sample());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines,
            [
                "prior    block     acc    loss  Δacc(pts)    Δloss",
                "heat     all    0.5000  1.2500      -25.0  +0.7500",
                "poisson  11     0.8000  0.4375       +5.0  -0.0625",
            ]
        );
    }

    #[test]
    fn the_csv_starts_with_the_base_and_deltas_are_fractions() {
        let c = csv(&sample());
        let lines: Vec<&str> = c.lines().collect();
        assert_eq!(
            lines,
            [
                "prior,block,acc,loss,delta_acc,delta_loss",
                "none,all,0.750000,0.500000,0.000000,0.000000",
                "heat,all,0.500000,1.250000,-0.250000,0.750000",
                "poisson,11,0.800000,0.437500,0.050000,-0.062500",
            ]
        );
    }

    #[test]
    fn images_must_be_1_to_the_maximum() {
        use crate::train::ablation::MAX_IMAGES;
        assert!(check_images(1).is_ok() && check_images(MAX_IMAGES).is_ok());
        for bad in [0, MAX_IMAGES + 1] {
            let e = check_images(bad).err().map(|e| e.exit_code());
            assert_eq!(e, Some(super::super::EXIT_USAGE), "{bad}");
        }
    }
}
