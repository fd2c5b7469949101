//! Reading prefix blocks back from the disk tier without stalling the step loop.
//!
//! When the scheduler meets a waiting sequence whose prefix goes on past the pool's
//! blocks onto a block the disk has, it hands the rest of the prefix to the loader thread
//! and goes on admitting the sequences behind it (as vLLM does for requests whose KV
//! comes from elsewhere); running sequences keep decoding. The loader reads the blocks in
//! order, up to the first miss, and sends them back as a command. The sequence then keeps
//! them in memory until it is admitted, when [`attach_cached_prefix`] copies each block
//! the pool lacks into a fresh pool block of its own: nothing is put in the pool early,
//! where a busy step could evict it before its sequence comes.
//!
//! Sequences that arrive while a load covering their prefix is under way (a burst of
//! requests with one system prompt after a restart) wait for that load instead of
//! reading the blocks again. At most [`MAX_LIVE_LOADS`] loads are under way or held in
//! memory at once; sequences past that wait their turn.
//!
//! [`attach_cached_prefix`]: super::scheduler

use std::sync::{mpsc, Arc, Weak};

use super::core::EngineCore;
use super::Command;
use crate::kv::disk::DiskTier;
use crate::kv::prefix_blocks;

/// Loads under way plus loads read and not yet consumed by their sequences' admission.
pub(super) const MAX_LIVE_LOADS: usize = 4;

/// Tests slow the loader down, to see what the engine does meanwhile.
#[cfg(test)]
pub(super) static LOAD_DELAY_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Where a waiting sequence stands with the disk tier.
#[derive(Clone, Default)]
pub(super) enum DiskLookup {
    /// Not looked for yet.
    #[default]
    Unchecked,
    /// Its prefix is on disk, but [`MAX_LIVE_LOADS`] loads are live: it waits its turn.
    Deferred,
    /// Load `id` is reading its blocks; not admitted until they arrive.
    Loading(u64),
    /// Looked for, with the blocks read for it, if any.
    Done(Option<Arc<LoadedBlocks>>),
}

/// Blocks to read, in prefix order, starting at block `start` of the prompt.
pub(super) struct LoadJob {
    id: u64,
    start: usize,
    blocks: Vec<(u64, Vec<u32>)>,
}

/// What the loader read: blocks `start..` of a prefix, up to the first one not on disk.
pub(crate) struct LoadedBlocks {
    id: u64,
    start: usize,
    blocks: Vec<(u64, Vec<u32>, Vec<u8>)>,
}

impl LoadedBlocks {
    /// The bytes of block `index` of the prompt, if this load read it and it is the
    /// block with chained hash `hash`.
    pub(super) fn bytes_of(&self, index: usize, hash: u64) -> Option<&[u8]> {
        let (h, _, bytes) = self.blocks.get(index.checked_sub(self.start)?)?;
        (*h == hash).then_some(bytes.as_slice())
    }
}

/// A load under way.
pub(super) struct LoadInFlight {
    id: u64,
    start: usize,
    /// The chained hashes of the blocks asked for.
    hashes: Vec<u64>,
    /// The sequences that wait for it.
    waiters: Vec<u64>,
}

/// The loader thread's end of the engine. Dropping it stops the thread.
pub(super) struct DiskLoader {
    jobs: mpsc::Sender<LoadJob>,
    next_id: u64,
    in_flight: Vec<LoadInFlight>,
    /// Loads read and still held by sequences waiting for admission.
    held: Vec<Weak<LoadedBlocks>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for DiskLoader {
    /// Stops the thread and waits for it: it holds the disk tier, whose writer must
    /// finish when the engine is dropped, not whenever this thread lets go.
    fn drop(&mut self) {
        self.jobs = mpsc::channel().0;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl DiskLoader {
    pub(super) fn start(tier: Arc<DiskTier>, engine: mpsc::Sender<Command>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<LoadJob>();
        let thread = std::thread::Builder::new()
            .name("moeserve-kv-load".into())
            .spawn(move || {
                for job in rx {
                    #[cfg(test)]
                    std::thread::sleep(std::time::Duration::from_millis(
                        LOAD_DELAY_MS.load(std::sync::atomic::Ordering::Relaxed),
                    ));
                    // Whatever happens, an answer goes back: sequences wait for it.
                    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        read_in_order(&tier, job.blocks)
                    }));
                    let blocks = read.unwrap_or_else(|_| {
                        tracing::error!(
                            "prefix cache on disk: reading blocks failed; computing them instead"
                        );
                        Vec::new()
                    });
                    let loaded = LoadedBlocks {
                        id: job.id,
                        start: job.start,
                        blocks,
                    };
                    if engine.send(Command::Loaded(Box::new(loaded))).is_err() {
                        return; // the engine has stopped
                    }
                }
            })?;
        Ok(Self {
            jobs: tx,
            next_id: 0,
            in_flight: Vec::new(),
            held: Vec::new(),
            thread: Some(thread),
        })
    }

    fn live_loads(&self) -> usize {
        self.in_flight.len() + self.held.iter().filter(|w| w.strong_count() > 0).count()
    }
}

/// Files read at once by one load: a single reader waits out each read's latency in
/// turn (the device idles between them); a few in flight keep it busy.
const PARALLEL_READS: usize = 4;

/// Reads `blocks` in prefix order, up to the first that is not on disk (or is bad),
/// `PARALLEL_READS` at a time.
fn read_in_order(tier: &DiskTier, blocks: Vec<(u64, Vec<u32>)>) -> Vec<(u64, Vec<u32>, Vec<u8>)> {
    let mut out = Vec::with_capacity(blocks.len());
    let mut blocks = blocks.into_iter().peekable();
    while blocks.peek().is_some() {
        let window: Vec<(u64, Vec<u32>)> = blocks.by_ref().take(4 * PARALLEL_READS).collect();
        let mut read: Vec<Option<Vec<u8>>> = vec![None; window.len()];
        std::thread::scope(|s| {
            for (lane, slots) in read.chunks_mut(4).enumerate() {
                let window = &window;
                s.spawn(move || {
                    for (i, slot) in slots.iter_mut().enumerate() {
                        let (hash, tokens) = &window[lane * 4 + i];
                        *slot = tier.store().get(*hash, tokens);
                        if slot.is_none() {
                            break; // the blocks after it are of no use
                        }
                    }
                });
            }
        });
        for ((hash, tokens), bytes) in window.into_iter().zip(read) {
            let Some(bytes) = bytes else {
                return out;
            };
            out.push((hash, tokens, bytes));
        }
    }
    out
}

impl EngineCore {
    /// Whether waiting sequence `sid` must wait for the disk before admission; starts
    /// reading its blocks if so. Only a fresh sequence whose prefix continues past the
    /// pool's blocks onto a block the disk may hold waits, and reads only once.
    pub(super) fn wait_for_disk(&mut self, sid: u64) -> bool {
        let (Some(loader), Some(tier)) = (self.loader.as_mut(), &self.disk) else {
            return false;
        };
        let bs = self.kv.block_size();
        let seq = self.seqs.get_mut(&sid).unwrap();
        match seq.disk {
            DiskLookup::Loading(_) => return true,
            DiskLookup::Done(_) => return false,
            DiskLookup::Unchecked | DiskLookup::Deferred => {}
        }
        // The blocks after the pool's: from the first the pool lacks to the last full
        // block before the prompt's last token.
        let mut start = None;
        let mut wanted = vec![];
        for (b, h, toks) in prefix_blocks(&seq.tokens, bs) {
            if start.is_none() {
                if self.pool.lookup(h, toks).is_some() {
                    continue;
                }
                if !tier.store().may_contain(h) {
                    break;
                }
                start = Some(b);
            }
            wanted.push((h, toks.to_vec()));
        }
        let Some(start) = start else {
            seq.disk = DiskLookup::Done(None);
            return false;
        };
        let last = wanted.last().map(|(h, _)| *h);
        if let Some(load) = loader
            .in_flight
            .iter_mut()
            .find(|l| l.start == start && l.hashes.get(wanted.len() - 1).copied() == last)
        {
            load.waiters.push(sid);
            seq.disk = DiskLookup::Loading(load.id);
            return true;
        }
        loader.held.retain(|w| w.strong_count() > 0);
        if loader.live_loads() >= MAX_LIVE_LOADS {
            seq.disk = DiskLookup::Deferred;
            return true;
        }
        let id = loader.next_id;
        let hashes = wanted.iter().map(|(h, _)| *h).collect();
        if loader
            .jobs
            .send(LoadJob {
                id,
                start,
                blocks: wanted,
            })
            .is_err()
        {
            seq.disk = DiskLookup::Done(None);
            return false;
        }
        loader.next_id += 1;
        loader.in_flight.push(LoadInFlight {
            id,
            start,
            hashes,
            waiters: vec![sid],
        });
        seq.disk = DiskLookup::Loading(id);
        true
    }

    /// Blocks the loader read go to the sequences that waited for them (sequences
    /// aborted meanwhile are skipped; with none left, the blocks are dropped).
    pub(super) fn loaded(&mut self, loaded: LoadedBlocks) {
        let Some(loader) = self.loader.as_mut() else {
            return;
        };
        let Some(i) = loader.in_flight.iter().position(|l| l.id == loaded.id) else {
            return;
        };
        let load = loader.in_flight.swap_remove(i);
        let loaded = Arc::new(loaded);
        loader.held.push(Arc::downgrade(&loaded));
        for sid in load.waiters {
            if let Some(seq) = self.seqs.get_mut(&sid) {
                if matches!(seq.disk, DiskLookup::Loading(id) if id == load.id) {
                    seq.disk = DiskLookup::Done(Some(loaded.clone()));
                }
            }
        }
    }

    /// Whether any sequence can be scheduled now: a running one, or a waiting one that
    /// is not waiting for a load (nor for a turn to load, while none is free).
    pub(super) fn has_work(&self) -> bool {
        if !self.running.is_empty() {
            return true;
        }
        let turn_free = self
            .loader
            .as_ref()
            .is_some_and(|l| l.live_loads() < MAX_LIVE_LOADS);
        self.waiting.iter().any(|s| match self.seqs[s].disk {
            DiskLookup::Loading(_) => false,
            DiskLookup::Deferred => turn_free,
            _ => true,
        })
    }
}
