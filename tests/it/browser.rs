//! A postgres-websockets browser client chats through the stack: Debian's Chromium, driven by
//! playwright-core (`tests/browser/chat.mjs`), on the example page the gateway serves.
//! `scripts/browser-test-setup.sh` (run by `scripts/test.sh`) installs both.

use std::path::PathBuf;
use std::time::Duration;

use pgws_tests::{token, Stack};
use serde_json::json;

#[tokio::test]
async fn the_example_page_chats_in_a_real_browser() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let page = root.join("examples/chat");
    let script = root.join("tests/browser/chat.mjs");
    assert!(
        root.join("tests/browser/node_modules/playwright-core")
            .is_dir(),
        "playwright-core missing: run scripts/browser-test-setup.sh"
    );
    let mut stack = Stack::new();
    stack.add_bridge(&[]).await?;
    stack
        .add_gateway(&[("PGWS_ROOT_PATH", &page.to_string_lossy())])
        .await?;
    stack.wait_flowing(0).await?;
    let base = format!("http://{}", stack.gateways[0].addr.expect("listening"));
    let writer = token(&json!({"mode": "rw", "channel": "chat"}));
    let reader = token(&json!({"mode": "r", "channels": ["chat"]}));
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new("node")
            .arg(&script)
            .arg(&base)
            .arg(&writer)
            .arg(&reader)
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    assert!(
        out.status.success(),
        "browser test failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
