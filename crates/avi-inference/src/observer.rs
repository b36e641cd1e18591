//! Hooks into the training loop.

use crate::method::Variational;
use crate::Result;

/// Hooks called by the training loop ([`crate::FitRequest::observer`]);
/// every method has a no-op default.
pub trait Observer {
    /// Called at every check, after `done` of `total` steps, with the last
    /// step's ELBO estimate.
    fn on_check(&mut self, _done: usize, _total: usize, _elbo: f64) {}

    /// Steps between calls of [`Observer::on_monitor`]; 0 (the default)
    /// never calls it.
    fn monitor_every(&self) -> usize {
        0
    }

    /// Called before the first step (`done = 0`) and after every
    /// [`Observer::monitor_every`] steps with the current parameters and the
    /// optimisation's wall time so far. Time spent here is left out of the
    /// trace's clock (monitoring is not part of the algorithm). An error
    /// stops the fit.
    fn on_monitor(&mut self, _done: usize, _seconds: f64, _var: &Variational) -> Result<()> {
        Ok(())
    }

    /// What the observer has recorded so far, stored in every checkpoint
    /// ([`crate::FitRequest::checkpoint`]) so that a resumed fit's observer
    /// continues from it ([`Observer::restore`]); `None` (the default):
    /// nothing to keep. Called between blocks, off the trace's clock.
    fn state(&self) -> Option<serde_json::Value> {
        None
    }

    /// Continue from a [`Observer::state`] read back from the checkpoint a
    /// fit resumes from, before its first step (and before the monitoring
    /// call of the resumed step, when that step's monitoring had not run
    /// when the checkpoint was written). The default ignores it.
    fn restore(&mut self, _state: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}

/// An [`Observer`] that does nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Observer for Silent {}
