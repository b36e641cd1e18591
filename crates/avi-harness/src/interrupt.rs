//! Stopping cleanly on Ctrl-C (SIGINT), SIGTERM, or the end of a parent's
//! pipe: the signal only sets a flag; the training loop's observer
//! ([`Watch`]) notices it at its next check (at most 100 steps later) and
//! unwinds the fit with an [`Interrupted`] panic payload, which the binary
//! turns into exit 130 after every claim has been dropped. Exiting from the
//! signal thread while libtorch computes would crash in libtorch's static
//! destructors, so that is only the last resort ([`request`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use avi_inference::Observer;

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// The panic payload and error of an interrupted command.
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

/// Unwind with [`Interrupted`] when a stop was requested (called between
/// steps, never inside a write).
pub fn check() {
    if requested() {
        std::panic::panic_any(Interrupted);
    }
}

/// An observer that checks for a stop at every check of the training loop,
/// then passes the call on.
pub struct Watch<'a>(pub &'a mut dyn Observer);

impl Observer for Watch<'_> {
    fn on_check(&mut self, done: usize, total: usize, elbo: f64) {
        check();
        self.0.on_check(done, total, elbo);
    }

    fn monitor_every(&self) -> usize {
        self.0.monitor_every()
    }

    fn on_monitor(
        &mut self,
        done: usize,
        seconds: f64,
        var: &avi_inference::Variational,
    ) -> avi_inference::Result<()> {
        self.0.on_monitor(done, seconds, var)
    }
}
