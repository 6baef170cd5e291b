//! Logs and traces.
//!
//! Logs: structured lines with `tracing`, text by default, JSON lines with
//! `PGWS_LOG_FORMAT=json`; the filter comes from `PGWS_LOG` (then `RUST_LOG`), default `info`.
//!
//! Traces: OpenTelemetry spans exported over OTLP when the standard variables ask for it:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` set, or
//! `OTEL_TRACES_EXPORTER=otlp`; not when `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none`. `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else
//! `OTEL_EXPORTER_OTLP_PROTOCOL`, chooses the transport: `http/protobuf` (the default; port
//! 4318, `/v1/traces` appended to `OTEL_EXPORTER_OTLP_ENDPOINT`) or `grpc` (port 4317, the
//! endpoint as given; plain text, no TLS). The SDK reads the rest itself
//! (`OTEL_SERVICE_NAME`, default the service's name; `OTEL_TRACES_SAMPLER`,
//! `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_HEADERS`, `_TIMEOUT`, ...).
//! The message spans use the target [`TARGET`]; without export no layer is interested in
//! that target, so creating those spans costs one cached check. With export, log lines
//! written inside a message span carry its `trace_id`.
//!
//! The W3C trace context travels in NATS headers (`traceparent`): [`inject`] on the sending
//! side, [`adopt`] on the receiving side.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use pgws_config::Settings;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The `tracing` target of the spans exported as traces.
pub const TARGET: &str = "pgws_trace";

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (so whether building trace context is worth anything).
pub fn tracing_enabled() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The installed telemetry; [`Telemetry::shutdown`] flushes the spans not yet exported.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// The gRPC exporter's own runtime: its connection lives there, apart from the service's
    /// runtime, which is gone before the last spans are flushed.
    grpc: Option<tokio::runtime::Runtime>,
}

impl Telemetry {
    /// Exports what is buffered and stops the exporter (bounded by the SDK's timeouts).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            EXPORTING.store(false, Ordering::Relaxed);
            if let Err(e) = provider.shutdown() {
                eprintln!("telemetry: flushing spans at shutdown failed: {e}");
            }
        }
        // Only after the flush: the batch processor's thread exports through this runtime.
        if let Some(runtime) = self.grpc {
            runtime.shutdown_background();
        }
    }
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    HttpProtobuf,
    Grpc,
}

/// Where the OpenTelemetry variables point, read from `env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Export {
    Off,
    Otlp(Protocol),
}

/// Decides from the `OTEL_*` variables whether to export, or says what is wrong with them.
pub(crate) fn export_from(env: impl Fn(&str) -> Option<String>) -> Result<Export, String> {
    let set = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(Export::Off);
    }
    match set("OTEL_TRACES_EXPORTER").map(|v| v.to_ascii_lowercase()) {
        Some(v) if v == "none" => return Ok(Export::Off),
        Some(v) if v != "otlp" => {
            return Err(format!(
                "OTEL_TRACES_EXPORTER: {v:?} is not supported (otlp or none)"
            ))
        }
        Some(_) => {}
        None if set("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
            && set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none() =>
        {
            return Ok(Export::Off)
        }
        None => {}
    }
    let mut protocol = Protocol::HttpProtobuf;
    for key in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(p) = set(key) {
            protocol = match p.trim().to_ascii_lowercase().as_str() {
                "http/protobuf" => Protocol::HttpProtobuf,
                "grpc" => Protocol::Grpc,
                _ => {
                    return Err(format!(
                        "{key}: {p:?} is not supported (grpc, the collector's port 4317, or http/protobuf, its port 4318)"
                    ))
                }
            };
            break;
        }
    }
    if protocol == Protocol::Grpc {
        for key in [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ] {
            if let Some(e) = set(key) {
                if e.trim().to_ascii_lowercase().starts_with("https://") {
                    return Err(format!(
                        "{key}: {e:?}: gRPC export has no TLS built in; use an http:// endpoint, or http/protobuf for a TLS collector"
                    ));
                }
                break;
            }
        }
    }
    Ok(Export::Otlp(protocol))
}

/// Installs the global subscriber (logs, and the trace exporter when the `OTEL_*` variables
/// ask for it). Call it before any async runtime starts: the exporter runs on a thread of its
/// own (the SDK's batch processor), and the gRPC exporter's connection on a one-thread runtime
/// of its own, kept until [`Telemetry::shutdown`]. An error names the variable that is wrong.
pub fn init_telemetry(settings: &Settings, service: &str) -> Result<Telemetry, String> {
    let export = export_from(|k| std::env::var(k).ok())?;
    let filter = settings
        .get("log")
        .map(str::to_owned)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_owned());
    let mut filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    if export == Export::Off {
        // Nothing wants the message spans: they are not even recorded.
        if let Ok(off) = format!("{TARGET}=off").parse() {
            filter = filter.add_directive(off);
        }
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = if settings.get("log_format") == Some("json") {
        fmt.json().flatten_event(true).with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let mut grpc = None;
    let (provider, traces) = match export {
        Export::Off => (None, None),
        Export::Otlp(protocol) => {
            let exporter = exporter(protocol, &mut grpc)?;
            let mut resource = Resource::builder();
            if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.is_empty()) {
                resource = resource.with_service_name(service.to_owned());
            }
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.build())
                .build();
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(service.to_owned()))
                .with_filter(Targets::new().with_target(TARGET, LevelFilter::TRACE));
            (Some(provider), Some(layer))
        }
    };
    let result = tracing_subscriber::registry()
        .with(fmt)
        .with(traces)
        .try_init();
    if result.is_ok() && provider.is_some() {
        EXPORTING.store(true, Ordering::Relaxed);
    }
    Ok(Telemetry { provider, grpc })
}

/// The OTLP span exporter for `protocol`. The gRPC (tonic) client needs a Tokio runtime for
/// its connection: it gets one of its own, left in `grpc`; the batch processor's thread only
/// hands it requests and waits for the answers.
fn exporter(
    protocol: Protocol,
    grpc: &mut Option<tokio::runtime::Runtime>,
) -> Result<opentelemetry_otlp::SpanExporter, String> {
    use opentelemetry_otlp::WithExportConfig;
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let built = match protocol {
        Protocol::HttpProtobuf => builder
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build(),
        Protocol::Grpc => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp-grpc")
                .enable_all()
                .build()
                .map_err(|e| format!("gRPC trace export: cannot start its runtime: {e}"))?;
            // The channel connects lazily; its worker task is spawned on the runtime entered.
            let built = {
                let _entered = runtime.enter();
                builder.with_tonic().build()
            };
            *grpc = Some(runtime);
            built
        }
    };
    built.map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT: {e}"))
}

/// Records the span's trace id in its `trace_id` field (declared `Empty`), so the log lines
/// inside it name their trace. Call it after [`adopt`], when the span has its parent.
pub fn mark(span: &Span) {
    if tracing_enabled() {
        let cx = span.context();
        let id = cx.span().span_context().trace_id();
        span.record("trace_id", tracing::field::display(id));
    }
}

/// Writes the span's trace context into NATS headers (`traceparent`, `tracestate`).
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    if tracing_enabled() {
        TraceContextPropagator::new().inject_context(&span.context(), &mut NatsHeaders(headers));
    }
}

/// Makes the trace context found in `headers` the span's parent (before the span is entered),
/// then marks the span with its trace id.
pub fn adopt(span: &Span, headers: Option<&HeaderMap>) {
    if !tracing_enabled() {
        return;
    }
    if let Some(cx) = headers.and_then(remote) {
        drop(span.set_parent(cx));
    }
    mark(span);
}

/// Links `span` to the span `other` (for work done for several traces at once).
pub fn link(span: &Span, other: &Span) {
    if tracing_enabled() {
        add_link(span, &other.context());
    }
}

/// Links `span` to the trace context found in `headers` (a batch serving several traces).
pub fn link_remote(span: &Span, headers: Option<&HeaderMap>) {
    if let (true, Some(cx)) = (tracing_enabled(), headers.and_then(remote)) {
        add_link(span, &cx);
    }
}

/// The valid trace context in `headers`, if any.
fn remote(headers: &HeaderMap) -> Option<opentelemetry::Context> {
    let cx = TraceContextPropagator::new().extract(&ReadHeaders(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

fn add_link(span: &Span, cx: &opentelemetry::Context) {
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// NATS headers as the propagator writes them.
struct NatsHeaders<'a>(&'a mut HeaderMap);

impl Injector for NatsHeaders<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

/// NATS headers as the propagator reads them.
struct ReadHeaders<'a>(&'a HeaderMap);

impl Extractor for ReadHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(vars: &[(&str, &str)]) -> Result<Export, String> {
        export_from(|k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn the_otel_variables_decide_the_export() {
        assert_eq!(decide(&[]), Ok(Export::Off));
        assert_eq!(
            decide(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]),
            Ok(Export::Otlp(Protocol::HttpProtobuf))
        );
        assert_eq!(
            decide(&[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://c:4318/v1/traces"
            )]),
            Ok(Export::Otlp(Protocol::HttpProtobuf))
        );
        assert_eq!(
            decide(&[("OTEL_TRACES_EXPORTER", "otlp")]),
            Ok(Export::Otlp(Protocol::HttpProtobuf))
        );
        assert_eq!(
            decide(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_SDK_DISABLED", "true")
            ]),
            Ok(Export::Off)
        );
        assert_eq!(
            decide(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_TRACES_EXPORTER", "none")
            ]),
            Ok(Export::Off)
        );
        assert_eq!(
            decide(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
            ]),
            Ok(Export::Otlp(Protocol::HttpProtobuf))
        );
        assert_eq!(
            decide(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            ]),
            Ok(Export::Otlp(Protocol::Grpc))
        );
        assert_eq!(
            decide(&[
                ("OTEL_TRACES_EXPORTER", "otlp"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
            ]),
            Ok(Export::Otlp(Protocol::Grpc))
        );
        // The traces' own variable wins, either way.
        assert_eq!(
            decide(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
            ]),
            Ok(Export::Otlp(Protocol::Grpc))
        );
        assert_eq!(
            decide(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
            ]),
            Ok(Export::Otlp(Protocol::HttpProtobuf))
        );
        // Empty is unset.
        assert_eq!(
            decide(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", ""),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            ]),
            Ok(Export::Otlp(Protocol::Grpc))
        );
    }

    #[test]
    fn unsupported_otel_settings_are_named() {
        let json = decide(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ])
        .expect_err("http/json");
        assert!(json.starts_with("OTEL_EXPORTER_OTLP_PROTOCOL:"), "{json}");
        assert!(json.contains("http/json"), "{json}");
        // The variable that decided is the one named.
        let bad = decide(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift"),
        ])
        .expect_err("thrift");
        assert!(
            bad.starts_with("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL:"),
            "{bad}"
        );
        let tls = decide(&[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .expect_err("grpc over TLS");
        assert!(
            tls.starts_with("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT:"),
            "{tls}"
        );
        let zipkin = decide(&[("OTEL_TRACES_EXPORTER", "zipkin")]).expect_err("zipkin");
        assert!(zipkin.starts_with("OTEL_TRACES_EXPORTER:"), "{zipkin}");
    }

    #[test]
    fn trace_context_round_trips_through_nats_headers() {
        let mut h = HeaderMap::new();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        NatsHeaders(&mut h).set("traceparent", tp.to_owned());
        let cx = TraceContextPropagator::new().extract(&ReadHeaders(&h));
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        let mut out = HeaderMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut NatsHeaders(&mut out));
        assert_eq!(out.get("traceparent").map(|v| v.as_str()), Some(tp));
    }
}
