//! The prefix cache's disk tier: full KV blocks kept as files, so that a prefix computed
//! once is served from disk after the pool has evicted it or the server has restarted
//! (DeepSeek's context caching does the same).
//!
//! Layout: `<dir>/<fingerprint>/<hash>.kv`, one file per block. The fingerprint (16 hex
//! digits) names everything that makes KV values differ: the weights, the architecture
//! and its config, the KV dtype and layout, the block size. Another model, quantization
//! or KV dtype lives in another subdirectory and never sees these blocks. The hash is the
//! block's chained hash ([`super::block_hash`], stable across builds and runs).
//!
//! A record: magic, version, fingerprint, hash, the block's tokens, the payload (the
//! block's KV bytes, all layers), and a CRC-32 of everything before it. A record whose
//! magic, fingerprint, hash, tokens, length or checksum do not match is a miss and is
//! removed: a corrupt, truncated or foreign file never becomes a wrong answer.
//!
//! Writes are atomic: a temporary file in the same directory, then a rename. Two servers
//! on one directory: the first to take the subdirectory's lock file owns it (writes,
//! evicts, removes bad files); the others are read-only followers that only read. The
//! owner's lock ends with its process, so a restarted server owns the directory again.
//!
//! The index (hash -> size and last use) is rebuilt at open by listing the directory,
//! without reading any block; use is ordered by file modification time, which a hit
//! refreshes. Past `max_bytes`, the least recently used files are deleted.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

const MAGIC: &[u8; 4] = b"MSKV";
const VERSION: u32 = 1;
/// magic, version, fingerprint, hash, token count.
const HEADER: usize = 4 + 4 + 8 + 8 + 4;
const EXTENSION: &str = "kv";

/// FNV-1a, 64 bits: a hash whose value is fixed by its definition, so that keys written
/// by one build are found by the next (std's `DefaultHasher` promises no such thing).
#[derive(Clone, Copy)]
pub struct StableHasher(u64);

impl Default for StableHasher {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl StableHasher {
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn write_u64(&mut self, v: u64) {
        self.write(&v.to_le_bytes())
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// A model's KV identity: feed it every input that changes the KV values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub u64);

impl Fingerprint {
    pub fn of(parts: &[&[u8]]) -> Self {
        let mut h = StableHasher::default();
        for p in parts {
            // Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
            h.write_u64(p.len() as u64);
            h.write(p);
        }
        Self(h.finish())
    }

    fn dir_name(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// How much of each end of a weight file [`weights_identity`] reads.
const IDENTITY_SAMPLE: u64 = 1 << 20;

/// An identity for a model's weight files that changes when their contents do: each
/// file's size and a hash of its first and last MiB (where a GGUF keeps its metadata and
/// tensor index, and a safetensors file its header, and where a re-quantization or an
/// edit of any tensor's type or shape shows). Reading whole files would cost minutes on
/// a DeepSeek-size checkpoint; names and times are left out, so a copied or renamed
/// file keeps its blocks.
pub fn weights_identity(paths: &[PathBuf]) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut h = StableHasher::default();
    let mut buf = Vec::new();
    for path in paths {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        h.write_u64(len);
        buf.clear();
        (&mut f).take(IDENTITY_SAMPLE).read_to_end(&mut buf)?;
        if len > IDENTITY_SAMPLE {
            f.seek(SeekFrom::Start(
                len.saturating_sub(IDENTITY_SAMPLE).max(IDENTITY_SAMPLE),
            ))?;
            f.take(IDENTITY_SAMPLE).read_to_end(&mut buf)?;
        }
        h.write(&buf);
    }
    Ok(h.finish())
}

/// The fingerprint of a model's KV blocks: its weights, its config (architecture, rope,
/// attention shapes: everything the model code reads), the KV layout and element type,
/// how the backend lays a block out ([`KvStorage::record_format`](super::KvStorage::record_format)),
/// the block size, and the byte order the records are read back in.
pub fn kv_fingerprint(
    weights: u64,
    config: &crate::config::ModelConfig,
    layout: super::KvLayout,
    record_format: &str,
    block_size: usize,
) -> Fingerprint {
    Fingerprint::of(&[
        &VERSION.to_le_bytes(),
        &weights.to_le_bytes(),
        format!("{config:?}").as_bytes(),
        format!("{layout:?}").as_bytes(),
        record_format.as_bytes(),
        &(block_size as u64).to_le_bytes(),
        if cfg!(target_endian = "little") {
            b"le"
        } else {
            b"be"
        },
    ])
}

/// Counters for the metrics.
#[derive(Debug, Default)]
pub struct DiskStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Records found bad (and removed, by the owner).
    pub corrupt: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub read_ns: AtomicU64,
    pub write_ns: AtomicU64,
    /// Blocks not written because the writer's queue was full, and writes that failed.
    pub dropped_writes: AtomicU64,
    pub write_errors: AtomicU64,
}

#[derive(Default)]
struct Index {
    /// hash -> (bytes on disk, last use)
    entries: HashMap<u64, (u64, u128)>,
    /// (last use, hash), oldest first
    by_use: BTreeSet<(u128, u64)>,
    total: u64,
    /// Makes every use distinct and later than the files' times at open.
    clock: u128,
}

impl Index {
    fn touch(&mut self, hash: u64, bytes: u64, at: u128) {
        if let Some((old_bytes, old_at)) = self.entries.insert(hash, (bytes, at)) {
            self.by_use.remove(&(old_at, hash));
            self.total -= old_bytes;
        }
        self.by_use.insert((at, hash));
        self.total += bytes;
    }

    fn remove(&mut self, hash: u64) -> bool {
        match self.entries.remove(&hash) {
            Some((bytes, at)) => {
                self.by_use.remove(&(at, hash));
                self.total -= bytes;
                true
            }
            None => false,
        }
    }

    fn now(&mut self) -> u128 {
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        self.clock = (self.clock + 1).max(wall);
        self.clock
    }
}

/// The blocks of one model fingerprint under one directory.
pub struct DiskBlockStore {
    dir: PathBuf,
    fingerprint: Fingerprint,
    max_bytes: u64,
    /// Held while this store owns the directory; `None`: a read-only follower.
    lock: Option<File>,
    index: Mutex<Index>,
    temp_counter: AtomicU64,
    pub stats: DiskStats,
}

fn mtime_nanos(meta: &fs::Metadata) -> u128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}

impl DiskBlockStore {
    /// Opens (creating) `root/<fingerprint>`, takes ownership if no other process holds
    /// it, removes the temporary files a killed owner left, and indexes the blocks.
    pub fn open(root: &Path, fingerprint: Fingerprint, max_bytes: u64) -> io::Result<Self> {
        let dir = root.join(fingerprint.dir_name());
        fs::create_dir_all(&dir)?;
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".lock"))?;
        let lock = match lock_file.try_lock() {
            Ok(()) => Some(lock_file),
            Err(fs::TryLockError::WouldBlock) => None,
            Err(fs::TryLockError::Error(e)) => return Err(e),
        };
        let mut index = Index::default();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.contains(".tmp") {
                // Only an owner writes temporaries, and only the owner is here now.
                if lock.is_some() {
                    let _ = fs::remove_file(entry.path());
                }
                continue;
            }
            let Some(hash) = name
                .strip_suffix(".kv")
                .and_then(|h| u64::from_str_radix(h, 16).ok())
            else {
                continue;
            };
            let meta = entry.metadata()?;
            index.touch(hash, meta.len(), mtime_nanos(&meta));
        }
        index.clock = index.by_use.last().map_or(0, |(t, _)| *t);
        let store = Self {
            dir,
            fingerprint,
            max_bytes,
            lock,
            index: Mutex::new(index),
            temp_counter: AtomicU64::new(0),
            stats: DiskStats::default(),
        };
        store.evict();
        Ok(store)
    }

    /// This model's subdirectory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether this store writes (it holds the directory's lock).
    pub fn is_owner(&self) -> bool {
        self.lock.is_some()
    }

    pub fn bytes_on_disk(&self) -> u64 {
        self.index.lock().unwrap().total
    }

    pub fn len(&self) -> usize {
        self.index.lock().unwrap().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a block is indexed (its record may still turn out bad when read).
    pub fn contains(&self, hash: u64) -> bool {
        self.index.lock().unwrap().entries.contains_key(&hash)
    }

    /// Whether a read of `hash` may find it: indexed, or (for a follower, whose index
    /// misses what the owner wrote after it opened) its file exists.
    pub fn may_contain(&self, hash: u64) -> bool {
        self.contains(hash) || (!self.is_owner() && self.path(hash).exists())
    }

    fn path(&self, hash: u64) -> PathBuf {
        self.dir.join(format!("{hash:016x}.{EXTENSION}"))
    }

    fn encode(&self, hash: u64, tokens: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::with_capacity(HEADER + tokens.len() * 4 + 8 + payload.len() + 4);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&self.fingerprint.0.to_le_bytes());
        buf.extend_from_slice(&hash.to_le_bytes());
        buf.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
        for t in tokens {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        buf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        buf.extend_from_slice(payload);
        let crc = crc32fast::hash(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        buf
    }

    /// The payload of a record, if it is whole and is the block asked for.
    fn decode(&self, buf: &[u8], hash: u64, tokens: &[u32]) -> Option<std::ops::Range<usize>> {
        let u32_at = |i: usize| Some(u32::from_le_bytes(buf.get(i..i + 4)?.try_into().ok()?));
        let u64_at = |i: usize| Some(u64::from_le_bytes(buf.get(i..i + 8)?.try_into().ok()?));
        let (body, crc) = buf.split_at_checked(buf.len().checked_sub(4)?)?;
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) {
            return None;
        }
        if buf.get(..4)? != MAGIC
            || u32_at(4)? != VERSION
            || u64_at(8)? != self.fingerprint.0
            || u64_at(16)? != hash
            || u32_at(24)? as usize != tokens.len()
        {
            return None;
        }
        let mut at = HEADER;
        for t in tokens {
            if u32_at(at)? != *t {
                return None;
            }
            at += 4;
        }
        let len = usize::try_from(u64_at(at)?).ok()?;
        at += 8;
        (at.checked_add(len)? == body.len()).then_some(at..at + len)
    }

    /// The block's KV bytes, if its record is on disk, whole, and holds exactly `tokens`.
    /// A bad record counts as a miss and is removed.
    /// A follower also looks for blocks its index does not know: the owner writes them
    /// after the follower opened.
    pub fn get(&self, hash: u64, tokens: &[u32]) -> Option<Vec<u8>> {
        if self.is_owner() && !self.contains(hash) {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let started = std::time::Instant::now();
        let path = self.path(hash);
        let mut buf = Vec::new();
        let read = File::open(&path).and_then(|mut f| f.read_to_end(&mut buf));
        if matches!(&read, Err(e) if e.kind() == io::ErrorKind::NotFound) {
            // Never written, or evicted by the owner: a plain miss.
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            self.index.lock().unwrap().remove(hash);
            return None;
        }
        let payload = read.ok().and_then(|_| self.decode(&buf, hash, tokens));
        self.stats
            .read_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let Some(range) = payload else {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            // A different token list under the same hash is a collision, not damage:
            // keep it; anything else that fails to decode is removed (by the owner).
            let collision = buf.len() >= HEADER && self.decode_tokens_differ(&buf, hash);
            if !collision {
                self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                self.index.lock().unwrap().remove(hash);
                if self.is_owner() {
                    let _ = fs::remove_file(&path);
                }
            }
            return None;
        };
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        let mut index = self.index.lock().unwrap();
        // The owner's writer may have evicted it since the read: keep it out of the
        // index then (its file is gone). A follower learns of the owner's blocks here.
        if !self.is_owner() || index.entries.contains_key(&hash) {
            let at = index.now();
            index.touch(hash, buf.len() as u64, at);
        }
        drop(index);
        if self.is_owner() {
            // The file's time is the use order a restart reads back.
            let _ = File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(SystemTime::now()));
        }
        buf.truncate(range.end);
        buf.drain(..range.start);
        Some(buf)
    }

    /// Whether `buf` is a whole record of this hash that holds other tokens.
    fn decode_tokens_differ(&self, buf: &[u8], hash: u64) -> bool {
        let Some(n) = buf
            .get(24..28)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
        else {
            return false;
        };
        let Some(stored) = buf.get(HEADER..HEADER + n * 4) else {
            return false;
        };
        let tokens: Vec<u32> = stored
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        self.decode(buf, hash, &tokens).is_some()
    }

    /// Writes a block (owner only; a follower, or a block already on disk, writes
    /// nothing and returns false). Atomic: readers see the whole record or none. Then
    /// deletes the least recently used blocks past the byte bound.
    pub fn put(&self, hash: u64, tokens: &[u32], payload: &[u8]) -> io::Result<bool> {
        if !self.is_owner() || self.contains(hash) {
            return Ok(false);
        }
        let started = std::time::Instant::now();
        let record = self.encode(hash, tokens, payload);
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let temp = self.dir.join(format!("{hash:016x}.tmp{n}"));
        let written = (|| {
            let mut f = File::create(&temp)?;
            f.write_all(&record)?;
            fs::rename(&temp, self.path(hash))
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
        self.stats
            .write_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.stats
            .bytes_written
            .fetch_add(record.len() as u64, Ordering::Relaxed);
        {
            let mut index = self.index.lock().unwrap();
            let at = index.now();
            index.touch(hash, record.len() as u64, at);
        }
        self.evict();
        Ok(true)
    }

    /// Deletes the least recently used blocks until the total is within the bound
    /// (owner only).
    fn evict(&self) {
        if !self.is_owner() {
            return;
        }
        let mut index = self.index.lock().unwrap();
        while index.total > self.max_bytes {
            let Some(&(_, hash)) = index.by_use.first() else {
                break;
            };
            index.remove(hash);
            let _ = fs::remove_file(self.path(hash));
        }
    }
}

/// A block on its way to disk.
struct WriteJob {
    hash: u64,
    tokens: Vec<u32>,
    payload: Vec<u8>,
}

/// The disk tier as the engine uses it: the store, plus a writer thread fed through a
/// bounded queue, so that the step loop hands full blocks off and never waits on the
/// disk. A block that finds the queue full is not written (counted in
/// `dropped_writes`): a slow disk costs cache hits, never step time.
pub struct DiskTier {
    store: Arc<DiskBlockStore>,
    jobs: Mutex<Option<SyncSender<WriteJob>>>,
    /// Blocks queued or being written.
    pending: Arc<AtomicUsize>,
    capacity: usize,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl DiskTier {
    /// Starts the writer thread; at most `queue_bytes` of blocks (and at least 4 blocks)
    /// wait for it.
    pub fn start(store: DiskBlockStore, block_bytes: usize, queue_bytes: usize) -> io::Result<Self> {
        let capacity = (queue_bytes / block_bytes.max(1)).max(4);
        let store = Arc::new(store);
        let pending = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::sync_channel::<WriteJob>(capacity);
        let writer = {
            let (store, pending) = (store.clone(), pending.clone());
            std::thread::Builder::new()
                .name("moeserve-kv-disk".into())
                .spawn(move || {
                    for job in rx {
                        if let Err(e) = store.put(job.hash, &job.tokens, &job.payload) {
                            tracing::warn!("prefix cache on disk: cannot write a block: {e}");
                            store.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        pending.fetch_sub(1, Ordering::Release);
                    }
                })?
        };
        Ok(Self {
            store,
            jobs: Mutex::new(Some(tx)),
            pending,
            capacity,
            writer: Mutex::new(Some(writer)),
        })
    }

    pub fn store(&self) -> &DiskBlockStore {
        &self.store
    }

    pub fn stats(&self) -> &DiskStats {
        &self.store.stats
    }

    /// Whether the block `hash` should be copied out and written: this server owns the
    /// directory, the block is not on disk, and the queue has room (a full queue counts
    /// as a dropped write).
    pub fn wants(&self, hash: u64) -> bool {
        if !self.store.is_owner() || self.store.contains(hash) {
            return false;
        }
        if self.pending.load(Ordering::Acquire) >= self.capacity {
            self.store.stats.dropped_writes.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Queues a block for the writer; never blocks.
    pub fn write(&self, hash: u64, tokens: &[u32], payload: Vec<u8>) {
        let jobs = self.jobs.lock().unwrap();
        let Some(tx) = jobs.as_ref() else { return };
        self.pending.fetch_add(1, Ordering::AcqRel);
        let job = WriteJob {
            hash,
            tokens: tokens.to_vec(),
            payload,
        };
        if tx.try_send(job).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            self.store.stats.dropped_writes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Blocks queued or being written.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Waits until the queued blocks are on disk, or `timeout` passes. Returns whether
    /// the queue emptied.
    pub fn flush(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while self.pending() > 0 {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        true
    }
}

impl Drop for DiskTier {
    /// Writes what is queued, then stops the writer.
    fn drop(&mut self) {
        self.jobs.lock().unwrap().take();
        if let Some(w) = self.writer.lock().unwrap().take() {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: Fingerprint = Fingerprint(0x1234);

    fn payload(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn the_stable_hash_is_fixed() {
        // FNV-1a's published test vector: "a" -> af63dc4c8601ec8c.
        let mut h = StableHasher::default();
        h.write(b"a");
        assert_eq!(h.finish(), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(Fingerprint::of(&[b"ab", b"c"]), Fingerprint::of(&[b"a", b"bc"]));
    }

    /// The weights' identity: the same for a copy, different when any sampled byte or
    /// the size differs; the fingerprint changes with the KV dtype and block size.
    #[test]
    fn fingerprints_follow_what_changes_the_values() {
        let tmp = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..3 * IDENTITY_SAMPLE as usize)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let file = |name: &str, bytes: &[u8]| {
            let p = tmp.path().join(name);
            fs::write(&p, bytes).unwrap();
            p
        };
        let id = |p: &PathBuf| weights_identity(std::slice::from_ref(p)).unwrap();
        let a = id(&file("a.gguf", &big));
        assert_eq!(a, id(&file("copy.gguf", &big)), "names do not count");
        let mut tail = big.clone();
        *tail.last_mut().unwrap() ^= 1;
        assert_ne!(a, id(&file("tail.gguf", &tail)));
        let mut head = big.clone();
        head[10] ^= 1;
        assert_ne!(a, id(&file("head.gguf", &head)));
        assert_ne!(a, id(&file("short.gguf", &big[..big.len() - 1])));
        assert_ne!(a, id(&file("small.gguf", b"tiny")));

        let cfg = crate::config::ModelConfig::from_file(
            &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/llama/config.json"),
        )
        .unwrap();
        let layout = crate::kv::KvLayout {
            num_layers: 2,
            num_kv_heads: 2,
            key_dim: 8,
            value_dim: 8,
            dtype: crate::kv::KvDtype::F32,
        };
        let f = kv_fingerprint(a, &cfg, layout, "host", 16);
        assert_eq!(f, kv_fingerprint(a, &cfg, layout, "host", 16));
        assert_ne!(f, kv_fingerprint(a ^ 1, &cfg, layout, "host", 16));
        assert_ne!(f, kv_fingerprint(a, &cfg, layout, "host", 32));
        assert_ne!(f, kv_fingerprint(a, &cfg, layout, "rows", 16));
        let half = crate::kv::KvLayout {
            dtype: crate::kv::KvDtype::F16,
            ..layout
        };
        assert_ne!(f, kv_fingerprint(a, &cfg, half, "host", 16));
        let mut other = cfg.clone();
        other.rms_norm_eps *= 2.0;
        assert_ne!(f, kv_fingerprint(a, &other, layout, "host", 16));
    }

    #[test]
    fn blocks_survive_a_reopen_and_check_their_tokens() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DiskBlockStore::open(tmp.path(), FP, 1 << 20).unwrap();
        assert!(store.is_owner());
        assert!(store.put(7, &[1, 2, 3], &payload(1, 100)).unwrap());
        assert!(
            !store.put(7, &[1, 2, 3], &payload(1, 100)).unwrap(),
            "already there"
        );
        assert_eq!(store.get(7, &[1, 2, 3]), Some(payload(1, 100)));
        assert_eq!(store.get(8, &[1, 2, 3]), None);
        drop(store);

        let store = DiskBlockStore::open(tmp.path(), FP, 1 << 20).unwrap();
        assert_eq!(store.len(), 1);
        assert_eq!(store.get(7, &[1, 2, 3]), Some(payload(1, 100)));
        // The same hash with other tokens (a collision) is a miss and stays on disk.
        assert_eq!(store.get(7, &[1, 2, 4]), None);
        assert_eq!(store.get(7, &[1, 2, 3]), Some(payload(1, 100)));
        assert_eq!(store.stats.hits.load(Ordering::Relaxed), 2);
        assert_eq!(store.stats.misses.load(Ordering::Relaxed), 1);
        assert_eq!(store.stats.corrupt.load(Ordering::Relaxed), 0);

        // Another fingerprint sees none of it.
        let other = DiskBlockStore::open(tmp.path(), Fingerprint(0x5678), 1 << 20).unwrap();
        assert!(other.is_empty());
        assert_eq!(other.get(7, &[1, 2, 3]), None);
    }

    #[test]
    fn corrupt_truncated_and_foreign_files_are_misses_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = DiskBlockStore::open(tmp.path(), FP, 1 << 20).unwrap();
        for h in 1..=4u64 {
            store.put(h, &[h as u32], &payload(h as u8, 64)).unwrap();
        }
        let path = |h: u64| store.path(h);
        // A flipped payload byte, a cut-off record, an empty file, another model's record.
        let mut bytes = fs::read(path(1)).unwrap();
        bytes[50] ^= 0xff;
        fs::write(path(1), bytes).unwrap();
        let bytes = fs::read(path(2)).unwrap();
        fs::write(path(2), &bytes[..bytes.len() - 10]).unwrap();
        fs::write(path(3), b"").unwrap();
        let foreign = DiskBlockStore::open(tmp.path(), Fingerprint(9), 1 << 20).unwrap();
        foreign.put(4, &[4], &payload(4, 64)).unwrap();
        fs::copy(foreign.path(4), path(4)).unwrap();
        for h in 1..=4u64 {
            assert_eq!(store.get(h, &[h as u32]), None, "block {h}");
            assert!(!path(h).exists(), "block {h} removed");
        }
        assert_eq!(store.stats.corrupt.load(Ordering::Relaxed), 4);
        assert!(store.is_empty());
        assert_eq!(store.bytes_on_disk(), 0);
    }

    #[test]
    fn the_byte_bound_drops_the_least_recently_used() {
        let tmp = tempfile::tempdir().unwrap();
        let record = |s: &DiskBlockStore| s.encode(0, &[0], &payload(0, 1000)).len() as u64;
        let probe = DiskBlockStore::open(tmp.path(), Fingerprint(1), 0).unwrap();
        let size = record(&probe);
        drop(probe);
        let store = DiskBlockStore::open(tmp.path(), FP, 3 * size).unwrap();
        for h in 1..=3u64 {
            store.put(h, &[0], &payload(0, 1000)).unwrap();
        }
        // Block 1 used again: block 2 is now the oldest, and goes when block 4 comes.
        assert!(store.get(1, &[0]).is_some());
        store.put(4, &[0], &payload(0, 1000)).unwrap();
        assert_eq!(store.bytes_on_disk(), 3 * size);
        assert!(store.contains(1) && !store.contains(2) && store.contains(3) && store.contains(4));
        assert!(!store.path(2).exists());
        drop(store);
        // Reopened with a smaller bound: the use order comes back from the files' times.
        let store = DiskBlockStore::open(tmp.path(), FP, 2 * size).unwrap();
        assert_eq!(store.len(), 2);
        assert!(!store.contains(3), "block 3 was the least recently used");
    }

    #[test]
    fn a_second_process_follows_and_leftover_temporaries_go() {
        let tmp = tempfile::tempdir().unwrap();
        let owner = DiskBlockStore::open(tmp.path(), FP, 1 << 20).unwrap();
        owner.put(1, &[1], &payload(1, 10)).unwrap();
        // A second store on the same directory (a second server) only reads.
        let follower = DiskBlockStore::open(tmp.path(), FP, 1 << 20).unwrap();
        assert!(!follower.is_owner());
        assert_eq!(follower.get(1, &[1]), Some(payload(1, 10)));
        assert!(!follower.put(2, &[2], &payload(2, 10)).unwrap());
        assert!(!follower.path(2).exists());
        // Blocks the owner writes after the follower opened are found too.
        owner.put(3, &[3], &payload(3, 10)).unwrap();
        assert_eq!(follower.get(3, &[3]), Some(payload(3, 10)));
        // A block gone from disk (evicted by the owner) is a miss, not damage.
        fs::remove_file(owner.path(3)).unwrap();
        assert_eq!(follower.get(3, &[3]), None);
        assert_eq!(follower.stats.corrupt.load(Ordering::Relaxed), 0);
        drop(follower);
        // A write cut short (the process killed before the rename) leaves a temporary,
        // never a block file; the next owner removes it.
        let dir = owner.dir.clone();
        fs::write(dir.join(format!("{:016x}.tmp0", 5u64)), b"partial").unwrap();
        drop(owner);
        let owner = DiskBlockStore::open(tmp.path(), FP, 1 << 20).unwrap();
        assert!(owner.is_owner(), "the lock went with the first owner");
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.contains(".tmp")), "{names:?}");
        assert_eq!(owner.len(), 1);
    }
}
