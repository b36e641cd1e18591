//! # avi-harness
//!
//! The `avi` command line and the pieces behind it: JSON fit configurations
//! ([`config`]), running them on a chosen device ([`run`]), reports written
//! atomically ([`report`]), the linear-model demo ([`demo`]), the paper's
//! experiments ([`reproduce`]), their summaries and `REPORT.md`
//! ([`summary`]), SVG figures ([`figures`]) and committed run reports in
//! compact form ([`compact`]).
//!
//! ```text
//! avi fit --config CFG.json --out REPORT.json [--save DIR] [--check] [--device auto|cpu|cuda] [--threads T]
//! avi encode --fitted DIR --data NEW --out Q.json [--draws M] [--seed S] [--refine K] [--refine-lr η]
//! avi diagnose --config CFG.json --out REPORT.json
//! avi reproduce EXPERIMENT [--quick] [--seeds N] [--jobs K] [--resume | --fresh] [--save] [--out DIR]
//! avi report DIR [--partial]
//! avi demo --out DIR [--device auto|cpu|cuda]
//! ```
//!
//! Exit codes: 0 success, 2 bad input or a refusal (one line on stderr,
//! nothing written), 3 the fit diverged (the report is written with
//! `"status": "diverged"`), 4 `avi report` on an incomplete grid without
//! `--partial`, 130 interrupted (SIGINT/SIGTERM: the fit stops at its
//! next block and its report is written with `"status": "interrupted"`;
//! no file half-written).
//! `docs/reliability.md` states what is guaranteed and what is not.
//!
//! The same steps from Rust:
//!
//! ```no_run
//! use avi_harness::{config::FitConfig, run};
//! # fn main() -> anyhow::Result<()> {
//! let cfg = FitConfig::parse(r#"{"model": {"kind": "linear", "tau": 1.155, "sigma": 2.43},
//!     "data": {"simulate": {"n": 1000, "seed": 7}}, "method": {"kind": "fvi"}}"#)?;
//! let prepared = run::prepare(&cfg, std::path::Path::new("."))?;
//! let (fit, report) = run::run_prepared(&cfg, &prepared, tch::Device::Cpu, &mut avi_inference::Silent)?;
//! println!("{} {:?}", fit.elbo, report.reference.map(|r| r.gap));
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod claim;
pub mod compact;
pub mod config;
pub mod data_files;
pub mod demo;
pub mod encode;
pub mod experiment;
pub mod figures;
pub mod fitted;
pub mod gap;
pub mod interrupt;
pub mod models;
pub mod report;
pub mod reproduce;
pub mod run;
pub mod run_report;
pub mod summary;
