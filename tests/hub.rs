//! Backbones by name (`hf:ORG/NAME[@REV]`): a Hugging Face cache folder made here in Python's
//! layout resolves with the network off; a hub served by a local HTTP server (the endpoint is
//! configurable) is downloaded into the cache with progress, survives a connection cut halfway
//! (no file that looks complete; the retry resumes and succeeds); a missing model is one line
//! naming the id and where it looked.

// Tests: unwrap is the assertion; pedantic style lints are for the library.
#![allow(clippy::unwrap_used, clippy::pedantic)]

use moppa_studio::train::hub::{DownloadProgress, Hub, HubId, find_cached, sha256_file};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

mod common;
use common::hub_server::{COMMIT, NAME, family_file, hub_files, python_cache, serve};

fn moppa_env(args: &[&str], env: &[(&str, &Path)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_moppa"));
    cmd.args(args)
        .env_remove("HF_HOME")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_HUB_OFFLINE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn a_python_cache_resolves_by_name_with_the_network_off() {
    let home = tempfile::tempdir().unwrap();
    let cache = home.path().join("hub");
    python_cache(&cache, &format!("timm/{NAME}"), "augreg");
    python_cache(&cache, "timm/vit_base_patch16_siglip_224.v2_webli", "siglip");
    let spec = format!("hf:timm/{NAME}");
    // HF_HOME/hub, offline, and an endpoint that would refuse a connection: only the cache works.
    let env: [(&str, &Path); 3] = [
        ("HF_HOME", home.path()),
        ("HF_HUB_OFFLINE", Path::new("1")),
        ("HF_ENDPOINT", Path::new("http://127.0.0.1:9")),
    ];
    let out = moppa_env(&["params", "--backbone", &spec, "--classes", "10"], &env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("D 24, depth 2, 224 px, patch 16"), "{stdout}");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("assumed"),
        "config.json was read"
    );

    // A run records the id, the commit it resolved to and the file's sha256; eval reloads it.
    let run = home.path().join("run");
    let data = home.path().join("data");
    common::colour_folder(&data);
    let args = common::short_train(&spec, &data, 2, 4, &run);
    let out = moppa_env(&args.iter().map(String::as_str).collect::<Vec<_>>(), &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    let sha = sha256_file(&family_file("augreg", "model.safetensors")).unwrap();
    assert!(config.contains(&format!("backbone = \"{spec}\"")), "{config}");
    assert!(
        config.contains(&format!("backbone_revision = \"{COMMIT}\"")),
        "{config}"
    );
    assert!(config.contains(&format!("backbone_sha256 = \"{sha}\"")), "{config}");
    let out = moppa_env(&["eval", "--run", run.to_str().unwrap()], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // HF_HUB_CACHE wins over HF_HOME; the listing shows family, size and why SigLIP is refused.
    let env2: [(&str, &Path); 3] = [
        ("HF_HUB_CACHE", &cache),
        ("HF_HOME", Path::new("/nonexistent")),
        ("HF_HUB_OFFLINE", Path::new("1")),
    ];
    let out = moppa_env(&["backbones"], &env2);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = |needle: &str| {
        stdout
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_default()
            .to_owned()
    };
    let vit = line(NAME);
    assert!(
        vit.contains("ViT") && vit.contains("224 px, patch 16") && vit.ends_with("yes"),
        "{stdout}"
    );
    let siglip = line("siglip");
    assert!(siglip.contains("no: ") && siglip.contains("attention-pool"), "{stdout}");
}

#[test]
fn a_missing_model_is_one_line_naming_the_id_and_where_it_looked() {
    let cache = tempfile::tempdir().unwrap();
    let env: [(&str, &Path); 2] = [("HF_HUB_CACHE", cache.path()), ("HF_HUB_OFFLINE", Path::new("1"))];
    let out = moppa_env(&["params", "--backbone", "hf:timm/vit_nope_patch16_224"], &env);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let msg: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(msg.len(), 1, "{stderr}");
    assert!(
        msg[0].contains("hf:timm/vit_nope_patch16_224")
            && msg[0].contains(
                &cache
                    .path()
                    .join("models--timm--vit_nope_patch16_224")
                    .display()
                    .to_string()
            )
            && msg[0].contains("HF_HUB_OFFLINE"),
        "{stderr}"
    );
    // A malformed id says the form.
    let out = moppa_env(&["params", "--backbone", "hf:vit_base"], &env);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("hf:ORG/NAME"));
}

#[derive(Default)]
struct Recorder {
    started: Vec<(String, u64)>,
    bytes: HashMap<String, u64>,
    current: String,
}

impl DownloadProgress for Recorder {
    fn start(&mut self, file: &str, total: u64) {
        self.started.push((file.to_owned(), total));
        self.current = file.to_owned();
        self.bytes.insert(file.to_owned(), 0);
    }
    fn advance(&mut self, bytes: u64) {
        *self.bytes.entry(self.current.clone()).or_default() += bytes;
    }
    fn finish(&mut self) {}
}

#[test]
fn a_download_cut_halfway_leaves_nothing_complete_and_the_retry_resumes() {
    let (files, weights) = hub_files();
    let server = serve(files, true);
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub {
        cache: cache.path().to_owned(),
        endpoint: format!("http://127.0.0.1:{}", server.port),
        offline: false,
    };
    let id = HubId::parse(&format!("hf:timm/{NAME}")).unwrap().unwrap();

    let mut progress = Recorder::default();
    let err = hub.resolve(&id, &mut progress).unwrap_err().to_string();
    assert!(
        err.contains("the next try resumes it") && err.contains(&format!("hf:timm/{NAME}")),
        "{err}"
    );
    assert!(!server.cut.load(Ordering::SeqCst), "the cut happened");
    assert!(find_cached(cache.path(), &id).is_none(), "nothing may look complete");
    let repo = cache.path().join(id.folder());
    let parts: Vec<u64> = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "part"))
        .map(|e| e.metadata().unwrap().len())
        .collect();
    assert_eq!(parts.len(), 1, "one partial file");
    assert!(parts[0] > 0 && parts[0] < weights.len() as u64, "{parts:?}");

    let mut progress = Recorder::default();
    let got = hub.resolve(&id, &mut progress).unwrap();
    assert!(got.downloaded && got.commit == COMMIT);
    assert_eq!(std::fs::read(&got.weights).unwrap(), weights, "the file is whole");
    assert!(got.weights.with_file_name("config.json").is_file());
    // The retry asked only for the rest, and reported the whole file.
    let resumed = server
        .ranges
        .lock()
        .unwrap()
        .iter()
        .any(|(f, start)| f == "model.safetensors" && *start == parts[0]);
    assert!(resumed, "{:?}", server.ranges.lock().unwrap());
    assert!(
        progress
            .started
            .contains(&("model.safetensors".to_owned(), weights.len() as u64))
    );
    assert_eq!(progress.bytes["model.safetensors"], weights.len() as u64);

    // Now in the cache: found without the network.
    let offline = Hub {
        offline: true,
        endpoint: "http://127.0.0.1:9".into(),
        ..hub
    };
    let again = offline.resolve(&id, &mut ()).unwrap();
    assert!(!again.downloaded && again.weights == got.weights);
}

#[test]
fn the_cli_downloads_from_the_configured_endpoint() {
    let (files, _) = hub_files();
    let server = serve(files, false);
    let cache = tempfile::tempdir().unwrap();
    let endpoint = PathBuf::from(format!("http://127.0.0.1:{}", server.port));
    let env: [(&str, &Path); 2] = [("HF_HUB_CACHE", cache.path()), ("HF_ENDPOINT", &endpoint)];
    let out = moppa_env(
        &["params", "--backbone", &format!("hf:timm/{NAME}"), "--classes", "10"],
        &env,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("downloaded hf:timm/{NAME} (commit {COMMIT})")),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("D 24"));
    // A name the hub does not have: 404, said as such.
    let out = moppa_env(&["params", "--backbone", "hf:timm/nothing_here"], &env);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("hf:timm/nothing_here") && stderr.contains("404"),
        "{stderr}"
    );
}
