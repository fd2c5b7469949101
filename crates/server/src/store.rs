//! The Responses API's stored responses: what `previous_response_id` continues and
//! `GET /v1/responses/{id}` returns. In memory, bounded in number (the oldest go first)
//! and each kept for a time; a restart forgets them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::api::conversation::Message;

use crate::api::openai_responses::ResponseObject;

#[derive(Debug, Clone)]
pub struct StoredResponse {
    pub response: ResponseObject,
    /// The conversation up to and including this response's answer, as chat messages
    /// (without its instructions, which a continuation does not inherit).
    pub conversation: Conversation,
    at: Instant,
}

/// A conversation as a chain of turns shared by the responses that continue it: each
/// stored response adds only its own turn (its input and its answer), so a chain of `n`
/// responses keeps `n` turns, not `n` growing copies of the whole conversation. A turn
/// lives as long as some response continues from it, stored or not.
#[derive(Debug, Clone, Default)]
pub struct Conversation(Option<Arc<Turn>>);

#[derive(Debug)]
pub struct Turn {
    messages: Vec<Message>,
    before: Conversation,
}

impl Conversation {
    /// This conversation followed by `messages`.
    pub fn then(&self, messages: Vec<Message>) -> Conversation {
        Conversation(Some(Arc::new(Turn {
            messages,
            before: self.clone(),
        })))
    }

    /// Every message, first to last.
    pub fn messages(&self) -> Vec<Message> {
        let mut turns = vec![];
        let mut at = &self.0;
        while let Some(turn) = at {
            turns.push(&turn.messages);
            at = &turn.before.0;
        }
        turns.into_iter().rev().flatten().cloned().collect()
    }
}

impl Drop for Turn {
    /// Frees a long chain one turn at a time (dropping it recursively could overflow
    /// the stack).
    fn drop(&mut self) {
        let mut next = self.before.0.take();
        while let Some(turn) = next {
            match Arc::try_unwrap(turn) {
                Ok(mut t) => next = t.before.0.take(),
                Err(_) => break, // still shared
            }
        }
    }
}

pub struct ResponseStore {
    max: usize,
    ttl: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, StoredResponse>,
    /// Ids in the order they were stored (deleted ones are skipped when reached).
    order: VecDeque<String>,
}

impl ResponseStore {
    pub fn new(max: usize, ttl: Duration) -> Self {
        ResponseStore {
            max,
            ttl,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn put(&self, response: ResponseObject, conversation: Conversation) {
        if self.max == 0 {
            return;
        }
        let mut inner = self.lock();
        let now = Instant::now();
        // The oldest go first: past the bound, or past their time.
        while let Some(oldest) = inner.order.front().cloned() {
            let expired = inner
                .entries
                .get(&oldest)
                .is_none_or(|e| now.duration_since(e.at) > self.ttl);
            if inner.entries.len() < self.max && !expired {
                break;
            }
            inner.order.pop_front();
            inner.entries.remove(&oldest);
        }
        // Ids of deleted responses stay in the order until reached; past twice the bound,
        // drop them all.
        if inner.order.len() >= 2 * self.max {
            let Inner { entries, order } = &mut *inner;
            order.retain(|id| entries.contains_key(id));
        }
        let id = response.id.clone();
        inner.order.push_back(id.clone());
        inner.entries.insert(
            id,
            StoredResponse {
                response,
                conversation,
                at: now,
            },
        );
    }

    /// The response, unless it is unknown or expired.
    pub fn get(&self, id: &str) -> Option<StoredResponse> {
        let mut inner = self.lock();
        let e = inner.entries.get(id)?;
        if e.at.elapsed() > self.ttl {
            inner.entries.remove(id);
            return None;
        }
        Some(e.clone())
    }

    /// Forgets the response; false if there was none.
    pub fn delete(&self, id: &str) -> bool {
        self.lock().entries.remove(id).is_some()
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::openai_responses::ResponsesRequest;

    fn response(id: &str) -> ResponseObject {
        let req: ResponsesRequest =
            serde_json::from_value(serde_json::json!({"model": "m", "input": "x"})).unwrap();
        ResponseObject::start(id.into(), "m".into(), &req)
    }

    /// Turns are shared down a chain and read back in order; a long chain drops.
    #[test]
    fn conversations_share_their_turns() {
        let msg = |s: &str| Message::new(crate::api::conversation::Role::User, s);
        let a = Conversation::default().then(vec![msg("1"), msg("2")]);
        let b = a.then(vec![msg("3")]);
        let c = a.then(vec![msg("x")]);
        assert_eq!(b.messages(), vec![msg("1"), msg("2"), msg("3")]);
        assert_eq!(c.messages(), vec![msg("1"), msg("2"), msg("x")]);
        drop(a);
        assert_eq!(b.messages().len(), 3, "a's turn lives on in b and c");
        let mut long = Conversation::default();
        for i in 0..200_000 {
            long = long.then(vec![msg(&i.to_string())]);
        }
        drop(long);
    }

    #[test]
    fn bounded_in_number_and_time() {
        let store = ResponseStore::new(2, Duration::from_secs(3600));
        for id in ["a", "b", "c"] {
            store.put(response(id), Conversation::default());
        }
        assert!(store.get("a").is_none(), "the oldest went first");
        assert!(store.get("b").is_some() && store.get("c").is_some());
        assert!(store.delete("b") && !store.delete("b"));
        store.put(response("d"), Conversation::default());
        assert_eq!(store.len(), 2);

        let store = ResponseStore::new(10, Duration::from_millis(20));
        store.put(response("a"), Conversation::default());
        std::thread::sleep(Duration::from_millis(40));
        assert!(store.get("a").is_none(), "expired");
        store.put(response("b"), Conversation::default());
        assert_eq!(store.len(), 1);

        // Deleting keeps the order queue bounded.
        let store = ResponseStore::new(4, Duration::from_secs(3600));
        store.put(response("keep"), Conversation::default());
        for i in 0..100 {
            let id = format!("r{i}");
            store.put(response(&id), Conversation::default());
            store.delete(&id);
        }
        assert!(store.lock().order.len() <= 8);
        assert!(store.get("keep").is_some());

        let none = ResponseStore::new(0, Duration::from_secs(1));
        none.put(response("a"), Conversation::default());
        assert!(none.is_empty());
    }
}
