//! Reasoning models (DeepSeek-R1 and its distills, Qwen3 thinking) write their thought
//! between `<think>` and `</think>` before the answer. [`ReasoningSplitter`] separates a
//! streamed output into `reasoning_content` and `content`, for tags that come from the
//! model's own vocabulary ([`ReasoningTags::from_codec`]).

use crate::tokenizer::TextCodec;

/// The model's thinking delimiters: their token ids and texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReasoningTags {
    pub start_token: u32,
    pub end_token: u32,
    pub start: String,
    pub end: String,
}

impl ReasoningTags {
    /// `<think>` and `</think>` when the vocabulary has each as a single token.
    pub fn from_codec(codec: &TextCodec) -> Option<Self> {
        let t = codec.tokenizer();
        let (start, end) = ("<think>", "</think>");
        Some(Self {
            start_token: t.token_to_id(start)?,
            end_token: t.token_to_id(end)?,
            start: start.to_string(),
            end: end.to_string(),
        })
    }

    /// Whether a rendered prompt leaves a thought open (the template wrote `<think>` and
    /// no `</think>` after it), so the output starts inside the reasoning.
    pub fn opened_in(&self, prompt: &str) -> bool {
        match (prompt.rfind(&self.start), prompt.rfind(&self.end)) {
            (Some(s), Some(e)) => s > e,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// At the start of the output: a `<think>` may open the reasoning.
    Start,
    Reasoning,
    /// Just after `</think>`: leading whitespace is dropped.
    AnswerStart,
    Answer,
}

/// Splits streamed text into (reasoning, content) deltas. A tag split across deltas is
/// held back until it is complete or ruled out; text that cannot be part of a tag is
/// passed on at once. Feeding the whole text at once gives the same split as feeding it
/// piece by piece.
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    tags: ReasoningTags,
    mode: Mode,
    held: String,
}

/// What a delta of output text turned into.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitDelta {
    pub reasoning: String,
    pub content: String,
}

impl ReasoningSplitter {
    /// `opened`: the prompt already opened the thought.
    pub fn new(tags: ReasoningTags, opened: bool) -> Self {
        Self {
            tags,
            mode: if opened { Mode::Reasoning } else { Mode::Start },
            held: String::new(),
        }
    }

    pub fn push(&mut self, delta: &str) -> SplitDelta {
        let mut out = SplitDelta::default();
        self.held.push_str(delta);
        loop {
            match self.mode {
                Mode::Start => {
                    let trimmed = self.held.trim_start();
                    if trimmed.is_empty() {
                        return out;
                    }
                    if let Some(rest) = trimmed.strip_prefix(self.tags.start.as_str()) {
                        self.held = rest.to_string();
                        self.mode = Mode::Reasoning;
                    } else if self.tags.start.starts_with(trimmed) {
                        return out; // maybe the beginning of the tag
                    } else {
                        self.mode = Mode::Answer;
                    }
                }
                Mode::Reasoning => match self.held.find(self.tags.end.as_str()) {
                    Some(i) => {
                        out.reasoning.push_str(&self.held[..i]);
                        self.held = self.held[i + self.tags.end.len()..].to_string();
                        self.mode = Mode::AnswerStart;
                    }
                    None => {
                        let keep = partial_suffix(&self.held, &self.tags.end);
                        let emit = self.held.len() - keep;
                        out.reasoning.push_str(&self.held[..emit]);
                        self.held.drain(..emit);
                        return out;
                    }
                },
                Mode::AnswerStart => {
                    let trimmed = self.held.trim_start();
                    if trimmed.is_empty() {
                        self.held.clear();
                        return out;
                    }
                    self.held = trimmed.to_string();
                    self.mode = Mode::Answer;
                }
                Mode::Answer => {
                    out.content.push_str(&self.held);
                    self.held.clear();
                    return out;
                }
            }
        }
    }

    /// The end of the output: whatever is held goes where the mode says (a thought never
    /// closed is all reasoning).
    pub fn finish(&mut self) -> SplitDelta {
        let held = std::mem::take(&mut self.held);
        match self.mode {
            Mode::Reasoning => SplitDelta {
                reasoning: held,
                content: String::new(),
            },
            Mode::AnswerStart => SplitDelta::default(),
            Mode::Start | Mode::Answer => SplitDelta {
                reasoning: String::new(),
                content: held,
            },
        }
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag`.
fn partial_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&n| tag.is_char_boundary(n) && text.ends_with(&tag[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags() -> ReasoningTags {
        ReasoningTags {
            start_token: 1,
            end_token: 2,
            start: "<think>".into(),
            end: "</think>".into(),
        }
    }

    /// Feeds `pieces` one by one and all at once; both must give `(reasoning, content)`.
    fn check(opened: bool, pieces: &[&str], reasoning: &str, content: &str) {
        let mut s = ReasoningSplitter::new(tags(), opened);
        let (mut r, mut c) = (String::new(), String::new());
        for p in pieces {
            let d = s.push(p);
            r.push_str(&d.reasoning);
            c.push_str(&d.content);
        }
        let d = s.finish();
        r.push_str(&d.reasoning);
        c.push_str(&d.content);
        assert_eq!(
            (r.as_str(), c.as_str()),
            (reasoning, content),
            "streamed {pieces:?}"
        );
        let mut whole = ReasoningSplitter::new(tags(), opened);
        let mut d = whole.push(&pieces.concat());
        let e = whole.finish();
        d.reasoning.push_str(&e.reasoning);
        d.content.push_str(&e.content);
        assert_eq!(
            (d.reasoning.as_str(), d.content.as_str()),
            (reasoning, content),
            "whole {pieces:?}"
        );
    }

    #[test]
    fn template_opened_thought_ends_at_the_closing_tag() {
        check(
            true,
            &["Let me think.", " 2+2=4.", "</think>", "\n\nThe answer is 4."],
            "Let me think. 2+2=4.",
            "The answer is 4.",
        );
    }

    #[test]
    fn closing_tag_split_across_chunks() {
        check(true, &["hmm </", "thi", "nk>", "\nok"], "hmm ", "ok");
        check(true, &["a<", "/think", ">b"], "a", "b");
        // A near-miss is reasoning text after all.
        check(true, &["x </thin", "g> y"], "x </thing> y", "");
    }

    #[test]
    fn never_closed_is_all_reasoning() {
        check(
            true,
            &["still ", "thinking when the tokens ran out"],
            "still thinking when the tokens ran out",
            "",
        );
    }

    #[test]
    fn model_opens_the_thought_itself_or_not_at_all() {
        check(
            false,
            &["<th", "ink>\nplan", "</think>answer"],
            "\nplan",
            "answer",
        );
        check(false, &["Just an answer."], "", "Just an answer.");
        check(false, &["<", "b>bold</b>"], "", "<b>bold</b>");
    }

    #[test]
    fn prompts_that_open_a_thought_are_recognised() {
        let t = tags();
        assert!(t.opened_in("<|User|>hi<|Assistant|><think>\n"));
        assert!(!t.opened_in("<|User|>hi<think>x</think><|Assistant|>"));
        assert!(!t.opened_in("plain"));
    }
}
