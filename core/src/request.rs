//! HTTP requests built by the core as data, so that what is sent is verified and fuzzed.

use crate::profile::{ClientAuth, ClientCredentials, ProviderProfile, RevokeStyle};
use crate::secret::{RefreshToken, SecretString};
use crate::time::Timestamp;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use base64::Engine as _;

/// One HTTP header of a request. Values may carry secrets and are redacted in `Debug`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Header {
    /// Lower-case header name.
    pub name: &'static str,
    /// Header value.
    pub value: SecretString,
}

/// An HTTP request for the driver to send exactly as given.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct HttpRequest {
    /// Always `POST` for token and revocation endpoints.
    pub method: &'static str,
    /// Absolute URL.
    pub url: String,
    /// Headers in order.
    pub headers: Vec<Header>,
    /// Body bytes (form-encoded or JSON); carries a token, so it is a secret.
    pub body: SecretString,
    /// The driver must not start sending after this instant: past it the worker's
    /// lease may have expired. It reports [`Input::NotSent`](crate::Input::NotSent)
    /// instead. It is also the total timeout of the exchange.
    pub send_deadline: Timestamp,
}

impl HttpRequest {
    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.expose())
    }
}

impl core::fmt::Debug for HttpRequest {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut names = f.debug_list();
        for h in &self.headers {
            names.entry(&h.name);
        }
        names.finish()?;
        write!(
            f,
            " {} {} (body <redacted {} bytes>, send before {})",
            self.method,
            self.url,
            self.body.len(),
            self.send_deadline
        )
    }
}

fn header(name: &'static str, value: impl Into<String>) -> Header {
    Header {
        name,
        value: SecretString::new(value),
    }
}

fn basic_auth(client: &ClientCredentials) -> Header {
    let raw = SecretString::new(format!(
        "{}:{}",
        client.client_id,
        client.client_secret.expose()
    ));
    let encoded = base64::engine::general_purpose::STANDARD.encode(raw.expose());
    header("authorization", format!("Basic {encoded}"))
}

fn form(pairs: &[(&str, &str)]) -> SecretString {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    SecretString::new(s.finish())
}

/// The refresh request of RFC 6749 §6 in the profile's dialect.
pub fn refresh_request(
    profile: &ProviderProfile,
    client: &ClientCredentials,
    refresh: &RefreshToken,
    send_deadline: Timestamp,
) -> HttpRequest {
    let grant = [
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh.expose()),
    ];
    token_request(
        profile,
        client,
        &grant,
        profile.ask_hard_expiry,
        send_deadline,
    )
}

/// The authorization-code exchange of RFC 6749 §4.1.3: its reply is read with
/// [`parse_token_reply`](crate::parse_token_reply) and stored with
/// [`Input::Authorized`](crate::Input::Authorized).
pub fn authorization_code_request(
    profile: &ProviderProfile,
    client: &ClientCredentials,
    code: &SecretString,
    redirect_uri: &str,
    verifier: Option<&SecretString>,
    send_deadline: Timestamp,
) -> HttpRequest {
    let mut grant = alloc::vec![
        ("grant_type", "authorization_code"),
        ("code", code.expose()),
        ("redirect_uri", redirect_uri),
    ];
    if let Some(v) = verifier {
        grant.push(("code_verifier", v.expose()));
    }
    token_request(profile, client, &grant, false, send_deadline)
}

/// A POST to the token endpoint with `grant` and the client's authentication.
fn token_request(
    profile: &ProviderProfile,
    client: &ClientCredentials,
    grant: &[(&str, &str)],
    ask_hard_expiry: bool,
    send_deadline: Timestamp,
) -> HttpRequest {
    let mut headers = Vec::with_capacity(4);
    let mut pairs = grant.to_vec();
    match profile.client_auth {
        ClientAuth::BasicHeader => headers.push(basic_auth(client)),
        ClientAuth::FormBody => {
            pairs.push(("client_id", client.client_id.as_str()));
            pairs.push(("client_secret", client.client_secret.expose()));
        }
    }
    headers.push(header("accept", "application/json"));
    headers.push(header("content-type", "application/x-www-form-urlencoded"));
    if ask_hard_expiry {
        headers.push(header("x-include-refresh-token-hard-expires-in", "true"));
    }
    HttpRequest {
        method: "POST",
        url: profile.token_url.clone(),
        headers,
        body: form(&pairs),
        send_deadline,
    }
}

/// The revocation request (Intuit JSON style or RFC 7009), if the profile has an
/// endpoint.
pub fn revoke_request(
    profile: &ProviderProfile,
    client: &ClientCredentials,
    refresh: &RefreshToken,
    send_deadline: Timestamp,
) -> Option<HttpRequest> {
    let url = profile.revoke_url.clone()?;
    let mut headers = alloc::vec![basic_auth(client), header("accept", "application/json")];
    let body = match profile.revoke_style {
        RevokeStyle::JsonToken => {
            headers.push(header("content-type", "application/json"));
            let json = serde_json::json!({ "token": refresh.expose() });
            SecretString::new(alloc::string::ToString::to_string(&json))
        }
        RevokeStyle::FormToken => {
            headers.push(header("content-type", "application/x-www-form-urlencoded"));
            form(&[
                ("token", refresh.expose()),
                ("token_type_hint", "refresh_token"),
            ])
        }
    };
    Some(HttpRequest {
        method: "POST",
        url,
        headers,
        body,
        send_deadline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{ClientCredentials, Environment};
    use crate::secret::ClientSecret;

    fn client() -> ClientCredentials {
        ClientCredentials {
            client_id: "ABclient".into(),
            client_secret: ClientSecret::new("s3cr3t"),
            environment: Environment::Production,
        }
    }

    #[test]
    fn intuit_refresh_request_is_exact() {
        let req = refresh_request(
            &ProviderProfile::intuit(),
            &client(),
            &RefreshToken::new("RT+1/="),
            Timestamp::from_secs(10),
        );
        assert_eq!(
            req.url,
            "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer"
        );
        assert_eq!(
            req.header("Authorization"),
            Some("Basic QUJjbGllbnQ6czNjcjN0")
        );
        assert_eq!(req.header("accept"), Some("application/json"));
        assert_eq!(
            req.header("x-include-refresh-token-hard-expires-in"),
            Some("true")
        );
        assert_eq!(
            req.body.expose(),
            "grant_type=refresh_token&refresh_token=RT%2B1%2F%3D"
        );
        let dbg = format!("{req:?}");
        assert!(
            !dbg.contains("QUJjbGllbnQ6czNjcjN0") && !dbg.contains("RT"),
            "{dbg}"
        );
    }

    #[test]
    fn intuit_revoke_is_json() {
        let req = revoke_request(
            &ProviderProfile::intuit(),
            &client(),
            &RefreshToken::new("RT\"x"),
            Timestamp::from_secs(10),
        );
        let req = req.expect("intuit has a revoke endpoint");
        assert_eq!(req.body.expose(), r#"{"token":"RT\"x"}"#);
    }
}
