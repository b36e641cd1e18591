//! Helpers shared by the harness's integration tests.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// A small linear experiment: 3 methods × 3 seeds of 300 steps on N = 200
/// (about a second per grid in a test build), with the definition's claims.
pub fn tiny_definition(dir: &Path) -> PathBuf {
    let mut def: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/experiments/linear.json"),
        )
        .unwrap(),
    )
    .unwrap();
    def["name"] = "tiny".into();
    def["data"]["simulate"]["n"] = 200.into();
    def["steps"] = 300.into();
    def["draws"] = 10.into();
    def["eval_draws"] = 200.into();
    def["seeds"] = serde_json::json!([1954, 1955, 1956]);
    def["quick"]["steps"] = 100.into();
    def["quick"]["n"] = 200.into();
    def["quick"]["seeds"] = 1.into();
    let keep = ["fvi", "const", "d=1"];
    let methods = def["methods"].as_array().unwrap().clone();
    def["methods"] = Value::Array(
        methods
            .into_iter()
            .filter(|m| keep.contains(&m["label"].as_str().unwrap()))
            .collect(),
    );
    // Claims about the methods kept (the definition's `d=2` is left out).
    let claims = def["claims"].as_array().unwrap().clone();
    def["claims"] = Value::Array(
        claims
            .into_iter()
            .map(|mut c| {
                let labels: Vec<Value> = c["labels"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|l| keep.contains(&l.as_str().unwrap()))
                    .cloned()
                    .collect();
                c["labels"] = Value::Array(labels);
                c
            })
            .collect(),
    );
    let path = dir.join("tiny.json");
    std::fs::write(&path, def.to_string()).unwrap();
    path
}
