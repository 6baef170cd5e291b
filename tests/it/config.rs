//! Start-up: invalid configuration fails at once with every problem listed.

use std::time::Duration;

use pgws_tests::{Service, ServiceKind};

async fn run_to_exit(kind: ServiceKind, env: &[(&str, &str)]) -> anyhow::Result<(i32, String)> {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Service::command(kind, &env)
            .stderr(std::process::Stdio::piped())
            .output(),
    )
    .await??;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn the_gateway_lists_every_configuration_problem() -> anyhow::Result<()> {
    let (code, err) = run_to_exit(
        ServiceKind::Gateway,
        &[
            ("PGWS_CERTIFICATE_FILE", "/nonexistent.pem"),
            ("PGWS_PORT", "http"),
        ],
    )
    .await?;
    assert_eq!(code, 64, "{err}");
    for needle in ["PGWS_JWT_SECRET is required", "TLS needs both", "PGWS_PORT"] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
    Ok(())
}

#[tokio::test]
async fn the_bridge_needs_a_database_uri_and_gives_up_after_its_retries() -> anyhow::Result<()> {
    let (code, err) = run_to_exit(ServiceKind::Bridge, &[]).await?;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("PGWS_DB_URI is required"), "{err}");
    let (code, err) = run_to_exit(
        ServiceKind::Bridge,
        &[
            ("PGWS_DB_URI", "postgres://postgres@127.0.0.1:1/postgres"),
            ("PGWS_RETRIES", "2"),
            ("PGWS_ADMIN_PORT", "0"),
        ],
    )
    .await?;
    assert_ne!(code, 0, "{err}");
    assert_ne!(code, 64, "{err}");
    Ok(())
}
