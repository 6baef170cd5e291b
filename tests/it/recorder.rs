//! The recorder's skeleton: ready only when NATS and PostgreSQL are connected.

use std::time::Duration;

use pgws_tests::{http_get, Service, ServiceKind, Stack};

#[tokio::test]
async fn the_recorder_is_ready_with_its_dependencies_and_says_which_is_missing(
) -> anyhow::Result<()> {
    let stack = Stack::new();
    let rec = Service::start(ServiceKind::Recorder, &stack.env()).await?;
    rec.wait_ready().await?;
    let mut env = stack.env();
    env.retain(|(k, _)| k != "PGWS_DB_URI");
    env.push((
        "PGWS_DB_URI".to_owned(),
        "postgres://postgres@127.0.0.1:1/postgres".to_owned(),
    ));
    let broken = Service::start(ServiceKind::Recorder, &env).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = http_get(broken.admin, "/readyz").await?;
    assert_eq!((status, body.trim()), (503, "not ready: database"));
    Ok(())
}
