//! The byte pipeline of one unit: `tar → BLAKE3 → zstd → age → parts`, and
//! back: `object → age → zstd → BLAKE3 → tar`.
//!
//! Everything here is synchronous `Read`/`Write` and runs on a blocking
//! thread; parts leave through a bounded channel, so memory stays at a few
//! parts per unit whatever the size of the unit.

use std::io::{self, Read, Write};

use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::budget::{Budget, Held};
use crate::hash::Blake3;
use crate::pool::{Pool, Pooled};

/// BLAKE3 is fast on large inputs (it hashes many chunks at once with SIMD)
/// and slow on the 512-byte headers and 8 KiB copies that tar writes, so
/// [`HashingWriter`] gathers writes into blocks of this size.
const HASH_BLOCK: usize = 256 << 10;

/// Counts and hashes (BLAKE3) the bytes written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
    bytes: u64,
    buf: Vec<u8>,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: blake3::Hasher::new(),
            bytes: 0,
            buf: Vec::with_capacity(HASH_BLOCK),
        }
    }

    fn drain(&mut self) -> io::Result<()> {
        self.hasher.update(&self.buf);
        self.inner.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// The inner writer, the BLAKE3 (hex) and the byte count.
    pub fn finish(mut self) -> io::Result<(W, Blake3, u64)> {
        self.drain()?;
        Ok((self.inner, self.hasher.finalize().into(), self.bytes))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.buf.len() + buf.len() > HASH_BLOCK {
            self.drain()?;
        }
        if buf.len() >= HASH_BLOCK {
            self.hasher.update(buf);
            self.inner.write_all(buf)?;
        } else {
            self.buf.extend_from_slice(buf);
        }
        self.bytes += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.drain()?;
        self.inner.flush()
    }
}

/// Counts and hashes (BLAKE3) the bytes read through it. Read from it in
/// large blocks (through a `BufReader`) for BLAKE3's sake.
pub struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: blake3::Hasher::new(),
            bytes: 0,
        }
    }

    /// Reads what is left (a tar's trailing padding), then returns the BLAKE3
    /// (hex) and byte count of everything read.
    pub fn finish(mut self) -> io::Result<(Blake3, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((self.hasher.finalize().into(), self.bytes))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Size and BLAKE3 (hex) of a stored object, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub bytes: u64,
    pub blake3: Blake3,
}

impl Digest {
    /// The digest of a whole object in memory.
    pub fn of(body: &[u8]) -> Digest {
        Digest {
            bytes: body.len() as u64,
            blake3: Blake3::of(body),
        }
    }
}

/// What travels from the pipeline to the upload: the parts, then the end.
#[derive(Debug)]
pub enum Part {
    /// A part, and the bytes of the run's budget it holds until it is
    /// stored on every target.
    Data(Bytes, Held),
    /// The object is complete; its size and hash.
    End(Digest),
}

/// Cuts the stream into parts of `part_size` bytes, hashes them and sends
/// them on, each holding its bytes from the run's [`Budget`]: the budget is
/// what keeps memory flat across units. After the last part, [`Part::End`]
/// marks the end: a channel that closes without it means the producer
/// failed, and the object must not be completed.
///
/// The buffer starts small and grows to `part_size` only for a unit that
/// fills it: a small unit never reserves a whole part.
pub struct PartSink {
    tx: mpsc::Sender<Part>,
    buf: BytesMut,
    part_size: usize,
    hasher: blake3::Hasher,
    sent: u64,
    budget: Arc<Budget>,
}

/// The first buffer of a part: most units of a Pryv volume are smaller.
const FIRST_BUFFER: usize = 64 << 10;

impl PartSink {
    pub fn new(tx: mpsc::Sender<Part>, part_size: usize, budget: Arc<Budget>) -> Self {
        PartSink {
            tx,
            buf: BytesMut::with_capacity(FIRST_BUFFER.min(part_size)),
            part_size,
            hasher: blake3::Hasher::new(),
            sent: 0,
            budget,
        }
    }

    fn send(&mut self, part: Part) -> io::Result<()> {
        self.tx
            .blocking_send(part)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }

    fn send_buffered(&mut self) -> io::Result<()> {
        // A buffer that grew by doubling can be twice what it holds: the
        // last part of a small unit is copied to its size, so the memory a
        // part keeps while it waits for the store is what the budget counts.
        let part = if self.buf.capacity() > self.buf.len() + self.buf.len() / 4 {
            let exact = Bytes::copy_from_slice(&self.buf);
            self.buf.clear();
            exact
        } else {
            self.buf.split().freeze()
        };
        self.sent += part.len() as u64;
        self.hasher.update(&part);
        let held = self.budget.hold_blocking(part.len());
        let full = part.len() == self.part_size;
        self.send(Part::Data(part, held))?;
        if full {
            // a large unit: the next part is likely whole too
            self.buf.reserve(self.part_size);
        }
        Ok(())
    }

    /// Sends the last part and the end marker; returns the stored size.
    pub fn finish(mut self) -> io::Result<u64> {
        if !self.buf.is_empty() {
            self.send_buffered()?;
        }
        let digest = Digest {
            bytes: self.sent,
            blake3: self.hasher.finalize().into(),
        };
        self.send(Part::End(digest))?;
        Ok(self.sent)
    }
}

impl Write for PartSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.part_size - self.buf.len();
        let n = room.min(buf.len());
        self.buf.extend_from_slice(&buf[..n]);
        if self.buf.len() == self.part_size {
            self.send_buffered()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a sealed unit turned out to be.
#[derive(Debug, Clone)]
pub struct Sealed<T> {
    /// BLAKE3 of the plain tar.
    pub blake3: Blake3,
    /// Size of the plain tar.
    pub plain_size: u64,
    /// Size of the stored object.
    pub stored_size: u64,
    /// What the producer returned.
    pub extra: T,
}

/// Runs `produce` on a writer whose bytes are hashed, compressed (zstd at
/// `level`, with frame checksums), encrypted to `recipients` and sent as parts.
pub fn seal<T>(
    recipients: &[age::x25519::Recipient],
    level: i32,
    sink: PartSink,
    produce: impl FnOnce(
        &mut HashingWriter<zstd::Encoder<'_, age::stream::StreamWriter<PartSink>>>,
    ) -> Result<T>,
) -> Result<Sealed<T>> {
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .context("no recipients to encrypt to")?;
    let age = encryptor.wrap_output(sink)?;
    let mut context = COMPRESSORS.take();
    let mut zstd = zstd::Encoder::with_context(age, &mut context);
    // a reused context keeps its parameters: set every one this frame needs
    zstd.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(level))?;
    zstd.include_checksum(true)?;
    let mut hashing = HashingWriter::new(zstd);
    let extra = produce(&mut hashing)?;
    let (zstd, blake3, plain_size) = hashing.finish()?;
    let age = zstd.finish()?;
    let sink = age.finish()?;
    let stored_size = sink.finish()?;
    Ok(Sealed {
        blake3,
        plain_size,
        stored_size,
        extra,
    })
}

/// Opens a stored object: age-decrypts with `identities`, then zstd-decodes.
pub fn open<'a, R: Read + 'a>(
    reader: R,
    identities: &[Box<dyn age::Identity + Send + Sync>],
    context: &'a mut zstd::zstd_safe::DCtx<'static>,
) -> Result<Box<dyn Read + 'a>, OpenError> {
    let plain = decrypt(io::BufReader::new(reader), identities)?;
    let plain = io::BufReader::with_capacity(zstd::zstd_safe::DCtx::in_size(), plain);
    Ok(Box::new(zstd::Decoder::with_context(plain, context)))
}

/// Drops the idle zstd contexts (a few MiB each) once a run has sealed or
/// opened its last unit: the daemon lives on between runs.
pub fn release_contexts() {
    COMPRESSORS.clear();
    DECOMPRESSORS.clear();
}

/// A zstd context for [`open`], reused from unit to unit.
pub fn decompressor() -> Pooled<zstd::zstd_safe::DCtx<'static>> {
    DECOMPRESSORS.take()
}

// kept between units: see crate::pool for why
static COMPRESSORS: Pool<zstd::zstd_safe::CCtx<'static>> = Pool::new(zstd::zstd_safe::CCtx::create);
static DECOMPRESSORS: Pool<zstd::zstd_safe::DCtx<'static>> =
    Pool::new(zstd::zstd_safe::DCtx::create);

fn decrypt<'a, R: io::BufRead + 'a>(
    reader: R,
    identities: &[Box<dyn age::Identity + Send + Sync>],
) -> Result<impl Read + 'a, OpenError> {
    let decryptor = age::Decryptor::new_buffered(reader).map_err(OpenError::Format)?;
    decryptor
        .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => OpenError::NoMatchingKeys,
            other => OpenError::Format(other),
        })
}

/// Why a stored object could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// None of the identities is a recipient of the object.
    #[error("none of the identities can decrypt it")]
    NoMatchingKeys,
    /// Not an age file, or a damaged one.
    #[error("not a valid age file: {0}")]
    Format(age::DecryptError),
    #[error("{0}")]
    Io(io::Error),
}

/// Encrypts a small document (manifest, audit copy) to `recipients`.
pub fn encrypt_small(recipients: &[age::x25519::Recipient], plain: &[u8]) -> Result<Vec<u8>> {
    encrypt_with(recipients, |w| w.write_all(plain))
}

/// Encrypts what `write` writes to `recipients`, in memory: only the
/// encrypted bytes are held whole, never the plain ones too.
pub fn encrypt_with(
    recipients: &[age::x25519::Recipient],
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<Vec<u8>> {
    encrypt_into(recipients, Vec::new(), write)
}

/// Encrypts what `write` writes to `recipients` into `out`; returns `out`.
pub fn encrypt_into<W: Write>(
    recipients: &[age::x25519::Recipient],
    out: W,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<W> {
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .context("no recipients to encrypt to")?;
    let mut w = encryptor.wrap_output(out)?;
    write(&mut w)?;
    Ok(w.finish()?)
}

/// Decrypts a small document.
pub fn decrypt_small(
    sealed: &[u8],
    identities: &[Box<dyn age::Identity + Send + Sync>],
) -> Result<Vec<u8>, OpenError> {
    let mut out = Vec::new();
    decrypt(sealed, identities)?
        .read_to_end(&mut out)
        .map_err(OpenError::Io)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_zstd_context_starts_each_frame_afresh() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 97) as u8).collect();
        let mut context = COMPRESSORS.take();
        // a frame abandoned half way, then a whole one on the same context
        let mut abandoned = zstd::Encoder::with_context(Vec::new(), &mut context);
        abandoned.write_all(&data[..100_000]).unwrap();
        drop(abandoned);
        let mut whole = zstd::Encoder::with_context(Vec::new(), &mut context);
        whole
            .set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(3))
            .unwrap();
        whole.include_checksum(true).unwrap();
        whole.write_all(&data).unwrap();
        let frame = whole.finish().unwrap();
        assert_eq!(zstd::decode_all(&frame[..]).unwrap(), data);
        // the same for decoding: half a frame, then a whole one
        let mut context = decompressor();
        let mut half = [0u8; 1000];
        let mut abandoned = zstd::Decoder::with_context(&frame[..], &mut context);
        abandoned.read_exact(&mut half).unwrap();
        drop(abandoned);
        let mut out = Vec::new();
        zstd::Decoder::with_context(&frame[..], &mut context)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn hashing_writer_hashes_what_passes_whatever_the_write_sizes() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut w = HashingWriter::new(Vec::new());
        for chunk in data.chunks(511).chain(std::iter::once(&data[..300_000])) {
            w.write_all(chunk).unwrap();
        }
        let (out, hash, n) = w.finish().unwrap();
        let mut expected = data.clone();
        expected.extend_from_slice(&data[..300_000]);
        assert_eq!(out, expected);
        assert_eq!(n, expected.len() as u64);
        assert_eq!(hash, Blake3::of(&expected));
    }
}
