//! What the load tests (`tests/tests/load.rs`) need besides [`crate::Device`]: a JSON-RPC client
//! for the public socket that never waits forever and tells an error answer from a closed
//! connection, and what a process holds (memory, descriptors, threads).

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Why a call got no result.
#[derive(Debug, Clone)]
pub enum CallError {
    /// The daemon answered with an error object.
    Rpc { code: i64, message: String },
    /// The connection ended (closed, reset, broken pipe) before the answer.
    Closed(String),
    /// No answer within the client's time-out: the daemon hung up on nothing and said nothing.
    TimedOut(Duration),
    /// The answer was not a JSON-RPC line.
    Garbage(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Rpc { code, message } => write!(f, "error {code}: {message}"),
            Self::Closed(why) => write!(f, "connection closed: {why}"),
            Self::TimedOut(after) => write!(f, "no answer within {after:?}"),
            Self::Garbage(line) => write!(f, "not a JSON-RPC answer: {line:?}"),
        }
    }
}

/// One connection to a device's public socket. Every read waits at most `timeout`.
pub struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
    /// What a read that timed out had read of a line so far.
    partial: Vec<u8>,
    next: u64,
    timeout: Duration,
}

impl Client {
    pub fn connect(socket: &Path, timeout: Duration) -> std::io::Result<Self> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            stream,
            partial: Vec::new(),
            next: 0,
            timeout,
        })
    }

    /// Sends one request and reads lines until its answer (or an answer with `id: null`, which
    /// the daemon sends when it refuses or closes the connection); notifications before it are
    /// skipped. A request that cannot be written (the daemon closed the connection) still reads
    /// what the daemon said before it closed.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, CallError> {
        self.next += 1;
        let id = self.next;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        let written = writeln!(self.stream, "{request}");
        if let Err(e) = &written
            && matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
        {
            return Err(CallError::TimedOut(self.timeout));
        }
        let started = Instant::now();
        loop {
            let line = match self.line(self.timeout.saturating_sub(started.elapsed())) {
                Ok(line) => line,
                Err(e) => match written {
                    Err(w) => return Err(CallError::Closed(w.to_string())),
                    Ok(()) => return Err(e),
                },
            };
            if line.get("method").is_some() {
                continue;
            }
            if line["id"] != json!(id) && !line["id"].is_null() {
                return Err(CallError::Garbage(line.to_string()));
            }
            if let Some(error) = line.get("error") {
                return Err(CallError::Rpc {
                    code: error["code"].as_i64().unwrap_or(0),
                    message: error["message"].as_str().unwrap_or("").to_owned(),
                });
            }
            return Ok(line["result"].clone());
        }
    }

    /// The next line as JSON, waiting at most `wait` (at least 1 ms). A line cut by the time-out
    /// is kept and completed by the next read.
    pub fn line(&mut self, wait: Duration) -> Result<Value, CallError> {
        let wait = wait.max(Duration::from_millis(1));
        let _ = self.stream.set_read_timeout(Some(wait));
        let read = self.reader.read_until(b'\n', &mut self.partial);
        let _ = self.stream.set_read_timeout(Some(self.timeout));
        match read {
            Ok(0) => Err(CallError::Closed("end of stream".into())),
            Ok(_) if self.partial.last() != Some(&b'\n') => {
                Err(CallError::Closed("end of stream within a line".into()))
            }
            Ok(_) => {
                let line = std::mem::take(&mut self.partial);
                serde_json::from_slice(&line)
                    .map_err(|_| CallError::Garbage(String::from_utf8_lossy(&line).into_owned()))
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(CallError::TimedOut(wait))
            }
            Err(e) => Err(CallError::Closed(e.to_string())),
        }
    }
}

/// What a process holds, from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Resident memory (`VmRSS`), KiB.
    pub rss_kib: u64,
    /// Proportional set size (`Pss` of `smaps_rollup`), KiB: shared pages divided among sharers.
    pub pss_kib: u64,
    /// Highest resident memory so far (`VmHWM`), KiB.
    pub hwm_kib: u64,
    /// Open file descriptors.
    pub fds: usize,
    pub threads: u64,
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RSS {:.1} MiB, PSS {:.1} MiB, {} fds, {} threads",
            self.rss_kib as f64 / 1024.0,
            self.pss_kib as f64 / 1024.0,
            self.fds,
            self.threads
        )
    }
}

/// `pid`'s usage now; zeros for what cannot be read (the process is gone).
pub fn usage(pid: u32) -> Usage {
    let field = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    Usage {
        rss_kib: field(&status, "VmRSS:"),
        hwm_kib: field(&status, "VmHWM:"),
        threads: field(&status, "Threads:"),
        pss_kib: field(&rollup, "Pss:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0),
    }
}

/// The `p` quantile (0..=1) of `samples` (sorted here); 0 for none.
pub fn quantile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    crate::bench::percentile(&sorted, p)
}
