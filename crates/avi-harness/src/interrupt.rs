//! Stopping cleanly on Ctrl-C (SIGINT), SIGTERM, or the end of a parent's
//! pipe: the signal only sets a flag ([`flag`]); the training loop notices
//! it at its next block boundary (at most `check_every` = 100 steps later)
//! and ends the fit with status `interrupted`, whose report is written
//! (atomically) before the command returns the [`Interrupted`] error, which
//! the binary turns into exit 130 after every claim has been dropped.
//! Exiting from the signal thread while libtorch computes would crash in
//! libtorch's static destructors, so that is only the last resort
//! ([`request`]: a phase that never reaches a block boundary).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// The error of an interrupted command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Whether a stop was requested.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Ask the process to stop. If it has not stopped `grace` later (a phase
/// that never reaches a check), release the claims and exit 130 between
/// writes.
pub fn request(grace: Duration) {
    REQUESTED.store(true, Ordering::SeqCst);
    std::thread::sleep(grace);
    crate::claim::release_all();
    eprintln!("avi: interrupted");
    crate::report::exit_between_writes(130)
}

/// The flag a fit watches ([`avi_inference::FitRequest::interrupt`]): set
/// when a stop was requested.
pub fn flag() -> &'static AtomicBool {
    &REQUESTED
}

/// Request a stop without the grace period's exit: for a parent that
/// learns of an interrupt from a child's exit code (130).
pub fn set() {
    REQUESTED.store(true, Ordering::SeqCst);
}
