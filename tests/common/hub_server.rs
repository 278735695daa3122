//! A minimal Hugging Face hub over HTTP for tests (the endpoint is configurable): serves one timm
//! model, optionally cutting the first full download of its weights halfway.

use super::fixture;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The model served (`timm/NAME`), the augreg family fixture.
pub const NAME: &str = "vit_base_patch16_224.augreg2_in21k_ft_in1k";
/// The commit every answer names.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

pub fn family_file(family: &str, file: &str) -> PathBuf {
    fixture("families").join(family).join(file)
}

/// A cache entry as `huggingface_hub` (Python) writes it: blobs named by hash, snapshot entries
/// that are symlinks to them, `refs/main` holding the commit.
pub fn python_cache(cache: &Path, repo: &str, family: &str) {
    let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(dir.join("blobs")).unwrap();
    let snap = dir.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(dir.join("refs")).unwrap();
    std::fs::write(dir.join("refs/main"), COMMIT).unwrap();
    for file in ["model.safetensors", "config.json"] {
        let src = family_file(family, file);
        let blob = dir
            .join("blobs")
            .join(moppa_studio::train::hub::sha256_file(&src).unwrap());
        std::fs::copy(&src, &blob).unwrap();
        std::os::unix::fs::symlink(
            format!("../../blobs/{}", blob.file_name().unwrap().to_str().unwrap()),
            snap.join(file),
        )
        .unwrap();
    }
}

/// File name → (bytes, ETag) served by the test hub.
pub type Files = HashMap<String, (Vec<u8>, String)>;

/// A minimal hub: `GET /ORG/NAME/resolve/REV/FILE` with `Range: bytes=A-[B]`, answering 206 with
/// the headers hf-hub reads (`X-Repo-Commit`, `ETag`/`X-Linked-Etag`, `Content-Range`). With
/// `cut` set, the first full request for the weights sends half the body, then closes.
pub struct TestHub {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Still to cut the weights halfway.
    pub cut: Arc<AtomicBool>,
    /// Every (file, range start) asked for.
    pub ranges: Arc<Mutex<Vec<(String, u64)>>>,
}

/// Starts serving `files` (cutting the first full weights download when `cut`).
pub fn serve(files: Files, cut: bool) -> TestHub {
    serve_with(files, cut, false)
}

/// As [`serve`], sending the weights 1 KiB every 20 ms (a download slow enough to cancel).
pub fn serve_slowly(files: Files) -> TestHub {
    serve_with(files, false, true)
}

fn serve_with(files: Files, cut: bool, slow: bool) -> TestHub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cut = Arc::new(AtomicBool::new(cut));
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let (c, r) = (cut.clone(), ranges.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (files, c, r) = (files.clone(), c.clone(), r.clone());
            std::thread::spawn(move || answer(stream, &files, &c, &r, slow));
        }
    });
    TestHub { port, cut, ranges }
}

fn answer(
    mut stream: TcpStream,
    files: &Files,
    cut: &AtomicBool,
    ranges: &Mutex<Vec<(String, u64)>>,
    slow: bool,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("range")
        {
            range = Some(v.trim().trim_start_matches("bytes=").to_owned());
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or_default();
    let file = path.rsplit('/').next().unwrap_or_default();
    let ours = path.starts_with(&format!("/timm/{NAME}/resolve/"));
    let Some((body, etag)) = files.get(file).filter(|_| ours) else {
        return stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    };
    let size = body.len() as u64;
    let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
        Some((a, b)) => (a.parse().unwrap_or(0), b.parse().unwrap_or(size - 1)),
        None => (0, size - 1),
    };
    ranges.lock().unwrap().push((file.to_owned(), start));
    let slice = &body[start as usize..=end as usize];
    let head = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{end}/{size}\r\n\
         ETag: \"{etag}\"\r\nX-Linked-Etag: \"{etag}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
        slice.len()
    );
    stream.write_all(head.as_bytes())?;
    if file == "model.safetensors" && slice.len() > 1 && cut.swap(false, Ordering::SeqCst) {
        stream.write_all(&slice[..slice.len() / 2])?;
        stream.flush()?;
        return stream.shutdown(std::net::Shutdown::Both);
    }
    if slow && file == "model.safetensors" && slice.len() > 1 {
        for chunk in slice.chunks(1024) {
            stream.write_all(chunk)?;
            stream.flush()?;
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    } else {
        stream.write_all(slice)?;
    }
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    Ok(())
}

/// The augreg fixture's weights and config.json (weights ETag: their sha256), and the weights.
pub fn hub_files() -> (Files, Vec<u8>) {
    let weights = std::fs::read(fixture("families/augreg/model.safetensors")).unwrap();
    let config = std::fs::read(fixture("families/augreg/config.json")).unwrap();
    let sha = moppa_studio::train::hub::sha256_file(&fixture("families/augreg/model.safetensors")).unwrap();
    let files = HashMap::from([
        ("model.safetensors".to_owned(), (weights.clone(), sha)),
        ("config.json".to_owned(), (config, "c0ffee".to_owned())),
    ]);
    (files, weights)
}
