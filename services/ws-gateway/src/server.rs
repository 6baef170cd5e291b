//! The public listener: plain TCP or TLS, HTTP/1.1 with upgrades. A websocket upgrade on any
//! path goes to the protocol router (`protocol::admit`); other requests get the static folder (`PGWS_ROOT_PATH`, no path
//! traversal: `tower-http`'s `ServeDir`) or a plain 200.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tower_http::services::ServeDir;

use crate::limits::Peer;
use crate::protocol::{self, Refusal};
use crate::transport::{Conn, Reset};
use crate::{socket, Gateway};

/// Loads the certificate chain and key into a TLS acceptor.
pub(crate) fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("opening {cert:?}"))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("reading certificates from {cert:?}"))?;
    let key = rustls_pemfile::private_key(&mut BufReader::new(
        std::fs::File::open(key).with_context(|| format!("opening {key:?}"))?,
    ))
    .with_context(|| format!("reading the private key from {key:?}"))?
    .with_context(|| format!("no private key in {key:?}"))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("TLS certificate and key do not match")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The router: every path, websocket or not, goes to [`handle`].
pub(crate) fn router(gw: Arc<Gateway>) -> Router {
    // As in postgres-websockets, a static folder that does not exist does not stop the
    // gateway: non-websocket requests get 404 until it does.
    if let Some(root) = gw.config.root_path.as_deref().filter(|r| !r.exists()) {
        tracing::warn!(
            root_path = %root.display(),
            "PGWS_ROOT_PATH does not exist: no static files are served"
        );
    }
    Router::new().fallback(handle).with_state(gw)
}

/// Accepts connections until shutdown; each connection is an owned task.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    gw: Arc<Gateway>,
) {
    let token = gw.shutdown.token.clone();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = token.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Connections still in their handshake (TLS, request, upgrade) per source address.
        let slot = if gw.handshakes.enabled() {
            match gw.handshakes.acquire(peer.ip()) {
                Some(slot) => Some(slot),
                None => {
                    gw.metrics
                        .handshakes_refused
                        .get_or_create(&[("reason", "handshakes_per_address")])
                        .inc();
                    drop(tcp);
                    continue;
                }
            }
        } else {
            None
        };
        drop(tcp.set_nodelay(true));
        let peer = Peer(peer.ip());
        let (tcp, reset) = Conn::new(tcp);
        let service = TowerToHyperService::new(router.clone().map_request(
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer);
                req.extensions_mut().insert(reset.clone());
                req
            },
        ));
        let tls = tls.clone();
        let limit = gw.config.handshake_timeout;
        gw.shutdown.spawn(async move {
            let _slot = slot;
            let result = match tls {
                Some(tls) => match tokio::time::timeout(limit, tls.accept(tcp)).await {
                    Ok(Ok(stream)) => serve_conn(TokioIo::new(stream), service, limit).await,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("TLS handshake timed out");
                        return;
                    }
                },
                None => serve_conn(TokioIo::new(tcp), service, limit).await,
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

/// Serves HTTP/1.1 on one connection; a request whose headers take longer than
/// `header_timeout` to arrive ends the connection (slow clients hold nothing for long).
async fn serve_conn<I, S>(io: I, service: S, header_timeout: Duration) -> Result<(), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
{
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(io, service)
        .with_upgrades()
        .await
}

async fn handle(State(gw): State<Arc<Gateway>>, req: Request) -> Response {
    let is_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if is_upgrade {
        websocket(gw, req).await
    } else {
        static_files(&gw, req).await
    }
}

async fn websocket(gw: Arc<Gateway>, req: Request) -> Response {
    let (mut parts, _) = req.into_parts();
    let upgrade =
        match axum::extract::ws::WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(u) => u,
            Err(rejection) => return rejection.into_response(),
        };
    let origin = parts
        .headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok());
    if !gw.config.allowed_origins.allows(origin) {
        let refusal = Refusal::new(StatusCode::FORBIDDEN, "origin", "origin not allowed");
        return refuse(&gw, refusal);
    }
    // Held as long as the socket lives (with the handshake before it).
    let slot = match parts.extensions.get::<Peer>() {
        Some(peer) if gw.per_address.enabled() => match gw.per_address.acquire(peer.0) {
            Some(slot) => Some(slot),
            None => {
                let refusal = Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "per_address",
                    "too many connections from this address",
                );
                return refuse(&gw, refusal);
            }
        },
        _ => None,
    };
    // The handshake's own waits are bounded; this bounds them together.
    let admit = async {
        let admission = protocol::admit(&gw, &parts).await?;
        gw.accept(admission).await
    };
    let admitted = tokio::time::timeout(gw.config.handshake_timeout, admit);
    let accepted = match admitted.await {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(refusal)) => return refuse(&gw, refusal),
        Err(_) => {
            let refusal = Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "handshake_timeout",
                "the handshake could not complete in time; try again",
            );
            return refuse(&gw, refusal);
        }
    };
    // A frame longer than the message limit is refused from its header (close 1009), before
    // its payload is read. The read buffer is small (every socket keeps it): the connection
    // reads ahead for it (`transport`).
    let mut upgrade = upgrade
        .read_buffer_size(256)
        .write_buffer_size(8192)
        .max_frame_size(crate::MAX_FRAME)
        .max_message_size(crate::MAX_FRAME);
    if let Some(protocol) = protocol::selected_protocol(&parts)
        .as_deref()
        .and_then(|p| HeaderValue::from_str(p).ok())
    {
        upgrade.set_selected_protocol(protocol);
    }
    // Armed when the socket is given up with bytes it could not write.
    let reset = parts.extensions.get::<Reset>().cloned().unwrap_or_default();
    let upgrading = Box::new(socket::Upgrading {
        accepted,
        reset,
        owned: (gw.shutdown.tracker.token(), slot),
    });
    upgrade.on_upgrade(move |ws| socket::run(socket::Socket::new(upgrading, ws)))
}

fn refuse(gw: &Gateway, refusal: Refusal) -> Response {
    gw.metrics
        .handshakes_refused
        .get_or_create(&[("reason", refusal.reason)])
        .inc();
    tracing::debug!(reason = refusal.reason, "handshake refused");
    (refusal.status, refusal.body).into_response()
}

async fn static_files(gw: &Gateway, req: Request) -> Response {
    match &gw.config.root_path {
        Some(root) => match ServeDir::new(root).oneshot(req).await {
            Ok(resp) => resp.map(Body::new),
            Err(never) => match never {},
        },
        None => (StatusCode::OK, "").into_response(),
    }
}
