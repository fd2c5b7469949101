//! The Responses API's stored responses: what `previous_response_id` continues and
//! `GET /v1/responses/{id}` returns. In memory, bounded in number (the oldest go first)
//! and each kept for a time; a restart forgets them.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::api::openai_responses::ResponseObject;

#[derive(Debug, Clone)]
pub struct StoredResponse {
    pub response: ResponseObject,
    /// The conversation up to and including this response's answer, as chat messages
    /// (without its instructions, which a continuation does not inherit).
    pub conversation: Vec<Value>,
    at: Instant,
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

    pub fn put(&self, response: ResponseObject, conversation: Vec<Value>) {
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

    #[test]
    fn bounded_in_number_and_time() {
        let store = ResponseStore::new(2, Duration::from_secs(3600));
        for id in ["a", "b", "c"] {
            store.put(response(id), vec![]);
        }
        assert!(store.get("a").is_none(), "the oldest went first");
        assert!(store.get("b").is_some() && store.get("c").is_some());
        assert!(store.delete("b") && !store.delete("b"));
        store.put(response("d"), vec![]);
        assert_eq!(store.len(), 2);

        let store = ResponseStore::new(10, Duration::from_millis(20));
        store.put(response("a"), vec![]);
        std::thread::sleep(Duration::from_millis(40));
        assert!(store.get("a").is_none(), "expired");
        store.put(response("b"), vec![]);
        assert_eq!(store.len(), 1);

        let none = ResponseStore::new(0, Duration::from_secs(1));
        none.put(response("a"), vec![]);
        assert!(none.is_empty());
    }
}
