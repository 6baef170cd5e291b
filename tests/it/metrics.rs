//! The metric families of every service exist on `/metrics` and move under traffic.

use std::time::Duration;

use pgws_tests::{eventually, http_get, unique, Service, ServiceKind, Stack, WsClient};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

/// The value of sample `name` on `svc` (0 when absent, so a counter that appears counts as
/// having moved).
async fn value(svc: &Service, name: &str) -> f64 {
    svc.metric(name).await.unwrap_or(0.0)
}

/// The samples that must move under traffic, in the order the test checks them.
async fn moving(gw: &Service, bridge: &Service) -> [f64; 8] {
    [
        value(gw, "pgws_gateway_client_messages_total").await,
        value(gw, "pgws_gateway_client_received_bytes_total").await,
        value(gw, "pgws_gateway_deliveries_total").await,
        value(gw, "pgws_gateway_delivered_bytes_total").await,
        value(gw, "pgws_gateway_delivery_latency_seconds_count").await,
        value(bridge, "pgws_bridge_notify_requests_total{outcome=\"ok\"}").await,
        value(bridge, "pgws_bridge_notify_batch_size_count").await,
        value(bridge, "pgws_bridge_notifications_published_total").await,
    ]
}

#[tokio::test]
async fn metric_families_exist_and_move_under_traffic() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let recorder = Service::start(ServiceKind::Recorder, &stack.env()).await?;
    recorder.wait_ready().await?;
    let (gw, bridge) = (&stack.gateways[0], &stack.bridges[0]);

    // Families present before the traffic (gauges and unlabelled counters).
    let families = [
        (gw, "pgws_gateway_connections_open"),
        (gw, "pgws_gateway_channels"),
        (gw, "pgws_gateway_client_messages_total"),
        (gw, "pgws_gateway_client_received_bytes_total"),
        (gw, "pgws_gateway_deliveries_total"),
        (gw, "pgws_gateway_delivered_bytes_total"),
        (gw, "pgws_gateway_slow_consumer_disconnects_total"),
        (gw, "pgws_gateway_delivery_latency_seconds"),
        (bridge, "pgws_bridge_notify_requests_total"),
        (bridge, "pgws_bridge_notify_batch_size"),
        (bridge, "pgws_bridge_notify_errors_total"),
        (bridge, "pgws_bridge_leader"),
        (bridge, "pgws_bridge_listener_connected"),
        (bridge, "pgws_bridge_notification_queue_usage"),
        (&recorder, "pgws_recorder_pending_messages"),
        (&recorder, "pgws_recorder_rows_total"),
        (&recorder, "pgws_recorder_batch_size"),
    ];
    for (svc, family) in families {
        let (status, body) = http_get(svc.admin, "/metrics").await?;
        assert_eq!(status, 200);
        // Counters are typed under their name without `_total`.
        let family = family.trim_end_matches("_total");
        assert!(
            body.contains(&format!("# TYPE {family} ")),
            "no family {family} in\n{body}"
        );
    }

    let before = moving(gw, bridge).await;

    // Traffic: a refused handshake, ten messages that come back as notifications.
    let refused = WsClient::connect(&format!("{}/chat/not-a-token", stack.ws_url(0))).await;
    assert!(refused.is_err(), "a handshake with a bad token is refused");
    let channel = unique("metered-");
    let mut ws = stack.connect(0, &channel, &json!({"mode": "rw"})).await?;
    for i in 0..10 {
        ws.send_text(&format!("m{i}")).await?;
    }
    for _ in 0..10 {
        ws.next_json(T).await?;
    }
    assert!(
        value(
            gw,
            "pgws_gateway_connections_open{protocol=\"postgres-websockets\"}"
        )
        .await
            >= 1.0,
        "open connections by protocol"
    );
    let (_, body) = http_get(gw.admin, "/metrics").await?;
    let refused: f64 = body
        .lines()
        .filter(|l| l.starts_with("pgws_gateway_handshakes_refused_total{reason="))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert!(refused >= 1.0, "refused handshakes by reason:\n{body}");

    let after = moving(gw, bridge).await;
    assert_eq!(after[0] - before[0], 10.0, "client messages");
    assert_eq!(
        after[1] - before[1],
        20.0,
        "received bytes (ten 2-byte frames)"
    );
    assert!(after[2] - before[2] >= 10.0, "deliveries");
    assert!(after[3] > before[3], "delivered bytes");
    assert!(after[4] - before[4] >= 10.0, "latency observations");
    assert!(after[5] > before[5], "notify requests ok");
    assert!(after[6] > before[6], "batch size observations");
    assert!(after[7] - before[7] >= 10.0, "notifications published");
    assert_eq!(value(bridge, "pgws_bridge_leader").await, 1.0);
    assert_eq!(value(bridge, "pgws_bridge_listener_connected").await, 1.0);

    // The recorder wrote the ten messages; its lag returns to zero.
    let recorded = eventually(T, || async {
        value(&recorder, "pgws_recorder_rows_total").await >= 10.0
    })
    .await;
    assert!(recorded, "recorder rows did not move");
    let caught_up = eventually(T, || async {
        value(&recorder, "pgws_recorder_pending_messages").await == 0.0
    })
    .await;
    assert!(caught_up, "recorder lag did not return to 0");
    Ok(())
}
