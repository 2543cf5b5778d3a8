//! The resident tensor store: per session and CFG branch, the large tensors of a generation
//! kept on this denoiser between calls (the branch's conditioning, the previous step's
//! modulated input, this step's streams and context, the cached residual), so that only
//! latents, signals and predictions travel (`ResidentStep`).
//!
//! Bounded: a byte budget (least recently used entries are evicted past it, the entry just
//! written included when it alone is larger), and a time to live for idle entries. Every
//! tensor is tagged with the generation and step that produced it; a call that needs another
//! is a miss, and the controller, which keeps what produced every tensor, asks again with the
//! inputs to recompute it. Nothing here is the source of truth.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use teaserve_proto::TensorMap;
use teaserve_proto::codec::map_bytes;
use teaserve_proto::v1;

use crate::registry::Tensors;
use crate::spec::Bindings;

/// `(session_id, branch)`.
pub type Key = (String, String);

/// A session branch's conditioning (every Preprocess input but the latents and the timestep),
/// checked and decoded once, with what the model derives from it alone
/// ([`crate::registry::ModelAdapter::embed_conditioning`]), so a resident step checks and
/// decodes only its latents and timestep and computes only what they change.
#[derive(Debug)]
pub struct Conditioned {
    /// The symbolic dimensions the conditioning and the first step's latents bound; later
    /// steps' latents must agree with them.
    pub bindings: Bindings,
    /// The conditioning, decoded onto the model's device.
    pub decoded: Tensors,
    /// What the model derives from it alone.
    pub embedded: Tensors,
}

impl Conditioned {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.decoded
            .values()
            .chain(self.embedded.values())
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum()
    }
}

/// What one session branch keeps here. Each part carries the step it belongs to.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    /// The session generation these tensors belong to.
    pub generation: u64,
    /// Model-native inputs except the latents and the timestep (wire tensors).
    pub conditioning: Option<Arc<TensorMap>>,
    /// The same, checked, decoded and embedded (made from `conditioning` when first needed).
    pub conditioned: Option<Arc<Conditioned>>,
    /// The last modulated input, as f32 values after the wire round trip, with its shape.
    pub indicator: Option<(u32, Vec<usize>, Arc<[f32]>)>,
    /// The last Preprocess result (streams and context as the wire would carry them).
    pub current: Option<(u32, Arc<v1::PreprocessResponse>)>,
    /// The image stream's residual `out - in` (f32) of the last computed step.
    pub residual: Option<(u32, Arc<Tensor>)>,
}

impl Entry {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        let cond = self.conditioning.as_ref().map_or(0, |c| map_bytes(c))
            + self.conditioned.as_ref().map_or(0, |c| c.bytes());
        let ind = self
            .indicator
            .as_ref()
            .map_or(0, |(_, _, v)| v.len() as u64 * 4);
        let cur = self.current.as_ref().map_or(0, |(_, p)| {
            map_bytes(&p.streams)
                + map_bytes(&p.context)
                + p.modulated_input
                    .as_ref()
                    .map_or(0, |t| t.data.len() as u64)
        });
        let res = self.residual.as_ref().map_or(0, |(_, r)| {
            (r.elem_count() * r.dtype().size_in_bytes()) as u64
        });
        cond + ind + cur + res
    }
}

/// Counters and gauges of the store, registered on the denoiser's `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct ResidentMetrics {
    /// Calls that found every tensor they needed kept.
    pub hits: Counter,
    /// Calls that found something missing (answered with a miss).
    pub misses: Counter,
    /// Tensors recomputed from `rebuild` inputs.
    pub rebuilds: Counter,
    /// Entries evicted (budget or time to live).
    pub evictions: Counter,
    /// Bytes held.
    pub bytes: Gauge,
}

struct Slot {
    entry: Entry,
    bytes: u64,
    used: Instant,
}

/// The bounded store; cheap to clone.
#[derive(Clone)]
pub struct ResidentStore {
    inner: Arc<Mutex<HashMap<Key, Slot>>>,
    budget: u64,
    ttl: Duration,
    /// Its metrics.
    pub metrics: ResidentMetrics,
}

impl ResidentStore {
    /// A store holding at most `budget` bytes; entries idle for `ttl` are dropped.
    pub fn new(budget: u64, ttl: Duration) -> Self {
        Self {
            inner: Arc::default(),
            budget,
            ttl,
            metrics: ResidentMetrics::default(),
        }
    }

    /// The byte budget.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Slot>> {
        // A panic while holding the lock leaves only a partial cache behind: keep serving.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The entry for `key` (empty when absent or of another generation).
    pub fn get(&self, key: &Key, generation: u64) -> Entry {
        let mut map = self.lock();
        self.expire(&mut map);
        match map.get_mut(key) {
            Some(slot) if slot.entry.generation == generation => {
                slot.used = Instant::now();
                slot.entry.clone()
            }
            _ => Entry {
                generation,
                ..Entry::default()
            },
        }
    }

    /// Stores `entry` under `key`, then evicts least recently used entries past the budget.
    pub fn put(&self, key: Key, entry: Entry) {
        let mut map = self.lock();
        let bytes = entry.bytes();
        map.insert(
            key,
            Slot {
                entry,
                bytes,
                used: Instant::now(),
            },
        );
        while map.values().map(|s| s.bytes).sum::<u64>() > self.budget {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&oldest);
            self.metrics.evictions.inc();
        }
        self.update_gauge(&map);
    }

    /// Forgets every branch of `session`; returns the bytes freed.
    pub fn release(&self, session: &str) -> u64 {
        let mut map = self.lock();
        let mut freed = 0;
        map.retain(|(s, _), slot| {
            let keep = s != session;
            if !keep {
                freed += slot.bytes;
            }
            keep
        });
        self.update_gauge(&map);
        freed
    }

    fn expire(&self, map: &mut HashMap<Key, Slot>) {
        let before = map.len();
        let ttl = self.ttl;
        map.retain(|_, s| s.used.elapsed() < ttl);
        for _ in map.len()..before {
            self.metrics.evictions.inc();
        }
        self.update_gauge(map);
    }

    fn update_gauge(&self, map: &HashMap<Key, Slot>) {
        let bytes: u64 = map.values().map(|s| s.bytes).sum();
        self.metrics
            .bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn entry(generation: u64, floats: usize) -> Entry {
        Entry {
            generation,
            indicator: Some((0, vec![floats], Arc::from(vec![0f32; floats]))),
            ..Entry::default()
        }
    }

    fn key(s: &str) -> Key {
        (s.to_string(), "positive".to_string())
    }

    #[test]
    fn budget_evicts_least_recently_used_and_generations_isolate() {
        let store = ResidentStore::new(1000, Duration::from_secs(60));
        store.put(key("a"), entry(1, 100)); // 400 bytes
        store.put(key("b"), entry(1, 100));
        assert!(store.get(&key("a"), 1).indicator.is_some()); // a is now the most recent
        store.put(key("c"), entry(1, 100)); // 1200 > 1000: b goes
        assert!(store.get(&key("b"), 1).indicator.is_none());
        assert!(store.get(&key("a"), 1).indicator.is_some());
        assert_eq!(store.metrics.evictions.get(), 1);
        assert_eq!(store.metrics.bytes.get(), 800);
        // Another generation sees nothing.
        assert!(store.get(&key("a"), 2).indicator.is_none());
        assert_eq!(store.release("a"), 400);
        assert!(store.get(&key("a"), 1).indicator.is_none());
        // An entry alone over the budget is not kept.
        store.put(key("d"), entry(1, 1000));
        assert!(store.get(&key("d"), 1).indicator.is_none());
    }

    #[test]
    fn idle_entries_expire() {
        let store = ResidentStore::new(1 << 20, Duration::from_millis(20));
        store.put(key("a"), entry(1, 10));
        std::thread::sleep(Duration::from_millis(40));
        assert!(store.get(&key("a"), 1).indicator.is_none());
        assert_eq!(store.metrics.bytes.get(), 0);
    }
}
