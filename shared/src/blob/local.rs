//! The embedded object store: files under one directory. Writes go to a temporary file that is
//! renamed into place on `finish`, so a crashed upload never leaves a partial object.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

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
        Ok(())
    }

    async fn abort(self: Box<Self>) -> BlobResult<()> {
        drop(self.file);
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
        let partial = self
            .root
            .join(".partial")
            .join(uuid::Uuid::new_v4().to_string());
        let file = fs::File::create(&partial).await?;
        Ok(Box::new(LocalWriter {
            file: BufWriter::with_capacity(256 << 10, file),
            partial,
            target,
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
}
