//! "Did you mean": the known word closest to a mistyped one, for method names, configuration keys
//! and member names alike.

/// The candidate nearest to `typed` by Damerau-Levenshtein distance (a swap of two neighbours is
/// one edit), if it is within `max_edits(candidate)` edits. Ties go to the first candidate in
/// sort order, so the hint does not depend on the candidates' order.
pub fn closest<'a>(
    typed: &str,
    candidates: impl IntoIterator<Item = &'a str>,
    max_edits: impl Fn(&str) -> usize,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|candidate| (strsim::damerau_levenshtein(typed, candidate), candidate))
        .filter(|(distance, candidate)| *distance <= max_edits(candidate))
        .min()
        .map(|(_, candidate)| candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nearest_within_the_limit_wins() {
        let words = ["status", "peers", "peer", "ping"];
        assert_eq!(closest("stauts", words, |_| 2), Some("status"));
        assert_eq!(closest("pers", words, |_| 2), Some("peers"));
        assert_eq!(closest("peeer", words, |_| 1), Some("peer"));
        assert_eq!(closest("reconnect", words, |_| 2), None);
        assert_eq!(closest("x", [], |_| 2), None);
        // The limit may depend on the candidate's length.
        assert_eq!(closest("dsek", ["desk"], |c| c.len() / 3), Some("desk"));
        assert_eq!(closest("dk", ["desk"], |c| c.len() / 3), None);
    }
}
