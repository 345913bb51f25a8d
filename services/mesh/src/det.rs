//! Hash maps and sets whose iteration order depends only on what was put in them, not on a
//! random seed drawn per process: the core iterates them when it sends, and a simulator run must
//! replay the same from the same seed. FxHash is also much cheaper than SipHash for the 32-byte
//! keys the core looks up on every input. The keys are public keys and ids of authenticated
//! members, so a fixed hash gives strangers nothing to flood.

use std::collections::{HashMap, HashSet};

use fxhash::FxBuildHasher;

pub type Map<K, V> = HashMap<K, V, FxBuildHasher>;
pub type Set<K> = HashSet<K, FxBuildHasher>;
