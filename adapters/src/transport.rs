//! Sending the requests the core builds. The transport's one judgement is the one
//! the core cannot make: was the request certainly not sent, or may the provider
//! have processed it without us seeing the reply?

use crate::clock::Clock;
use async_trait::async_trait;
use bytes::Bytes;
use reqwest::header::HeaderValue;
use std::time::Duration;
use tokenfence_core::{HttpRequest, HttpResponse, Timestamp, MAX_REPLY_BYTES};
use zeroize::Zeroizing;

/// How a request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// A complete reply (the body is capped just above [`MAX_REPLY_BYTES`], so an
    /// oversized reply reaches the core as such and is rejected there).
    Replied(HttpResponse),
    /// Certainly not sent: connection refused, DNS failure, deadline passed,
    /// refused URL.
    NotSent,
    /// Maybe processed: timed out or broken after the request went out.
    OutcomeUnknown,
}

/// Something that can carry out an [`HttpRequest`].
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Sends `request`, which must not start after `request.send_deadline`, and must
    /// be over by then (the deadline is the whole exchange's timeout).
    async fn send(&self, request: &HttpRequest) -> Delivery;
}

#[async_trait]
impl<T: Transport + ?Sized> Transport for std::sync::Arc<T> {
    async fn send(&self, request: &HttpRequest) -> Delivery {
        (**self).send(request).await
    }
}

/// Why a URL may not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("refusing to send OAuth credentials to {url}: only https, or plain http to a loopback address, is allowed")]
pub struct InsecureUrl {
    /// The URL (endpoints are not secrets).
    pub url: String,
}

/// Refuses anything but https, except plain http to 127.0.0.1/::1/localhost.
pub fn check_url(url: &str) -> Result<(), InsecureUrl> {
    let refuse = || InsecureUrl { url: url.into() };
    let parsed = reqwest::Url::parse(url).map_err(|_| refuse())?;
    match (parsed.scheme(), parsed.host()) {
        ("https", Some(_)) => Ok(()),
        ("http", Some(url::Host::Ipv4(ip))) if ip.is_loopback() => Ok(()),
        ("http", Some(url::Host::Ipv6(ip))) if ip.is_loopback() => Ok(()),
        ("http", Some(url::Host::Domain("localhost"))) => Ok(()),
        _ => Err(refuse()),
    }
}

/// reqwest with rustls: connect timeout, total timeout from the request's
/// deadline, no redirects, capped reply size.
pub struct ReqwestTransport {
    client: reqwest::Client,
    clock: std::sync::Arc<dyn Clock>,
}

impl ReqwestTransport {
    /// A transport with a 5-second connect timeout.
    pub fn new(clock: std::sync::Arc<dyn Clock>) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(ReqwestTransport { client, clock })
    }

    /// The reqwest request for `request`. Every header value is marked sensitive
    /// (hyper keeps it out of HPACK tables and `Debug` output), and the header
    /// values and the body, which hold the client secret and the refresh token, are
    /// copies that are zeroed when reqwest drops them.
    fn build(&self, request: &HttpRequest) -> Result<reqwest::Request, reqwest::Error> {
        let zeroed_on_drop = |s: &str| Bytes::from_owner(Zeroizing::new(s.as_bytes().to_vec()));
        let mut builder = self.client.post(&request.url);
        for h in &request.headers {
            // A value the core built (ASCII, no control characters): always valid.
            if let Ok(mut value) = HeaderValue::from_maybe_shared(zeroed_on_drop(h.value.expose()))
            {
                value.set_sensitive(true);
                builder = builder.header(h.name, value);
            }
        }
        builder.body(zeroed_on_drop(request.body.expose())).build()
    }

    async fn exchange(&self, request: &HttpRequest) -> Result<HttpResponse, reqwest::Error> {
        let mut response = self.client.execute(self.build(request)?).await?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_REPLY_BYTES {
                break; // the core rejects it as too large; stop reading
            }
        }
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }
}

fn remaining(deadline: Timestamp, now: Timestamp) -> Option<Duration> {
    let left = deadline.saturating_since(now);
    (!left.is_zero()).then_some(left)
}

#[async_trait]
impl Transport for ReqwestTransport {
    async fn send(&self, request: &HttpRequest) -> Delivery {
        if let Err(e) = check_url(&request.url) {
            tracing::error!(error = %e, "request refused");
            return Delivery::NotSent;
        }
        let Some(budget) = remaining(request.send_deadline, self.clock.now()) else {
            return Delivery::NotSent;
        };
        match tokio::time::timeout(budget, self.exchange(request)).await {
            Ok(Ok(reply)) => Delivery::Replied(reply),
            Ok(Err(e)) if e.is_connect() || e.is_builder() => {
                tracing::warn!(error = %e.without_url(), "refresh request not sent");
                Delivery::NotSent
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e.without_url(), "refresh outcome unknown");
                Delivery::OutcomeUnknown
            }
            Err(_) => {
                tracing::warn!(?budget, "refresh timed out; outcome unknown");
                Delivery::OutcomeUnknown
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_headers_are_sensitive_and_nothing_shows_in_debug() {
        let clock: std::sync::Arc<dyn Clock> = std::sync::Arc::new(crate::clock::SystemClock);
        let transport = ReqwestTransport::new(clock).unwrap();
        let client = tokenfence_core::ClientCredentials {
            client_id: "app-id".into(),
            client_secret: tokenfence_core::ClientSecret::new("sekret-Client-9"),
            environment: tokenfence_core::Environment::Production,
        };
        let request = tokenfence_core::refresh_request(
            &tokenfence_core::ProviderProfile::intuit(),
            &client,
            &tokenfence_core::RefreshToken::new("RT-sekret-7"),
            Timestamp::from_secs(2_000_000_000),
        );
        let built = transport.build(&request).unwrap();
        let auth = &built.headers()["authorization"];
        assert!(auth.is_sensitive());
        assert!(built.headers().values().all(HeaderValue::is_sensitive));
        let shown = format!("{built:?} {:?}", built.headers());
        assert!(!shown.contains("Basic"), "{shown}");
        assert!(!shown.contains("RT-sekret-7"), "{shown}");
        let body = built.body().and_then(|b| b.as_bytes()).unwrap();
        assert_eq!(body, request.body.expose().as_bytes());
    }

    #[test]
    fn only_https_or_loopback_http() {
        assert!(check_url("https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer").is_ok());
        assert!(check_url("http://127.0.0.1:8080/token").is_ok());
        assert!(check_url("http://[::1]:8080/token").is_ok());
        assert!(check_url("http://localhost:8080/token").is_ok());
        assert!(check_url("http://oauth.platform.intuit.com/token").is_err());
        assert!(check_url("http://10.0.0.1/token").is_err());
        assert!(check_url("ftp://127.0.0.1/token").is_err());
        assert!(check_url("not a url").is_err());
    }
}
