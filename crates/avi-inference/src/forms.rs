//! What the inference side knows of a model beyond [`avi_models::Model`].

use avi_models::{FusedModel, Model};

/// The fused engine's per-element form of `model`, when it has one.
pub(crate) fn fused_form(model: &dyn Model) -> Option<FusedModel> {
    model.fused()
}
