//! The ingest API's HTTP server: the accept loop around the axum router, with the limits
//! that keep clients from holding it hostage. Without them, thousands of connections that
//! send half a request and then nothing stay open forever, each holding a socket and memory.
//!
//! - at most `connections_max` connections are served at once; further ones wait in the
//!   kernel's listen backlog until one closes (a homeserver's request is delayed, not refused);
//! - a connection that has not sent a whole request head within `header_read_timeout` is
//!   closed; hyper's timer also runs while a keep-alive connection waits for its next request,
//!   so idle connections give their place back too;
//! - a request body must arrive within `body_read_timeout` (enforced where the handlers read
//!   it, see `api::read_json`, which answers 408).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, warn};

/// How much the ingest API lets its clients hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngestLimits {
    /// Connections served at once.
    pub connections_max: usize,
    /// From waiting for a request (a new connection, or an idle keep-alive one) to having its
    /// whole head.
    pub header_read_timeout: Duration,
    /// From the request head to having the whole body.
    pub body_read_timeout: Duration,
}

impl Default for IngestLimits {
    /// The defaults of `[ingest]` in `docs/serve-config.md`.
    fn default() -> Self {
        Self {
            connections_max: 512,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
        }
    }
}

/// An accept error such as EMFILE repeats until something closes; pausing keeps the loop
/// from spinning on it.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until `stop` turns true, then lets open connections finish
/// their current request and waits for them.
pub(crate) async fn serve(listener: TcpListener, app: Router, limits: IngestLimits, mut stop: watch::Receiver<bool>) {
    let places = Arc::new(Semaphore::new(limits.connections_max));
    let mut connections = JoinSet::new();
    loop {
        // Taking a place before accepting leaves excess connections in the backlog, where they
        // cost this process nothing.
        let place = tokio::select! {
            place = Arc::clone(&places).acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => break,
            },
            () = stopped(&mut stop) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!("ingest API: cannot accept a connection: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        // Answers are small and a homeserver waits on each; Nagle would delay them.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let mut stop = stop.clone();
        connections.spawn(async move {
            let _place = place;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stopped(&mut stop) => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                // Timeouts and clients that vanish mid-request end up here; not worth more.
                debug!(%peer, "ingest API connection ended: {e}");
            }
        });
        // Finished connections are reaped as we go, so the set stays as large as what is open.
        while connections.try_join_next().is_some() {}
    }
    while connections.join_next().await.is_some() {}
}

/// Returns once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}
