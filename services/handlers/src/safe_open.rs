//! Opening a handler file (or an allow list) so that what is checked is what is used.
//!
//! The path is resolved here, one component at a time from `/`, each with
//! `openat(O_PATH | O_NOFOLLOW)` on the directory descriptor before it, and each descriptor is
//! `fstat`ed. Symbolic links are read through their own descriptor and followed by this code, not
//! by the kernel, so every directory passed through (also those holding the links, and those a
//! link leads to) is checked, and the file is opened from the very descriptor that was checked.
//! The caller then checks the file's own descriptor and runs or reads that descriptor: nobody can
//! swap the file between the check and the use.
//!
//! A directory may be passed through when it belongs to this user or root and group and others
//! cannot write it: whoever can change a directory can put another program in place of the
//! handler. Two exceptions:
//!
//! - Outside the handler directory, a sticky directory that others may write (`/tmp`, mode 1777)
//!   is safe for entries that belong to this user or root, since nobody else can rename or delete
//!   them there.
//! - Under a user manager, systemd's `PrivateUsers=` leaves root unmapped, so root's files show
//!   as owned by the overflow uid ("nobody"), like every other user's. There, an owner shown as
//!   the overflow uid is accepted on the way to the handler directory (`/`, `/home`: whoever
//!   controls those controls the configuration too), and nowhere else.

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, OnceLock};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open, openat, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};

use crate::resolve::{FileProblem, Stat, trusted_owner};

/// As many symbolic links as the kernel follows in one path lookup.
const MAX_LINKS: u32 = 40;

/// Whose files and directories may decide what runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trust {
    pub own_uid: u32,
    /// The uid that stands for every user this process's user namespace does not map, when
    /// root is one of them (the overflow uid, 65534); `None` where root is mapped.
    pub unidentified: Option<u32>,
}

impl Trust {
    /// This process's: its uid, and whether it runs in a user namespace without root.
    pub fn current() -> Self {
        static UNIDENTIFIED: OnceLock<Option<u32>> = OnceLock::new();
        let unidentified = *UNIDENTIFIED.get_or_init(|| {
            let uid_map = fs::read_to_string("/proc/self/uid_map").ok()?;
            if maps_root(&uid_map) {
                return None;
            }
            let overflow = fs::read_to_string("/proc/sys/kernel/overflowuid").ok();
            Some(
                overflow
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(65534),
            )
        });
        Self {
            own_uid: nix::unistd::getuid().as_raw(),
            unidentified,
        }
    }

    pub fn trusts(&self, uid: u32) -> bool {
        trusted_owner(uid, self.own_uid)
    }

    fn hides(&self, uid: u32) -> bool {
        self.unidentified == Some(uid) && !self.trusts(uid)
    }

    /// The problem of an owner that is not trusted.
    pub fn owner_problem(&self, uid: u32) -> FileProblem {
        if self.hides(uid) {
            FileProblem::HiddenOwner { uid }
        } else {
            FileProblem::WrongOwner { uid }
        }
    }
}

/// Whether a `/proc/PID/uid_map` maps uid 0 of the namespace.
fn maps_root(uid_map: &str) -> bool {
    uid_map.lines().any(|line| {
        let mut fields = line.split_whitespace().map(str::parse::<u64>);
        matches!((fields.next(), fields.nth(1)), (Some(Ok(0)), Some(Ok(count))) if count > 0)
    })
}

/// What a problem is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Dir(PathBuf),
    Link(PathBuf),
    /// The file that was to be opened, whatever its path.
    Target,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathProblem {
    pub place: Place,
    pub problem: FileProblem,
}

/// What the walk ended at.
#[derive(Debug)]
pub enum End {
    /// The file or directory, opened. A file is opened for reading, unless that is not
    /// permitted (an execute-only program): then the descriptor is an `O_PATH` one.
    Opened(Opened),
    /// A component does not exist. `through_link`: it was named by a symbolic link.
    Missing { through_link: bool },
    /// The walk could not go on.
    Stopped(PathProblem),
}

#[derive(Debug)]
pub struct Opened {
    pub fd: OwnedFd,
    pub stat: Stat,
    /// Device and inode: the identity of what was opened.
    pub id: (u64, u64),
    pub readable: bool,
    /// The path it was found at, every link resolved.
    pub real: PathBuf,
}

#[derive(Debug)]
pub struct Walk {
    /// The handler directory with every link resolved, once the walk got that far.
    pub root_real: Option<PathBuf>,
    /// What is wrong on the way, in the order met; the walk goes on past these.
    pub problems: Vec<PathProblem>,
    pub end: End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Dir,
    File,
}

enum Step {
    Name {
        name: OsString,
        from_link: bool,
    },
    /// Everything before this step led to the handler directory.
    HandlerDir,
}

/// The directory the walk is in.
struct Current {
    fd: OwnedFd,
    stat: FileStat,
    real: PathBuf,
    /// Its entry was taken out of a directory that others may write, protected by the sticky
    /// bit only if it belongs to this user or root: an owner that cannot be identified will not
    /// do.
    strict_owner: bool,
}

struct Walker<'a> {
    trust: &'a Trust,
    root_real: Option<PathBuf>,
    /// Directories passed on the way to the handler directory, whose owner could not be
    /// identified: passing them again later is as safe as it was then.
    ancestors: HashSet<(u64, u64)>,
    problems: Vec<PathProblem>,
}

fn file_id(stat: &FileStat) -> (u64, u64) {
    (stat.st_dev, stat.st_ino)
}

fn kind(stat: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits())
}

pub fn stat_of(stat: &FileStat) -> Stat {
    let kind = kind(stat);
    Stat {
        uid: stat.st_uid,
        mode: stat.st_mode & 0o7777,
        is_file: kind == SFlag::S_IFREG,
        is_dir: kind == SFlag::S_IFDIR,
    }
}

fn unreadable(place: Place, error: Errno) -> PathProblem {
    PathProblem {
        place,
        problem: FileProblem::Unreadable {
            error: std::io::Error::from(error).to_string(),
        },
    }
}

impl Walker<'_> {
    fn in_tree(&self, real: &Path) -> bool {
        self.root_real
            .as_deref()
            .is_some_and(|root| real.starts_with(root))
    }

    fn owner_ok(&self, uid: u32, id: (u64, u64), before_root: bool, strict: bool) -> bool {
        self.trust.trusts(uid)
            || (!strict && self.trust.hides(uid) && (before_root || self.ancestors.contains(&id)))
    }

    /// Checks `dir` as the walk takes an entry out of it (or ends in it). Returns whether the
    /// entry must belong to this user or root (the directory is safe only through its sticky
    /// bit).
    fn pass(&mut self, dir: &Current, before_root: bool) -> bool {
        let in_tree = !before_root && self.in_tree(&dir.real);
        let stat = &dir.stat;
        let id = file_id(stat);
        // What holds handlers must be known to be safe.
        if !self.owner_ok(stat.st_uid, id, before_root, dir.strict_owner || in_tree) {
            self.problems.push(PathProblem {
                place: Place::Dir(dir.real.clone()),
                problem: self.trust.owner_problem(stat.st_uid),
            });
        }
        if before_root && self.trust.hides(stat.st_uid) {
            self.ancestors.insert(id);
        }
        let mode = stat.st_mode & 0o7777;
        if mode & 0o022 == 0 {
            return false;
        }
        if !in_tree && mode & 0o1000 != 0 {
            return true;
        }
        self.problems.push(PathProblem {
            place: Place::Dir(dir.real.clone()),
            problem: FileProblem::Writable { mode },
        });
        false
    }
}

fn open_slash() -> Result<Current, PathProblem> {
    let place = || Place::Dir(PathBuf::from("/"));
    let fd = open(
        "/",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| unreadable(place(), e))?;
    let stat = fstat(&fd).map_err(|e| unreadable(place(), e))?;
    Ok(Current {
        fd,
        stat,
        real: PathBuf::from("/"),
        strict_owner: false,
    })
}

/// The components of `path` as walk steps ("/" is where every walk starts).
fn push_components(steps: &mut VecDeque<Step>, path: &Path, from_link: bool) {
    for component in path.components().rev() {
        let name = match component {
            Component::Normal(name) => name.to_owned(),
            Component::ParentDir => OsString::from(".."),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => continue,
        };
        steps.push_front(Step::Name { name, from_link });
    }
}

/// Walks from `/` to `root/rel...` (the handler directory, then names below it), checking
/// everything on the way, and opens what it ends at.
pub fn walk(root: &Path, rel: &[&str], want: Want, trust: &Trust) -> Walk {
    let mut walker = Walker {
        trust,
        root_real: None,
        ancestors: HashSet::new(),
        problems: Vec::new(),
    };
    let end = walk_steps(&mut walker, root, rel, want);
    Walk {
        root_real: walker.root_real,
        problems: walker.problems,
        end,
    }
}

fn walk_steps(walker: &mut Walker<'_>, root: &Path, rel: &[&str], want: Want) -> End {
    let absolute_root;
    let root = if root.is_absolute() {
        root
    } else {
        match std::env::current_dir() {
            Ok(cwd) => {
                absolute_root = cwd.join(root);
                &absolute_root
            }
            Err(e) => {
                return End::Stopped(PathProblem {
                    place: Place::Dir(root.to_owned()),
                    problem: FileProblem::Unreadable {
                        error: e.to_string(),
                    },
                });
            }
        }
    };
    let mut steps = VecDeque::new();
    push_components(&mut steps, root, false);
    steps.push_back(Step::HandlerDir);
    for name in rel {
        steps.push_back(Step::Name {
            name: OsString::from(name),
            from_link: false,
        });
    }
    let mut dir = match open_slash() {
        Ok(dir) => dir,
        Err(problem) => return End::Stopped(problem),
    };
    let mut before_root = true;
    let mut links = 0;
    while let Some(step) = steps.pop_front() {
        let (name, from_link) = match step {
            Step::HandlerDir => {
                before_root = false;
                walker.root_real = Some(dir.real.clone());
                continue;
            }
            Step::Name { name, from_link } => (name, from_link),
        };
        if name == "." {
            continue;
        }
        if name == ".." {
            let parent = openat(
                &dir.fd,
                "..",
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .and_then(|fd| fstat(&fd).map(|stat| (fd, stat)));
            match parent {
                Ok((fd, stat)) => {
                    let mut real = dir.real.clone();
                    real.pop();
                    dir = Current {
                        fd,
                        stat,
                        real,
                        strict_owner: false,
                    };
                }
                Err(e) => return End::Stopped(unreadable(Place::Dir(dir.real.clone()), e)),
            }
            continue;
        }
        let is_last = steps.is_empty();
        let entry_path = dir.real.join(&name);
        let entry = match openat(
            &dir.fd,
            name.as_os_str(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .and_then(|fd| fstat(&fd).map(|stat| (fd, stat)))
        {
            Ok(entry) => entry,
            Err(Errno::ENOENT) => {
                return End::Missing {
                    through_link: from_link,
                };
            }
            Err(e) => return End::Stopped(unreadable(Place::Dir(entry_path), e)),
        };
        let (entry_fd, entry_stat) = entry;
        let strict = walker.pass(&dir, before_root);
        match kind(&entry_stat) {
            SFlag::S_IFLNK => {
                let link_id = file_id(&entry_stat);
                if !walker.owner_ok(entry_stat.st_uid, link_id, before_root, strict) {
                    walker.problems.push(PathProblem {
                        place: Place::Link(entry_path.clone()),
                        problem: walker.trust.owner_problem(entry_stat.st_uid),
                    });
                }
                links += 1;
                if links > MAX_LINKS {
                    return End::Stopped(PathProblem {
                        place: Place::Link(entry_path),
                        problem: FileProblem::TooManyLinks,
                    });
                }
                let target = match readlinkat(&entry_fd, "") {
                    Ok(target) => PathBuf::from(target),
                    Err(e) => return End::Stopped(unreadable(Place::Link(entry_path), e)),
                };
                if target.is_absolute() {
                    dir = match open_slash() {
                        Ok(slash) => slash,
                        Err(problem) => return End::Stopped(problem),
                    };
                }
                push_components(&mut steps, &target, true);
            }
            SFlag::S_IFDIR if !(is_last && want == Want::File) => {
                dir = Current {
                    fd: entry_fd,
                    stat: entry_stat,
                    real: entry_path,
                    strict_owner: strict,
                };
            }
            SFlag::S_IFREG if is_last && want == Want::File => {
                return open_file(&dir, &name, entry_fd, &entry_stat, entry_path);
            }
            _ if is_last => {
                return End::Stopped(PathProblem {
                    place: Place::Target,
                    problem: if want == Want::File {
                        FileProblem::NotRegular
                    } else {
                        FileProblem::NotADirectory
                    },
                });
            }
            _ => {
                return End::Stopped(PathProblem {
                    place: Place::Dir(entry_path),
                    problem: FileProblem::NotADirectory,
                });
            }
        }
    }
    match want {
        Want::Dir => {
            // The same rules as for passing through it.
            walker.pass(&dir, false);
            End::Opened(Opened {
                id: file_id(&dir.stat),
                stat: stat_of(&dir.stat),
                fd: dir.fd,
                readable: false,
                real: dir.real,
            })
        }
        // The last name was a link to a directory, or `..`.
        Want::File => End::Stopped(PathProblem {
            place: Place::Target,
            problem: FileProblem::NotRegular,
        }),
    }
}

/// Opens the regular file `name` in `dir` for reading, and makes sure it is the one that was
/// checked (`checked_fd`, an `O_PATH` descriptor: opening that way has no side effects, while
/// opening a device or FIFO for reading may).
fn open_file(
    dir: &Current,
    name: &OsStr,
    checked_fd: OwnedFd,
    checked: &FileStat,
    real: PathBuf,
) -> End {
    let opened = openat(
        &dir.fd,
        name,
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY
            | OFlag::O_NONBLOCK,
        Mode::empty(),
    );
    let (fd, readable) = match opened {
        Ok(fd) => (fd, true),
        // An execute-only program: it can still be run from the checked descriptor.
        Err(Errno::EACCES) => (checked_fd, false),
        Err(Errno::ENOENT | Errno::ELOOP) => return changed(),
        Err(e) => return End::Stopped(unreadable(Place::Target, e)),
    };
    let stat = match fstat(fd.as_fd()) {
        Ok(stat) => stat,
        Err(e) => return End::Stopped(unreadable(Place::Target, e)),
    };
    if file_id(&stat) != file_id(checked) {
        return changed();
    }
    End::Opened(Opened {
        id: file_id(&stat),
        stat: stat_of(&stat),
        fd,
        readable,
        real,
    })
}

fn changed() -> End {
    End::Stopped(PathProblem {
        place: Place::Target,
        problem: FileProblem::Changed,
    })
}

/// How a file to be executed starts: what the kernel will make of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `#!`: the kernel runs the interpreter with the file's path (`/dev/fd/N`).
    Script,
    /// `\x7fELF`: a program.
    Elf,
    /// Anything else, which the kernel refuses (ENOEXEC).
    Other,
    /// Not readable to this user, so not known (only a program can run then).
    Unknown,
}

/// Reads the first bytes of an opened file (without moving its offset).
pub fn format_of(opened: &Opened) -> Format {
    if !opened.readable {
        return Format::Unknown;
    }
    let Ok(file) = opened.fd.try_clone().map(fs::File::from) else {
        return Format::Unknown;
    };
    let mut head = [0u8; 4];
    let mut filled = 0;
    while filled < head.len() {
        match file.read_at(&mut head[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return Format::Unknown,
        }
    }
    let head = &head[..filled];
    if head.starts_with(b"#!") {
        Format::Script
    } else if head == b"\x7fELF" {
        Format::Elf
    } else {
        Format::Other
    }
}

/// An opened and checked file, shared by the run that uses it.
#[derive(Debug, Clone)]
pub struct CheckedFile {
    pub fd: Arc<OwnedFd>,
    pub id: (u64, u64),
    pub format: Format,
    pub real: PathBuf,
}

/// Two checked files are the same when they are the same file.
impl PartialEq for CheckedFile {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for CheckedFile {}

/// Names a place for messages, relative to the handler directory where it is in it.
pub fn label(place: &Place, root_real: Option<&Path>, target: &str) -> String {
    let (path, noun) = match place {
        Place::Dir(path) => (path, "directory"),
        Place::Link(path) => (path, "the symbolic link"),
        Place::Target => return target.to_owned(),
    };
    if let Some(root) = root_real {
        if path == root && matches!(place, Place::Dir(_)) {
            return "the handler directory".to_owned();
        }
        if let Ok(inner) = path.strip_prefix(root) {
            return format!("{noun} {}", inner.display());
        }
        if root.starts_with(path) {
            return format!("{noun} {} (above the handler directory)", path.display());
        }
    }
    format!("{noun} {}", path.display())
}

/// Whether `place` is outside the handler directory and not above it: reached by a link.
pub fn is_elsewhere(place: &Place, root_real: Option<&Path>) -> bool {
    let path = match place {
        Place::Dir(path) | Place::Link(path) => path,
        Place::Target => return false,
    };
    root_real.is_some_and(|root| !path.starts_with(root) && !root.starts_with(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn tree() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o700)).unwrap();
        tmp
    }

    fn write(path: &Path, mode: u32) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, "#!/bin/sh\n").unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mkdir(path: &Path, mode: u32) {
        fs::create_dir_all(path).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn me() -> Trust {
        Trust {
            own_uid: nix::unistd::getuid().as_raw(),
            unidentified: None,
        }
    }

    fn chown(path: &Path, uid: u32) {
        std::os::unix::fs::lchown(path, Some(uid), None).unwrap();
    }

    #[test]
    fn uid_maps() {
        assert!(maps_root("         0          0 4294967295\n"));
        assert!(maps_root("0 100000 65536\n"));
        assert!(!maps_root("      1000       1000          1\n"));
        assert!(!maps_root(""));
    }

    #[test]
    fn a_plain_file_opens_with_its_real_path() {
        let tmp = tree();
        let root = tmp.path().join("handlers");
        mkdir(&root, 0o700);
        write(&root.join("a/b.sh"), 0o700);
        let plain = walk(&root, &["a", "b.sh"], Want::File, &me());
        assert_eq!(plain.problems, vec![]);
        let End::Opened(opened) = plain.end else {
            panic!("{:?}", plain.end)
        };
        assert!(opened.readable && opened.stat.is_file);
        assert_eq!(opened.real, root.canonicalize().unwrap().join("a/b.sh"));
        assert_eq!(format_of(&opened), Format::Script);
        assert_eq!(plain.root_real, Some(root.canonicalize().unwrap()));
    }

    #[test]
    fn every_directory_a_link_passes_through_is_checked() {
        let tmp = tree();
        let root = tmp.path().join("handlers");
        mkdir(&root, 0o700);
        let open = tmp.path().join("open");
        mkdir(&open, 0o777);
        write(&open.join("t.sh"), 0o700);
        symlink(open.join("t.sh"), root.join("x")).unwrap();
        let linked = walk(&root, &["x"], Want::File, &me());
        assert_eq!(
            linked.problems,
            vec![PathProblem {
                place: Place::Dir(open.canonicalize().unwrap()),
                problem: FileProblem::Writable { mode: 0o777 },
            }]
        );
        assert!(is_elsewhere(
            &linked.problems[0].place,
            linked.root_real.as_deref()
        ));
        // The file is still opened: the caller refuses it for the problem.
        assert!(matches!(linked.end, End::Opened(_)));

        // A link that makes a directory of the handler directory point elsewhere.
        let sub = tmp.path().join("sub");
        mkdir(&sub, 0o770);
        write(&sub.join("y"), 0o700);
        symlink("../sub", root.join("s")).unwrap();
        let through_dir = walk(&root, &["s", "y"], Want::File, &me());
        assert_eq!(
            through_dir.problems,
            vec![PathProblem {
                place: Place::Dir(sub.canonicalize().unwrap()),
                problem: FileProblem::Writable { mode: 0o770 },
            }]
        );
    }

    #[test]
    fn a_sticky_directory_is_safe_for_entries_of_ours_only() {
        let tmp = tree();
        let root = tmp.path().join("handlers");
        mkdir(&root, 0o700);
        let sticky = tmp.path().join("sticky");
        mkdir(&sticky, 0o1777);
        write(&sticky.join("mine.sh"), 0o700);
        symlink(sticky.join("mine.sh"), root.join("mine")).unwrap();
        let walk_mine = walk(&root, &["mine"], Want::File, &me());
        assert_eq!(walk_mine.problems, vec![]);
        assert!(matches!(walk_mine.end, End::Opened(_)));

        // Another user's directory in it is not: its owner may swap what is inside.
        let theirs = sticky.join("theirs");
        mkdir(&theirs, 0o755);
        write(&theirs.join("t.sh"), 0o700);
        chown(&theirs, 65534);
        symlink(theirs.join("t.sh"), root.join("t")).unwrap();
        let walk_theirs = walk(&root, &["t"], Want::File, &me());
        assert_eq!(
            walk_theirs.problems,
            vec![PathProblem {
                place: Place::Dir(theirs.canonicalize().unwrap()),
                problem: FileProblem::WrongOwner { uid: 65534 },
            }]
        );
        // ...not even where the overflow uid might be root: a sticky directory's entries must
        // be known to be ours.
        let hidden = Trust {
            unidentified: Some(65534),
            ..me()
        };
        let walk_hidden = walk(&root, &["t"], Want::File, &hidden);
        assert_eq!(
            walk_hidden.problems[0].problem,
            FileProblem::HiddenOwner { uid: 65534 }
        );
        // The handler directory itself gets no sticky exception.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o1777)).unwrap();
        let walk_root = walk(&root, &["mine"], Want::File, &me());
        assert_eq!(
            walk_root.problems[0],
            PathProblem {
                place: Place::Dir(root.canonicalize().unwrap()),
                problem: FileProblem::Writable { mode: 0o1777 },
            }
        );
    }

    #[test]
    fn an_unidentified_owner_is_accepted_only_on_the_way_to_the_handler_directory() {
        let tmp = tree();
        let home = tmp.path().join("home");
        let root = home.join("handlers");
        mkdir(&root, 0o700);
        write(&home.join("bin/tool"), 0o700);
        symlink(home.join("bin/tool"), root.join("tool")).unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        write(&elsewhere.join("x"), 0o700);
        symlink(elsewhere.join("x"), root.join("x")).unwrap();
        mkdir(&home, 0o755);
        mkdir(&elsewhere, 0o755);
        chown(&home, 65534);
        chown(&elsewhere, 65534);

        let strict = me();
        let walk_strict = walk(&root, &["tool"], Want::File, &strict);
        assert_eq!(
            walk_strict.problems[0].problem,
            FileProblem::WrongOwner { uid: 65534 }
        );
        let sandboxed = Trust {
            unidentified: Some(65534),
            ..me()
        };
        // home leads to the handler directory, and is passed again on the way to bin/tool.
        let walk_tool = walk(&root, &["tool"], Want::File, &sandboxed);
        assert_eq!(walk_tool.problems, vec![]);
        let walk_x = walk(&root, &["x"], Want::File, &sandboxed);
        assert_eq!(
            walk_x.problems,
            vec![PathProblem {
                place: Place::Dir(elsewhere.canonicalize().unwrap()),
                problem: FileProblem::HiddenOwner { uid: 65534 },
            }]
        );
    }

    #[test]
    fn links_that_dangle_or_loop_and_things_that_are_not_files() {
        let tmp = tree();
        let root = tmp.path().join("handlers");
        mkdir(&root, 0o700);
        symlink(root.join("missing"), root.join("dangling")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        mkdir(&root.join("dir"), 0o700);
        nix::unistd::mkfifo(&root.join("fifo"), Mode::from_bits_truncate(0o700)).unwrap();
        let end = |name: &str| walk(&root, &[name], Want::File, &me()).end;
        assert!(matches!(
            end("dangling"),
            End::Missing { through_link: true }
        ));
        assert!(matches!(
            end("absent"),
            End::Missing {
                through_link: false
            }
        ));
        let problem = |end: End| match end {
            End::Stopped(p) => p.problem,
            other => panic!("{other:?}"),
        };
        assert_eq!(problem(end("loop")), FileProblem::TooManyLinks);
        assert_eq!(problem(end("dir")), FileProblem::NotRegular);
        // A FIFO is not opened for reading (that could block, or for a device do something).
        assert_eq!(problem(end("fifo")), FileProblem::NotRegular);
        assert!(matches!(
            walk(&root, &["dir"], Want::Dir, &me()).end,
            End::Opened(_)
        ));
    }

    #[test]
    fn formats() {
        let tmp = tree();
        let root = tmp.path();
        for (name, text, format) in [
            ("script", &b"#!/bin/sh\n"[..], Format::Script),
            ("elf", &b"\x7fELF\x02\x01"[..], Format::Elf),
            ("text", &b"echo hi\n"[..], Format::Other),
            ("empty", &b""[..], Format::Other),
        ] {
            fs::write(root.join(name), text).unwrap();
            let End::Opened(opened) = walk(root, &[name], Want::File, &me()).end else {
                panic!("{name}")
            };
            assert_eq!(format_of(&opened), format, "{name}");
        }
    }
}
