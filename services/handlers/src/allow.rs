//! Sender allow lists: `STEM.from` next to a handler names the devices whose messages may run
//! it, one device name or device ID per line; `#` starts a comment. Without the file, every
//! member may; with it, only those listed (an empty list: none).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use cnsprcy::identity::{DeviceId, DeviceName};
use cnsprcy::ipc::Sender;
use serde::Serialize;

use crate::resolve::{FileProblem, Use, open_checked, rel_name};
use crate::safe_open::{Format, Trust};

/// Allow lists are short; a larger file is a mistake, not a list to read whole.
const MAX_ALLOW_LIST_BYTES: u64 = 64 * 1024;

/// One line of an allow list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowEntry {
    /// As written.
    pub text: String,
    /// The device ID, when the line is one (in any grouping: `k3j9-x81q-...` or `k3j9x81q...`).
    #[serde(skip)]
    pub id: Option<DeviceId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowList {
    /// The file, relative to the handler directory.
    pub file: String,
    pub entries: Vec<AllowEntry>,
    /// Lines that are neither a device name nor an ID (1-based line number, text); they match
    /// nobody.
    pub bad_lines: Vec<(usize, String)>,
}

impl AllowList {
    /// Parses the text of an allow list named `file`.
    pub fn parse(file: &str, text: &str) -> Self {
        let mut entries = Vec::new();
        let mut bad_lines = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let id = line.parse::<DeviceId>().ok();
            if id.is_some() || DeviceName::new(line).is_ok() {
                entries.push(AllowEntry {
                    text: line.to_owned(),
                    id,
                });
            } else {
                bad_lines.push((index + 1, line.to_owned()));
            }
        }
        Self {
            file: file.to_owned(),
            entries,
            bad_lines,
        }
    }

    /// Reads the allow list `name` in the directory `dir` (segments below the handler directory
    /// `root`): `None` when there is none. It is read from the descriptor that was checked,
    /// like a handler is run from one. One that cannot be read, or that others could have
    /// written (it or a directory on its way), is an error: the handler is then refused rather
    /// than opened to everyone.
    pub fn load(
        root: &Path,
        dir: &[String],
        name: &str,
        trust: &Trust,
    ) -> Result<Option<Self>, String> {
        let rel = rel_name(dir, Some(name));
        let file = match open_checked(root, dir, name, Use::Read, trust) {
            Ok(None) => return Ok(None),
            Ok(Some(file)) => file,
            Err(findings) => {
                return Err(findings
                    .into_iter()
                    .next()
                    .map(|f| f.message)
                    .unwrap_or_else(|| format!("{rel} cannot be checked")));
            }
        };
        if file.format == Format::Unknown {
            return Err(format!("{rel} cannot be read; fix: chmod u+r"));
        }
        let mut text = String::new();
        let read = file
            .fd
            .try_clone()
            .map(File::from)
            .and_then(|f| f.take(MAX_ALLOW_LIST_BYTES + 1).read_to_string(&mut text));
        if let Err(e) = read {
            return Err(FileProblem::Unreadable {
                error: e.to_string(),
            }
            .describe(&rel, trust.own_uid));
        }
        if text.len() as u64 > MAX_ALLOW_LIST_BYTES {
            return Err(format!(
                "{rel} is larger than {} KiB; an allow list names a few devices",
                MAX_ALLOW_LIST_BYTES / 1024
            ));
        }
        Ok(Some(Self::parse(&rel, &text)))
    }

    /// Whether the list names `sender`, by name or by device ID.
    pub fn allows(&self, sender: &Sender) -> bool {
        let sender_id = sender.id.parse::<DeviceId>().ok();
        self.entries
            .iter()
            .any(|entry| entry.text == sender.name || (entry.id.is_some() && entry.id == sender_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnsprcy::identity::Identity;

    #[test]
    fn names_ids_comments_and_bad_lines() {
        let id = Identity::generate().device_id();
        let compact: String = id.to_string().replace('-', "");
        let text = format!("# devices\nlaptop\n  phone   # the phone\n{compact}\nnot a name\n\n");
        let list = AllowList::parse("x.from", &text);
        let texts: Vec<&str> = list.entries.iter().map(|e| e.text.as_str()).collect();
        assert_eq!(texts, ["laptop", "phone", compact.as_str()]);
        assert_eq!(list.bad_lines, vec![(5, "not a name".to_owned())]);

        let sender = |name: &str, id: &str| Sender {
            name: name.into(),
            id: id.into(),
        };
        let other = Identity::generate().device_id().to_string();
        assert!(list.allows(&sender("laptop", &other)));
        assert!(list.allows(&sender("renamed", &id.to_string())));
        assert!(!list.allows(&sender("desk", &other)));
        assert!(!list.allows(&sender("not a name", &other)));
        assert!(!AllowList::parse("x.from", "").allows(&sender("laptop", &other)));
    }
}
