//! Streaming detokenization and stop strings.

use crate::tokenizer::TextCodec;

/// Turns a growing list of token ids into text deltas that are always whole characters.
///
/// Decoding token by token breaks multi-byte characters that span tokens (byte-level
/// BPE, byte fallback) and loses context-dependent spacing (SentencePiece's leading
/// space). So each step decodes a short window twice, from `prefix_offset` to the last
/// emitted token and to the newest token, and emits the difference, unless it ends in an
/// incomplete character (U+FFFD), in which case the tokens wait for the next one.
#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl Detokenizer {
    pub fn new(skip_special_tokens: bool) -> Self {
        Self {
            skip_special_tokens,
            ..Self::default()
        }
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, codec: &TextCodec, token: u32) -> String {
        self.ids.push(token);
        let prefix = self.decode(codec, self.prefix_offset, self.read_offset);
        let full = self.decode(codec, self.prefix_offset, self.ids.len());
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            full[prefix.len()..].to_string()
        } else {
            String::new()
        }
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn flush(&mut self, codec: &TextCodec) -> String {
        let prefix = self.decode(codec, self.prefix_offset, self.read_offset);
        let full = self.decode(codec, self.prefix_offset, self.ids.len());
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        match full.get(prefix.len()..) {
            Some(rest) if full.len() > prefix.len() => rest.to_string(),
            _ => String::new(),
        }
    }

    fn decode(&self, codec: &TextCodec, from: usize, to: usize) -> String {
        codec
            .decode(&self.ids[from..to], self.skip_special_tokens)
            .unwrap_or_default()
    }
}

/// Finds stop strings in the output text, across token boundaries, and holds back any
/// tail that may still become one, so no part of a stop string is ever emitted.
#[derive(Debug, Clone, Default)]
pub struct StopChecker {
    stops: Vec<String>,
    text: String,
    emitted: usize,
    /// The stop string found, once one is.
    matched: Option<String>,
}

impl StopChecker {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            ..Self::default()
        }
    }

    /// Adds `delta`; returns the text that is safe to emit now, and the stop string if one
    /// was completed (the text before it is emitted, the stop string and anything after it
    /// are not).
    pub fn push(&mut self, delta: &str) -> (String, Option<String>) {
        if self.stops.is_empty() {
            return (delta.to_string(), None);
        }
        // A new match must end inside the delta, so it starts at most (longest stop - 1)
        // bytes before it.
        let longest = self.stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut from = self
            .text
            .len()
            .saturating_sub(longest.saturating_sub(1))
            .max(self.emitted);
        self.text.push_str(delta);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| (from + i, s)))
            .min_by_key(|(i, _)| *i);
        if let Some((at, stop)) = found {
            let out = self.text[self.emitted..at].to_string();
            self.emitted = at;
            self.matched = Some(stop.clone());
            return (out, Some(stop.clone()));
        }
        // Hold back the longest tail that is a proper prefix of a stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if i > hold && self.text.len() - self.emitted >= i && self.text.ends_with(&s[..i]) {
                    hold = i;
                }
            }
        }
        let until = self.text.len() - hold;
        let out = self.text[self.emitted..until].to_string();
        self.emitted = until;
        (out, None)
    }

    /// Whether a stop string was found.
    pub fn stopped(&self) -> bool {
        self.matched.is_some()
    }

    /// The stop string found, if one was (Anthropic's `stop_sequence`).
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }

    /// The held-back tail, when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_match_across_deltas_and_are_not_emitted() {
        let mut s = StopChecker::new(vec!["STOP".into(), "\n\n".into()]);
        assert_eq!(s.push("hello S"), ("hello ".into(), None));
        assert_eq!(s.push("T"), ("".into(), None));
        assert_eq!(s.push("ALL"), ("STALL".into(), None));
        assert_eq!(s.push(" now ST"), (" now ".into(), None));
        assert_eq!(s.push("OP and more"), ("".into(), Some("STOP".into())));
        let mut s = StopChecker::new(vec!["\n\n".into()]);
        assert_eq!(s.push("a\n"), ("a".into(), None));
        assert_eq!(s.flush(), "\n");
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_text_is_safe() {
        let mut s = StopChecker::new(vec!["é!".into(), "b".into()]);
        assert_eq!(s.push("ééé"), ("éé".into(), None));
        assert_eq!(s.push("!ab"), ("".into(), Some("é!".into())));
    }
}
