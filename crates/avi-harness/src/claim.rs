//! Exclusive claims on the runs of an experiment folder, so that two
//! `avi reproduce` processes on one folder never fit the same run twice.
//!
//! A run `runs/LABEL-SEED.json` is claimed by creating
//! `runs/LABEL-SEED.lock` with `create_new` (atomic: exactly one process
//! succeeds) holding the claimant's host, pid, process start time and the
//! claim's time. The claim is removed when the run's report is written, when
//! the run fails, and by the interrupt handler ([`release_all`]). A process
//! killed with SIGKILL leaves its claim behind: a claim whose process no
//! longer runs on this host is *stale* ([`Holder::is_stale`]); `--resume`
//! reports and takes it over, a plain run refuses.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Who holds a claim (the contents of a `.lock` file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Host name of the claimant.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// Its start time in clock ticks after boot (`/proc/PID/stat` field
    /// 22), to tell a reused pid from the claimant; `None` where unknown.
    #[serde(default)]
    pub proc_start: Option<u64>,
    /// When the claim was made (seconds since the Unix epoch).
    pub since: u64,
}

impl Holder {
    /// This process.
    pub fn me() -> Self {
        Self {
            host: host_name(),
            pid: std::process::id(),
            proc_start: proc_start_time(std::process::id()),
            since: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// Whether the claimant is known to be gone: same host, and no process
    /// with its pid and start time runs. A claim from another host is never
    /// stale (its process cannot be seen from here).
    pub fn is_stale(&self) -> bool {
        if self.host != host_name() || !Path::new("/proc/self/stat").exists() {
            return false;
        }
        match proc_start_time(self.pid) {
            None => true,
            Some(start) => self.proc_start.is_some_and(|s| s != start),
        }
    }

    /// `pid P on HOST since TIME`.
    pub fn describe(&self) -> String {
        format!(
            "pid {} on {} since {}",
            self.pid,
            self.host,
            crate::claim::utc(self.since)
        )
    }
}

/// An exclusive claim on one run; removed when dropped.
#[derive(Debug)]
pub struct RunClaim {
    path: PathBuf,
}

/// What [`RunClaim::acquire`] found.
#[derive(Debug)]
pub enum Claimed {
    /// The run is ours now.
    Ours(RunClaim),
    /// A live process holds it.
    Held(Holder),
    /// A process that no longer runs held it (taken over only when asked).
    Stale(Holder),
}

/// Claims held by this process, removed by [`release_all`] on interrupt.
static HELD: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

impl RunClaim {
    /// Try to claim `lock` (a `.lock` path). With `take_stale`, a stale
    /// claim is removed and taken over (it is read again just before, so a
    /// claim renewed meanwhile by another process is left alone).
    pub fn acquire(lock: &Path, take_stale: bool) -> Result<Claimed> {
        for _ in 0..3 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(lock)
            {
                Ok(mut f) => {
                    let mut text = serde_json::to_vec(&Holder::me())?;
                    text.push(b'\n');
                    f.write_all(&text)
                        .and_then(|()| f.sync_all())
                        .with_context(|| format!("cannot write {}", lock.display()))?;
                    HELD.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(lock.to_path_buf());
                    return Ok(Claimed::Ours(Self {
                        path: lock.to_path_buf(),
                    }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let Some(holder) = read_holder(lock)? else {
                        // Removed between our attempt and the read: retry.
                        continue;
                    };
                    if !holder.is_stale() {
                        return Ok(Claimed::Held(holder));
                    }
                    if !take_stale {
                        return Ok(Claimed::Stale(holder));
                    }
                    if read_holder(lock)?.as_ref() == Some(&holder) {
                        match std::fs::remove_file(lock) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                            Err(e) => {
                                return Err(e).with_context(|| {
                                    format!("cannot remove the stale claim {}", lock.display())
                                })
                            }
                        }
                    }
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", lock.display()))
                }
            }
        }
        // Three rounds lost to other processes: someone else is active.
        match read_holder(lock)? {
            Some(h) => Ok(Claimed::Held(h)),
            None => anyhow::bail!("cannot claim {}: it keeps changing", lock.display()),
        }
    }
}

impl Drop for RunClaim {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let mut held = HELD
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.retain(|p| p != &self.path);
    }
}

/// Remove every claim this process holds (the interrupt handler's cleanup).
pub fn release_all() {
    let held = HELD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for p in held.iter() {
        let _ = std::fs::remove_file(p);
    }
}

/// The holder recorded in a `.lock` file; `None` when the file is gone. A
/// file that cannot be parsed (a claim being written, or damaged) reads as
/// held by an unknown live process.
pub fn read_holder(lock: &Path) -> Result<Option<Holder>> {
    match std::fs::read_to_string(lock) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).unwrap_or(Holder {
            host: "an unknown host".into(),
            pid: 0,
            proc_start: None,
            since: 0,
        }))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", lock.display())),
    }
}

/// The claims (`*.lock`) in `runs_dir` with their holders.
pub fn claims_in(runs_dir: &Path) -> Result<Vec<(PathBuf, Holder)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(runs_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", runs_dir.display())),
    };
    for entry in entries {
        let p = entry?.path();
        if p.extension().is_some_and(|e| e == "lock") {
            if let Some(h) = read_holder(&p)? {
                out.push((p, h));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// This host's name (`/proc/sys/kernel/hostname`, else `/etc/hostname`).
pub(crate) fn host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Field 22 of `/proc/PID/stat` (the process's start time); `None` when
/// there is no such process (or no `/proc`).
fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time.
pub fn utc(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H.
/// Hinnant's days-to-civil algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_796_469_037), "2026-12-05T11:10:37Z");
    }

    /// One claim at a time; a second attempt sees the live holder (this
    /// process); dropping the claim frees the run; a claim of a process
    /// that is gone is stale and taken over only when asked.
    #[test]
    fn claims_are_exclusive_and_stale_ones_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("fvi-1.lock");
        let Claimed::Ours(claim) = RunClaim::acquire(&lock, false).unwrap() else {
            panic!("first claim refused");
        };
        match RunClaim::acquire(&lock, true).unwrap() {
            Claimed::Held(h) => assert_eq!(h.pid, std::process::id()),
            other => panic!("{other:?}"),
        }
        assert_eq!(claims_in(dir.path()).unwrap().len(), 1);
        drop(claim);
        assert!(!lock.exists());
        // A holder with this host but a start time no process has.
        let mut gone = Holder::me();
        gone.proc_start = gone.proc_start.map(|s| s + 1);
        std::fs::write(&lock, serde_json::to_string(&gone).unwrap()).unwrap();
        assert!(gone.is_stale());
        assert!(matches!(
            RunClaim::acquire(&lock, false).unwrap(),
            Claimed::Stale(_)
        ));
        let Claimed::Ours(claim) = RunClaim::acquire(&lock, true).unwrap() else {
            panic!("stale claim not taken over");
        };
        assert_eq!(read_holder(&lock).unwrap().unwrap().pid, std::process::id());
        drop(claim);
        // Another host's claim is never stale.
        gone.host = "elsewhere.invalid".into();
        assert!(!gone.is_stale());
    }
}
