//! Message tags and built-in event names: what they may look like, and the reserved names of the
//! handler directory. Tags become paths below the handler directory, so the rules here are what
//! keeps a tag from naming anything outside it; the mesh, the CLI and the handler service all
//! check tags with `validate_tag`.

/// The longest tag, in bytes.
pub const MAX_TAG_BYTES: usize = 200;
/// The longest segment of a tag, in bytes (with an extension it must still fit a file name).
pub const MAX_SEGMENT_BYTES: usize = 64;
/// The most segments a tag may have.
pub const MAX_SEGMENTS: usize = 8;

/// The directory (at the top of the handler directory) holding the built-in events' handlers.
pub const EVENTS_DIR: &str = "_events";
/// The file stem of a directory's fallback handler.
pub const DEFAULT_STEM: &str = "_default";
/// The extension of a handler's sender allow list (`clipboard/set.from`); never a handler itself.
pub const ALLOW_LIST_EXTENSION: &str = "from";
/// The longest file extension that counts as one (`.sh`, `.py`, `.bash`).
pub const MAX_EXTENSION_BYTES: usize = 16;

/// The events the daemon raises itself, each run by `_events/NAME[.EXT]`.
pub const EVENTS: &[&str] = &[
    "peer-up",
    "peer-down",
    "peer-address",
    "daemon-start",
    "daemon-stop",
    "store-change",
];

/// The characters a tag segment may hold.
pub fn is_tag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Checks one segment of a tag. `_`-names are the handler directory's own (`_default`,
/// `_events`), and `.`-names would be `.`, `..` or hidden files, so neither can be sent.
pub fn validate_segment(segment: &str) -> Result<(), String> {
    if segment.is_empty() {
        return Err("has an empty segment (two '/' in a row, or one at an end)".into());
    }
    if segment.len() > MAX_SEGMENT_BYTES {
        return Err(format!(
            "has a segment longer than {MAX_SEGMENT_BYTES} characters"
        ));
    }
    if let Some(bad) = segment.chars().find(|c| !is_tag_char(*c)) {
        return Err(format!(
            "contains {bad:?}; segments hold only letters, digits, '.', '_' and '-'"
        ));
    }
    if segment.starts_with('.') {
        return Err(format!(
            "has the segment {segment:?}; a segment may not start with '.'"
        ));
    }
    if segment.starts_with('_') {
        return Err(format!(
            "has the segment {segment:?}; names starting with '_' are reserved for the handler directory"
        ));
    }
    Ok(())
}

/// Checks a message tag such as `clipboard/set`. The error completes "tag X ...".
pub fn validate_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        return Err("tag is empty".into());
    }
    let describe = |reason: String| format!("tag {tag:?} {reason}");
    if tag.len() > MAX_TAG_BYTES {
        return Err(describe(format!("is longer than {MAX_TAG_BYTES} bytes")));
    }
    let segments = tag.split('/').count();
    if segments > MAX_SEGMENTS {
        return Err(describe(format!("has more than {MAX_SEGMENTS} segments")));
    }
    tag.split('/')
        .try_for_each(validate_segment)
        .map_err(describe)
}

/// Checks a built-in event name: lower-case letters, digits and '-'. Names not in `EVENTS` are
/// allowed, so a newer mesh service may raise events an older handler service does not know.
pub fn validate_event(event: &str) -> Result<(), String> {
    let ok = !event.is_empty()
        && event.len() <= MAX_SEGMENT_BYTES
        && event
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !event.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "event name {event:?} is not valid: lower-case letters, digits and '-'"
        ))
    }
}

/// Splits a file name into its stem and single extension: `set.sh` → (`set`, Some(`sh`)). An
/// extension is what follows the last '.', if that is 1 to `MAX_EXTENSION_BYTES` characters of
/// tag characters other than '.', and the stem before it is not empty.
pub fn split_extension(file_name: &str) -> (&str, Option<&str>) {
    match file_name.rsplit_once('.') {
        Some((stem, ext))
            if !stem.is_empty()
                && !ext.is_empty()
                && ext.len() <= MAX_EXTENSION_BYTES
                && ext.chars().all(|c| is_tag_char(c) && c != '.') =>
        {
            (stem, Some(ext))
        }
        _ => (file_name, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_tags() {
        let deepest = ["a"; MAX_SEGMENTS].join("/");
        let longest_segment = "x".repeat(MAX_SEGMENT_BYTES);
        for tag in [
            "clipboard/set",
            "a",
            "notify",
            "a.b/c-d/e_f",
            "v1.2",
            "x/-y",
            &deepest,
            &longest_segment,
        ] {
            assert_eq!(validate_tag(tag), Ok(()), "{tag}");
        }
    }

    #[test]
    fn bad_tags_say_why() {
        let cases = [
            ("", "empty"),
            ("/a", "empty segment"),
            ("a/", "empty segment"),
            ("a//b", "empty segment"),
            ("a/./b", "may not start with '.'"),
            ("a/../b", "may not start with '.'"),
            ("..", "may not start with '.'"),
            (".hidden", "may not start with '.'"),
            ("_events/peer-up", "reserved"),
            ("a/_default", "reserved"),
            ("a b", "contains ' '"),
            ("a\\b", "contains '\\\\'"),
            ("ä", "contains 'ä'"),
            ("a\0b", "contains '\\0'"),
        ];
        for (tag, why) in cases {
            let err = validate_tag(tag).unwrap_err();
            assert!(err.contains(why), "{tag:?}: {err}");
        }
        let long_segment = "x".repeat(MAX_SEGMENT_BYTES + 1);
        assert!(validate_tag(&long_segment).unwrap_err().contains("longer"));
        let deep = ["a"; MAX_SEGMENTS + 1].join("/");
        assert!(validate_tag(&deep).unwrap_err().contains("segments"));
        let long = vec!["x".repeat(60); 4].join("/");
        assert!(validate_tag(&long).unwrap_err().contains("bytes"));
    }

    #[test]
    fn events() {
        for event in EVENTS {
            validate_event(event).unwrap();
            validate_segment(event).unwrap();
        }
        assert!(validate_event("Peer-Up").is_err());
        assert!(validate_event("../x").is_err());
        assert!(validate_event("").is_err());
    }

    #[test]
    fn extensions() {
        assert_eq!(split_extension("set.sh"), ("set", Some("sh")));
        assert_eq!(split_extension("set"), ("set", None));
        assert_eq!(split_extension("v1.2"), ("v1", Some("2")));
        assert_eq!(split_extension("a.b.py"), ("a.b", Some("py")));
        assert_eq!(split_extension(".bashrc"), (".bashrc", None));
        assert_eq!(split_extension("x."), ("x.", None));
        assert_eq!(split_extension("x.a~"), ("x.a~", None));
        assert_eq!(
            split_extension("x.averyveryverylongext"),
            ("x.averyveryverylongext", None)
        );
        assert_eq!(split_extension("_default.sh"), ("_default", Some("sh")));
    }
}
