//! The n-gram proposer (prompt lookup decoding): when the sequence's last `n` tokens
//! occurred earlier in it (prompt or output), the tokens that followed that occurrence
//! are the draft. It costs nothing but a scan of the sequence and pays off wherever the
//! answer repeats its input: code edits, copied configs, quoted passages, lists.

/// Up to `k` drafted tokens for the sequence `tokens`: the tokens after the most recent
/// earlier occurrence of its longest suffix of `min..=max` tokens (longest first, then
/// most recent). Empty when no suffix of at least `min` tokens occurred before.
///
/// One backward scan for the last token, extending each hit backwards; stops at the
/// first hit of `max` tokens. A few microseconds for thousands of tokens, so 64 sequences
/// per step do not show beside the forward.
pub fn propose(tokens: &[u32], min: usize, max: usize, k: usize) -> Vec<u32> {
    let n = tokens.len();
    if k == 0 || min == 0 || n < min + 1 {
        return Vec::new();
    }
    let last = tokens[n - 1];
    let mut best: Option<(usize, usize)> = None; // (match length, end of the match)
    for end in (0..n - 1).rev() {
        if tokens[end] != last {
            continue;
        }
        // The match ends at `end` (inclusive) and mirrors the suffix ending at n - 1.
        let limit = max.min(end + 1);
        let mut len = 1;
        while len < limit && tokens[end - len] == tokens[n - 1 - len] {
            len += 1;
        }
        if len >= min && best.is_none_or(|(l, _)| len > l) {
            best = Some((len, end));
            if len == max {
                break;
            }
        }
    }
    match best {
        Some((_, end)) => tokens[end + 1..n.min(end + 1 + k)].to_vec(),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::propose;

    #[test]
    fn the_longest_then_most_recent_match_proposes_what_followed() {
        // "1 2 3 4 ... 9 | 1 2 3" proposes "4 5 6".
        let t = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3];
        assert_eq!(propose(&t, 2, 4, 3), vec![4, 5, 6]);
        // Only as many tokens as followed.
        let t = [7, 8, 9, 7, 8];
        assert_eq!(propose(&t, 2, 4, 5), vec![9, 7, 8]);
        // The longer match wins over a more recent shorter one: "5 1 2" matched at the
        // start (3 tokens) beats "1 2" at position 4..6.
        let t = [5, 1, 2, 10, 1, 2, 11, 5, 1, 2];
        assert_eq!(propose(&t, 2, 4, 2), vec![10, 1]);
        // Of equally long matches, the most recent.
        let t = [1, 2, 10, 1, 2, 11, 1, 2];
        assert_eq!(propose(&t, 2, 4, 1), vec![11]);
    }

    #[test]
    fn no_draft_without_a_long_enough_match() {
        assert!(propose(&[1, 2, 3, 4], 2, 4, 3).is_empty());
        // A single repeated token is shorter than min 2.
        assert!(propose(&[9, 1, 5, 1], 2, 4, 3).is_empty());
        assert_eq!(propose(&[9, 1, 5, 1], 1, 4, 3), vec![5, 1]);
        assert!(propose(&[1, 2, 1, 2], 2, 4, 0).is_empty());
        assert!(propose(&[], 1, 4, 3).is_empty());
        assert!(propose(&[1], 1, 4, 3).is_empty());
    }

    #[test]
    fn a_repeated_run_proposes_its_continuation() {
        // The suffix [3,3,3] matches ending one token earlier; what followed is [3].
        let t = [3, 3, 3, 3];
        assert_eq!(propose(&t, 2, 3, 4), vec![3]);
    }
}
