//! What the fuzz harnesses of every crate share (the harnesses themselves are tests: this
//! crate's in `fuzz.rs`, the mesh's and the handler service's in theirs). `docs/reliability.md`
//! lists them and says how to run them longer.
//!
//! Each harness is a `bolero` target that plain `cargo test` runs on stable: first the files in
//! `src/__fuzz__/NAME/corpus/` of its crate, then random inputs for `TEST_TIME` (or as long as
//! `BOLERO_RANDOM_TEST_TIME_MS` says). Every input is tried twice: as it is, and as a list of
//! edits to one of the corpus files (`mutated`), so that random inputs reach past the first
//! byte a parser checks. A harness asserts that the parser returns instead of panicking, that
//! its errors say something, and, where there is an encoder, that what it accepts encodes and
//! decodes back to the same value.
//!
//! Test support only (public so that the other crates' harnesses share it): it panics on a
//! missing or empty corpus, as a test should.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long each harness runs random inputs under `cargo test` (after the corpus). Kept short:
/// CI runs every harness on every change.
pub const TEST_TIME: Duration = Duration::from_millis(1500);

/// The corpus of the harness `name` in the crate at `manifest_dir`.
pub fn corpus_dir(manifest_dir: &str, name: &str) -> PathBuf {
    Path::new(manifest_dir)
        .join("src/__fuzz__")
        .join(name)
        .join("corpus")
}

/// The corpus files of the harness `name` in the crate at `manifest_dir`: the seeds that
/// `mutated` edits. `fuzz_seeds!` passes the calling crate's directory.
pub fn seeds(manifest_dir: &str, name: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(manifest_dir, name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files
        .iter()
        .map(|file| std::fs::read(file).expect("corpus file"))
        .collect();
    assert!(!seeds.is_empty(), "corpus {} is empty", dir.display());
    seeds
}

/// Bytes that often sit at a parser's edges: lengths, signs, delimiters, quotes.
const INTERESTING: &[u8] = b"\x00\x01\x7f\x80\xff\n\r\"\\{}[],:=.-/_#'0";

/// One of `seeds`, edited as `input` says: its first byte picks the seed, then every 3 bytes
/// are one edit (what, where, with which byte). Deterministic, so a failing input replays.
pub fn mutated(seeds: &[Vec<u8>], input: &[u8]) -> Vec<u8> {
    let Some((&pick, edits)) = input.split_first() else {
        return Vec::new();
    };
    let mut bytes = seeds[usize::from(pick) % seeds.len()].clone();
    for edit in edits.chunks_exact(3) {
        let (what, at, byte) = (edit[0], usize::from(edit[1]), edit[2]);
        // `at` scaled to the length, so long seeds are edited everywhere, not only at the start.
        let at = if bytes.is_empty() {
            0
        } else {
            at * bytes.len() / 256
        };
        match what % 8 {
            0 => bytes.insert(at, byte),
            1 => {
                if at < bytes.len() {
                    bytes[at] ^= 1 << (byte % 8);
                }
            }
            2 => {
                if at < bytes.len() {
                    bytes[at] = byte;
                }
            }
            3 => {
                let end = (at + usize::from(byte % 16) + 1).min(bytes.len());
                bytes.drain(at..end);
            }
            4 => bytes.insert(at, INTERESTING[usize::from(byte) % INTERESTING.len()]),
            5 => {
                // Repeat a stretch: long names, deep nesting, many list items.
                let end = (at + usize::from(byte % 32) + 1).min(bytes.len());
                let stretch = bytes[at..end].to_vec();
                for _ in 0..(byte / 32) + 1 {
                    bytes.splice(at..at, stretch.iter().copied());
                }
            }
            6 => bytes.truncate(at),
            _ => {
                // Splice in the start of another seed.
                let other = &seeds[usize::from(byte) % seeds.len()];
                let take = other.len().min(usize::from(byte) + 1);
                bytes.splice(at..at, other[..take].iter().copied());
            }
        }
    }
    bytes
}

/// Runs `test` on `input` and on `input` as edits of a seed.
pub fn both(seeds: &[Vec<u8>], input: &[u8], mut test: impl FnMut(&[u8])) {
    test(input);
    test(&mutated(seeds, input));
}

/// Text from bytes as a parser of text would get it (lossy, so every input is tried).
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An error worth showing: it says something.
pub fn assert_says_something(error: &impl std::fmt::Display) {
    let shown = error.to_string();
    assert!(!shown.trim().is_empty(), "an error with no message");
}

/// A bolero target named `name` (its corpus is `src/__fuzz__/NAME/corpus` in the calling
/// crate), with the short random phase `cargo test` gets. The caller has `bolero` as a
/// dev-dependency.
#[macro_export]
macro_rules! fuzz_target {
    ($name:expr) => {
        bolero::check!(name = $name).with_test_time($crate::fuzzing::TEST_TIME)
    };
}

/// The seeds of the harness `name` in the calling crate.
#[macro_export]
macro_rules! fuzz_seeds {
    ($name:expr) => {
        $crate::fuzzing::seeds(env!("CARGO_MANIFEST_DIR"), $name)
    };
}
