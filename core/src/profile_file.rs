//! Provider profiles as files (TOML or JSON), so a provider that is not built in is
//! described as data, checked, and given to the library, the CLIs, the model checker,
//! the simulator and the mock provider alike.
//!
//! ```toml
//! name = "acme"
//! token_url = "https://id.acme.example/oauth2/token"
//! revoke_url = "https://id.acme.example/oauth2/revoke"
//! client_auth = "form"            # "basic" (default) or "form"
//! access_ttl = "15m"              # assumed when a reply omits expires_in
//! idle_window = "30days"
//! hard_lifetime = "365days"
//!
//! [rotation]
//! mode = "every-refresh"          # "never" (default), "every-refresh", "periodic"
//! grace = "2m"                    # how long a rotated-away token keeps working
//! reuse_detection = true          # replay outside the grace revokes the family
//! ```
//!
//! Durations are written as `"90s"`, `"15m"`, `"24h"`, `"100days"` (or a number of
//! seconds). Unknown fields are refused, so a typo is an error, not a default.

use crate::profile::{
    ClientAuth, GraceReplay, ProviderProfile, RevokeStyle, Rotation, RotationPolicy,
};
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::time::Duration;
use serde::{Deserialize, Serialize};

/// Why a profile could not be used. Profiles hold no secrets, so messages may quote
/// the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// The file could not be read.
    #[error("cannot read provider profile {path}: {reason}")]
    Read {
        /// The path given.
        path: String,
        /// What the operating system said.
        reason: String,
    },
    /// The text is not a profile document (syntax, a wrong type, an unknown field).
    #[error("provider profile {origin}: {message}")]
    Syntax {
        /// Where the text came from (a path, or `"text"`).
        origin: String,
        /// The parser's message, with line and column where it has them.
        message: String,
    },
    /// A field has a value tokenfence cannot work with.
    #[error("provider profile {origin}: `{field}` {problem}")]
    Invalid {
        /// Where the text came from.
        origin: String,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// Neither a built-in profile nor a file.
    #[error("unknown provider `{name}`: give a built-in profile ({}) or the path of a profile file (.toml or .json)", BUILT_IN.join(", "))]
    Unknown {
        /// The name given.
        name: String,
    },
}

/// The names [`ProviderProfile::built_in`] knows.
pub const BUILT_IN: [&str; 5] = ["intuit", "xero", "atlassian", "google", "github"];

/// A duration in a profile: `"15m"`-style text or a number of seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
enum Span {
    Seconds(u64),
    Text(String),
}

impl Span {
    /// In the largest unit that divides it: `"100days"`, `"24h"`, `"15m"`, `"90s"`.
    fn of(d: Duration) -> Span {
        let s = d.as_secs();
        Span::Text(if d.subsec_nanos() != 0 {
            format!("{}ms", d.as_millis())
        } else if s % 86_400 == 0 && s >= 2 * 86_400 {
            format!("{}days", s / 86_400)
        } else if s % 3_600 == 0 && s > 0 {
            format!("{}h", s / 3_600)
        } else if s % 60 == 0 && s > 0 {
            format!("{}m", s / 60)
        } else {
            format!("{s}s")
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    #[default]
    Never,
    EveryRefresh,
    Periodic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Replay {
    #[default]
    Idempotent,
    Fork,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Auth {
    #[default]
    Basic,
    Form,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Revoke {
    #[default]
    Form,
    Json,
}

#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotationDoc {
    #[serde(default)]
    mode: Mode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    period: Option<Span>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    grace: Option<Span>,
    #[serde(default)]
    grace_replay: Replay,
    #[serde(default)]
    reuse_detection: bool,
}

/// The file form of a [`ProviderProfile`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileDoc {
    name: String,
    token_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revoke_url: Option<String>,
    #[serde(default)]
    revoke_style: Revoke,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    authorize_url: Option<String>,
    #[serde(default)]
    client_auth: Auth,
    #[serde(default)]
    ask_hard_expiry: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    transaction_id_header: Option<String>,
    #[serde(default = "default_access_ttl")]
    access_ttl: Span,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    idle_window: Option<Span>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hard_lifetime: Option<Span>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    invalid_grant_aliases: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    scopes: Vec<String>,
    #[serde(default = "yes")]
    pkce: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    authorize_params: BTreeMap<String, String>,
    #[serde(default)]
    rotation: RotationDoc,
}

fn yes() -> bool {
    true
}

fn default_access_ttl() -> Span {
    Span::Text("1h".into())
}

/// Checks one field of a document, naming it in the error.
struct Checker<'a> {
    origin: &'a str,
}

impl Checker<'_> {
    fn invalid(&self, field: &'static str, problem: impl Into<String>) -> ProfileError {
        ProfileError::Invalid {
            origin: self.origin.into(),
            field,
            problem: problem.into(),
        }
    }

    /// A positive duration.
    fn span(&self, field: &'static str, span: &Span) -> Result<Duration, ProfileError> {
        let d = match span {
            Span::Seconds(s) => Duration::from_secs(*s),
            Span::Text(t) => humantime::parse_duration(t).map_err(|e| {
                self.invalid(field, format!("is not a duration (`{t}`: {e}); write e.g. \"90s\", \"15m\", \"24h\", \"100days\""))
            })?,
        };
        if d.is_zero() {
            return Err(self.invalid(field, "must be longer than zero (leave it out for none)"));
        }
        if d > crate::days(100 * 365) {
            return Err(self.invalid(field, "is longer than 100 years"));
        }
        Ok(d)
    }

    fn optional(
        &self,
        field: &'static str,
        span: &Option<Span>,
    ) -> Result<Option<Duration>, ProfileError> {
        span.as_ref().map(|s| self.span(field, s)).transpose()
    }

    /// An endpoint: https, or http on a loopback host (a mock provider).
    fn url(&self, field: &'static str, url: &str) -> Result<String, ProfileError> {
        let rest = if let Some(rest) = url.strip_prefix("https://") {
            rest
        } else if let Some(rest) = url.strip_prefix("http://") {
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            let host = host.rsplit_once(':').map_or(host, |(h, port)| {
                if port.bytes().all(|b| b.is_ascii_digit()) {
                    h
                } else {
                    host
                }
            });
            if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
                return Err(self.invalid(
                    field,
                    format!("`{url}` must use https (plain http only on a loopback host)"),
                ));
            }
            rest
        } else {
            return Err(self.invalid(field, format!("`{url}` is not an https URL")));
        };
        let host = rest.split(['/', '?', '#']).next().unwrap_or("");
        if host.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.invalid(field, format!("`{url}` is not a URL with a host")));
        }
        Ok(url.into())
    }

    fn rotation(&self, doc: &RotationDoc) -> Result<RotationPolicy, ProfileError> {
        let rotation = match (doc.mode, &doc.period) {
            (Mode::Periodic, Some(p)) => Rotation::Periodic {
                period: self.span("rotation.period", p)?,
            },
            (Mode::Periodic, None) => {
                return Err(self.invalid("rotation.period", "is needed when mode = \"periodic\""))
            }
            (_, Some(_)) => {
                return Err(self.invalid("rotation.period", "applies only to mode = \"periodic\""))
            }
            (Mode::Never, None) => Rotation::Never,
            (Mode::EveryRefresh, None) => Rotation::EveryRefresh,
        };
        let grace = self
            .optional("rotation.grace", &doc.grace)?
            .unwrap_or(Duration::ZERO);
        if rotation == Rotation::Never {
            if !grace.is_zero() || doc.reuse_detection || doc.grace_replay != Replay::Idempotent {
                return Err(self.invalid(
                    "rotation",
                    "has grace, grace_replay or reuse_detection, which need a rotating mode (\"every-refresh\" or \"periodic\")",
                ));
            }
        } else if grace.is_zero() && doc.grace_replay == Replay::Fork {
            return Err(self.invalid("rotation.grace_replay", "\"fork\" needs a grace window"));
        }
        Ok(RotationPolicy {
            rotation,
            grace,
            grace_replay: match doc.grace_replay {
                Replay::Idempotent => GraceReplay::Idempotent,
                Replay::Fork => GraceReplay::Fork,
            },
            reuse_detection: doc.reuse_detection,
        })
    }

    fn profile(&self, doc: ProfileDoc) -> Result<ProviderProfile, ProfileError> {
        let name_ok = !doc.name.is_empty()
            && doc.name.len() <= 64
            && doc
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if !name_ok {
            return Err(self.invalid(
                "name",
                "must be 1-64 characters of a-z, 0-9, '-', '_' or '.' (it is stored with every connection)",
            ));
        }
        let header_ok = |h: &String| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        };
        if doc
            .transaction_id_header
            .as_ref()
            .is_some_and(|h| !header_ok(h))
        {
            return Err(self.invalid("transaction_id_header", "is not an HTTP header name"));
        }
        let word =
            |w: &String| !w.is_empty() && !w.chars().any(|c| c.is_whitespace() || c.is_control());
        if !doc.scopes.iter().all(word) {
            return Err(self.invalid(
                "scopes",
                "holds an empty scope or one with spaces (give each scope on its own)",
            ));
        }
        const SET_BY_TOKENFENCE: [&str; 7] = [
            "client_id",
            "response_type",
            "redirect_uri",
            "state",
            "scope",
            "code_challenge",
            "code_challenge_method",
        ];
        if let Some(k) = doc
            .authorize_params
            .keys()
            .find(|k| SET_BY_TOKENFENCE.contains(&k.as_str()) || !word(k))
        {
            return Err(self.invalid(
                "authorize_params",
                format!("cannot set `{k}` (tokenfence sets it, or it is not a parameter name)"),
            ));
        }
        if !doc.invalid_grant_aliases.iter().all(word) {
            return Err(self.invalid(
                "invalid_grant_aliases",
                "holds an empty code or one with spaces",
            ));
        }
        let default_access_ttl = self.span("access_ttl", &doc.access_ttl)?;
        let idle_window = self.optional("idle_window", &doc.idle_window)?;
        let hard_lifetime = self.optional("hard_lifetime", &doc.hard_lifetime)?;
        if idle_window.is_some_and(|w| w <= default_access_ttl) {
            return Err(self.invalid("idle_window", "must be longer than access_ttl"));
        }
        Ok(ProviderProfile {
            token_url: self.url("token_url", &doc.token_url)?,
            revoke_url: doc
                .revoke_url
                .as_deref()
                .map(|u| self.url("revoke_url", u))
                .transpose()?,
            authorize_url: doc
                .authorize_url
                .as_deref()
                .map(|u| self.url("authorize_url", u))
                .transpose()?,
            name: doc.name,
            revoke_style: match doc.revoke_style {
                Revoke::Form => RevokeStyle::FormToken,
                Revoke::Json => RevokeStyle::JsonToken,
            },
            client_auth: match doc.client_auth {
                Auth::Basic => ClientAuth::BasicHeader,
                Auth::Form => ClientAuth::FormBody,
            },
            ask_hard_expiry: doc.ask_hard_expiry,
            transaction_id_header: doc.transaction_id_header,
            rotation: self.rotation(&doc.rotation)?,
            default_access_ttl,
            idle_window,
            hard_lifetime,
            invalid_grant_aliases: doc.invalid_grant_aliases,
            scopes: doc.scopes,
            pkce: doc.pkce,
            authorize_params: doc.authorize_params.into_iter().collect(),
        })
    }
}

impl From<&ProviderProfile> for ProfileDoc {
    fn from(p: &ProviderProfile) -> Self {
        let (mode, period) = match p.rotation.rotation {
            Rotation::Never => (Mode::Never, None),
            Rotation::EveryRefresh => (Mode::EveryRefresh, None),
            Rotation::Periodic { period } => (Mode::Periodic, Some(Span::of(period))),
        };
        ProfileDoc {
            name: p.name.clone(),
            token_url: p.token_url.clone(),
            revoke_url: p.revoke_url.clone(),
            revoke_style: match p.revoke_style {
                RevokeStyle::FormToken => Revoke::Form,
                RevokeStyle::JsonToken => Revoke::Json,
            },
            authorize_url: p.authorize_url.clone(),
            client_auth: match p.client_auth {
                ClientAuth::BasicHeader => Auth::Basic,
                ClientAuth::FormBody => Auth::Form,
            },
            ask_hard_expiry: p.ask_hard_expiry,
            transaction_id_header: p.transaction_id_header.clone(),
            access_ttl: Span::of(p.default_access_ttl),
            idle_window: p.idle_window.map(Span::of),
            hard_lifetime: p.hard_lifetime.map(Span::of),
            invalid_grant_aliases: p.invalid_grant_aliases.clone(),
            scopes: p.scopes.clone(),
            pkce: p.pkce,
            authorize_params: p.authorize_params.iter().cloned().collect(),
            rotation: RotationDoc {
                mode,
                period,
                grace: (!p.rotation.grace.is_zero()).then(|| Span::of(p.rotation.grace)),
                grace_replay: match p.rotation.grace_replay {
                    GraceReplay::Idempotent => Replay::Idempotent,
                    GraceReplay::Fork => Replay::Fork,
                },
                reuse_detection: p.rotation.reuse_detection,
            },
        }
    }
}

impl ProviderProfile {
    /// A built-in profile by name: `intuit`, `xero`, `atlassian`, `google`, `github`
    /// ([`BUILT_IN`]).
    pub fn built_in(name: &str) -> Option<ProviderProfile> {
        Some(match name {
            "intuit" => ProviderProfile::intuit(),
            "xero" => ProviderProfile::xero(),
            "atlassian" => ProviderProfile::atlassian(),
            "google" => ProviderProfile::google(),
            "github" => ProviderProfile::github_app(),
            _ => return None,
        })
    }

    /// Parses and checks a profile document; JSON if the text starts with `{`,
    /// TOML otherwise. `origin` names the text in errors (a path, say).
    pub fn from_document(origin: &str, text: &str) -> Result<ProviderProfile, ProfileError> {
        let syntax = |message: String| ProfileError::Syntax {
            origin: origin.into(),
            message: message.trim_end().into(),
        };
        let doc: ProfileDoc = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| syntax(e.to_string()))?
        } else {
            toml::from_str(text).map_err(|e| syntax(e.to_string()))?
        };
        Checker { origin }.profile(doc)
    }

    /// The profile as a TOML document that [`from_document`](Self::from_document)
    /// reads back to an equal profile: a starting point for a provider's own file.
    pub fn to_toml(&self) -> String {
        toml::to_string(&ProfileDoc::from(self)).unwrap_or_default()
    }

    /// A built-in profile by name, or else the profile file at that path.
    pub fn named_or_file(name_or_path: &str) -> Result<ProviderProfile, ProfileError> {
        if let Some(p) = Self::built_in(name_or_path) {
            return Ok(p);
        }
        let path = std::path::Path::new(name_or_path);
        let is_file_name = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("toml" | "json")
        );
        if !is_file_name && !path.exists() {
            return Err(ProfileError::Unknown {
                name: name_or_path.into(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| ProfileError::Read {
            path: name_or_path.into(),
            reason: e.to_string(),
        })?;
        Self::from_document(name_or_path, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::minutes;

    const ACME: &str = r#"
name = "acme"
token_url = "https://id.acme.example/oauth2/token"
revoke_url = "https://id.acme.example/oauth2/revoke"
client_auth = "form"
access_ttl = "15m"
idle_window = "30days"
hard_lifetime = 31536000
invalid_grant_aliases = ["token_expired"]

[rotation]
mode = "every-refresh"
grace = "2m"
reuse_detection = true
"#;

    fn problem(text: &str) -> ProfileError {
        ProviderProfile::from_document("t", text).unwrap_err()
    }

    #[test]
    fn a_toml_profile_reads_into_the_profile_it_describes() {
        let p = ProviderProfile::from_document("acme.toml", ACME).unwrap();
        assert_eq!(p.name, "acme");
        assert_eq!(p.client_auth, ClientAuth::FormBody);
        assert_eq!(p.revoke_style, RevokeStyle::FormToken);
        assert_eq!(p.default_access_ttl, minutes(15));
        assert_eq!(p.idle_window, Some(crate::days(30)));
        assert_eq!(p.hard_lifetime, Some(crate::days(365)));
        assert_eq!(
            p.rotation,
            RotationPolicy {
                rotation: Rotation::EveryRefresh,
                grace: minutes(2),
                grace_replay: GraceReplay::Idempotent,
                reuse_detection: true,
            }
        );
        assert!(p.means_invalid_grant("token_expired"));
    }

    #[test]
    fn every_built_in_profile_survives_toml_and_json() {
        for name in BUILT_IN {
            let p = ProviderProfile::built_in(name).unwrap();
            let toml = p.to_toml();
            assert_eq!(
                ProviderProfile::from_document(name, &toml).unwrap(),
                p,
                "{toml}"
            );
            let json = serde_json::to_string(&ProfileDoc::from(&p)).unwrap();
            assert_eq!(
                ProviderProfile::from_document(name, &json).unwrap(),
                p,
                "{json}"
            );
        }
    }

    #[test]
    fn mistakes_are_named() {
        let cases = [
            ("name = \"x\"\ntoken_url = \"https://a.example/t\"\ntoken_ur = 1", "unknown field `token_ur`"),
            ("name = \"x\"", "missing field `token_url`"),
            ("name = \"X Y\"\ntoken_url = \"https://a.example/t\"", "`name`"),
            ("name = \"x\"\ntoken_url = \"http://a.example/t\"", "must use https"),
            ("name = \"x\"\ntoken_url = \"ftp://a.example/t\"", "not an https URL"),
            ("name = \"x\"\ntoken_url = \"https://\"", "with a host"),
            ("name = \"x\"\ntoken_url = \"https://a.example/t\"\naccess_ttl = \"soon\"", "not a duration"),
            ("name = \"x\"\ntoken_url = \"https://a.example/t\"\naccess_ttl = 0", "longer than zero"),
            ("name = \"x\"\ntoken_url = \"https://a.example/t\"\nidle_window = \"10m\"", "longer than access_ttl"),
            ("name = \"x\"\ntoken_url = \"https://a.example/t\"\n[rotation]\nmode = \"periodic\"", "`rotation.period` is needed"),
            ("name = \"x\"\ntoken_url = \"https://a.example/t\"\n[rotation]\nperiod = \"1h\"", "only to mode"),
            ("name = \"x\"\ntoken_url = \"https://a.example/t\"\n[rotation]\ngrace = \"1h\"", "need a rotating mode"),
            ("name = \"x\"\ntoken_url = \"https://a.example/t\"\n[rotation]\nmode = \"every-refresh\"\ngrace_replay = \"fork\"", "needs a grace window"),
            ("name = \"x\"\ntoken_url = \"https://a.example/t\"\n[rotation]\nmode = \"sometimes\"", "unknown variant `sometimes`"),
            ("{\"name\": \"x\", \"token_url\": 5}", "invalid type"),
            ("name = \"x\"\ntoken_url = \"https://a.example/t\"\ntransaction_id_header = \"a b\"", "header name"),
            ("name = \"x\"\ntoken_url = \"https://a.example/t\"\nscopes = [\"a b\"]", "`scopes`"),
            ("name = \"x\"\ntoken_url = \"https://a.example/t\"\n[authorize_params]\nstate = \"x\"", "cannot set `state`"),
        ];
        for (text, expected) in cases {
            let message = problem(text).to_string();
            assert!(message.contains(expected), "{text:?}: {message}");
        }
    }

    #[test]
    fn plain_http_is_only_for_loopback() {
        for url in [
            "http://127.0.0.1:8080/token",
            "http://localhost/token",
            "http://[::1]:9/t",
        ] {
            let text = format!("name = \"x\"\ntoken_url = \"{url}\"");
            assert!(ProviderProfile::from_document("t", &text).is_ok(), "{url}");
        }
        let text = "name = \"x\"\ntoken_url = \"http://127.0.0.1.evil.example/t\"";
        assert!(problem(text).to_string().contains("must use https"));
    }

    #[test]
    fn a_name_that_is_neither_built_in_nor_a_file_is_unknown() {
        let e = ProviderProfile::named_or_file("intuitt").unwrap_err();
        assert!(matches!(e, ProfileError::Unknown { .. }));
        assert!(e.to_string().contains("intuit, xero"), "{e}");
        let e = ProviderProfile::named_or_file("/nonexistent/acme.toml").unwrap_err();
        assert!(matches!(e, ProfileError::Read { .. }), "{e}");
    }
}
