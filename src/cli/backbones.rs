//! `moppa backbones` (the timm models in the Hugging Face cache) and fetching `hf:` backbones with
//! a progress bar before a command needs them.

use super::{CliError, usage};
use crate::train::backbone::{CachedBackbone, list_backbones, resolve_backbone};
use crate::train::hub::{DownloadProgress, Hub, HubId};
use crate::util::group_digits;
use clap::Args;
use std::fmt::Write as _;

/// A download's progress as an indicatif bar on stderr (hidden when stderr is not a terminal).
#[derive(Default)]
pub struct HubBar {
    bar: Option<indicatif::ProgressBar>,
}

impl DownloadProgress for HubBar {
    fn start(&mut self, file: &str, total: u64) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.set_message(format!("downloading {file}"));
        self.bar = Some(b);
    }
    fn advance(&mut self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }
    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// Brings an `hf:` backbone into the cache (with a progress bar) before a command uses it, and
/// says where it came from; other specs are left alone. `pinned`: the commit a resumed run
/// recorded.
pub fn fetch(spec: &str, pinned: Option<&str>) -> Result<(), CliError> {
    match HubId::parse(spec) {
        None => return Ok(()),
        // A malformed id is a bad flag value (exit 2), unlike an id the cache and hub lack.
        Some(Err(e)) => return Err(usage(e)),
        Some(Ok(_)) => {}
    }
    let found = resolve_backbone(spec, pinned, &mut HubBar::default()).map_err(|e| match e {
        crate::train::TrainError::Config(m) => CliError::Failure(anyhow::anyhow!(m)),
        other => CliError::Failure(other.into()),
    })?;
    if let Some(h) = found.hub.filter(|h| h.downloaded) {
        eprintln!(
            "downloaded {} (commit {}) into {}",
            h.id.spec(),
            h.commit,
            h.weights.display()
        );
    }
    Ok(())
}

/// `moppa backbones`.
#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Lists the models in the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub, else \
~/.cache/huggingface/hub) that hold a model.safetensors: the id to pass as --backbone, family, parameters, \
input size, size on disk, and whether MoPPA Studio can load it (or why not)."
)]
pub struct BackbonesArgs {
    /// Only ids containing this text.
    pub filter: Option<String>,
}

/// One row of the listing.
struct Row {
    id: String,
    family: String,
    params: String,
    input: String,
    disk: String,
    status: String,
}

fn row(b: CachedBackbone) -> Row {
    let (params, input, status) = match &b.summary {
        Ok(s) => (
            group_digits(s.params),
            format!("{} px, patch {}", s.cfg.img_size, s.cfg.patch_size),
            "yes".to_owned(),
        ),
        Err(why) => (String::new(), String::new(), format!("no: {why}")),
    };
    Row {
        id: b.spec,
        family: b.family,
        params,
        input,
        disk: crate::config::human_bytes(b.bytes as f64),
        status,
    }
}

/// Runs `moppa backbones`.
pub fn backbones(args: &BackbonesArgs) -> Result<(), CliError> {
    let hub = Hub::from_env();
    let rows: Vec<Row> = list_backbones(&hub)
        .into_iter()
        .filter(|m| args.filter.as_ref().is_none_or(|f| m.spec.contains(f.as_str())))
        .map(row)
        .collect();
    if rows.is_empty() {
        return Err(usage(format!(
            "no model with a model.safetensors in the Hugging Face cache {}{} (download one with --backbone hf:timm/NAME, or set HF_HUB_CACHE / HF_HOME)",
            hub.cache.display(),
            args.filter
                .as_ref()
                .map_or_else(String::new, |f| format!(" matching '{f}'"))
        )));
    }
    let header = ["backbone", "family", "parameters", "input", "on disk", "loads"];
    let cells = |r: &Row| {
        [
            r.id.clone(),
            r.family.clone(),
            r.params.clone(),
            r.input.clone(),
            r.disk.clone(),
            r.status.clone(),
        ]
    };
    let mut width = header.map(str::len);
    for r in &rows {
        for (w, c) in width.iter_mut().zip(cells(r)) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |c: [String; 6]| {
        let mut s = String::new();
        for (i, (cell, w)) in c.iter().zip(width).enumerate() {
            if i == 5 {
                s.push_str(cell);
            } else {
                let _ = write!(s, "{cell:<w$}  ");
            }
        }
        s.trim_end().to_owned()
    };
    println!("{}", line(header.map(str::to_owned)));
    for r in &rows {
        println!("{}", line(cells(r)));
    }
    println!("cache: {}", hub.cache.display());
    Ok(())
}
