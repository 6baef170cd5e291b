//! OpenTelemetry across the services: real OTLP receivers in the test, over HTTP/protobuf and
//! over gRPC (plain text and TLS), as a collector speaks them; one client message is one trace from the gateway
//! through the bridge, one notification is one trace from the bridge to the gateway's fan-out,
//! spans are flushed at shutdown, and log lines carry the trace id.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use pgws_tests::{eventually, unique, Stack};
use prost::Message as _;
use serde_json::json;

const T: Duration = Duration::from_secs(10);

/// One received span, flattened.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    attributes: Vec<(String, String)>,
}

impl Got {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

type Spans = Arc<Mutex<Vec<Got>>>;

/// Keeps the spans of an export request.
fn keep(spans: &Spans, request: ExportTraceServiceRequest) {
    let mut got = spans.lock().expect("spans");
    for rs in request.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
            .map(text)
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                got.push(Got {
                    service: service.clone(),
                    name: s.name,
                    trace: s.trace_id,
                    id: s.span_id,
                    parent: s.parent_span_id,
                    attributes: s
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(kv)))
                        .collect(),
                });
            }
        }
    }
}

/// `POST /v1/traces` with an `ExportTraceServiceRequest` body, answered with an empty
/// `ExportTraceServiceResponse`.
async fn receive(
    State(spans): State<Spans>,
    body: Bytes,
) -> ([(&'static str, &'static str); 1], Vec<u8>) {
    if let Ok(request) = ExportTraceServiceRequest::decode(body) {
        keep(&spans, request);
    }
    ([("content-type", "application/x-protobuf")], Vec::new())
}

/// The OTLP trace service over gRPC.
struct Receiver(Spans);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        keep(&self.0, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// The OTLP transports a service exports with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    HttpProtobuf,
    Grpc,
    /// gRPC over TLS.
    GrpcTls,
}

/// An OTLP receiver for `protocol` on a port of its own; over TLS with the certificate
/// `leaf.pem` (key `leaf.key`) in `tls`.
async fn otlp_receiver(
    protocol: Protocol,
    tls: Option<&Path>,
) -> anyhow::Result<(SocketAddr, Spans)> {
    let spans: Spans = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    match protocol {
        Protocol::HttpProtobuf => {
            let app = axum::Router::new()
                .route("/v1/traces", post(receive))
                .with_state(Arc::clone(&spans));
            tokio::spawn(async move { axum::serve(listener, app).await });
        }
        Protocol::Grpc | Protocol::GrpcTls => {
            let service = TraceServiceServer::new(Receiver(Arc::clone(&spans)));
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let mut server = tonic::transport::Server::builder();
            if let Some(dir) = tls {
                let identity = tonic::transport::Identity::from_pem(
                    std::fs::read(dir.join("leaf.pem"))?,
                    std::fs::read(dir.join("leaf.key"))?,
                );
                server = server
                    .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
            }
            tokio::spawn(server.serve_with_incoming(service, incoming));
        }
    }
    Ok((addr, spans))
}

fn find<'a>(
    spans: &'a [Got],
    service: &str,
    name: &str,
    pred: impl Fn(&Got) -> bool,
) -> Option<&'a Got> {
    spans
        .iter()
        .find(|s| s.service == service && s.name == name && pred(s))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_message_and_a_notification_are_each_one_trace_across_the_services_over_http(
) -> anyhow::Result<()> {
    one_trace_each(Protocol::HttpProtobuf).await
}

#[tokio::test]
async fn a_message_and_a_notification_are_each_one_trace_across_the_services_over_grpc(
) -> anyhow::Result<()> {
    one_trace_each(Protocol::Grpc).await
}

#[tokio::test]
async fn a_message_and_a_notification_are_each_one_trace_across_the_services_over_grpc_with_tls(
) -> anyhow::Result<()> {
    one_trace_each(Protocol::GrpcTls).await
}

/// A client message and the notification it becomes, traced across the services, exported
/// over `protocol` to a receiver that speaks only that protocol.
async fn one_trace_each(protocol: Protocol) -> anyhow::Result<()> {
    // Over TLS: a test CA, and the receiver's certificate for 127.0.0.1 signed by it.
    let certs = match protocol {
        Protocol::GrpcTls => Some(pgws_tests::test_certificates(
            "pgws-otlp-tls-",
            "IP:127.0.0.1",
        )?),
        _ => None,
    };
    let (addr, spans) = otlp_receiver(protocol, certs.as_deref()).await?;
    // The endpoint of both is the collector's base address: HTTP appends /v1/traces, gRPC
    // does not.
    let scheme = if certs.is_some() { "https" } else { "http" };
    let endpoint = format!("{scheme}://{addr}");
    let name = match protocol {
        Protocol::HttpProtobuf => "http/protobuf",
        Protocol::Grpc | Protocol::GrpcTls => "grpc",
    };
    let ca = certs.map(|dir| dir.join("ca.pem").to_string_lossy().into_owned());
    // A long export delay: the spans reach the receiver because shutdown flushes them.
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", name),
        ("OTEL_BSP_SCHEDULE_DELAY", "60000"),
        ("PGWS_LOG", "info,ws_gateway=debug"),
    ];
    if let Some(ca) = &ca {
        env.push(("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.as_str()));
    }
    let mut stack = Stack::start_with(&env).await?;
    let channel = unique("traced-");
    let mut ws = stack.connect(0, &channel, &json!({"mode": "rw"})).await?;
    ws.send_text("follow me").await?;
    // The message comes back as a notification: both traces happen.
    let echo = ws.next_json(T).await?;
    assert_eq!(echo["payload"], "follow me");
    drop(ws);
    for svc in stack.gateways.iter().chain(&stack.bridges) {
        svc.signal("TERM")?;
    }
    for svc in stack.gateways.iter_mut().chain(&mut stack.bridges) {
        assert!(svc.wait_exit(Duration::from_secs(30)).await?.success());
    }
    let complete = eventually(T, || {
        let spans = spans.lock().expect("spans").clone();
        let channel = channel.clone();
        async move {
            find(&spans, "ws-gateway", "gateway.fanout", |s| {
                s.attr("messaging.destination.name")
                    .is_some_and(|d| d.contains(&channel))
            })
            .is_some()
                && find(&spans, "pg-bridge", "bridge.notify", |_| true).is_some()
        }
    })
    .await;
    let spans = spans.lock().expect("spans").clone();
    assert!(
        complete,
        "spans missing over {endpoint} ({name}); got {:#?}",
        spans
            .iter()
            .map(|s| (&s.service, &s.name))
            .collect::<Vec<_>>()
    );

    // Client message: gateway.receive -> gateway.publish -> bridge.batch -> bridge.notify.
    let receive = find(&spans, "ws-gateway", "gateway.receive", |s| {
        s.attr("messaging.destination.name") == Some(channel.as_str())
    })
    .expect("gateway.receive");
    assert!(receive.parent.is_empty(), "the receive span is a root");
    assert_eq!(receive.attr("messaging.message.body.size"), Some("9"));
    let publish = find(&spans, "ws-gateway", "gateway.publish", |s| {
        s.parent == receive.id
    })
    .expect("gateway.publish under gateway.receive");
    assert_eq!(publish.trace, receive.trace);
    let batch = find(&spans, "pg-bridge", "bridge.batch", |s| {
        s.parent == publish.id
    })
    .expect("bridge.batch under gateway.publish");
    assert_eq!(batch.trace, receive.trace);
    assert_eq!(batch.attr("notifications"), Some("1"));
    let notify = find(&spans, "pg-bridge", "bridge.notify", |s| {
        s.parent == batch.id
    })
    .expect("bridge.notify under bridge.batch");
    assert_eq!(notify.trace, receive.trace);
    assert_eq!(notify.attr("db.system"), Some("postgresql"));

    // Notification: bridge.listen -> bridge.publish -> gateway.fanout (one span, not per socket).
    let listen = find(&spans, "pg-bridge", "bridge.listen", |s| {
        s.attr("messaging.destination.name") == Some(channel.as_str())
    })
    .expect("bridge.listen");
    assert!(listen.parent.is_empty(), "the listen span is a root");
    assert_ne!(
        listen.trace, receive.trace,
        "a notification is a trace of its own"
    );
    let out = find(&spans, "pg-bridge", "bridge.publish", |s| {
        s.parent == listen.id
    })
    .expect("bridge.publish under bridge.listen");
    let fanout = find(&spans, "ws-gateway", "gateway.fanout", |s| {
        s.parent == out.id
    })
    .expect("gateway.fanout under bridge.publish");
    assert_eq!(fanout.trace, listen.trace);
    assert_eq!(fanout.attr("sockets"), Some("1"));

    // The gateway's log line for the fan-out names the notification's trace.
    let log = stack.gateways[0].log();
    let id = hex(&listen.trace);
    assert!(
        log.lines()
            .any(|l| l.contains("fanned out") && l.contains(&id)),
        "no log line with trace_id={id}:\n{log}"
    );
    Ok(())
}

#[tokio::test]
async fn a_ca_file_that_cannot_be_read_stops_a_service_naming_the_variable() -> anyhow::Result<()> {
    let stack = Stack::new();
    let mut env = stack.env();
    let missing = std::env::temp_dir().join(unique("pgws-no-such-ca-"));
    for (k, v) in [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://127.0.0.1:4317"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        (
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
            &*missing.to_string_lossy(),
        ),
    ] {
        env.push((k.into(), v.into()));
    }
    let out = pgws_tests::Service::command(pgws_tests::ServiceKind::Bridge, &env)
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_CERTIFICATE"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn without_otel_settings_nothing_is_exported_and_an_unsupported_protocol_is_refused(
) -> anyhow::Result<()> {
    // An unsupported protocol (OTLP's JSON over HTTP) is a configuration error (exit 64)
    // naming the variable.
    let stack = Stack::new();
    let mut env = stack.env();
    env.push((
        "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
        "http://127.0.0.1:4318".into(),
    ));
    env.push(("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/json".into()));
    let out = pgws_tests::Service::command(pgws_tests::ServiceKind::Bridge, &env)
        .output()
        .await?;
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{stderr}");
    // Without OTEL_* settings the services carry no trace context on NATS.
    let stack = Stack::start().await?;
    let nats = async_nats::connect(pgws_tests::nats_url()).await?;
    let mut sub = nats.subscribe(format!("{}.>", stack.prefix)).await?;
    nats.flush().await?;
    let channel = unique("plain-");
    let mut ws = stack.connect(0, &channel, &json!({"mode": "rw"})).await?;
    ws.send_text("untraced").await?;
    ws.next_json(T).await?;
    let mut seen = 0;
    while let Ok(Some(m)) = tokio::time::timeout(
        Duration::from_millis(500),
        futures::StreamExt::next(&mut sub),
    )
    .await
    {
        seen += 1;
        let traced = m
            .headers
            .as_ref()
            .is_some_and(|h| h.get("traceparent").is_some());
        assert!(!traced, "a message on {} carries trace context", m.subject);
    }
    assert!(seen >= 2, "saw {seen} messages on the stack's subjects");
    Ok(())
}
