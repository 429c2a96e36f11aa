//! Receiving one OAuth callback on a loopback address (`tokenfence connect
//! --listen`): the browser is redirected to `http://ADDR/callback?code=...&state=...`;
//! its raw query goes to [`TokenManager::finish_connect`](crate::TokenManager::finish_connect).

use axum::extract::RawQuery;
use axum::response::Html;
use axum::routing::get;
use axum::Router;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Serves `listener` until one request reaches `/callback`; returns its raw query
/// (the code inside it is a secret: hand it to `finish_connect`, do not log it).
pub async fn receive_one(listener: tokio::net::TcpListener) -> std::io::Result<String> {
    let (tx, rx) = oneshot::channel::<String>();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let app = Router::new().route(
        "/callback",
        get(move |RawQuery(query): RawQuery| {
            let tx = Arc::clone(&tx);
            async move {
                let sender = tx.lock().ok().and_then(|mut t| t.take());
                match sender {
                    Some(sender) => {
                        let _ = sender.send(query.unwrap_or_default());
                        Html("<!doctype html><title>tokenfence</title><p>Received. You can close this window: the terminal says how it went.</p>")
                    }
                    None => Html("<!doctype html><title>tokenfence</title><p>A callback was already received.</p>"),
                }
            }
        }),
    );
    let (done, finished) = oneshot::channel::<()>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async {
        let _ = finished.await;
    });
    let serving = tokio::spawn(async move { server.await });
    let query = rx
        .await
        .map_err(|_| std::io::Error::other("the server stopped before a callback came"));
    let _ = done.send(());
    let _ = serving.await;
    query
}
