//! The digest tree anti-entropy compares: every key falls into one of 65536 leaves by the first
//! two bytes of its BLAKE2s hash; a leaf's digest is the XOR of its entries' version hashes, a
//! bucket's (the first byte) the XOR of its 256 leaves. XOR lets a write update the digests in
//! constant time: remove the old version's hash, add the new one's.

use std::collections::{BTreeSet, HashMap};

use blake2::{Blake2s256, Digest};

use super::merge::Version;

pub const BUCKETS: usize = 256;
pub const LEAVES_PER_BUCKET: usize = 256;

/// The leaf a key falls into.
pub fn leaf_of(key: &str) -> u16 {
    let hash = Blake2s256::digest(key.as_bytes());
    u16::from_be_bytes([hash[0], hash[1]])
}

/// The root digest of a tree with these bucket digests: their XOR, which is the XOR of every
/// entry's hash.
pub fn root(top: &[u64]) -> u64 {
    top.iter().fold(0, |root, bucket| root ^ bucket)
}

/// A version's contribution to its leaf's digest.
fn entry_hash(key: &str, version: &Version) -> u64 {
    let mut hasher = Blake2s256::new();
    hasher.update((key.len() as u64).to_be_bytes());
    hasher.update(key.as_bytes());
    hasher.update(version.ts.ms.to_be_bytes());
    hasher.update(version.ts.counter.to_be_bytes());
    hasher.update(version.writer);
    let hash = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_be_bytes(first)
}

pub struct DigestTree {
    leaves: Vec<u64>,
    /// Each bucket's digest, kept up to date with its leaves (anti-entropy asks for all 256
    /// with every round; folding 65536 leaves each time cost more than the rest of a round).
    buckets: Vec<u64>,
    keys: HashMap<u16, BTreeSet<String>>,
}

impl Default for DigestTree {
    fn default() -> Self {
        Self {
            leaves: vec![0; BUCKETS * LEAVES_PER_BUCKET],
            buckets: vec![0; BUCKETS],
            keys: HashMap::new(),
        }
    }
}

impl DigestTree {
    /// Records that `key` went from `old` to `new`.
    pub fn update(&mut self, key: &str, old: Option<&Version>, new: &Version) {
        let leaf = leaf_of(key);
        let mut change = entry_hash(key, new);
        if let Some(old) = old {
            change ^= entry_hash(key, old);
        } else {
            self.keys.entry(leaf).or_default().insert(key.to_owned());
        }
        self.leaves[usize::from(leaf)] ^= change;
        self.buckets[usize::from(leaf >> 8)] ^= change;
    }

    /// How many keys the tree holds.
    pub fn key_count(&self) -> usize {
        self.keys.values().map(BTreeSet::len).sum()
    }

    /// The 256 bucket digests.
    pub fn top(&self) -> Vec<u64> {
        self.buckets.clone()
    }

    /// The 256 leaf digests of one bucket.
    pub fn bucket(&self, bucket: u8) -> Vec<u64> {
        let start = usize::from(bucket) * LEAVES_PER_BUCKET;
        self.leaves[start..start + LEAVES_PER_BUCKET].to_vec()
    }

    /// The keys in one leaf.
    pub fn keys(&self, leaf: u16) -> impl Iterator<Item = &String> {
        self.keys.get(&leaf).into_iter().flatten()
    }
}

/// The positions where two digest lists differ (a list of the wrong length differs everywhere).
pub fn differing(ours: &[u64], theirs: &[u64]) -> Vec<usize> {
    if ours.len() != theirs.len() {
        return (0..ours.len()).collect();
    }
    (0..ours.len()).filter(|&i| ours[i] != theirs[i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnsprcy::wire::StoreTimestamp;

    fn version(ms: u64, writer: u8) -> Version {
        Version {
            ts: StoreTimestamp { ms, counter: 0 },
            writer: [writer; 32],
        }
    }

    #[test]
    fn digests_depend_on_content_not_order() {
        let mut a = DigestTree::default();
        let mut b = DigestTree::default();
        a.update("x", None, &version(1, 1));
        a.update("y", None, &version(2, 1));
        a.update("x", Some(&version(1, 1)), &version(3, 2));
        b.update("y", None, &version(2, 1));
        b.update("x", None, &version(3, 2));
        assert_eq!(a.top(), b.top());
        assert!(differing(&a.top(), &b.top()).is_empty());
        b.update("y", Some(&version(2, 1)), &version(4, 1));
        let diff = differing(&a.top(), &b.top());
        assert_eq!(diff, [usize::from(leaf_of("y") >> 8)]);
        let bucket = diff[0] as u8;
        let leaves = differing(&a.bucket(bucket), &b.bucket(bucket));
        assert_eq!(leaves, [usize::from(leaf_of("y") & 0xff)]);
        assert_eq!(a.keys(leaf_of("y")).collect::<Vec<_>>(), ["y"]);
        // The kept bucket digests are the fold of their leaves.
        for tree in [&a, &b] {
            let folded: Vec<u64> = tree
                .leaves
                .chunks(LEAVES_PER_BUCKET)
                .map(|leaves| leaves.iter().fold(0, |x, y| x ^ y))
                .collect();
            assert_eq!(tree.top(), folded);
        }
    }
}
