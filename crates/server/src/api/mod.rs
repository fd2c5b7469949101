//! The API's types: requests as clients send them ([`requests`]) and every body the
//! server sends ([`responses`]); both are described in the OpenAPI document.

pub mod anthropic;
pub mod conversation;
pub mod openai_responses;
pub mod requests;
pub mod responses;
pub mod structured;
pub mod tokenize;
pub mod tools;

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
