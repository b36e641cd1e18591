//! Checkpoints of a fit and bit-exact resumption
//! ([`crate::FitRequest::checkpoint`], [`crate::FitRequest::resume`]).
//!
//! Every `every` steps the one loop ([`crate::fit`]'s `drive`) ends a block,
//! asks the engine for its state (host copies) and hands it to a background
//! thread that writes it under the checkpoint folder `DIR` (at most one
//! write in flight; the fit waits for the last before it returns):
//!
//! ```text
//! DIR/step-<k>/state.safetensors   the engine's tensors ("engine/…": the
//!                                  variational parameters, Adam's moments
//!                                  and step counts, the learning rate, the
//!                                  generator's state, …) and the trace so
//!                                  far ("trace/iteration", "trace/elbo",
//!                                  "trace/seconds")
//! DIR/step-<k>/meta.json           the step, what the fit is (model, method,
//!                                  options, engine, threads, device, the
//!                                  data's SHA-256) and the caller's context
//!                                  (the `avi` binary: its resolved config)
//! DIR/latest.json                  the pointer: the step, its folder and
//!                                  the SHA-256 of each of its files
//! ```
//!
//! Atomicity: a checkpoint is written into `step-<k>.tmp/`, each file and
//! the folder fsynced, the folder renamed to `step-<k>/`, then
//! `latest.json` replaced atomically (written to a temporary file in the
//! same folder, fsynced, renamed, the folder fsynced); only then is the
//! previous checkpoint removed. A crash at any moment leaves `latest.json`
//! naming a complete checkpoint (or no `latest.json` before the first).
//!
//! Resuming reads `latest.json`, checks every file against its SHA-256 (a
//! tampered or truncated file is an error naming it), checks that the
//! checkpoint is of the same fit (same model, method, options, engine,
//! threads, device and data), builds the engine as a fresh fit would,
//! restores its state, the trace and the step count, and continues the loop
//! from there: on the CPU, the libtorch and fused engines then end with the
//! same bits as the uninterrupted fit (the trace's wall-clock seconds
//! aside). Engines that cannot save their state (the graph engine on CUDA,
//! the fused CUDA kernels) refuse checkpointing with an error.
//!
//! Batched seeds (one engine fitting R runs) keep every run's trace
//! (`trace/<r>/iteration`, …) and status (a run that diverged stays
//! diverged) in one checkpoint. Several seeds fitted one after another by
//! [`crate::FitRequest::run_all`] keep one checkpoint folder per seed,
//! `DIR/seed-<seed>/`.
//!
//! The writer removes only what it wrote: it marks a folder it writes into
//! with the file `.avi-checkpoints`, and refuses a folder that holds
//! anything but neither that mark nor a `latest.json` (a folder of the
//! user's that happens to hold `step-…` entries is never cleared).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use avi_models::Model;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::engine::{EngineState, Stepper};
use crate::family::host_vec;
use crate::method::MethodConfig;
use crate::options::FitOptions;
use crate::result::{Clock, FitStatus, Trace};
use crate::{InferenceError, Result};

/// The version of the checkpoint format.
const FORMAT: u32 = 1;
/// The pointer file's name.
const LATEST: &str = "latest.json";
const STATE: &str = "state.safetensors";
const META: &str = "meta.json";
/// The mark of a folder the writer owns.
const MARK: &str = ".avi-checkpoints";

/// What a checkpoint says about itself, without its tensors
/// ([`latest_checkpoint`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    /// The folder of the checkpoint's files.
    pub path: PathBuf,
    /// Steps taken when it was written.
    pub step: usize,
    /// Steps of the whole fit.
    pub steps: usize,
    /// What the writer passed to [`crate::FitRequest::checkpoint_context`]
    /// (the `avi` binary: its resolved config).
    pub context: Option<serde_json::Value>,
}

/// The pointer to the latest complete checkpoint (`latest.json`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Latest {
    format: u32,
    step: usize,
    folder: String,
    /// SHA-256 (hex) of each file of the folder.
    sha256: BTreeMap<String, String>,
}

/// What identifies the fit a checkpoint belongs to: a resumed fit must have
/// the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Identity {
    model: String,
    method: serde_json::Value,
    options: serde_json::Value,
    engine: String,
    threads: usize,
    device: String,
    /// SHA-256 of the data (their f64 values, row-major, and shape).
    data_sha256: String,
    /// Batched seeds: the seeds of the runs (absent for one run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seeds: Option<Vec<u64>>,
}

/// `meta.json`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    format: u32,
    step: usize,
    steps: usize,
    identity: Identity,
    clock: Clock,
    /// The trace's last time stamp, as f64 bits (exact).
    last_time_bits: u64,
    context: Option<serde_json::Value>,
    /// Batched seeds: each run's status (absent for one run, whose status
    /// is always ok at a checkpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    runs: Option<Vec<FitStatus>>,
    /// The observer's records ([`crate::Observer::state`]), when it keeps
    /// any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    observer: Option<serde_json::Value>,
    /// Whether the monitoring of this step had run when the checkpoint was
    /// written (an interrupted fit's last step); a resumed fit then does
    /// not monitor it again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    monitored: bool,
}

/// Writes a checkpoint every `every` steps into `dir`.
#[derive(Debug)]
pub(crate) struct Writer {
    dir: PathBuf,
    every: usize,
    identity: Identity,
    context: Option<serde_json::Value>,
    steps: usize,
    /// The write in flight.
    pending: Option<std::thread::JoinHandle<Result<()>>>,
}

/// Where a resumed fit continues: its step count, each run's trace and
/// status, and the clock.
#[derive(Debug)]
pub(crate) struct Resumed {
    pub(crate) step: usize,
    pub(crate) traces: Vec<Trace>,
    pub(crate) status: Vec<FitStatus>,
    pub(crate) last_time: f64,
    /// The observer's records.
    pub(crate) observer: Option<serde_json::Value>,
    /// Whether the resumed step's monitoring already ran.
    pub(crate) monitored: bool,
}

/// What a fit is, for [`Identity`].
pub(crate) struct FitFacts<'a> {
    pub(crate) model: &'a dyn Model,
    pub(crate) x: &'a Tensor,
    pub(crate) method: &'a MethodConfig,
    pub(crate) options: &'a FitOptions,
    pub(crate) threads: usize,
    pub(crate) device: Device,
    /// The seeds of the runs the engine fits at once (batched seeds: R of
    /// them; one run: its seed, which the options also hold).
    pub(crate) seeds: &'a [u64],
}

impl FitFacts<'_> {
    fn identity(&self) -> Result<Identity> {
        let json = |v: std::result::Result<serde_json::Value, serde_json::Error>| {
            v.map_err(|e| InferenceError::config("checkpoint", e.to_string()))
        };
        let mut hash = Sha256::new();
        let x = self.x.to_device(Device::Cpu).to_kind(Kind::Double);
        for d in x.size() {
            hash.update(d.to_le_bytes());
        }
        for v in host_vec(&x)? {
            hash.update(v.to_le_bytes());
        }
        Ok(Identity {
            model: self.model.name().to_string(),
            method: json(serde_json::to_value(self.method))?,
            options: json(serde_json::to_value(self.options))?,
            engine: format!("{:?}", self.options.engine),
            threads: self.threads,
            device: format!("{:?}", self.device),
            data_sha256: format!("{:x}", hash.finalize()),
            seeds: (self.seeds.len() > 1).then(|| self.seeds.to_vec()),
        })
    }
}

fn io(path: &Path, what: &str, e: std::io::Error) -> InferenceError {
    InferenceError::checkpoint(path, format!("{what}: {e}"))
}

/// fsync a folder (so that a rename in it is durable).
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(dir, "cannot sync the folder", e))
}

/// Create `dir` for checkpoints, or take it over when it is one already
/// (it holds the mark or a `latest.json`) or is empty; mark it. A folder
/// holding anything else is refused: the writer removes `step-…` folders
/// in it.
fn claim_folder(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| io(dir, "cannot create the folder", e))?;
    let ours = dir.join(MARK).is_file() || dir.join(LATEST).is_file();
    if !ours {
        let mut entries = fs::read_dir(dir).map_err(|e| io(dir, "cannot list", e))?;
        if let Some(entry) = entries.next() {
            let name = entry.map_or_else(
                |_| "?".into(),
                |e| e.file_name().to_string_lossy().into_owned(),
            );
            return Err(InferenceError::checkpoint(
                dir,
                format!(
                    "the folder holds `{name}` and is not a checkpoint folder (no {LATEST}, no {MARK}): \
                     give an empty or new folder"
                ),
            ));
        }
        write_synced(
            &dir.join(MARK),
            b"checkpoints of avi fits: the writer removes old step-* folders here\n",
        )?;
        sync_dir(dir)?;
    }
    Ok(())
}

/// Write `bytes` to `path` and fsync it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| io(path, "cannot create", e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| io(path, "cannot write", e))
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

impl Writer {
    /// A writer for the fit `facts` into `dir` every `every` steps, with
    /// the caller's `context`.
    pub(crate) fn new(
        dir: &Path,
        every: usize,
        context: Option<serde_json::Value>,
        facts: &FitFacts<'_>,
    ) -> Result<Self> {
        if every == 0 {
            return Err(InferenceError::config(
                "checkpoint.every",
                "must be at least 1",
            ));
        }
        claim_folder(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            every,
            identity: facts.identity()?,
            context,
            steps: facts.options.steps,
            pending: None,
        })
    }

    /// The step at which the block that starts after `done` steps must end
    /// at the latest.
    pub(crate) fn next_stop(&self, done: usize) -> usize {
        (done / self.every + 1) * self.every
    }

    /// Whether a checkpoint is due after `done` steps.
    pub(crate) fn due(&self, done: usize) -> bool {
        done % self.every == 0
    }

    /// Checkpoint step `step`: the engine's state and the trace (its last
    /// time stamp `last_time`) are copied on this thread, then written
    /// atomically by a background thread (off the training thread's
    /// critical path), which then removes the previous checkpoint. At most
    /// one write is in flight: this first waits for the previous one and
    /// reports its error. `observer` is what the observer keeps;
    /// `monitored`, whether this step's monitoring has run.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write(
        &mut self,
        step: usize,
        stepper: &dyn Stepper,
        traces: &[Trace],
        status: &[FitStatus],
        last_time: f64,
        observer: Option<serde_json::Value>,
        monitored: bool,
    ) -> Result<()> {
        let state = stepper.state()?;
        let mut tensors: Vec<(String, Tensor)> = state
            .tensors
            .into_iter()
            .map(|(n, t)| (format!("engine/{n}"), t))
            .collect();
        let one = traces.len() == 1;
        for (r, trace) in traces.iter().enumerate() {
            let prefix = if one {
                "trace".to_string()
            } else {
                format!("trace/{r}")
            };
            let iteration: Vec<i64> = trace.iteration.iter().map(|&i| i as i64).collect();
            tensors.push((
                format!("{prefix}/iteration"),
                Tensor::from_slice(&iteration),
            ));
            tensors.push((format!("{prefix}/elbo"), Tensor::from_slice(&trace.elbo)));
            tensors.push((
                format!("{prefix}/seconds"),
                Tensor::from_slice(&trace.seconds),
            ));
        }
        let meta = Meta {
            format: FORMAT,
            step,
            steps: self.steps,
            identity: self.identity.clone(),
            clock: traces.first().map_or_else(Clock::default, |t| t.clock),
            last_time_bits: last_time.to_bits(),
            context: self.context.clone(),
            runs: (!one).then(|| status.to_vec()),
            observer,
            monitored,
        };
        self.wait()?;
        let dir = self.dir.clone();
        let job = move || write_files(&dir, step, &tensors, &meta);
        let handle = std::thread::Builder::new()
            .name("avi-checkpoint".into())
            .spawn(job)
            .map_err(|e| io(&self.dir, "cannot start the writing thread", e))?;
        self.pending = Some(handle);
        Ok(())
    }

    /// Wait until the checkpoint being written (if any) is complete.
    pub(crate) fn wait(&mut self) -> Result<()> {
        match self.pending.take() {
            None => Ok(()),
            Some(h) => h.join().unwrap_or_else(|_| {
                Err(InferenceError::checkpoint(
                    &self.dir,
                    "the writing thread panicked",
                ))
            }),
        }
    }
}

/// Write checkpoint `step` (its `tensors` and `meta`) into `dir`
/// atomically, point `latest.json` at it, then remove older checkpoints.
fn write_files(dir: &Path, step: usize, tensors: &[(String, Tensor)], meta: &Meta) -> Result<()> {
    let folder = format!("step-{step}");
    let tmp = dir.join(format!("{folder}.tmp"));
    let done = dir.join(&folder);
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, "cannot remove a stale folder", e))?;
    }
    fs::create_dir(&tmp).map_err(|e| io(&tmp, "cannot create", e))?;
    let state_path = tmp.join(STATE);
    Tensor::write_safetensors(tensors, &state_path)
        .map_err(|e| InferenceError::checkpoint(&state_path, e.to_string()))?;
    let state_bytes = fs::read(&state_path).map_err(|e| io(&state_path, "cannot read", e))?;
    File::open(&state_path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(&state_path, "cannot sync", e))?;
    let meta_bytes = serde_json::to_vec_pretty(meta)
        .map_err(|e| InferenceError::checkpoint(tmp.join(META), e.to_string()))?;
    write_synced(&tmp.join(META), &meta_bytes)?;
    sync_dir(&tmp)?;
    if done.exists() {
        fs::remove_dir_all(&done).map_err(|e| io(&done, "cannot replace", e))?;
    }
    fs::rename(&tmp, &done).map_err(|e| io(&done, "cannot rename into place", e))?;
    sync_dir(dir)?;
    let latest = Latest {
        format: FORMAT,
        step,
        folder: folder.clone(),
        sha256: [
            (STATE.to_string(), sha256_hex(&state_bytes)),
            (META.to_string(), sha256_hex(&meta_bytes)),
        ]
        .into(),
    };
    let latest_bytes = serde_json::to_vec_pretty(&latest)
        .map_err(|e| InferenceError::checkpoint(dir.join(LATEST), e.to_string()))?;
    let latest_tmp = dir.join(format!("{LATEST}.tmp"));
    write_synced(&latest_tmp, &latest_bytes)?;
    let latest_path = dir.join(LATEST);
    fs::rename(&latest_tmp, &latest_path)
        .map_err(|e| io(&latest_path, "cannot rename into place", e))?;
    sync_dir(dir)?;
    // Older checkpoints (and stale temporary folders) go last.
    let entries = fs::read_dir(dir).map_err(|e| io(dir, "cannot list", e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("step-") && name != folder {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

/// A checkpoint read back and checked.
struct Loaded {
    /// Its folder.
    folder: PathBuf,
    /// The bytes of its tensors' file.
    state: Vec<u8>,
    meta: Meta,
}

/// The checkpoint `latest.json` of `dir` points to, its files checked
/// against their SHA-256; `None` when `dir` has no `latest.json`.
fn read_latest(dir: &Path) -> Result<Option<Loaded>> {
    let latest_path = dir.join(LATEST);
    let bytes = match fs::read(&latest_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&latest_path, "cannot read", e)),
    };
    let latest: Latest = serde_json::from_slice(&bytes)
        .map_err(|e| InferenceError::checkpoint(&latest_path, format!("not a pointer: {e}")))?;
    if latest.format != FORMAT {
        return Err(InferenceError::checkpoint(
            &latest_path,
            format!("format {} (this build reads {FORMAT})", latest.format),
        ));
    }
    let valid_folder = latest.folder.starts_with("step-")
        && !latest.folder.contains(['/', '\\'])
        && latest.folder != "."
        && latest.folder != "..";
    if !valid_folder {
        return Err(InferenceError::checkpoint(
            &latest_path,
            format!("names the folder `{}`", latest.folder),
        ));
    }
    let folder = dir.join(&latest.folder);
    let mut files = BTreeMap::new();
    for name in [STATE, META] {
        let path = folder.join(name);
        let expected = latest.sha256.get(name).ok_or_else(|| {
            InferenceError::checkpoint(&latest_path, format!("no SHA-256 of {name}"))
        })?;
        let bytes = fs::read(&path).map_err(|e| io(&path, "cannot read", e))?;
        let actual = sha256_hex(&bytes);
        if &actual != expected {
            return Err(InferenceError::checkpoint(
                &path,
                format!(
                    "SHA-256 {actual} differs from {expected} recorded in {LATEST}: the file was changed or truncated"
                ),
            ));
        }
        files.insert(name, bytes);
    }
    let meta_path = folder.join(META);
    let meta: Meta = serde_json::from_slice(&files[META])
        .map_err(|e| InferenceError::checkpoint(&meta_path, e.to_string()))?;
    if meta.format != FORMAT || meta.step != latest.step {
        return Err(InferenceError::checkpoint(
            &meta_path,
            "does not match latest.json",
        ));
    }
    let state = files.remove(STATE).unwrap_or_default();
    Ok(Some(Loaded {
        folder,
        state,
        meta,
    }))
}

/// The latest checkpoint in `dir` (the folder given to
/// [`crate::FitRequest::checkpoint`]), its files checked against their
/// SHA-256; `Ok(None)` when there is none yet. Errors name the file that
/// is missing, tampered with or truncated.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<CheckpointInfo>> {
    Ok(read_latest(dir)?.map(|c| CheckpointInfo {
        path: c.folder,
        step: c.meta.step,
        steps: c.meta.steps,
        context: c.meta.context,
    }))
}

/// Read the latest checkpoint of `dir` for the fit `facts`: its engine
/// state and where the fit continues. Errors when there is none, when a
/// file fails its SHA-256, or when the checkpoint is of another fit.
pub(crate) fn load(dir: &Path, facts: &FitFacts<'_>) -> Result<(EngineState, Resumed)> {
    let Some(Loaded {
        folder,
        state: bytes,
        meta,
    }) = read_latest(dir)?
    else {
        return Err(InferenceError::checkpoint(
            dir.join(LATEST),
            "no checkpoint to resume from",
        ));
    };
    let ours = facts.identity()?;
    let theirs = &meta.identity;
    let differs = [
        ("model", theirs.model != ours.model),
        ("method", theirs.method != ours.method),
        ("options", theirs.options != ours.options),
        ("engine", theirs.engine != ours.engine),
        ("threads", theirs.threads != ours.threads),
        ("device", theirs.device != ours.device),
        ("data", theirs.data_sha256 != ours.data_sha256),
        ("seeds", theirs.seeds != ours.seeds),
    ];
    if let Some((what, _)) = differs.iter().find(|(_, d)| *d) {
        let detail = match *what {
            "threads" => format!(" ({} threads; resume with as many)", theirs.threads),
            "engine" => format!(" ({})", theirs.engine),
            "device" => format!(" ({})", theirs.device),
            _ => String::new(),
        };
        return Err(InferenceError::checkpoint(
            folder.join(META),
            format!("the checkpoint is of another fit: its {what} differs{detail}"),
        ));
    }
    let state_path = folder.join(STATE);
    let bad = |e: String| InferenceError::checkpoint(&state_path, e);
    let tensors = read_safetensors_bytes(&bytes).map_err(bad)?;
    let mut engine = EngineState::default();
    let mut trace_parts: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, t) in tensors {
        if let Some(n) = name.strip_prefix("engine/") {
            engine.tensors.push((n.to_string(), t));
        } else if name.starts_with("trace/") {
            trace_parts.insert(name, t);
        }
    }
    let part = |name: &str| {
        trace_parts
            .get(name)
            .ok_or_else(|| InferenceError::checkpoint(&state_path, format!("no `{name}`")))
    };
    let bad_trace = |detail: String| InferenceError::checkpoint(&state_path, detail);
    let (runs, status) = match &meta.runs {
        None => (1, vec![FitStatus::Ok]),
        Some(status) => (status.len(), status.clone()),
    };
    if runs != facts.seeds.len() {
        return Err(InferenceError::checkpoint(
            folder.join(META),
            format!(
                "the checkpoint is of another fit: it holds {runs} runs, the fit has {}",
                facts.seeds.len()
            ),
        ));
    }
    let mut traces = Vec::with_capacity(runs);
    for (r, s) in status.iter().enumerate() {
        let prefix = if meta.runs.is_none() {
            "trace".to_string()
        } else {
            format!("trace/{r}")
        };
        let iteration: Vec<usize> = Vec::<i64>::try_from(part(&format!("{prefix}/iteration"))?)
            .map_err(|e| bad_trace(e.to_string()))?
            .into_iter()
            .map(|i| i as usize)
            .collect();
        let elbo = host_vec(part(&format!("{prefix}/elbo"))?)?;
        let seconds = host_vec(part(&format!("{prefix}/seconds"))?)?;
        // A run still going has a record of every step; a diverged one is
        // cut at its divergence.
        let len_ok = match s {
            FitStatus::Ok => elbo.len() == meta.step,
            _ => elbo.len() <= meta.step,
        };
        if !len_ok || iteration.len() != elbo.len() || seconds.len() != elbo.len() {
            return Err(bad_trace(format!(
                "a trace of {} steps at step {}",
                elbo.len(),
                meta.step
            )));
        }
        traces.push(Trace {
            iteration,
            elbo,
            seconds,
            clock: meta.clock,
        });
    }
    Ok((
        engine,
        Resumed {
            step: meta.step,
            traces,
            status,
            last_time: f64::from_bits(meta.last_time_bits),
            observer: meta.observer,
            monitored: meta.monitored,
        },
    ))
}

/// The tensors of safetensors `bytes` (the bytes whose SHA-256 was
/// checked, not a second read of the file).
fn read_safetensors_bytes(bytes: &[u8]) -> std::result::Result<Vec<(String, Tensor)>, String> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            Tensor::try_from(view)
                .map(|t| (name, t))
                .map_err(|e| e.to_string())
        })
        .collect()
}
