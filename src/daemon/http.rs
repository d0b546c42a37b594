//! The daemon's HTTP endpoint on `metrics_listen`: `GET /metrics`
//! (Prometheus text) and `GET /healthz` (200 or 503, with a JSON reason).
//! At most [`MAX_CONNECTIONS`] connections are open; a new one always gets
//! in, in place of the least recently active one of the busiest peer.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Connections kept open at once. A connection that arrives at the cap is
/// never turned away: it takes the place of the least recently active
/// connection of the peer that holds the most (see [`Connections`]), so idle
/// or slow sockets can never lock a scraper out, and a client that opens
/// many loses its own first.
const MAX_CONNECTIONS: usize = 64;

/// A client that does not send its request headers within this is dropped.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

use super::metrics::Metrics;

/// The open connections of the endpoint, and which one gives way to a new one.
#[derive(Debug, Default)]
struct Connections {
    next: u64,
    open: HashMap<u64, Connection>,
}

#[derive(Debug)]
struct Connection {
    peer: IpAddr,
    /// Accepted, or last answered a request.
    active: Instant,
    close: CancellationToken,
}

impl Connections {
    /// Admits a connection from `peer`, closing another one first when at
    /// the cap: of the peer with the most connections, the one least
    /// recently active. A scrape (a request as soon as it connects) is then
    /// the last connection to go.
    fn admit(&mut self, peer: IpAddr, parent: &CancellationToken) -> (u64, CancellationToken) {
        if self.open.len() >= MAX_CONNECTIONS {
            let mut per_peer: HashMap<IpAddr, usize> = HashMap::new();
            for c in self.open.values() {
                *per_peer.entry(c.peer).or_default() += 1;
            }
            let victim = self
                .open
                .iter()
                .max_by_key(|(_, c)| (per_peer[&c.peer], std::cmp::Reverse(c.active)))
                .map(|(id, _)| *id);
            if let Some(c) = victim.and_then(|id| self.open.remove(&id)) {
                tracing::debug!(peer = %c.peer, "metrics connections at the cap: closing the least recently active one");
                c.close.cancel();
            }
        }
        let id = self.next;
        self.next += 1;
        let close = parent.child_token();
        self.open.insert(
            id,
            Connection {
                peer,
                active: Instant::now(),
                close: close.clone(),
            },
        );
        (id, close)
    }

    fn touch(&mut self, id: u64) {
        if let Some(c) = self.open.get_mut(&id) {
            c.active = Instant::now();
        }
    }

    fn remove(&mut self, id: u64) {
        self.open.remove(&id);
    }
}

/// The endpoint, serving in the background.
#[derive(Debug)]
pub struct Endpoint {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    /// Stops accepting, closes every open connection, and returns once
    /// every connection's task has ended.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Binds `addr` now (so a port in use is a startup error), then serves in
/// the background until [`Endpoint::shutdown`].
pub async fn serve(addr: SocketAddr, metrics: Arc<Mutex<Metrics>>) -> Result<Endpoint> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on metrics_listen = {addr}"))?;
    tracing::info!(%addr, "serving /metrics and /healthz");
    let stop = CancellationToken::new();
    let task = tokio::spawn(accept(listener, metrics, stop.clone()));
    Ok(Endpoint { stop, task })
}

/// Accepts connections until `stop`, each served by a task of its own;
/// then waits for those tasks (each connection's token is a child of
/// `stop`, so all of them are closing).
async fn accept(listener: TcpListener, metrics: Arc<Mutex<Metrics>>, stop: CancellationToken) {
    let connections = Arc::new(Mutex::new(Connections::default()));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // e.g. out of file descriptors: do not spin
                tracing::warn!(error = %e, "cannot accept a metrics connection");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
        };
        let (id, close) = table(&connections).admit(peer.ip(), &stop);
        let metrics = Arc::clone(&metrics);
        let connections = Arc::clone(&connections);
        tasks.spawn(async move {
            let seen = Arc::clone(&connections);
            let service = hyper::service::service_fn(move |req| {
                table(&seen).touch(id);
                let metrics = Arc::clone(&metrics);
                async move { Ok::<_, Infallible>(answer(&req, &metrics)) }
            });
            let serving = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                served = serving => {
                    if let Err(e) = served {
                        tracing::debug!(error = %e, "metrics connection ended");
                    }
                }
                () = close.cancelled() => {}
            }
            table(&connections).remove(id);
        });
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
}

/// The connection table; a panic while holding it leaves it consistent.
fn table(c: &Mutex<Connections>) -> std::sync::MutexGuard<'_, Connections> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

fn answer(req: &Request<Incoming>, metrics: &Mutex<Metrics>) -> Response<Full<Bytes>> {
    let now = chrono::Utc::now();
    let metrics = metrics.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // HEAD is a GET without the body (hyper leaves the body out).
    let readable = matches!(*req.method(), Method::GET | Method::HEAD);
    let (status, content_type, body) = match (readable, req.uri().path()) {
        (true, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(now),
        ),
        (true, "/healthz") => {
            let health = metrics.health(now);
            let status = if health.healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::to_string(&health).unwrap_or_default();
            (status, "application/json", body + "\n")
        }
        (true, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics or /healthz\n".to_string(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET and HEAD\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, v);
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_busiest_peer_gives_way_least_recently_active_first() {
        let mut c = Connections::default();
        let root = CancellationToken::new();
        let (b, c_b) = ("10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        // the scraper's connection is the oldest of all
        let (_, scraper) = c.admit(b, &root);
        let flood: Vec<(u64, CancellationToken)> =
            (1..MAX_CONNECTIONS).map(|_| c.admit(a, &root)).collect();
        // in the order admitted, one millisecond apart
        let base = Instant::now() - std::time::Duration::from_secs(1);
        for (id, conn) in c.open.iter_mut() {
            conn.active = base + std::time::Duration::from_millis(*id);
        }
        // a's first connection answered a request since: its second is the
        // least recently active
        c.touch(flood[0].0);
        let (_, newcomer) = c.admit(c_b, &root);
        assert_eq!(c.open.len(), MAX_CONNECTIONS);
        assert!(
            !scraper.is_cancelled(),
            "the other peer keeps its connection"
        );
        assert!(!newcomer.is_cancelled());
        assert!(!flood[0].1.is_cancelled());
        assert!(flood[1].1.is_cancelled(), "the flooding peer's idlest goes");
        assert_eq!(flood.iter().filter(|(_, t)| t.is_cancelled()).count(), 1);
        // a closed connection leaves the table
        c.remove(flood[2].0);
        assert_eq!(c.open.len(), MAX_CONNECTIONS - 1);
    }

    #[tokio::test]
    async fn shutdown_closes_open_connections_and_waits_for_them() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let endpoint = serve(addr, Arc::new(Mutex::new(Metrics::default())))
            .await
            .unwrap();
        // an idle connection (no request yet) and one that was answered
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        kept.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 503");
        tokio::time::timeout(std::time::Duration::from_secs(5), endpoint.shutdown())
            .await
            .expect("shutdown waits only for the connections it closed");
        // both connections were closed by the server, and nothing listens
        let mut rest = Vec::new();
        for s in [&mut idle, &mut kept] {
            // an end of file or a reset: either way the server let go
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut rest))
                    .await
                    .expect("the server closed the connection");
        }
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
