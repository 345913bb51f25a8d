//! The handler service's fuzz harnesses: the mapping from a tag or event name (chosen by
//! another device) to a file below the handler directory, and allow lists (`cnsprcy::fuzzing`
//! says how they run; `docs/reliability.md` lists them all).

use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path};

use cnsprcy::fuzzing::{both, text};
use cnsprcy::ipc::{EVENT_MESSAGE, Sender};
use cnsprcy::{fuzz_seeds, fuzz_target};

use crate::allow::AllowList;
use crate::resolve::{Resolution, levels, resolve};

/// A name below the handler directory: one plain path component, not hidden.
fn assert_plain_segment(segment: &str, what: &str) {
    assert!(
        !segment.is_empty()
            && !segment.contains(['/', '\0', '\\'])
            && segment != "."
            && segment != ".."
            && !(segment.starts_with('.')),
        "{what}: {segment:?}"
    );
}

/// A handler directory with a handler at every kind of place.
fn handler_dir() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("a temporary directory");
    for (file, script) in [
        ("_default", true),
        ("clipboard/set.sh", true),
        ("clipboard/set.from", false),
        ("a/_default.sh", true),
        ("a/b/c", true),
        ("a/b/c.py", true),
        ("_events/peer-up", true),
        ("_events/_default.sh", true),
    ] {
        let path = root.path().join(file);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("a directory");
        std::fs::write(&path, if script { "#!/bin/sh\n" } else { "laptop\n" }).expect("a file");
        let mode = if script { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    root
}

/// A tag or event name from another device: every place it maps to is a plain name below the
/// handler directory, and the handler found for it lies below it too.
#[test]
fn handler_path() {
    let root = handler_dir();
    let seeds = fuzz_seeds!("handler_path");
    fuzz_target!("handler_path").for_each(|input| {
        both(&seeds, input, |bytes| {
            let name = text(bytes);
            for (event, tag) in [(EVENT_MESSAGE, name.as_str()), (name.as_str(), "")] {
                if let Ok(levels) = levels(event, tag) {
                    assert!(!levels.is_empty());
                    for level in levels {
                        for segment in &level.dir {
                            assert_plain_segment(segment, "directory");
                        }
                        assert_plain_segment(&level.stem, "stem");
                    }
                }
                match resolve(root.path(), event, tag) {
                    Resolution::Found(handler) => {
                        let rel = handler
                            .path
                            .strip_prefix(root.path())
                            .expect("below the handler directory");
                        assert!(
                            rel.components().all(|c| matches!(c, Component::Normal(_))),
                            "{rel:?}"
                        );
                        assert_eq!(Path::new(&handler.rel), rel);
                    }
                    Resolution::Refused { reason, .. } => assert!(!reason.is_empty()),
                    Resolution::NoHandler => {}
                }
            }
        })
    });
}

/// A sender allow list as the user wrote it: every line is an entry or a bad line, and a
/// sender is allowed only by a name or ID on an entry.
#[test]
fn allow_list() {
    let seeds = fuzz_seeds!("allow_list");
    let stranger = Sender {
        name: "stranger".into(),
        id: "none".into(),
    };
    fuzz_target!("allow_list").for_each(|input| {
        both(&seeds, input, |bytes| {
            let list = AllowList::parse("x.from", &text(bytes));
            for entry in &list.entries {
                assert!(!entry.text.is_empty() && !entry.text.contains('#'));
                let named = Sender {
                    name: entry.text.clone(),
                    id: String::new(),
                };
                assert!(list.allows(&named));
            }
            let listed = list.entries.iter().any(|e| e.text == stranger.name);
            assert_eq!(list.allows(&stranger), listed);
        })
    });
}
