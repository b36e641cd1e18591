//! Fitted states from the command line: `avi fit --save DIR` (or
//! `"save": "DIR"` in a config), `avi reproduce --save`, and `"init_from":
//! "DIR"` (a warm start from a saved state) — the harness's side of
//! [`avi_inference::Fitted`]. The model's configuration recorded in (and
//! checked against) a state is the config's `model` block as the harness
//! resolves it (every default written).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use avi_inference::{DataFingerprint, Expect, Fit, Fitted, Variational};
use tch::{Device, Tensor};

use crate::config::FitConfig;
use crate::run::{data_tensor, Prepared};

/// The config's `model` block as recorded in a saved state.
pub fn model_value(cfg: &FitConfig) -> Result<serde_json::Value> {
    Ok(serde_json::to_value(&cfg.model)?)
}

/// `path` as given in a config: relative paths are taken from the
/// config's folder.
pub fn resolve(path: &Path, config_dir: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        config_dir.join(path)
    }
}

/// Check, before fitting, that the fit of `cfg` on `prepared` may save its
/// state to `dir` (absent, empty, or the same fit's state; its parent
/// folder must exist).
pub fn check_save(cfg: &FitConfig, prepared: &Prepared, dir: &Path) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        anyhow::bail!(
            "--save {}: folder {} does not exist",
            dir.display(),
            parent.display()
        );
    }
    let data = DataFingerprint::of(&data_tensor(prepared))?;
    Fitted::check_target(
        dir,
        prepared.model.as_model().name(),
        &model_value(cfg)?,
        &cfg.method,
        &data,
    )?;
    Ok(())
}

/// Save the fitted family of `fit` (a fit of `cfg` on `prepared`) to `dir`,
/// with this build's git commit.
pub fn save_fit(cfg: &FitConfig, prepared: &Prepared, fit: Fit, dir: &Path) -> Result<()> {
    save_variational(cfg, prepared, fit.variational, dir)
}

/// [`save_fit`] for the variational parameters alone.
pub fn save_variational(
    cfg: &FitConfig,
    prepared: &Prepared,
    variational: Variational,
    dir: &Path,
) -> Result<()> {
    let x = data_tensor(prepared);
    let mut fitted = Fitted::new(
        prepared.model.as_model(),
        &cfg.method,
        variational,
        &x,
        model_value(cfg)?,
    )?;
    fitted.git_commit = option_env!("AVI_GIT_COMMIT").map(str::to_string);
    fitted
        .save(dir)
        .with_context(|| format!("cannot save the fitted state to {}", dir.display()))
}

/// The variational parameters saved in `dir`, checked to be a fit of the
/// same model (configuration included), method and training data `x` as
/// `cfg`, on `device`, with their training inputs (a warm start).
pub fn load_start(
    cfg: &FitConfig,
    model: &dyn avi_models::Model,
    x: &Tensor,
    dir: &Path,
    device: Device,
) -> Result<Variational> {
    let model_config = model_value(cfg)?;
    let expect = Expect {
        model,
        model_config: Some(&model_config),
        method: Some(&cfg.method),
        data: Some(x),
    };
    let fitted = Fitted::load(dir, &expect, device)
        .with_context(|| format!("field `init_from`: {}", dir.display()))?;
    if fitted.dtype() != cfg.dtype {
        anyhow::bail!(
            "field `init_from`: {} holds {:?} parameters, the config asks for {:?} (set `dtype`)",
            dir.display(),
            fitted.dtype(),
            cfg.dtype
        );
    }
    Ok(fitted.variational)
}
