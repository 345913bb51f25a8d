//! `cnspr handlers list` and `cnspr handlers check`: read the handler directory directly (no
//! daemon needed) through the handler service's own scanning rules, and print them for people
//! or, with --json, for scripts.

use std::process::ExitCode;

use clap::Subcommand;
use cnsprcy::env::DeviceEnv;
use cnsprcy_handlers::scan::{Entry, Report, scan};
use serde_json::json;

use crate::commands::{print_json, table};

#[derive(Debug, Subcommand)]
pub enum HandlersCommand {
    /// Show which file handles which tag and built-in event, and why
    #[command(long_about = "Show which file in the handler directory \
($XDG_CONFIG_HOME/cnsprcy/handlers, see `cnspr config path`) handles which tag and built-in event, \
and why: its exact name (clipboard/set), its name with one extension (clipboard/set.sh), a \
directory fallback (clipboard/_default handles clipboard/* without a handler of their own), the \
top-level fallback (_default handles every such tag), or a built-in event (_events/peer-up, \
_events/_default). The FROM column shows the devices a STEM.from file limits a handler to. \
Handlers that would be refused are marked; `cnspr handlers check` says why. Reads the directory \
itself: the daemon need not run. See docs/event_handlers.md.")]
    List {
        /// Print JSON ({"dir", "exists", "handlers": [...], "problems": [...], "notes": [...]})
        #[arg(long)]
        json: bool,
    },
    /// Find what is wrong in the handler directory; exit status 1 if anything is
    #[command(
        long_about = "Check the handler directory for everything that keeps a \
handler from running or a file from ever being used: handlers that are not executable, not owned \
by you (or root), writable by group or others, or neither #! scripts nor programs; \
directories owned by others or writable by group or others, in the handler directory, above it, \
and wherever a symbolic link leads (a link into /srv/shared, mode 0777, is refused); two files \
for one tag (set and set.sh), names no tag can match (spaces, a leading '_' or '.', too \
deep), unknown event names in _events, and .from allow lists that cannot be read, have bad lines \
or belong to no handler. Prints each problem with its fix and exits with status 1 if there is \
any, 0 if there is none. Reads the directory itself: the daemon need not run."
    )]
    Check {
        /// Print JSON ({"dir", "ok", "handlers", "problems": [{"file","kind","message"}], "notes"})
        #[arg(long)]
        json: bool,
    },
}

pub fn run(env: &DeviceEnv, command: HandlersCommand) -> anyhow::Result<ExitCode> {
    let report = scan(&env.paths.handlers_dir);
    match command {
        HandlersCommand::List { json } => list(&report, json),
        HandlersCommand::Check { json } => check(&report, json),
    }
}

fn list(report: &Report, as_json: bool) -> anyhow::Result<ExitCode> {
    if as_json {
        print_json(report)?;
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", format_list(report));
    Ok(ExitCode::SUCCESS)
}

fn format_list(report: &Report) -> String {
    let dir = report.dir.display();
    if !report.exists {
        return format!(
            "The handler directory {dir} does not exist, so no message has a handler.\n\
             Create it and put an executable there named after a tag: for the tag clipboard/set,\n\
             {dir}/clipboard/set (or clipboard/set.sh). See docs/event_handlers.md.\n"
        );
    }
    if report.handlers.is_empty() {
        let mut out = format!(
            "No handlers in {dir}.\n\
             A handler is an executable named after a tag: for the tag clipboard/set,\n\
             {dir}/clipboard/set (or clipboard/set.sh). See docs/event_handlers.md.\n"
        );
        if !report.problems.is_empty() {
            out.push_str(&problems_line(report));
        }
        return out;
    }
    let mut rows = vec![["HANDLES", "FILE", "WHY", "FROM", "STATUS"].map(String::from)];
    for entry in &report.handlers {
        rows.push([
            entry.handles.clone(),
            entry.file.clone(),
            why(entry),
            from(entry),
            if entry.runs { "ok" } else { "refused" }.to_owned(),
        ]);
    }
    let mut out = format!("Handler directory {dir}\n\n");
    out.push_str(&table(&rows));
    let refused = report.handlers.iter().filter(|e| !e.runs).count();
    if refused > 0 {
        out.push_str(&format!(
            "\n{refused} handler{} would be refused; `cnspr handlers check` says why.\n",
            if refused == 1 { "" } else { "s" }
        ));
    } else if !report.problems.is_empty() {
        out.push('\n');
        out.push_str(&problems_line(report));
    }
    out
}

fn problems_line(report: &Report) -> String {
    let n = report.problems.len();
    format!(
        "{n} problem{} in the handler directory; `cnspr handlers check` lists them.\n",
        if n == 1 { "" } else { "s" }
    )
}

fn why(entry: &Entry) -> String {
    match &entry.extension {
        Some(ext) if entry.kind == cnsprcy_handlers::resolve::MatchKind::Extension => {
            format!("{} .{ext}", entry.kind.describe())
        }
        _ => entry.kind.describe().to_owned(),
    }
}

fn from(entry: &Entry) -> String {
    if entry.event.is_some() {
        return "-".to_owned();
    }
    match &entry.from {
        None => "any member".to_owned(),
        Some(info) if info.error.is_some() => format!("nobody ({} unusable)", info.file),
        Some(info) if info.devices.is_empty() => "nobody".to_owned(),
        Some(info) => info.devices.join(", "),
    }
}

fn check(report: &Report, as_json: bool) -> anyhow::Result<ExitCode> {
    let ok = report.problems.is_empty();
    if as_json {
        print_json(&json!({
            "dir": report.dir,
            "exists": report.exists,
            "ok": ok,
            "handlers": report.handlers.len(),
            "problems": report.problems,
            "notes": report.notes,
        }))?;
    } else {
        print!("{}", format_check(report));
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn format_check(report: &Report) -> String {
    let dir = report.dir.display();
    let mut out = String::new();
    let n = report.problems.len();
    if n == 0 {
        let handlers = report.handlers.len();
        out.push_str(&format!(
            "No problems in {dir} ({handlers} handler{}).\n",
            if handlers == 1 { "" } else { "s" }
        ));
    } else {
        out.push_str(&format!(
            "{n} problem{} in {dir}:\n",
            if n == 1 { "" } else { "s" }
        ));
        for problem in &report.problems {
            out.push_str(&format!("  - {}\n", problem.message));
        }
    }
    for note in &report.notes {
        out.push_str(&format!("note: {}\n", note.message));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn list_and_check_read_well() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        fs::set_permissions(root, fs::Permissions::from_mode(0o700)).unwrap();
        fs::create_dir(root.join("clipboard")).unwrap();
        for (file, mode) in [("clipboard/set.sh", 0o700), ("notify", 0o644)] {
            fs::write(root.join(file), "#!/bin/sh\n").unwrap();
            fs::set_permissions(root.join(file), fs::Permissions::from_mode(mode)).unwrap();
        }
        fs::write(root.join("clipboard/set.from"), "laptop\nphone\n").unwrap();
        let report = scan(root);
        let text = format_list(&report);
        assert!(
            text.contains(
                "clipboard/set  clipboard/set.sh  name with extension .sh  laptop, phone  ok"
            ),
            "{text}"
        );
        assert!(
            text.contains("notify         notify            exact name"),
            "{text}"
        );
        assert!(text.contains("1 handler would be refused"), "{text}");
        let text = format_check(&report);
        assert!(text.starts_with("1 problem in "), "{text}");
        assert!(text.contains("notify is not executable"), "{text}");
    }
}
