//! (a) The official `openai` Python SDK (PyPI) as the client, against a
//! pipeline-2 SmolLM2 instance: every check lives in `openai_sdk.py` beside
//! this file and uses the SDK's own types and exceptions.
//!
//! Skips, saying why, without the model or the `openai` package; fails
//! instead where `SHARDVISOR_REQUIRE_MODEL=1` (CI installs both).

use std::time::Duration;

use serde_json::json;

use engine::testing::python_has;

use crate::harness::{create_ready, python_checks, TestNode};
use crate::model::smollm2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdk_works_unchanged() {
    let Some(model) = smollm2() else { return };
    if !python_has("openai", "openai") {
        return;
    }
    let node = TestNode::start("openai-sdk");
    let id = create_ready(&node, json!({"model": model, "runners": 2})).await;
    let (_, models) = node.call("GET", "/v1/models", None).await;
    let name = models["data"]
        .as_array()
        .and_then(|d| {
            d.iter()
                .find(|m| m["instance_id"] == id.as_str() && m["id"] != id.as_str())
        })
        .and_then(|m| m["id"].as_str())
        .unwrap_or_else(|| panic!("no model name for {id}: {models}"))
        .to_string();
    let args = [node.base.clone(), name, id.clone()];
    python_checks("openai_sdk.py", &args, Duration::from_secs(170)).await;
    let report = node.delete(&id, "").await;
    assert_eq!(report["errors"], json!([]), "{report}");
    node.assert_quiet();
}
