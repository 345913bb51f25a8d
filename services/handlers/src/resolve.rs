//! Which file handles a tag or a built-in event, and whether it may run.
//!
//! The mapping (documented in `docs/event_handlers.md`): for the tag `a/b/c`, the handler is
//! `a/b/c` or `a/b/c.EXT` (one extension, any); failing that the nearest directory fallback,
//! `a/b/_default[.EXT]`, then `a/_default[.EXT]`, then `_default[.EXT]` at the top. A built-in
//! event `peer-up` runs `_events/peer-up[.EXT]`, else `_events/_default[.EXT]`. The first level
//! with a candidate decides: two candidates there (`c` and `c.sh`) are ambiguous and refused, and
//! a candidate that may not run is refused, rather than quietly falling back to a broader handler.
//!
//! Nothing is cached: every run looks at the directory afresh, so edits apply at once.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use cnsprcy::ipc::{EVENT_MESSAGE, Sender};
use cnsprcy::tag::{
    ALLOW_LIST_EXTENSION, DEFAULT_STEM, EVENTS_DIR, split_extension, validate_event, validate_tag,
};
use serde::Serialize;

use crate::allow::AllowList;
use crate::safe_open::{self, CheckedFile, End, Format, PathProblem, Place, Trust, Want};

/// Why a file handles what it handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchKind {
    /// Named exactly like the tag: `clipboard/set`.
    Exact,
    /// Named like the tag plus one extension: `clipboard/set.sh`.
    Extension,
    /// `_default` in one of the tag's directories: `clipboard/_default`.
    DirectoryDefault,
    /// `_default` at the top of the handler directory: every tag without a closer handler.
    Default,
    /// `_events/NAME` for the built-in event NAME.
    Event,
    /// `_events/_default`: every built-in event without a handler of its own.
    EventDefault,
}

impl MatchKind {
    /// How `cnspr handlers list` explains the match.
    pub fn describe(self) -> &'static str {
        match self {
            MatchKind::Exact => "exact name",
            MatchKind::Extension => "name with extension",
            MatchKind::DirectoryDefault => "directory fallback",
            MatchKind::Default => "top-level fallback",
            MatchKind::Event => "built-in event",
            MatchKind::EventDefault => "built-in event fallback",
        }
    }
}

/// A handler file chosen for a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handler {
    /// The file to execute.
    pub path: PathBuf,
    /// The file relative to the handler directory, `/`-separated: the handler's name in logs
    /// and replies.
    pub rel: String,
    /// The directory holding the file: the handler's working directory.
    pub dir: PathBuf,
    pub kind: MatchKind,
    /// The sender allow list that applies (`STEM.from` next to the file), if there is one.
    pub allow: Option<AllowList>,
    /// The file, opened and checked: what runs is this descriptor, not whatever is at `path`
    /// by then.
    pub file: CheckedFile,
}

/// The answer to "which handler runs this?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Found(Handler),
    NoHandler,
    /// A handler exists (or several do) but may not run; `reason` says why and how to fix it.
    Refused {
        handler: Option<String>,
        reason: String,
    },
}

/// One place where a handler may be: the files `STEM` and `STEM.EXT` in `dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Level {
    /// The directory, as segments below the handler directory.
    pub dir: Vec<String>,
    pub stem: String,
    /// The kind of a candidate without an extension (with one, `Exact` becomes `Extension`).
    pub kind: MatchKind,
}

/// The places to look for the handler of `tag` (a message) or of the built-in `event`, most
/// specific first.
pub(crate) fn levels(event: &str, tag: &str) -> Result<Vec<Level>, String> {
    if event != EVENT_MESSAGE {
        validate_event(event)?;
        let dir = vec![EVENTS_DIR.to_owned()];
        return Ok(vec![
            Level {
                dir: dir.clone(),
                stem: event.to_owned(),
                kind: MatchKind::Event,
            },
            Level {
                dir,
                stem: DEFAULT_STEM.to_owned(),
                kind: MatchKind::EventDefault,
            },
        ]);
    }
    validate_tag(tag)?;
    let segments: Vec<String> = tag.split('/').map(str::to_owned).collect();
    let (name, dirs) = match segments.split_last() {
        Some((name, dirs)) => (name.clone(), dirs.to_vec()),
        // validate_tag refuses the empty tag.
        None => return Err("tag is empty".into()),
    };
    let mut levels = vec![Level {
        dir: dirs.clone(),
        stem: name,
        kind: MatchKind::Exact,
    }];
    for depth in (0..=dirs.len()).rev() {
        levels.push(Level {
            dir: dirs[..depth].to_vec(),
            stem: DEFAULT_STEM.to_owned(),
            kind: if depth == 0 {
                MatchKind::Default
            } else {
                MatchKind::DirectoryDefault
            },
        });
    }
    Ok(levels)
}

/// Joins segments with '/' for names in messages ("" is the handler directory itself).
pub(crate) fn rel_name(dir: &[String], file: Option<&str>) -> String {
    let mut parts: Vec<&str> = dir.iter().map(String::as_str).collect();
    parts.extend(file);
    parts.join("/")
}

/// A file in a directory that is a candidate for `stem`: `stem` itself or `stem.EXT` (never
/// `stem.from`, the allow list). Directories are not candidates: `a/` holds the handlers of
/// `a/...`, it does not handle `a`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub file_name: String,
    pub extension: Option<String>,
}

pub(crate) fn is_candidate_name<'a>(file_name: &'a str, stem: &str) -> Option<Option<&'a str>> {
    if file_name == stem {
        return Some(None);
    }
    match split_extension(file_name) {
        (s, Some(ext)) if s == stem && ext != ALLOW_LIST_EXTENSION => Some(Some(ext)),
        _ => None,
    }
}

/// What a directory holds for one stem.
#[derive(Debug, Default)]
struct Listing {
    /// Sorted by name.
    candidates: Vec<Candidate>,
    /// Whether `stem.from` is there (of whatever kind: `AllowList::load` checks it).
    allow_list: bool,
}

/// The candidates for `stem` in `dir`, and whether its allow list is there. A missing
/// directory has neither.
fn candidates(dir: &Path, stem: &str) -> io::Result<Listing> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e)
            if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::NotADirectory =>
        {
            return Ok(Listing::default());
        }
        Err(e) => return Err(e),
    };
    let allow_name = format!("{stem}.{ALLOW_LIST_EXTENSION}");
    let mut allow_list = false;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        // Names that are not UTF-8 cannot be made from a tag.
        let Ok(file_name) = entry.file_name().into_string() else {
            continue;
        };
        allow_list |= file_name == allow_name;
        let Some(extension) = is_candidate_name(&file_name, stem) else {
            continue;
        };
        // Followed through symbolic links; a dangling link stays a candidate, to be refused.
        if fs::metadata(entry.path()).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        found.push(Candidate {
            extension: extension.map(str::to_owned),
            file_name,
        });
    }
    found.sort_by(|a, b| a.file_name.cmp(&b.file_name));
    Ok(Listing {
        candidates: found,
        allow_list,
    })
}

/// What may be wrong with a handler file, its allow list or a directory above it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileProblem {
    /// A symbolic link whose target does not exist.
    Dangling,
    /// Not a regular file (a FIFO, a device, a socket).
    NotRegular,
    NotExecutable {
        mode: u32,
    },
    /// Owned by someone other than this user (or root).
    WrongOwner {
        uid: u32,
    },
    /// Owned by the uid a user namespace without root shows for root and every other user.
    HiddenOwner {
        uid: u32,
    },
    /// Group or others may write it: they could make it run anything.
    Writable {
        mode: u32,
    },
    /// It could not be inspected.
    Unreadable {
        error: String,
    },
    /// A directory was expected.
    NotADirectory,
    /// Symbolic links lead on and on (a loop).
    TooManyLinks,
    /// It was replaced while it was being checked.
    Changed,
    /// Executable, but neither a `#!` script nor an ELF program: the kernel would refuse it.
    NotAProgram,
}

impl FileProblem {
    /// A sentence about `what` (such as "clipboard/set.sh" or "directory clipboard"), with the fix.
    pub fn describe(&self, what: &str, own_uid: u32) -> String {
        match self {
            FileProblem::Dangling => {
                format!("{what} is a symbolic link to a file that does not exist")
            }
            FileProblem::NotRegular => format!("{what} is not a regular file"),
            FileProblem::NotExecutable { mode } => {
                format!("{what} is not executable (mode {mode:04o}); fix: chmod u+x")
            }
            FileProblem::WrongOwner { uid } => format!(
                "{what} belongs to uid {uid}, not to you (uid {own_uid}) or root; fix: chown it or remove it"
            ),
            FileProblem::Writable { mode } => format!(
                "{what} is writable by group or others (mode {mode:04o}), who could make it run anything; fix: chmod go-w"
            ),
            FileProblem::HiddenOwner { uid } => format!(
                "{what} belongs to uid {uid}, which stands for root and every other user alike in the user namespace this runs in (systemd's PrivateUsers=), so it cannot be trusted; fix: keep handlers, and what they link to, in your own directories"
            ),
            FileProblem::Unreadable { error } => format!("{what} cannot be inspected: {error}"),
            FileProblem::NotADirectory => format!("{what} is not a directory"),
            FileProblem::TooManyLinks => {
                format!("{what} leads through too many symbolic links (a loop?)")
            }
            FileProblem::Changed => {
                format!("{what} changed while it was being checked; try again")
            }
            FileProblem::NotAProgram => format!(
                "{what} starts neither with a #! line nor as a program (ELF binary), so it cannot be started; fix: make its first line #!/bin/sh (or the interpreter it needs)"
            ),
        }
    }

    /// A short code for JSON output.
    pub fn code(&self) -> &'static str {
        match self {
            FileProblem::Dangling => "dangling_link",
            FileProblem::NotRegular => "not_a_file",
            FileProblem::NotExecutable { .. } => "not_executable",
            FileProblem::WrongOwner { .. } | FileProblem::HiddenOwner { .. } => "wrong_owner",
            FileProblem::Writable { .. } => "writable_by_others",
            FileProblem::Unreadable { .. } => "unreadable",
            FileProblem::NotADirectory => "not_a_directory",
            FileProblem::TooManyLinks => "link_loop",
            FileProblem::Changed => "changed",
            FileProblem::NotAProgram => "not_a_program",
        }
    }
}

/// The owner and mode a check looks at, apart from the file system so the rules are testable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub uid: u32,
    pub mode: u32,
    pub is_file: bool,
    pub is_dir: bool,
}

/// Root may already change anything of this user's, so a file of root's (typically a link to a
/// system program) is as trustworthy as the user's own.
pub(crate) fn trusted_owner(uid: u32, own_uid: u32) -> bool {
    uid == own_uid || uid == 0
}

/// The problems of a file that is to be executed: every one, for `cnspr handlers check`.
pub fn check_handler_stat(stat: Stat, own_uid: u32) -> Vec<FileProblem> {
    let mut problems = check_data_stat(stat, own_uid);
    // Only the owner's bit counts for the user's own files; for root's, any execute bit (what
    // `access(X_OK)` would say for another user depends on the groups, so stay simple).
    let executable = if stat.uid == own_uid {
        stat.mode & 0o100 != 0
    } else {
        stat.mode & 0o111 != 0
    };
    if stat.is_file && !executable {
        problems.insert(0, FileProblem::NotExecutable { mode: stat.mode });
    }
    problems
}

/// The problems of a file that is read as configuration (an allow list).
pub fn check_data_stat(stat: Stat, own_uid: u32) -> Vec<FileProblem> {
    let mut problems = Vec::new();
    if !stat.is_file {
        problems.push(FileProblem::NotRegular);
    }
    if !trusted_owner(stat.uid, own_uid) {
        problems.push(FileProblem::WrongOwner { uid: stat.uid });
    }
    if stat.mode & 0o022 != 0 {
        problems.push(FileProblem::Writable { mode: stat.mode });
    }
    problems
}

/// Describes a directory for messages: "the handler directory" or "directory a/b".
pub(crate) fn dir_label(segments: &[String]) -> String {
    if segments.is_empty() {
        "the handler directory".to_owned()
    } else {
        format!("directory {}", segments.join("/"))
    }
}

/// One thing wrong with a handler, its allow list, or what leads to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finding {
    /// What `cnspr handlers check` files it under: the file, or the directory in the handler
    /// directory it is about ("" for the handler directory and the directories above it).
    pub file: String,
    pub code: &'static str,
    pub message: String,
}

/// What an opened file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    /// A handler, run from its descriptor.
    Execute,
    /// An allow list, read from its descriptor.
    Read,
}

/// Opens `name` in the directory `dir` (segments below `root`) through `safe_open`, and checks
/// it and every directory and link on its way. `Ok(None)`: there is no such file (only for
/// `Use::Read`; a handler that vanished since it was listed changed while being checked).
/// `Err` holds every problem, in the order met, and is never empty.
pub(crate) fn open_checked(
    root: &Path,
    dir: &[String],
    name: &str,
    usage: Use,
    trust: &Trust,
) -> Result<Option<CheckedFile>, Vec<Finding>> {
    let rel = rel_name(dir, Some(name));
    let mut names: Vec<&str> = dir.iter().map(String::as_str).collect();
    names.push(name);
    let walk = safe_open::walk(root, &names, Want::File, trust);
    let root_real = walk.root_real.as_deref();
    let mut findings: Vec<Finding> = walk
        .problems
        .iter()
        .map(|p| path_finding(&p.place, &p.problem, root_real, &rel, trust))
        .collect();
    let opened = match walk.end {
        End::Opened(opened) => opened,
        End::Missing { through_link: true } => {
            findings.push(file_finding(&rel, &FileProblem::Dangling, trust));
            return Err(findings);
        }
        End::Missing {
            through_link: false,
        } if usage == Use::Read => return Ok(None),
        End::Missing { .. } => {
            findings.push(file_finding(&rel, &FileProblem::Changed, trust));
            return Err(findings);
        }
        End::Stopped(p) => {
            findings.push(path_finding(&p.place, &p.problem, root_real, &rel, trust));
            return Err(findings);
        }
    };
    let format = safe_open::format_of(&opened);
    let own = match usage {
        Use::Execute => {
            let mut problems = check_handler_stat(opened.stat, trust.own_uid);
            if format == Format::Other {
                problems.push(FileProblem::NotAProgram);
            }
            problems
        }
        Use::Read => check_data_stat(opened.stat, trust.own_uid),
    };
    for problem in own {
        let problem = match problem {
            FileProblem::WrongOwner { uid } => trust.owner_problem(uid),
            other => other,
        };
        findings.push(file_finding(&rel, &problem, trust));
    }
    if !findings.is_empty() {
        return Err(findings);
    }
    Ok(Some(CheckedFile {
        fd: std::sync::Arc::new(opened.fd),
        id: opened.id,
        format,
        real: opened.real,
    }))
}

/// The problems of the handler directory itself and of everything above it, or of the
/// directory `dir` in it and everything on the way there.
pub(crate) fn dir_findings(root: &Path, dir: &[String], trust: &Trust) -> Vec<Finding> {
    let names: Vec<&str> = dir.iter().map(String::as_str).collect();
    let walk = safe_open::walk(root, &names, Want::Dir, trust);
    let root_real = walk.root_real.as_deref();
    let rel = dir.join("/");
    let mut findings: Vec<Finding> = walk
        .problems
        .iter()
        .map(|p| path_finding(&p.place, &p.problem, root_real, &rel, trust))
        .collect();
    match walk.end {
        End::Opened(_) => {}
        End::Missing { .. } => findings.push(Finding {
            file: rel.clone(),
            code: "changed",
            message: FileProblem::Changed.describe(&dir_label(dir), trust.own_uid),
        }),
        End::Stopped(PathProblem {
            place: Place::Target,
            problem,
        }) => findings.push(Finding {
            file: rel.clone(),
            code: problem.code(),
            message: problem.describe(&dir_label(dir), trust.own_uid),
        }),
        End::Stopped(p) => {
            findings.push(path_finding(&p.place, &p.problem, root_real, &rel, trust))
        }
    }
    findings
}

fn file_finding(rel: &str, problem: &FileProblem, trust: &Trust) -> Finding {
    Finding {
        file: rel.to_owned(),
        code: problem.code(),
        message: problem.describe(rel, trust.own_uid),
    }
}

/// A problem of `place` on the way to `rel` (a file or directory in the handler directory).
fn path_finding(
    place: &Place,
    problem: &FileProblem,
    root_real: Option<&Path>,
    rel: &str,
    trust: &Trust,
) -> Finding {
    let label = safe_open::label(place, root_real, rel);
    let described = problem.describe(&label, trust.own_uid);
    if safe_open::is_elsewhere(place, root_real) {
        return Finding {
            file: rel.to_owned(),
            code: problem.code(),
            message: format!(
                "{rel} leads out of the handler directory (through a symbolic link), and {described}, or put the file itself in the handler directory instead of a link to it"
            ),
        };
    }
    let file = match (place, root_real) {
        (Place::Target, _) => rel.to_owned(),
        (Place::Dir(path) | Place::Link(path), Some(root)) => path
            .strip_prefix(root)
            .map(|inner| inner.to_string_lossy().into_owned())
            .unwrap_or_default(),
        (Place::Dir(_) | Place::Link(_), None) => String::new(),
    };
    Finding {
        file,
        code: problem.code(),
        message: described,
    }
}

/// Finds the handler for a run of `event` with `tag` in the handler directory `root`, and checks
/// that it may run (but not yet whether the sender is allowed: see `Handler::allows`).
pub fn resolve(root: &Path, event: &str, tag: &str) -> Resolution {
    resolve_as(root, event, tag, &Trust::current())
}

/// `resolve`, trusting what `trust` trusts.
pub(crate) fn resolve_as(root: &Path, event: &str, tag: &str, trust: &Trust) -> Resolution {
    let levels = match levels(event, tag) {
        Ok(levels) => levels,
        Err(reason) => {
            return Resolution::Refused {
                handler: None,
                reason,
            };
        }
    };
    for level in levels {
        let dir = level.dir.iter().fold(root.to_owned(), |d, s| d.join(s));
        let listing = match candidates(&dir, &level.stem) {
            Ok(listing) => listing,
            Err(e) => {
                return Resolution::Refused {
                    handler: None,
                    reason: format!("cannot read {}: {e}", dir_label(&level.dir)),
                };
            }
        };
        let candidate = match listing.candidates.as_slice() {
            [] => continue,
            [one] => one,
            [first, second, ..] => {
                return Resolution::Refused {
                    handler: Some(rel_name(&level.dir, Some(&first.file_name))),
                    reason: format!(
                        "ambiguous: both {} and {} would handle it; remove or rename one",
                        rel_name(&level.dir, Some(&first.file_name)),
                        rel_name(&level.dir, Some(&second.file_name)),
                    ),
                };
            }
        };
        let rel = rel_name(&level.dir, Some(&candidate.file_name));
        let refuse = |findings: Vec<Finding>| Resolution::Refused {
            handler: Some(rel.clone()),
            reason: findings
                .into_iter()
                .next()
                .map(|f| f.message)
                .unwrap_or_else(|| format!("{rel} cannot be checked")),
        };
        let file = match open_checked(root, &level.dir, &candidate.file_name, Use::Execute, trust) {
            Ok(Some(file)) => file,
            // `Execute` never answers "no such file".
            Ok(None) => return refuse(Vec::new()),
            Err(findings) => return refuse(findings),
        };
        // Built-in events have no sender, so an allow list has nothing to limit there. Where
        // the listing has none, it is not looked for again (a walk of the whole path): one
        // made since could as well have been made a moment after the run started.
        let allow = if event == EVENT_MESSAGE && listing.allow_list {
            let allow_name = format!("{}.{ALLOW_LIST_EXTENSION}", level.stem);
            match AllowList::load(root, &level.dir, &allow_name, trust) {
                Ok(allow) => allow,
                // An allow list that cannot be trusted allows nobody.
                Err(reason) => {
                    return Resolution::Refused {
                        handler: Some(rel.clone()),
                        reason,
                    };
                }
            }
        } else {
            None
        };
        let kind = match (level.kind, &candidate.extension) {
            (MatchKind::Exact, Some(_)) => MatchKind::Extension,
            (kind, _) => kind,
        };
        return Resolution::Found(Handler {
            path: dir.join(&candidate.file_name),
            rel,
            dir,
            kind,
            allow,
            file,
        });
    }
    Resolution::NoHandler
}

/// Whether any file would be a candidate for the run: `false` exactly when `resolve` would
/// answer `NoHandler`. Cheaper than `resolve` (a directory listing or two), for runs that are
/// refused anyway. When it cannot tell, it says `true`.
pub fn has_candidate(root: &Path, event: &str, tag: &str) -> bool {
    let Ok(levels) = levels(event, tag) else {
        return true;
    };
    levels.iter().any(|level| {
        let dir = level.dir.iter().fold(root.to_owned(), |d, s| d.join(s));
        candidates(&dir, &level.stem).map_or(true, |found| !found.candidates.is_empty())
    })
}

impl Handler {
    /// Whether `from` may run this handler: `Err` has the reason for the sender.
    pub fn allows(&self, from: Option<&Sender>) -> Result<(), String> {
        let Some(allow) = &self.allow else {
            return Ok(());
        };
        match from {
            Some(sender) if allow.allows(sender) => Ok(()),
            Some(sender) => Err(format!(
                "{} is not in {}, which limits who may run {}",
                sender.name, allow.file, self.rel
            )),
            None => Err(format!(
                "{} limits who may run {}, and the message has no sender",
                allow.file, self.rel
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    pub(crate) fn write(root: &Path, rel: &str, mode: u32) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn found(root: &Path, event: &str, tag: &str) -> (String, MatchKind) {
        match resolve(root, event, tag) {
            Resolution::Found(h) => (h.rel, h.kind),
            other => panic!("{event} {tag}: {other:?}"),
        }
    }

    fn refused(root: &Path, tag: &str) -> String {
        match resolve(root, EVENT_MESSAGE, tag) {
            Resolution::Refused { reason, .. } => reason,
            other => panic!("{tag}: {other:?}"),
        }
    }

    fn tree() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o700)).unwrap();
        tmp
    }

    #[test]
    fn levels_go_from_exact_to_top_default() {
        let described: Vec<(String, String, MatchKind)> = levels(EVENT_MESSAGE, "a/b/c")
            .unwrap()
            .into_iter()
            .map(|l| (l.dir.join("/"), l.stem, l.kind))
            .collect();
        assert_eq!(
            described,
            vec![
                ("a/b".into(), "c".into(), MatchKind::Exact),
                ("a/b".into(), "_default".into(), MatchKind::DirectoryDefault),
                ("a".into(), "_default".into(), MatchKind::DirectoryDefault),
                ("".into(), "_default".into(), MatchKind::Default),
            ]
        );
        let events = levels("peer-up", "peer-up").unwrap();
        assert_eq!(events[0].dir, vec!["_events".to_owned()]);
        assert_eq!(events[1].kind, MatchKind::EventDefault);
        assert!(levels(EVENT_MESSAGE, "../x").is_err());
        assert!(levels("../x", "x").is_err());
    }

    #[test]
    fn exact_extension_and_fallbacks() {
        let tmp = tree();
        let root = tmp.path();
        write(root, "clipboard/set", 0o700);
        write(root, "clipboard/get.sh", 0o700);
        write(root, "clipboard/_default.py", 0o700);
        write(root, "notify/deep/x", 0o700);
        write(root, "_default", 0o755);
        write(root, "_events/peer-up.sh", 0o700);
        write(root, "_events/_default", 0o700);
        // Not candidates: the allow list, a longer name, a directory named like the tag.
        write(root, "clipboard/set.from", 0o600);
        write(root, "clipboard/setter", 0o700);
        fs::create_dir_all(root.join("clip")).unwrap();

        assert_eq!(
            found(root, EVENT_MESSAGE, "clipboard/set"),
            ("clipboard/set".into(), MatchKind::Exact)
        );
        assert_eq!(
            found(root, EVENT_MESSAGE, "clipboard/get"),
            ("clipboard/get.sh".into(), MatchKind::Extension)
        );
        assert_eq!(
            found(root, EVENT_MESSAGE, "clipboard/other/deeper"),
            ("clipboard/_default.py".into(), MatchKind::DirectoryDefault)
        );
        assert_eq!(
            found(root, EVENT_MESSAGE, "notify/deep"),
            ("_default".into(), MatchKind::Default)
        );
        assert_eq!(
            found(root, EVENT_MESSAGE, "clip"),
            ("_default".into(), MatchKind::Default)
        );
        assert_eq!(
            found(root, EVENT_MESSAGE, "notify/deep/x"),
            ("notify/deep/x".into(), MatchKind::Exact)
        );
        assert_eq!(
            found(root, "peer-up", "peer-up"),
            ("_events/peer-up.sh".into(), MatchKind::Event)
        );
        assert_eq!(
            found(root, "daemon-stop", "daemon-stop"),
            ("_events/_default".into(), MatchKind::EventDefault)
        );
        // A message never reaches the events directory, even through the top-level fallback.
        fs::remove_file(root.join("_default")).unwrap();
        assert_eq!(
            resolve(root, EVENT_MESSAGE, "peer-up"),
            Resolution::NoHandler
        );
        assert_eq!(
            resolve(root, EVENT_MESSAGE, "nothing/here"),
            Resolution::NoHandler
        );
    }

    #[test]
    fn two_candidates_are_ambiguous_and_do_not_fall_back() {
        let tmp = tree();
        let root = tmp.path();
        write(root, "a/b", 0o700);
        write(root, "a/b.sh", 0o700);
        write(root, "_default", 0o700);
        let reason = refused(root, "a/b");
        assert!(reason.contains("ambiguous"), "{reason}");
        assert!(reason.contains("a/b and a/b.sh"), "{reason}");
    }

    #[test]
    fn permissions_are_refused_with_the_fix() {
        let tmp = tree();
        let root = tmp.path();
        write(root, "plain", 0o600);
        write(root, "open", 0o777);
        write(root, "group", 0o770);
        write(root, "_default", 0o700);
        symlink(root.join("missing"), root.join("dangling")).unwrap();
        let reason = refused(root, "plain");
        assert!(
            reason.contains("plain is not executable (mode 0600)"),
            "{reason}"
        );
        assert!(reason.contains("chmod u+x"), "{reason}");
        assert!(refused(root, "open").contains("writable by group or others"));
        assert!(refused(root, "group").contains("chmod go-w"));
        assert!(refused(root, "dangling").contains("does not exist"));

        write(root, "sub/x", 0o700);
        fs::set_permissions(root.join("sub"), fs::Permissions::from_mode(0o777)).unwrap();
        let reason = refused(root, "sub/x");
        assert!(reason.contains("directory sub is writable"), "{reason}");
        fs::set_permissions(root, fs::Permissions::from_mode(0o757)).unwrap();
        let reason = refused(root, "anything");
        assert!(
            reason.contains("the handler directory is writable"),
            "{reason}"
        );
    }

    #[test]
    fn stat_rules() {
        let me = 1000;
        let file = |uid, mode| Stat {
            uid,
            mode,
            is_file: true,
            is_dir: false,
        };
        assert_eq!(check_handler_stat(file(me, 0o700), me), vec![]);
        assert_eq!(check_handler_stat(file(me, 0o755), me), vec![]);
        assert_eq!(check_handler_stat(file(0, 0o755), me), vec![]);
        assert_eq!(
            check_handler_stat(file(me, 0o644), me),
            vec![FileProblem::NotExecutable { mode: 0o644 }]
        );
        // The group's execute bit does not make the owner's file executable for the owner.
        assert_eq!(
            check_handler_stat(file(me, 0o610), me),
            vec![FileProblem::NotExecutable { mode: 0o610 }]
        );
        assert_eq!(
            check_handler_stat(file(1001, 0o775), me),
            vec![
                FileProblem::WrongOwner { uid: 1001 },
                FileProblem::Writable { mode: 0o775 }
            ]
        );
        let fifo = Stat {
            is_file: false,
            ..file(me, 0o700)
        };
        assert_eq!(check_handler_stat(fifo, me), vec![FileProblem::NotRegular]);
    }

    #[test]
    fn allow_lists_limit_senders() {
        let tmp = tree();
        let root = tmp.path();
        write(root, "lock", 0o700);
        fs::write(
            root.join("lock.from"),
            "# only these\nlaptop\n\nphone # mine\n",
        )
        .unwrap();
        fs::set_permissions(root.join("lock.from"), fs::Permissions::from_mode(0o600)).unwrap();
        let Resolution::Found(handler) = resolve(root, EVENT_MESSAGE, "lock") else {
            panic!()
        };
        let sender = |name: &str| Sender {
            name: name.into(),
            id: "0000-0000-0000-0000".into(),
        };
        assert_eq!(handler.allows(Some(&sender("laptop"))), Ok(()));
        assert_eq!(handler.allows(Some(&sender("phone"))), Ok(()));
        let reason = handler.allows(Some(&sender("desk"))).unwrap_err();
        assert!(reason.contains("desk is not in lock.from"), "{reason}");
        assert!(handler.allows(None).unwrap_err().contains("no sender"));

        // An allow list others may write is refused: it could let anyone in.
        fs::set_permissions(root.join("lock.from"), fs::Permissions::from_mode(0o666)).unwrap();
        assert!(refused(root, "lock").contains("lock.from is writable"));
    }

    /// The hole this closes: a handler that is a link into a directory others may write was
    /// checked and then run by its path, so they could swap what ran.
    #[test]
    fn a_link_into_a_directory_others_may_write_is_refused_and_reported() {
        let tmp = tree();
        let root = tmp.path().join("handlers");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).unwrap();
        let open = tmp.path().join("open");
        write(&open, "t.sh", 0o700);
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        symlink(open.join("t.sh"), root.join("swap")).unwrap();
        // A sticky directory (like /tmp) protects the files of ours in it.
        let sticky = tmp.path().join("sticky");
        write(&sticky, "mine.sh", 0o700);
        fs::set_permissions(&sticky, fs::Permissions::from_mode(0o1777)).unwrap();
        symlink(sticky.join("mine.sh"), root.join("mine")).unwrap();

        let reason = refused(&root, "swap");
        let open_real = open.canonicalize().unwrap();
        assert!(
            reason.contains(&format!(
                "swap leads out of the handler directory (through a symbolic link), and directory {} is writable by group or others (mode 0777)",
                open_real.display()
            )),
            "{reason}"
        );
        assert!(reason.contains("chmod go-w"), "{reason}");
        assert_eq!(found(&root, EVENT_MESSAGE, "mine").0, "mine");

        let report = crate::scan::scan(&root);
        let problem = report
            .problems
            .iter()
            .find(|p| p.file == "swap")
            .unwrap_or_else(|| panic!("{:?}", report.problems));
        assert_eq!(problem.kind, "writable_by_others");
        assert!(
            problem.message.contains(&open_real.display().to_string()),
            "{problem:?}"
        );
        let runs = |file: &str| {
            report
                .handlers
                .iter()
                .find(|e| e.file == file)
                .unwrap()
                .runs
        };
        assert!(!runs("swap"));
        assert!(runs("mine"));
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    }

    #[test]
    fn an_executable_without_interpreter_line_is_refused() {
        let tmp = tree();
        let root = tmp.path();
        fs::write(root.join("bare"), "echo no interpreter line\n").unwrap();
        fs::set_permissions(root.join("bare"), fs::Permissions::from_mode(0o700)).unwrap();
        let reason = refused(root, "bare");
        assert!(
            reason.contains("bare starts neither with a #! line nor as a program"),
            "{reason}"
        );
        let report = crate::scan::scan(root);
        assert_eq!(report.problems[0].kind, "not_a_program");
        // A program is fine.
        fs::copy("/bin/true", root.join("prog")).unwrap();
        fs::set_permissions(root.join("prog"), fs::Permissions::from_mode(0o700)).unwrap();
        let Resolution::Found(prog) = resolve(root, EVENT_MESSAGE, "prog") else {
            panic!()
        };
        assert_eq!(prog.file.format, Format::Elf);
    }
}
