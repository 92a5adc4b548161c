//! The embedded object store: files under one directory. Writes go to a temporary file that is
//! renamed into place on `finish`, so a crashed upload never leaves a partial object.
//!
//! Temporary files live in `.partial/` and are named `{pid}-{uuid}`: a writer dropped before
//! `finish` removes its own, and [`BlobStore::sweep_abandoned`] removes those whose process is
//! gone (or, when that cannot be told, that are older than the threshold), never one this
//! process is still writing.

use std::collections::HashSet;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::fs;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufWriter};
use tokio_util::io::ReaderStream;

use super::{BlobError, BlobResult, BlobStore, BlobWriter, ByteStream};

pub struct LocalBlobStore {
    root: PathBuf,
}

/// Partial files being written by this process, whichever store instance writes them.
static LIVE: LazyLock<Mutex<HashSet<PathBuf>>> = LazyLock::new(Default::default);

fn live() -> std::sync::MutexGuard<'static, HashSet<PathBuf>> {
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether process `pid` runs on this machine; `None` where that cannot be told (no `/proc`).
fn process_alive(pid: u32) -> Option<bool> {
    Path::new("/proc/self")
        .exists()
        .then(|| Path::new(&format!("/proc/{pid}")).exists())
}

impl LocalBlobStore {
    pub async fn open(root: impl AsRef<Path>) -> BlobResult<Self> {
        let root = root.as_ref().to_path_buf();
        fs::create_dir_all(root.join(".partial")).await?;
        Ok(LocalBlobStore { root })
    }

    fn path(&self, key: &str) -> BlobResult<PathBuf> {
        let valid = !key.is_empty()
            && key.split('/').all(|part| {
                !part.is_empty() && part != "." && part != ".." && !part.starts_with('.')
            });
        if !valid {
            return Err(BlobError::Other(format!("invalid object key {key:?}")));
        }
        Ok(self.root.join(key))
    }
}

struct LocalWriter {
    file: BufWriter<fs::File>,
    partial: PathBuf,
    target: PathBuf,
    /// Renamed into place or removed: nothing left for `drop` to remove.
    done: bool,
}

impl Drop for LocalWriter {
    /// A writer dropped mid-write (a cancelled request) removes its partial file.
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = std::fs::remove_file(&self.partial) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(error = %e, path = %self.partial.display(), "could not remove a partial file");
                }
            }
        }
        live().remove(&self.partial);
    }
}

#[async_trait]
impl BlobWriter for LocalWriter {
    async fn write(&mut self, bytes: Bytes) -> BlobResult<()> {
        self.file.write_all(&bytes).await?;
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> BlobResult<()> {
        self.file.flush().await?;
        self.file.get_ref().sync_all().await?;
        if let Some(parent) = self.target.parent() {
            fs::create_dir_all(parent).await?;
        }
        fs::rename(&self.partial, &self.target).await?;
        self.done = true;
        Ok(())
    }

    async fn abort(mut self: Box<Self>) -> BlobResult<()> {
        self.done = true;
        match fs::remove_file(&self.partial).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl BlobStore for LocalBlobStore {
    fn backend(&self) -> &'static str {
        "local"
    }

    async fn ping(&self) -> BlobResult<()> {
        fs::metadata(self.root.join(".partial")).await?;
        Ok(())
    }

    async fn begin(&self, key: &str) -> BlobResult<Box<dyn BlobWriter>> {
        let target = self.path(key)?;
        let partial = self.root.join(".partial").join(format!(
            "{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        // Marked live before it exists, so a sweep never sees it unowned.
        live().insert(partial.clone());
        let file = match fs::File::create(&partial).await {
            Ok(file) => file,
            Err(e) => {
                live().remove(&partial);
                return Err(e.into());
            }
        };
        Ok(Box::new(LocalWriter {
            file: BufWriter::with_capacity(256 << 10, file),
            partial,
            target,
            done: false,
        }))
    }

    async fn read_range(&self, key: &str, start: u64, end: u64) -> BlobResult<ByteStream> {
        let path = self.path(key)?;
        let mut file = match fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BlobError::NotFound(key.to_owned()))
            }
            Err(e) => return Err(e.into()),
        };
        file.seek(SeekFrom::Start(start)).await?;
        let reader = file.take(end.saturating_sub(start));
        Ok(ReaderStream::with_capacity(reader, 64 << 10)
            .map(|r| r.map_err(BlobError::from))
            .boxed())
    }

    async fn delete(&self, key: &str) -> BlobResult<()> {
        match fs::remove_file(self.path(key)?).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    async fn sweep_abandoned(&self, older_than: Duration) -> BlobResult<u64> {
        let me = std::process::id();
        let mut removed = 0;
        let mut entries = fs::read_dir(self.root.join(".partial")).await?;
        while let Some(entry) = entries.next_entry().await? {
            let path = entry.path();
            if live().contains(&path) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let owner = name
                .split_once('-')
                .and_then(|(pid, _)| pid.parse::<u32>().ok());
            let abandoned = match owner.map(|pid| (pid, process_alive(pid))) {
                // Ours, yet no writer of ours holds it; or its process is gone.
                Some((pid, _)) if pid == me => true,
                Some((_, Some(alive))) => !alive,
                _ => entry
                    .metadata()
                    .await
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|age| age >= older_than),
            };
            if abandoned {
                match fs::remove_file(&path).await {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(removed)
    }
}
