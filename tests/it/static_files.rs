//! Non-websocket requests: the static folder, without path traversal; TLS.

use std::time::Duration;

use pgws_tests::{http_get, Stack};

#[tokio::test]
async fn the_root_path_is_served_and_nothing_outside_it() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(pgws_tests::unique("pgws-static-"));
    std::fs::create_dir_all(dir.join("sub"))?;
    std::fs::write(dir.join("index.html"), "<h1>chat</h1>")?;
    std::fs::write(dir.join("sub/a.txt"), "inner")?;
    std::fs::write(dir.with_extension("secret"), "outside")?;
    let root = dir.to_string_lossy().into_owned();
    let mut stack = Stack::new();
    stack.add_gateway(&[("PGWS_ROOT_PATH", &root)]).await?;
    let addr = stack.gateways[0].addr.expect("listening");
    assert_eq!(
        http_get(addr, "/").await?,
        (200, "<h1>chat</h1>".to_owned())
    );
    assert_eq!(
        http_get(addr, "/sub/a.txt").await?,
        (200, "inner".to_owned())
    );
    let secret_name = dir.with_extension("secret");
    let name = secret_name
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    for path in [
        format!("/../{name}"),
        format!("/%2e%2e/{name}"),
        "/sub/../../etc/passwd".to_owned(),
    ] {
        let (status, body) = http_get(addr, &path).await?;
        assert!(status == 404 || status == 400, "{path}: {status}");
        assert!(
            !body.contains("outside") && !body.contains("root:"),
            "{path} leaked"
        );
    }
    let mut plain = Stack::new();
    plain.add_gateway(&[]).await?;
    assert_eq!(
        http_get(plain.gateways[0].addr.expect("listening"), "/anything")
            .await?
            .0,
        200
    );
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_file(dir.with_extension("secret")).ok();
    Ok(())
}

#[tokio::test]
async fn tls_serves_when_certificate_and_key_are_set() -> anyhow::Result<()> {
    let dir = pgws_tests::test_certificates("pgws-tls-", "DNS:localhost")?;
    let (cert, key) = (dir.join("leaf.pem"), dir.join("leaf.key"));
    let (c, k) = (
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
    );
    let mut stack = Stack::new();
    stack
        .add_gateway(&[("PGWS_CERTIFICATE_FILE", &c), ("PGWS_KEY_FILE", &k)])
        .await?;
    let addr = stack.gateways[0].addr.expect("listening");
    assert!(stack.gateways[0].log().contains("tls=true"));
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("https://{addr}/"))
            .output(),
    )
    .await??;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    // Plain HTTP on the TLS port does not work.
    assert!(http_get(addr, "/").await.is_err());
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
