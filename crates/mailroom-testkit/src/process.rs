//! A child process we spawned and may signal. Signals go only to our own, not yet reaped child,
//! so its PID cannot have been reused by another process.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

use crate::error::{Result, TestkitError};

const POLL: Duration = Duration::from_millis(20);

/// Start of the line [`ChildProcess::spawn`] writes into the log before each start.
pub(crate) const START_MARKER: &str = "--- mailroom-testkit: starting ";

/// `binary arg1 arg2 ...` for logs and error messages (lossy, unquoted).
pub(crate) fn command_line<S: AsRef<OsStr>>(binary: &Path, args: &[S]) -> String {
    let mut line = binary.display().to_string();
    for arg in args {
        line.push(' ');
        line.push_str(&arg.as_ref().to_string_lossy());
    }
    line
}

/// A running (or exited but reaped-by-us) child process.
#[derive(Debug)]
pub(crate) struct ChildProcess {
    child: Child,
    binary: PathBuf,
    exit: Option<ExitStatus>,
}

impl ChildProcess {
    /// Spawns `binary args...` with stdin closed and stdout/stderr appended to `log` (after a
    /// `--- mailroom-testkit: starting ...` marker line with the whole command).
    pub(crate) fn spawn<S: AsRef<OsStr>>(binary: &Path, args: &[S], log: &Path) -> Result<Self> {
        let io_err = |what, source| TestkitError::Io {
            what,
            path: log.to_path_buf(),
            source,
        };
        let command = command_line(binary, args);
        let mut out: File = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| io_err("cannot open log", e))?;
        writeln!(out, "{START_MARKER}{command}").map_err(|e| io_err("cannot write log", e))?;
        let err = out.try_clone().map_err(|e| io_err("cannot open log", e))?;
        let child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|source| TestkitError::Spawn {
                binary: binary.to_path_buf(),
                command,
                source,
            })?;
        Ok(Self {
            child,
            binary: binary.to_path_buf(),
            exit: None,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status once the process has exited (reaps it); `None` while it runs.
    pub(crate) fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            // An error here means the child was already reaped; treat it as gone.
            match self.child.try_wait() {
                Ok(status) => self.exit = status,
                Err(_) => self.exit = Some(ExitStatus::default()),
            }
        }
        self.exit
    }

    pub(crate) fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Sends SIGTERM if the process still runs (it has not been reaped, so the PID is ours).
    pub(crate) fn send_term(&mut self) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        kill_process(Pid::from_child(&self.child), Signal::TERM).map_err(|e| TestkitError::Signal {
            action: "terminate",
            binary: self.binary.clone(),
            pid: self.pid(),
            source: e.into(),
        })
    }

    /// Waits until the process exits or `deadline` passes; returns whether it exited.
    pub(crate) fn wait_until(&mut self, deadline: Instant) -> bool {
        loop {
            if !self.is_running() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(POLL);
        }
    }

    /// SIGKILL and reap.
    pub(crate) fn kill(&mut self) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        let (binary, pid) = (self.binary.clone(), self.child.id());
        let signal_err = |action, source| TestkitError::Signal {
            action,
            binary: binary.clone(),
            pid,
            source,
        };
        self.child.kill().map_err(|e| signal_err("kill", e))?;
        let status = self.child.wait().map_err(|e| signal_err("wait for", e))?;
        self.exit = Some(status);
        Ok(())
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    pub(crate) fn terminate(&mut self, grace: Duration) -> Result<()> {
        self.send_term()?;
        if self.wait_until(Instant::now() + grace) {
            return Ok(());
        }
        self.kill()
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        // Never leave a child behind: the owners stop it gracefully first, this is the backstop.
        let _ = self.kill();
    }
}
