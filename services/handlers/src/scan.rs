//! The whole handler directory at a glance, for `cnspr handlers list` and `cnspr handlers check`:
//! which file handles which tag and why, and everything that keeps a handler from running or a
//! file from ever being used. It applies the same rules as `resolve`, which a test keeps in step.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use cnsprcy::tag::{
    ALLOW_LIST_EXTENSION, DEFAULT_STEM, EVENTS, EVENTS_DIR, MAX_SEGMENTS, split_extension,
    validate_segment, validate_tag,
};
use serde::Serialize;

use crate::allow::AllowList;
use crate::resolve::{
    Finding, MatchKind, Use, dir_findings, dir_label, is_candidate_name, open_checked, rel_name,
};
use crate::safe_open::Trust;

/// Everything `scan` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub dir: PathBuf,
    /// False when the handler directory does not exist (then nothing runs, and nothing is wrong).
    pub exists: bool,
    pub handlers: Vec<Entry>,
    /// What is wrong: `cnspr handlers check` fails when there is any.
    pub problems: Vec<Problem>,
    /// Worth knowing, not wrong.
    pub notes: Vec<Problem>,
}

/// One handler file and what it handles.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// The tag, tag pattern or event, as people read it: `clipboard/set`, `clipboard/*`, `*`,
    /// `event peer-up`, `event *`.
    pub handles: String,
    /// For messages: the tag, or for a fallback the pattern of tags it catches.
    pub tag: Option<String>,
    /// For built-in events: the event name (`*` for the events fallback).
    pub event: Option<String>,
    /// The file, relative to the handler directory.
    pub file: String,
    #[serde(rename = "match")]
    pub kind: MatchKind,
    pub extension: Option<String>,
    /// The sender allow list, if the handler has one.
    pub from: Option<FromInfo>,
    /// Whether it would run now; if not, `problems` says why.
    pub runs: bool,
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FromInfo {
    pub file: String,
    /// The device names and IDs it lets in.
    pub devices: Vec<String>,
    /// Why it cannot be used (then the handler is refused for every message).
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The file or directory, relative to the handler directory ("" for the directory itself).
    pub file: String,
    /// A short code: `not_executable`, `ambiguous`, `bad_name`, ...
    pub kind: &'static str,
    pub message: String,
}

/// A file in a directory being scanned.
struct FileEntry {
    name: String,
    stem: String,
    extension: Option<String>,
}

struct Scanner {
    root: PathBuf,
    trust: Trust,
    report: Report,
}

/// Looks at every file below the handler directory `root`.
pub fn scan(root: &Path) -> Report {
    scan_as(root, Trust::current())
}

/// `scan`, trusting what `trust` trusts.
pub(crate) fn scan_as(root: &Path, trust: Trust) -> Report {
    let mut scanner = Scanner {
        root: root.to_owned(),
        trust,
        report: Report {
            dir: root.to_owned(),
            exists: false,
            handlers: Vec::new(),
            problems: Vec::new(),
            notes: Vec::new(),
        },
    };
    match fs::metadata(root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            scanner.note(
                "",
                "missing",
                format!(
                    "the handler directory {} does not exist, so no message has a handler",
                    root.display()
                ),
            );
        }
        Err(e) => scanner.problem(
            "",
            "unreadable",
            format!("cannot inspect the handler directory: {e}"),
        ),
        Ok(meta) if !meta.is_dir() => scanner.problem(
            "",
            "not_a_directory",
            format!(
                "the handler directory {} is not a directory",
                root.display()
            ),
        ),
        Ok(_) => {
            scanner.report.exists = true;
            scanner.dir_problems(&[]);
            scanner.walk(&[]);
        }
    }
    let mut report = scanner.report;
    report.handlers.sort_by(|a, b| a.file.cmp(&b.file));
    report
}

impl Scanner {
    fn problem(&mut self, file: &str, kind: &'static str, message: String) {
        self.report.problems.push(Problem {
            file: file.to_owned(),
            kind,
            message,
        });
    }

    fn note(&mut self, file: &str, kind: &'static str, message: String) {
        self.report.notes.push(Problem {
            file: file.to_owned(),
            kind,
            message,
        });
    }

    /// Reports `finding`, once: the directories on the way are on the way of many files.
    fn finding(&mut self, finding: &Finding) {
        let problem = Problem {
            file: finding.file.clone(),
            kind: finding.code,
            message: finding.message.clone(),
        };
        if !self.report.problems.contains(&problem) {
            self.report.problems.push(problem);
        }
    }

    /// Checks the directory `segments` and everything on the way to it.
    fn dir_problems(&mut self, segments: &[String]) {
        for finding in dir_findings(&self.root, segments, &self.trust) {
            self.finding(&finding);
        }
    }

    fn path(&self, segments: &[String]) -> PathBuf {
        segments.iter().fold(self.root.clone(), |p, s| p.join(s))
    }

    /// Scans the directory `segments`.
    fn walk(&mut self, segments: &[String]) {
        let dir = self.path(segments);
        let in_events = segments.len() == 1 && segments[0] == EVENTS_DIR;
        let read = match fs::read_dir(&dir) {
            Ok(read) => read,
            Err(e) => {
                let label = dir_label(segments);
                self.problem(
                    &segments.join("/"),
                    "unreadable",
                    format!("cannot read {label}: {e}"),
                );
                return;
            }
        };
        let mut names = Vec::new();
        for entry in read {
            match entry {
                Ok(entry) => match entry.file_name().into_string() {
                    Ok(name) => names.push(name),
                    Err(raw) => {
                        let shown = raw.to_string_lossy().into_owned();
                        let rel = rel_name(segments, Some(&shown));
                        self.problem(
                            &rel,
                            "bad_name",
                            format!("{rel} can never match: its name is not UTF-8 text"),
                        );
                    }
                },
                Err(e) => {
                    let label = dir_label(segments);
                    self.problem(
                        &segments.join("/"),
                        "unreadable",
                        format!("cannot read {label}: {e}"),
                    );
                }
            }
        }
        names.sort();

        let mut files = Vec::new();
        let mut allow_stems = Vec::new();
        for name in names {
            // Hidden files (editor swap files and the like) are never handlers: no tag starts
            // with '.'.
            if name.starts_with('.') {
                continue;
            }
            let rel = rel_name(segments, Some(&name));
            if fs::metadata(dir.join(&name)).is_ok_and(|m| m.is_dir()) {
                self.directory(segments, &name, &rel, in_events);
                continue;
            }
            let (stem, extension) = split_extension(&name);
            if extension == Some(ALLOW_LIST_EXTENSION) {
                allow_stems.push(stem.to_owned());
                continue;
            }
            let usable = if in_events {
                self.event_file_name(stem, &rel)
            } else {
                self.tag_file_name(segments, stem, &rel)
            };
            if usable {
                files.push(FileEntry {
                    stem: stem.to_owned(),
                    extension: extension.map(str::to_owned),
                    name,
                });
            }
        }

        let stems: BTreeSet<String> = files.iter().map(|f| f.stem.clone()).collect();
        for stem in &stems {
            self.handlers_of_stem(segments, stem, &files, &allow_stems, in_events);
        }
        for stem in allow_stems.iter().filter(|s| !stems.contains(*s)) {
            let rel = rel_name(segments, Some(&format!("{stem}.{ALLOW_LIST_EXTENSION}")));
            if in_events {
                self.problem(
                    &rel,
                    "allow_list_ignored",
                    format!("{rel} has no effect: built-in events have no sender to limit"),
                );
            } else {
                self.problem(
                    &rel,
                    "allow_list_orphan",
                    format!(
                        "{rel} limits nothing: there is no handler {stem} or {stem}.EXT next to it"
                    ),
                );
            }
        }
    }

    /// A directory entry that is a directory.
    fn directory(&mut self, segments: &[String], name: &str, rel: &str, in_events: bool) {
        let reason = if segments.is_empty() && name == EVENTS_DIR {
            None
        } else if in_events {
            Some("directories in _events are never used".to_owned())
        } else if let Err(reason) = validate_segment(name) {
            Some(format!(
                "no tag can reach it: a tag segment {}",
                reason.trim_start_matches("has ")
            ))
        } else if segments.len() + 1 >= MAX_SEGMENTS {
            Some(format!(
                "it is too deep: tags have at most {MAX_SEGMENTS} segments"
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            self.problem(
                rel,
                "bad_name",
                format!("directory {rel} is never used: {reason}"),
            );
            return;
        }
        let mut inner: Vec<String> = segments.to_vec();
        inner.push(name.to_owned());
        self.dir_problems(&inner);
        self.walk(&inner);
    }

    /// Whether a file in `_events` names an event handler; reports it if not.
    fn event_file_name(&mut self, stem: &str, rel: &str) -> bool {
        if stem == DEFAULT_STEM || EVENTS.contains(&stem) {
            return true;
        }
        self.problem(
            rel,
            "unknown_event",
            format!(
                "{rel} never runs: there is no built-in event {stem:?} (the events are {})",
                EVENTS.join(", ")
            ),
        );
        false
    }

    /// Whether a file outside `_events` can handle a tag (or is a fallback); reports it if not.
    fn tag_file_name(&mut self, segments: &[String], stem: &str, rel: &str) -> bool {
        if stem == DEFAULT_STEM {
            return true;
        }
        if segments.is_empty() && stem == EVENTS_DIR {
            self.problem(
                rel,
                "bad_name",
                format!("{rel} is never used: {EVENTS_DIR} must be a directory of event handlers"),
            );
            return false;
        }
        let tag = rel_name(segments, Some(stem));
        match validate_tag(&tag) {
            Ok(()) => true,
            Err(reason) => {
                self.problem(rel, "bad_name", format!("{rel} can never match: {reason}"));
                false
            }
        }
    }

    /// The handler files for one stem in one directory: normally one; several are ambiguous.
    fn handlers_of_stem(
        &mut self,
        segments: &[String],
        stem: &str,
        files: &[FileEntry],
        allow_stems: &[String],
        in_events: bool,
    ) {
        // The same test as at run time, so a file whose full name is the stem counts too
        // (`v1.2` beside `v1.2.sh`).
        let candidates: Vec<&FileEntry> = files
            .iter()
            .filter(|f| is_candidate_name(&f.name, stem).is_some())
            .collect();
        let ambiguity = (candidates.len() > 1).then(|| {
            let names: Vec<String> = candidates
                .iter()
                .map(|f| rel_name(segments, Some(&f.name)))
                .collect();
            let what = if in_events {
                format!("the event {stem}")
            } else if stem == DEFAULT_STEM {
                "the same tags".to_owned()
            } else {
                format!("the tag {}", rel_name(segments, Some(stem)))
            };
            format!(
                "ambiguous: {} would all handle {what}; remove or rename all but one",
                names.join(", ")
            )
        });
        if let Some(message) = &ambiguity {
            let file = rel_name(segments, Some(stem));
            self.problem(&file, "ambiguous", message.clone());
        }
        let allow = self.allow_list(segments, stem, allow_stems, in_events);
        for file in files.iter().filter(|f| f.stem == stem) {
            let rel = rel_name(segments, Some(&file.name));
            // Opened and checked as for a run, with everything on its way.
            let mut problems = Vec::new();
            if let Err(findings) =
                open_checked(&self.root, segments, &file.name, Use::Execute, &self.trust)
            {
                for finding in &findings {
                    self.finding(finding);
                    problems.push(finding.message.clone());
                }
            }
            problems.extend(ambiguity.clone());
            if let Some(error) = allow.as_ref().and_then(|a| a.error.clone()) {
                problems.push(error);
            }
            let dir_tag = segments.join("/");
            let kind = match (
                in_events,
                stem == DEFAULT_STEM,
                segments.is_empty(),
                &file.extension,
            ) {
                (true, true, _, _) => MatchKind::EventDefault,
                (true, false, _, _) => MatchKind::Event,
                (false, true, true, _) => MatchKind::Default,
                (false, true, false, _) => MatchKind::DirectoryDefault,
                (false, false, _, Some(_)) => MatchKind::Extension,
                (false, false, _, None) => MatchKind::Exact,
            };
            let (handles, tag, event) = match kind {
                MatchKind::Event => (format!("event {stem}"), None, Some(stem.to_owned())),
                MatchKind::EventDefault => ("event *".to_owned(), None, Some("*".to_owned())),
                MatchKind::Default => ("*".to_owned(), Some("*".to_owned()), None),
                MatchKind::DirectoryDefault => {
                    let pattern = format!("{dir_tag}/*");
                    (pattern.clone(), Some(pattern), None)
                }
                MatchKind::Exact | MatchKind::Extension => {
                    let tag = rel_name(segments, Some(stem));
                    (tag.clone(), Some(tag), None)
                }
            };
            self.report.handlers.push(Entry {
                handles,
                tag,
                event,
                file: rel,
                kind,
                extension: file.extension.clone(),
                from: allow.clone(),
                runs: problems.is_empty(),
                problems,
            });
        }
    }

    /// The allow list of `stem` in `segments`, reported on where it is broken.
    fn allow_list(
        &mut self,
        segments: &[String],
        stem: &str,
        allow_stems: &[String],
        in_events: bool,
    ) -> Option<FromInfo> {
        if !allow_stems.iter().any(|s| s == stem) {
            return None;
        }
        let name = format!("{stem}.{ALLOW_LIST_EXTENSION}");
        let rel = rel_name(segments, Some(&name));
        if in_events {
            self.problem(
                &rel,
                "allow_list_ignored",
                format!("{rel} has no effect: built-in events have no sender to limit"),
            );
            return None;
        }
        match AllowList::load(&self.root, segments, &name, &self.trust) {
            Ok(None) => None,
            Ok(Some(list)) => {
                for (line, text) in &list.bad_lines {
                    self.problem(
                        &rel,
                        "allow_list_bad_line",
                        format!("{rel}:{line}: {text:?} is neither a device name nor a device ID"),
                    );
                }
                if list.entries.is_empty() {
                    self.note(
                        &rel,
                        "allow_list_empty",
                        format!("{rel} names no device, so no message runs its handler"),
                    );
                }
                Some(FromInfo {
                    file: rel,
                    devices: list.entries.into_iter().map(|e| e.text).collect(),
                    error: None,
                })
            }
            Err(error) => {
                self.problem(&rel, "allow_list_unusable", error.clone());
                Some(FromInfo {
                    file: rel,
                    devices: Vec::new(),
                    error: Some(error),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::{Resolution, resolve_as};
    use cnsprcy::ipc::EVENT_MESSAGE;
    use std::os::unix::fs::PermissionsExt;

    fn write(root: &Path, rel: &str, mode: u32) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn crafted() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::set_permissions(root, fs::Permissions::from_mode(0o700)).unwrap();
        write(root, "clipboard/set.sh", 0o700);
        write(root, "clipboard/get", 0o700);
        write(root, "clipboard/_default", 0o700);
        write(root, "clipboard/set.from", 0o600);
        fs::write(
            root.join("clipboard/set.from"),
            "laptop\n# comment\nnot valid!\n",
        )
        .unwrap();
        write(root, "notify/show.py", 0o644);
        write(root, "lock", 0o700);
        write(root, "lock.sh", 0o700);
        write(root, "_default", 0o700);
        write(root, "_events/peer-up", 0o700);
        write(root, "_events/peer-upp", 0o700);
        write(root, "_events/peer-down.from", 0o600);
        write(root, "bad name", 0o700);
        write(root, "_private", 0o700);
        write(root, "orphan.from", 0o600);
        write(root, ".hidden", 0o700);
        write(root, "open/x", 0o700);
        fs::set_permissions(root.join("open"), fs::Permissions::from_mode(0o777)).unwrap();
        tmp
    }

    #[test]
    fn list_says_what_handles_what() {
        let tmp = crafted();
        let report = scan(tmp.path());
        assert!(report.exists);
        let rows: Vec<(String, String, MatchKind, bool)> = report
            .handlers
            .iter()
            .map(|e| (e.handles.clone(), e.file.clone(), e.kind, e.runs))
            .collect();
        let expected = [
            ("*", "_default", MatchKind::Default, true),
            ("event peer-up", "_events/peer-up", MatchKind::Event, true),
            (
                "clipboard/*",
                "clipboard/_default",
                MatchKind::DirectoryDefault,
                true,
            ),
            ("clipboard/get", "clipboard/get", MatchKind::Exact, true),
            (
                "clipboard/set",
                "clipboard/set.sh",
                MatchKind::Extension,
                true,
            ),
            ("lock", "lock", MatchKind::Exact, false),
            ("lock", "lock.sh", MatchKind::Extension, false),
            ("notify/show", "notify/show.py", MatchKind::Extension, false),
            ("open/x", "open/x", MatchKind::Exact, false),
        ]
        .map(|(a, b, c, d)| (a.to_owned(), b.to_owned(), c, d));
        assert_eq!(rows, expected);
        let set = report
            .handlers
            .iter()
            .find(|e| e.file == "clipboard/set.sh")
            .unwrap();
        let from = set.from.as_ref().unwrap();
        assert_eq!(from.devices, ["laptop"]);
        assert_eq!(from.file, "clipboard/set.from");
    }

    #[test]
    fn check_finds_every_problem() {
        let tmp = crafted();
        let report = scan(tmp.path());
        let kinds: Vec<(&str, &str)> = report
            .problems
            .iter()
            .map(|p| (p.file.as_str(), p.kind))
            .collect();
        for expected in [
            ("clipboard/set.from", "allow_list_bad_line"),
            ("notify/show.py", "not_executable"),
            ("lock", "ambiguous"),
            ("_events/peer-upp", "unknown_event"),
            ("_events/peer-down.from", "allow_list_ignored"),
            ("bad name", "bad_name"),
            ("_private", "bad_name"),
            ("orphan.from", "allow_list_orphan"),
            ("open", "writable_by_others"),
        ] {
            assert!(
                kinds.contains(&expected),
                "{expected:?} missing from {kinds:?}"
            );
        }
        assert_eq!(kinds.len(), 9, "{kinds:?}");
        let open = report.handlers.iter().find(|e| e.file == "open/x").unwrap();
        assert!(
            open.problems[0].contains("directory open is writable"),
            "{:?}",
            open.problems
        );
    }

    #[test]
    fn a_missing_directory_is_a_note_not_a_problem() {
        let tmp = tempfile::tempdir().unwrap();
        let report = scan(&tmp.path().join("none"));
        assert!(!report.exists);
        assert!(report.problems.is_empty());
        assert_eq!(report.notes[0].kind, "missing");
    }

    /// What `scan` lists is what `resolve` runs: every entry's tag resolves to its file, and is
    /// refused exactly when the scan says it does not run.
    #[test]
    fn scan_and_resolve_agree() {
        let tmp = crafted();
        let root = tmp.path();
        write(root, "v1.2", 0o700);
        write(root, "v1.2.sh", 0o700);
        fs::write(root.join("bare"), "echo no interpreter line\n").unwrap();
        // Links out of the handler directory: into a directory others may write, into a sticky
        // one, and into one whose owner is the overflow uid (root, or anyone, in a sandbox).
        let outside = tempfile::tempdir().unwrap();
        for (dir, mode, link) in [
            ("open", 0o777, "swap"),
            ("sticky", 0o1777, "mine"),
            ("hidden", 0o755, "hidden"),
        ] {
            write(outside.path(), &format!("{dir}/t.sh"), 0o700);
            let dir = outside.path().join(dir);
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
            std::os::unix::fs::symlink(dir.join("t.sh"), root.join(link)).unwrap();
        }
        std::os::unix::fs::lchown(outside.path().join("hidden"), Some(65534), None).unwrap();

        let here = Trust::current();
        let sandboxed = Trust {
            unidentified: Some(65534),
            ..here
        };
        for trust in [here, sandboxed] {
            let report = scan_as(root, trust);
            assert!(
                report
                    .problems
                    .iter()
                    .any(|p| p.file == "v1.2" && p.kind == "ambiguous"),
                "{:?}",
                report.problems
            );
            let runs = |file: &str| {
                report
                    .handlers
                    .iter()
                    .find(|e| e.file == file)
                    .unwrap()
                    .runs
            };
            assert!(!runs("swap") && runs("mine") && !runs("hidden") && !runs("bare"));
            for entry in &report.handlers {
                agree(root, entry, &trust);
            }
        }
    }

    /// Resolves what `entry` handles, and checks that the answer is what the scan says.
    fn agree(root: &Path, entry: &Entry, trust: &Trust) {
        let (event, tag) = match (&entry.event, &entry.tag) {
            (Some(event), _) if event == "*" => {
                ("daemon-stop".to_owned(), "daemon-stop".to_owned())
            }
            (Some(event), _) => (event.clone(), event.clone()),
            (None, Some(tag)) => (
                EVENT_MESSAGE.to_owned(),
                tag.replace('*', "zz").trim_start_matches('/').to_owned(),
            ),
            (None, None) => unreachable!(),
        };
        match resolve_as(root, &event, &tag, trust) {
            Resolution::Found(handler) => {
                assert!(
                    entry.runs,
                    "{tag}: resolve runs {}, scan says {:?}",
                    handler.rel, entry.problems
                );
                assert_eq!(handler.rel, entry.file, "{tag}");
            }
            Resolution::Refused { handler, reason } => {
                assert!(
                    !entry.runs,
                    "{tag}: resolve refuses ({reason}), scan says it runs"
                );
                assert!(handler.is_some(), "{tag}");
                // The same words, but for an ambiguity (the scan names every candidate).
                assert!(
                    entry.problems.contains(&reason) || reason.starts_with("ambiguous"),
                    "{tag}: {reason} is not among {:?}",
                    entry.problems
                );
            }
            Resolution::NoHandler => panic!("{tag}: no handler, but scan lists {}", entry.file),
        }
    }
}
