//! Hash maps and sets whose iteration order depends only on what was put in them, not on a
//! random seed drawn per process: the core iterates them when it sends, and a simulator run must
//! replay the same from the same seed. The keys are public keys and ids of authenticated
//! members, so a fixed hasher key gives strangers nothing to flood.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;

pub type Map<K, V> = HashMap<K, V, BuildHasherDefault<DefaultHasher>>;
pub type Set<K> = HashSet<K, BuildHasherDefault<DefaultHasher>>;
