//! Backbones by name, `hf:ORG/NAME[@REV]` (INTERFACES.md, "Backbones by name"): found in the
//! local Hugging Face cache first (Python's layout, so files Python downloaded are found with no
//! network), else downloaded into that cache by the `hf-hub` crate's sync API, atomically (the
//! bytes go to `blobs/ETAG.part`, renamed only when complete; an interrupted download resumes).

use super::error::{Result, TrainError};
use sha2::Digest as _;
use std::path::{Path, PathBuf};

/// The weights file of a timm repository.
pub const WEIGHTS: &str = "model.safetensors";
/// timm's architecture and preprocessing, next to the weights.
pub const CONFIG: &str = "config.json";

/// A parsed `hf:ORG/NAME[@REV]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubId {
    /// `ORG/NAME`.
    pub repo: String,
    /// A branch, tag or commit; `None` means `main`.
    pub revision: Option<String>,
}

impl HubId {
    /// `Some` when `spec` starts with `hf:`; the error says what is wrong with the rest, on one
    /// line (the id shown escaped).
    #[must_use]
    pub fn parse(spec: &str) -> Option<Result<Self>> {
        let rest = spec.strip_prefix("hf:")?;
        let (repo, revision) = match rest.split_once('@') {
            Some((r, rev)) => (r, Some(rev.to_owned())),
            None => (rest, None),
        };
        let repo_ok = repo.split('/').count() == 2
            && repo.split('/').all(|p| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            });
        let problem = if repo_ok {
            revision.as_deref().and_then(revision_problem)
        } else {
            Some("the repository is not ORG/NAME (letters, digits, '-', '_', '.')")
        };
        Some(match problem {
            None => Ok(Self {
                repo: repo.to_owned(),
                revision,
            }),
            Some(why) => Err(TrainError::Config(format!(
                "--backbone {spec:?}: {why}; expected hf:ORG/NAME or hf:ORG/NAME@REVISION, a branch, tag or commit (e.g. hf:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k)"
            ))),
        })
    }

    /// The revision asked for (`main` by default).
    #[must_use]
    pub fn rev(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    /// The repository's folder in the cache: `models--ORG--NAME`.
    #[must_use]
    pub fn folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }

    /// `hf:ORG/NAME[@REV]` again.
    #[must_use]
    pub fn spec(&self) -> String {
        match &self.revision {
            Some(r) => format!("hf:{}@{r}", self.repo),
            None => format!("hf:{}", self.repo),
        }
    }
}

/// What makes `rev` no branch, tag or commit name, if anything: it becomes a path under the
/// cache's `refs/` and `snapshots/`, so it must stay a relative path inside them.
fn revision_problem(rev: &str) -> Option<&'static str> {
    if rev.is_empty() {
        Some("the revision is empty")
    } else if rev.chars().any(char::is_control) {
        Some("the revision holds a control character")
    } else if rev.contains('\\') {
        Some("the revision holds a backslash")
    } else if rev.starts_with('/') {
        Some("the revision is an absolute path")
    } else if rev.split('/').any(str::is_empty) {
        Some("the revision has an empty part ('//' or a '/' at the end)")
    } else if rev.contains("..") || rev.split('/').any(|p| p == ".") {
        Some("the revision holds '..' or a '.' part")
    } else {
        None
    }
}

/// Whether `commit` (read from a `refs/` file) can name a folder of `snapshots/`: one plain
/// path part.
fn is_snapshot_name(commit: &str) -> bool {
    !commit.is_empty() && revision_problem(commit).is_none() && !commit.contains('/')
}

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// The hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
#[must_use]
pub fn cache_dir() -> PathBuf {
    if let Some(c) = env_nonempty("HF_HUB_CACHE") {
        return PathBuf::from(c);
    }
    if let Some(h) = env_nonempty("HF_HOME") {
        return PathBuf::from(h).join("hub");
    }
    let home = env_nonempty("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache/huggingface/hub")
}

/// Whether `HF_HUB_OFFLINE` forbids the network (Python's truthy values).
#[must_use]
pub fn offline() -> bool {
    env_nonempty("HF_HUB_OFFLINE")
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// The hub's address: `HF_ENDPOINT`, else `https://huggingface.co`.
#[must_use]
pub fn endpoint() -> String {
    env_nonempty("HF_ENDPOINT").map_or_else(
        || "https://huggingface.co".to_owned(),
        |e| e.trim_end_matches('/').to_owned(),
    )
}

/// A backbone found in (or brought into) the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cached {
    /// The id asked for.
    pub id: HubId,
    /// The commit the revision resolved to.
    pub commit: String,
    /// `snapshots/COMMIT/model.safetensors`.
    pub weights: PathBuf,
    /// Whether this call downloaded anything.
    pub downloaded: bool,
}

impl Cached {
    /// The id pinned to its commit, `hf:ORG/NAME@COMMIT` (what `config.toml` records).
    #[must_use]
    pub fn pinned(&self) -> String {
        format!("hf:{}@{}", self.id.repo, self.commit)
    }
}

fn is_commit(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

/// Looks `id` up in `cache` without the network: the revision's ref (or the commit itself),
/// then the snapshot's `model.safetensors`.
#[must_use]
pub fn find_cached(cache: &Path, id: &HubId) -> Option<Cached> {
    let repo = cache.join(id.folder());
    let rev = id.rev();
    if revision_problem(rev).is_some() {
        return None;
    }
    let commit = if is_commit(rev) && repo.join("snapshots").join(rev).is_dir() {
        rev.to_owned()
    } else {
        std::fs::read_to_string(repo.join("refs").join(rev))
            .ok()?
            .trim()
            .to_owned()
    };
    if !is_snapshot_name(&commit) {
        return None;
    }
    let weights = repo.join("snapshots").join(&commit).join(WEIGHTS);
    weights.is_file().then(|| Cached {
        id: id.clone(),
        commit,
        weights,
        downloaded: false,
    })
}

/// Told how a download goes (the CLI draws a bar, the app a progress bar).
pub trait DownloadProgress {
    /// A file starts (or resumes): its name and total size in bytes.
    fn start(&mut self, file: &str, total: u64);
    /// `bytes` more arrived.
    fn advance(&mut self, bytes: u64);
    /// The file is complete.
    fn finish(&mut self);
}

/// No report.
impl DownloadProgress for () {
    fn start(&mut self, _: &str, _: u64) {}
    fn advance(&mut self, _: u64) {}
    fn finish(&mut self) {}
}

/// hf-hub's progress trait over ours.
struct Relay<'a>(&'a mut dyn DownloadProgress);

impl hf_hub::api::Progress for Relay<'_> {
    fn init(&mut self, size: usize, filename: &str) {
        self.0.start(filename, size as u64);
    }
    fn update(&mut self, size: usize) {
        self.0.advance(size as u64);
    }
    fn finish(&mut self) {
        self.0.finish();
    }
}

fn not_found(id: &HubId, cache: &Path, why: &str) -> TrainError {
    TrainError::Config(format!(
        "{}: not in the Hugging Face cache (looked in {}) and {why}",
        id.spec(),
        cache.join(id.folder()).display()
    ))
}

/// Where backbones by name come from: the cache, the hub's address and whether the network may
/// be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hub {
    /// The cache folder (`…/hub`).
    pub cache: PathBuf,
    /// The hub's address.
    pub endpoint: String,
    /// Never download.
    pub offline: bool,
}

impl Hub {
    /// As the environment says: [`cache_dir`], [`endpoint`], [`offline`].
    #[must_use]
    pub fn from_env() -> Self {
        Self {
            cache: cache_dir(),
            endpoint: endpoint(),
            offline: offline(),
        }
    }

    /// Resolves `id`: from the cache when it is there, else downloads `model.safetensors` and
    /// `config.json` into it (unless offline), reporting to `progress`.
    pub fn resolve(&self, id: &HubId, progress: &mut dyn DownloadProgress) -> Result<Cached> {
        // A revision set after parsing (a resumed run's recorded commit) is checked here too.
        if let Some(why) = revision_problem(id.rev()) {
            return Err(TrainError::Config(format!("{:?}: {why}", id.spec())));
        }
        if let Some(found) = find_cached(&self.cache, id) {
            return Ok(found);
        }
        if self.offline {
            return Err(not_found(id, &self.cache, "HF_HUB_OFFLINE is set"));
        }
        self.download(id, progress)
    }

    /// Downloads `model.safetensors` and (when the repository has one) `config.json` of `id`
    /// into the cache, and checks the weights against their content hash when the hub gives one.
    pub fn download(&self, id: &HubId, progress: &mut dyn DownloadProgress) -> Result<Cached> {
        let cache = &self.cache;
        let token = env_nonempty("HF_TOKEN").or_else(|| hf_hub::Cache::new(cache.clone()).token());
        let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache.clone()))
            .with_endpoint(self.endpoint.clone())
            .with_token(token)
            .with_progress(false)
            .build()
            .map_err(|e| not_found(id, cache, &format!("the hub client could not start: {e}")))?;
        let repo = api.repo(hf_hub::Repo::with_revision(
            id.repo.clone(),
            hf_hub::RepoType::Model,
            id.rev().to_owned(),
        ));
        let failed = |file: &str, e: &hf_hub::api::sync::ApiError| {
            let e = e.to_string();
            let hint = if e.contains("404") {
                " (no such repository, revision or file)"
            } else if e.contains("401") || e.contains("403") {
                " (a gated or private repository: set HF_TOKEN)"
            } else if has_partial(&cache.join(id.folder())) {
                "; the part downloaded is kept and the next try resumes it"
            } else {
                ""
            };
            not_found(
                id,
                cache,
                &format!("downloading {file} from {} failed: {e}{hint}", self.endpoint),
            )
        };
        // The weights first: a repository without them is not a backbone.
        let weights = repo
            .download_with_progress(WEIGHTS, Relay(progress))
            .map_err(|e| failed(WEIGHTS, &e))?;
        verify_blob(&weights)?;
        if let Err(e) = repo.download_with_progress(CONFIG, Relay(progress)) {
            // timm repositories have one; without it the loader assumes defaults and says so.
            if !e.to_string().contains("404") {
                return Err(failed(CONFIG, &e));
            }
        }
        let commit = weights
            .parent()
            .and_then(Path::file_name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Cached {
            id: id.clone(),
            commit,
            weights,
            downloaded: true,
        })
    }
}

/// Whether an interrupted download of this repository left a `.part` file to resume.
fn has_partial(repo: &Path) -> bool {
    std::fs::read_dir(repo.join("blobs"))
        .is_ok_and(|d| d.flatten().any(|e| e.path().extension().is_some_and(|x| x == "part")))
}

/// The hub names large files' blobs by their sha256: a blob that does not hash to its name is
/// removed (the next run downloads it again) and reported.
fn verify_blob(path: &Path) -> Result<()> {
    let Ok(blob) = std::fs::canonicalize(path) else {
        return Ok(());
    };
    let name = blob
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.len() != 64 || !name.chars().all(|c| c.is_ascii_hexdigit()) {
        return Ok(());
    }
    let got = sha256_file(&blob)?;
    if got == name.to_ascii_lowercase() {
        return Ok(());
    }
    let _ = std::fs::remove_file(&blob);
    let _ = std::fs::remove_file(path);
    Err(TrainError::Config(format!(
        "{}: the downloaded file's sha256 is {got}, the hub said {name}; removed it (run again to download it anew)",
        path.display()
    )))
}

/// sha256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
    Ok(format!("{:x}", h.finalize()))
}

/// One timm model in the cache, for listings.
#[derive(Clone, Debug)]
pub struct CachedModel {
    /// `hf:ORG/NAME`.
    pub spec: String,
    /// Its weights (the `main` ref's snapshot, else the newest snapshot).
    pub weights: PathBuf,
    /// Size of the weights on disk, bytes.
    pub bytes: u64,
}

/// Every model repository in `cache` with a `model.safetensors` (any organisation), sorted.
#[must_use]
pub fn list_cached(cache: &Path) -> Vec<CachedModel> {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("models--") else {
            continue;
        };
        let Some((org, model)) = rest.split_once("--") else {
            continue;
        };
        let id = HubId {
            repo: format!("{org}/{model}"),
            revision: None,
        };
        let weights = find_cached(cache, &id).map(|c| c.weights).or_else(|| {
            let mut snaps: Vec<_> = std::fs::read_dir(e.path().join("snapshots"))
                .ok()?
                .flatten()
                .map(|s| s.path().join(WEIGHTS))
                .filter(|p| p.is_file())
                .collect();
            snaps.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
            snaps.pop()
        });
        if let Some(weights) = weights {
            let bytes = std::fs::metadata(&weights).map_or(0, |m| m.len());
            out.push(CachedModel {
                spec: id.spec(),
                weights,
                bytes,
            });
        }
    }
    out.sort_by(|a, b| a.spec.cmp(&b.spec));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_bad_ones_say_the_form() {
        let id = HubId::parse("hf:timm/vit_base_patch16_224.mae@v1.0").and_then(Result::ok);
        assert_eq!(
            id,
            Some(HubId {
                repo: "timm/vit_base_patch16_224.mae".into(),
                revision: Some("v1.0".into())
            })
        );
        assert!(HubId::parse("builtin").is_none());
        for bad in [
            "hf:timm",
            "hf:/x",
            "hf:a/b/c",
            "hf:a/b@",
            "hf:a/b c",
            "hf:a/b@/etc/passwd",
            "hf:a/b@../../x",
            "hf:a/b@v1/../../x",
            "hf:a/b@ref\nname",
            "hf:a/b@ref\\name",
            "hf:a/b@pr//1",
            "hf:a/b@pr/",
            "hf:a/b@./x",
        ] {
            match HubId::parse(bad) {
                Some(Err(e)) => assert!(!e.to_string().chars().any(char::is_control), "{e}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        // Branch names may have parts (`refs/pr/1`, `feature/x`); a commit is one part.
        for good in [
            "hf:a/b@refs/pr/1",
            "hf:a/b@feature/x",
            "hf:a/b@0123456789abcdef0123456789abcdef01234567",
        ] {
            assert!(matches!(HubId::parse(good), Some(Ok(_))), "{good}");
        }
    }
}
