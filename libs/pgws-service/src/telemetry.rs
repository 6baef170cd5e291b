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
//! endpoint as given). gRPC is over TLS (rustls, ring) with an `https://` endpoint (or one
//! without a scheme, unless `OTEL_EXPORTER_OTLP_(TRACES_)INSECURE=true`): the server is checked
//! against the system's roots, or instead against the PEM CA file in
//! `OTEL_EXPORTER_OTLP_(TRACES_)CERTIFICATE`; `OTEL_EXPORTER_OTLP_(TRACES_)CLIENT_CERTIFICATE`
//! and `_CLIENT_KEY` present a client certificate. The files are read at start; one that cannot
//! be read or holds nothing usable is an error naming its variable. The SDK reads the rest itself
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

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use pgws_bus::Headers as HeaderMap;
use pgws_config::{keys, Settings};
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
        None if first_set(&env, ENDPOINTS).is_none() => return Ok(Export::Off),
        None => {}
    }
    let protocol = match first_set(
        &env,
        [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ],
    ) {
        None => Protocol::HttpProtobuf,
        Some((key, p)) => match p.to_ascii_lowercase().as_str() {
            "http/protobuf" => Protocol::HttpProtobuf,
            "grpc" => Protocol::Grpc,
            _ => {
                return Err(format!(
                    "{key}: {p:?} is not supported (grpc, the collector's port 4317, or http/protobuf, its port 4318)"
                ))
            }
        },
    };
    Ok(Export::Otlp(protocol))
}

/// Where traces go, the traces-only variable first.
const ENDPOINTS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// The first of `keys` that is set (not empty), with its name.
fn first_set(env: &impl Fn(&str) -> Option<String>, keys: [&'static str; 2]) -> Option<Named> {
    keys.into_iter().find_map(|k| {
        env(k)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .map(|v| (k, v))
    })
}

/// Whether the gRPC exporter connects over TLS, its endpoint resolved as the exporter does:
/// `https://`, or no scheme unless `OTEL_EXPORTER_OTLP_(TRACES_)INSECURE=true`. The default
/// endpoint (`http://localhost:4317`) is plain text.
pub(crate) fn grpc_over_tls(env: impl Fn(&str) -> Option<String>) -> bool {
    let Some((_, endpoint)) = first_set(&env, ENDPOINTS) else {
        return false;
    };
    let endpoint = endpoint.to_ascii_lowercase();
    if endpoint.starts_with("https://") {
        return true;
    }
    if endpoint.contains("://") {
        return false;
    }
    // The exporter reads these without trimming, and only `true` (any case) is insecure.
    let insecure = env("OTEL_EXPORTER_OTLP_TRACES_INSECURE")
        .or_else(|| env("OTEL_EXPORTER_OTLP_INSECURE"))
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    !insecure
}

/// A file named by a variable: the variable and the path.
type Named = (&'static str, String);

/// The PEM files of a TLS connection, each with the variable that names it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    /// The CA trusted instead of the system's roots.
    ca: Option<Named>,
    /// The client's certificate (chain) and its private key.
    client: Option<(Named, Named)>,
}

/// The TLS files the `OTEL_EXPORTER_OTLP_(TRACES_)CERTIFICATE`, `_CLIENT_CERTIFICATE` and
/// `_CLIENT_KEY` variables name; a client certificate without its key (or the reverse) is an
/// error.
pub(crate) fn tls_files(env: impl Fn(&str) -> Option<String>) -> Result<TlsFiles, String> {
    let ca = first_set(
        &env,
        [
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
        ],
    );
    let cert = first_set(
        &env,
        [
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        ],
    );
    let key = first_set(
        &env,
        [
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
            "OTEL_EXPORTER_OTLP_CLIENT_KEY",
        ],
    );
    let client = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some((k, _)), None) => {
            return Err(format!(
                "{k}: a client certificate needs its key (OTEL_EXPORTER_OTLP_CLIENT_KEY)"
            ))
        }
        (None, Some((k, _))) => {
            return Err(format!(
                "{k}: a client key needs its certificate (OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE)"
            ))
        }
    };
    Ok(TlsFiles { ca, client })
}

/// Reads a PEM file named by the variable `key`, with at least one certificate in it.
fn read_certificates(key: &str, path: &str) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{key}: {path}: {e}"))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{key}: {path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{key}: {path}: no PEM certificate in it"));
    }
    Ok(pem)
}

/// The gRPC exporter's TLS settings: the CA file's certificates, else the system's roots (found
/// when the connection is built); and the client's certificate, if any.
fn tls_config(
    files: &TlsFiles,
) -> Result<opentelemetry_otlp::tonic_types::transport::ClientTlsConfig, String> {
    use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig, Identity};
    let config = match &files.ca {
        Some((key, path)) => ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read_certificates(key, path)?)),
        None => ClientTlsConfig::new().with_native_roots(),
    };
    let Some(((cert_key, cert_path), (key_key, key_path))) = &files.client else {
        return Ok(config);
    };
    let cert = read_certificates(cert_key, cert_path)?;
    let pem = std::fs::read(key_path).map_err(|e| format!("{key_key}: {key_path}: {e}"))?;
    match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(_)) => {}
        Ok(None) => return Err(format!("{key_key}: {key_path}: no PEM private key in it")),
        Err(e) => return Err(format!("{key_key}: {key_path}: {e}")),
    }
    Ok(config.identity(Identity::from_pem(cert, pem)))
}

/// Installs the global subscriber (logs, and the trace exporter when the `OTEL_*` variables
/// ask for it). Call it before any async runtime starts: the exporter runs on a thread of its
/// own (the SDK's batch processor), and the gRPC exporter's connection on a one-thread runtime
/// of its own, kept until [`Telemetry::shutdown`]. An error names the variable that is wrong.
pub fn init_telemetry(settings: &Settings, service: &str) -> Result<Telemetry, String> {
    let export = export_from(|k| std::env::var(k).ok())?;
    let filter = settings
        .get(keys::LOG)
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
    let fmt = if settings.get(keys::LOG_FORMAT) == Some("json") {
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
    use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
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
            let mut builder = builder.with_tonic();
            if grpc_over_tls(|k| std::env::var(k).ok()) {
                let files = tls_files(|k| std::env::var(k).ok())?;
                builder = builder.with_tls_config(tls_config(&files)?);
            }
            // The channel connects lazily; its worker task is spawned on the runtime entered.
            let built = {
                let _entered = runtime.enter();
                builder.build()
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

/// Writes the span's trace context into bus headers (`traceparent`, `tracestate`).
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    if tracing_enabled() {
        TraceContextPropagator::new().inject_context(&span.context(), &mut NatsHeaders(headers));
    }
}

/// Makes the trace context found in `headers` the span's parent (before the span is entered),
/// then marks the span with its trace id.
pub fn adopt(span: &Span, headers: &HeaderMap) {
    if !tracing_enabled() {
        return;
    }
    if let Some(cx) = remote(headers) {
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
pub fn link_remote(span: &Span, headers: &HeaderMap) {
    if let (true, Some(cx)) = (tracing_enabled(), remote(headers)) {
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
        self.0.insert(key.to_owned(), value);
    }
}

/// NATS headers as the propagator reads them.
struct ReadHeaders<'a>(&'a HeaderMap);

impl Extractor for ReadHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of<'a>(vars: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<String> + 'a {
        |k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn decide(vars: &[(&str, &str)]) -> Result<Export, String> {
        export_from(env_of(vars))
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
        // gRPC over TLS is no longer refused.
        assert_eq!(
            decide(&[
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://c:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ]),
            Ok(Export::Otlp(Protocol::Grpc))
        );
        let zipkin = decide(&[("OTEL_TRACES_EXPORTER", "zipkin")]).expect_err("zipkin");
        assert!(zipkin.starts_with("OTEL_TRACES_EXPORTER:"), "{zipkin}");
    }

    #[test]
    fn the_endpoint_decides_whether_grpc_is_over_tls() {
        let tls = |vars: &[(&str, &str)]| grpc_over_tls(env_of(vars));
        assert!(!tls(&[]), "the default endpoint is plain text");
        assert!(!tls(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")]));
        assert!(tls(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "HTTPS://c:4317")]));
        // The traces' own endpoint wins.
        assert!(tls(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://c:4317")
        ]));
        assert!(!tls(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317")
        ]));
        // Without a scheme: TLS unless insecure.
        assert!(tls(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4317")]));
        assert!(!tls(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4317"),
            ("OTEL_EXPORTER_OTLP_INSECURE", "TRUE")
        ]));
        assert!(tls(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "c:4317"),
            ("OTEL_EXPORTER_OTLP_INSECURE", "true"),
            ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "false")
        ]));
    }

    #[test]
    fn tls_files_come_from_the_otel_variables() {
        let files = |vars: &[(&str, &str)]| tls_files(env_of(vars));
        assert_eq!(files(&[]), Ok(TlsFiles::default()));
        assert_eq!(
            files(&[
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/all.pem"),
                ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "/traces.pem")
            ]),
            Ok(TlsFiles {
                ca: Some((
                    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
                    "/traces.pem".into()
                )),
                client: None
            })
        );
        assert_eq!(
            files(&[
                ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/c.pem"),
                ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "/k.pem")
            ]),
            Ok(TlsFiles {
                ca: None,
                client: Some((
                    ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/c.pem".into()),
                    ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "/k.pem".into())
                ))
            })
        );
        let half = files(&[("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/c.pem")])
            .expect_err("a certificate without its key");
        assert!(
            half.starts_with("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE:"),
            "{half}"
        );
        let half = files(&[("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "/k.pem")])
            .expect_err("a key without its certificate");
        assert!(
            half.starts_with("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY:"),
            "{half}"
        );
    }

    #[test]
    fn a_missing_or_invalid_tls_file_is_named() {
        let dir = std::env::temp_dir().join(format!("pgws-otlp-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").expect("junk");
        let junk = junk.to_string_lossy().into_owned();
        let ca = |path: &str| TlsFiles {
            ca: Some(("OTEL_EXPORTER_OTLP_CERTIFICATE", path.to_owned())),
            client: None,
        };
        let missing = tls_config(&ca("/nonexistent/ca.pem")).expect_err("missing");
        assert!(
            missing.starts_with("OTEL_EXPORTER_OTLP_CERTIFICATE: /nonexistent/ca.pem:"),
            "{missing}"
        );
        let invalid = tls_config(&ca(&junk)).expect_err("invalid");
        assert!(
            invalid.starts_with("OTEL_EXPORTER_OTLP_CERTIFICATE:") && invalid.contains("no PEM"),
            "{invalid}"
        );
        let key = tls_config(&TlsFiles {
            ca: None,
            client: Some((
                (
                    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                    "/nonexistent/c.pem".into(),
                ),
                ("OTEL_EXPORTER_OTLP_CLIENT_KEY", junk.clone()),
            )),
        })
        .expect_err("missing client certificate");
        assert!(
            key.starts_with("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE:"),
            "{key}"
        );
        std::fs::remove_dir_all(&dir).ok();
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
