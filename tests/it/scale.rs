//! Two gateways and two bridges on one NATS: messages cross, per-socket order holds; stacks
//! with different prefixes do not see each other.

use std::time::Duration;

use pgws_tests::{unique, Stack};
use serde_json::json;

const T: Duration = Duration::from_secs(15);

#[tokio::test]
async fn two_gateways_and_two_bridges_keep_each_sockets_order() -> anyhow::Result<()> {
    let mut stack = Stack::start().await?;
    stack.add_bridge(&[]).await?;
    stack.add_gateway(&[]).await?;
    stack.wait_flowing(1).await?;
    let channel = unique("order-");
    let mut reader = stack.connect(1, &channel, &json!({"mode": "r"})).await?;
    let mut writers = Vec::new();
    for _ in 0..3 {
        writers.push(stack.connect(0, &channel, &json!({"mode": "w"})).await?);
    }
    let n = 200;
    for i in 0..n {
        for (w, ws) in writers.iter_mut().enumerate() {
            ws.send_text(&format!("{w}:{i}")).await?;
        }
    }
    let mut next = [0usize; 3];
    for _ in 0..n * writers.len() {
        let msg = reader.next_json(T).await?;
        let text = msg["payload"].as_str().unwrap_or_default().to_owned();
        let (w, i) = text.split_once(':').unwrap_or_default();
        let (w, i): (usize, usize) = (w.parse()?, i.parse()?);
        assert_eq!(i, next[w], "socket {w} out of order");
        next[w] += 1;
    }
    assert_eq!(next, [n; 3]);
    // Both bridges executed NOTIFYs (queue group), one holds LISTEN.
    let mut served = 0;
    for b in &stack.bridges {
        if b.metric("pgws_bridge_notify_requests_total{outcome=\"ok\"}")
            .await
            .unwrap_or(0.0)
            > 0.0
        {
            served += 1;
        }
    }
    assert!(served >= 1);
    Ok(())
}

#[tokio::test]
async fn stacks_with_different_prefixes_do_not_see_each_other() -> anyhow::Result<()> {
    let one = Stack::start().await?;
    let two = Stack::start().await?;
    let mut a = one.connect(0, "shared", &json!({"mode": "rw"})).await?;
    let mut b = two.connect(0, "shared", &json!({"mode": "rw"})).await?;
    a.send_text("only for one").await?;
    b.send_text("only for two").await?;
    assert_eq!(a.next_json(T).await?["payload"], "only for one");
    assert_eq!(b.next_json(T).await?["payload"], "only for two");
    assert!(
        a.next_text(Duration::from_millis(500)).await.is_err(),
        "crossed stacks"
    );
    assert!(
        b.next_text(Duration::from_millis(500)).await.is_err(),
        "crossed stacks"
    );
    Ok(())
}
