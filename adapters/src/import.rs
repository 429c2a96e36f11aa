//! Bringing existing connections in: refresh tokens obtained by another system
//! (a home-grown table, another token service's export), kept by tokenfence from
//! then on. One grant at a time with [`TokenManager::import`], or a file of JSON
//! lines with [`TokenManager::import_lines`] (what `tokenfence import FILE` runs).
//!
//! One line per connection:
//!
//! ```json
//! {"id":"4620816365","provider":"intuit","environment":"production","client_id":"ABc...",
//!  "refresh_token":"AB11...","access_token":"eyJ...","access_expires_at":"2026-12-01T10:00:00Z",
//!  "realm_id":"4620816365","idle_deadline":"2027-03-10T00:00:00Z","hard_deadline":1924992000}
//! ```
//!
//! `id`, `provider`, `client_id` and `refresh_token` are required; `environment`
//! defaults to `production`; instants are RFC 3339 or seconds since the epoch.
//! Every line is checked before anything is written, errors name the line and the
//! member and never echo a value; a line whose provider, environment and client
//! id name none of the manager's registered clients is refused (S7: a refresh
//! token is only ever presented with the credentials it was issued to). Each line
//! is stored under the registered client it names.

use crate::manager::{ManagerError, TokenManager};
use std::io::BufRead;
use tokenfence_core::{
    is_usable_token, AccessGrant, AccessToken, ConnectionId, ConnectionRecord, Environment,
    ExistingGrant, GrantIdentity, RefreshToken, Timestamp,
};
use zeroize::Zeroizing;

/// How an import treats connections already stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportOptions {
    /// Replace a stored connection holding another refresh token (by default it
    /// is left alone and reported as [`Imported::Exists`]).
    pub replace: bool,
    /// Check and report what would happen; write nothing.
    pub dry_run: bool,
}

/// What an import did to one connection (or, in a dry run, would do).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Imported {
    /// Stored as a new connection.
    Created,
    /// Replaced the stored connection (`replace`).
    Replaced,
    /// The store already holds this refresh token for this identity: nothing to
    /// do (an import run twice changes nothing).
    Unchanged,
    /// The store holds another grant for this id; left alone (no `replace`).
    Exists,
}

impl std::fmt::Display for Imported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Imported::Created => "created",
            Imported::Replaced => "replaced",
            Imported::Unchanged => "unchanged",
            Imported::Exists => "exists (not replaced without --replace)",
        })
    }
}

/// Why a line of an import file was not imported. Never carries a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The line is not a JSON object.
    #[error("line {line}: not a JSON object ({problem})")]
    Json {
        /// 1-based line number.
        line: usize,
        /// What is wrong, without the line's content.
        problem: String,
    },
    /// A member is missing, of the wrong type or unusable.
    #[error("line {line}: `{member}` {problem}")]
    Member {
        /// 1-based line number.
        line: usize,
        /// The member's name.
        member: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The line's provider, environment or client id is not the manager's.
    #[error("line {line}: `{member}` is `{given}` but this manager's client has `{configured}`; a refresh token is only presented with the credentials it was issued to")]
    Identity {
        /// 1-based line number.
        line: usize,
        /// `provider`, `environment` or `client_id`.
        member: &'static str,
        /// What the line says.
        given: String,
        /// What the manager is configured with.
        configured: String,
    },
    /// The line's provider, environment and client id name none of the
    /// manager's registered clients.
    #[error("line {line}: no registered client is {given}; a refresh token is only presented with the credentials it was issued to")]
    UnknownClient {
        /// 1-based line number.
        line: usize,
        /// `provider/environment/client id` as the line says.
        given: String,
    },
    /// The same connection id appears on an earlier line of the file.
    #[error("line {line}: connection `{id}` already appears on line {first}")]
    Duplicate {
        /// 1-based line number.
        line: usize,
        /// The connection id.
        id: ConnectionId,
        /// The earlier line.
        first: usize,
    },
    /// Storing the line's connection failed.
    #[error("line {line}: {source}")]
    Store {
        /// 1-based line number.
        line: usize,
        /// Why.
        source: ManagerError,
    },
}

/// What an import file came to, line by line.
#[derive(Debug, Default)]
pub struct ImportReport {
    /// Each imported (or, in a dry run, checked) line: its number, the
    /// connection and what happened.
    pub imported: Vec<(usize, ConnectionId, Imported)>,
    /// Each line that was not imported, and why.
    pub errors: Vec<ImportError>,
}

impl ImportReport {
    /// How many lines came to `outcome`.
    pub fn count(&self, outcome: Imported) -> usize {
        self.imported
            .iter()
            .filter(|(_, _, o)| *o == outcome)
            .count()
    }

    /// Whether every line was imported or already there (no error, nothing
    /// left alone).
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty() && self.count(Imported::Exists) == 0
    }
}

/// One checked line of an import file.
struct Line {
    id: ConnectionId,
    identity: GrantIdentity,
    grant: ExistingGrant,
}

const MEMBERS: [&str; 10] = [
    "id",
    "provider",
    "environment",
    "client_id",
    "refresh_token",
    "access_token",
    "access_expires_at",
    "realm_id",
    "idle_deadline",
    "hard_deadline",
];

/// Longest connection id, realm id, provider or client id accepted.
const MAX_NAME: usize = 255;

fn parse_line(line: usize, text: &str) -> Result<Line, ImportError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| ImportError::Json {
        line,
        // The category and column only: serde's message may quote the input.
        problem: format!("{:?} error at column {}", e.classify(), e.column()),
    })?;
    let serde_json::Value::Object(map) = value else {
        return Err(ImportError::Json {
            line,
            problem: "not an object".into(),
        });
    };
    let member_error = |member: &str, problem| ImportError::Member {
        line,
        member: member.into(),
        problem,
    };
    if let Some(unknown) = map.keys().find(|k| !MEMBERS.contains(&k.as_str())) {
        // The key is the file's own text but names a member, not a value; cut
        // it short and printable all the same.
        let shown: String = unknown
            .chars()
            .filter(|c| !c.is_control())
            .take(40)
            .collect();
        return Err(member_error(&shown, "is not a known member"));
    }
    let text_member = |member: &'static str| -> Result<Option<&str>, ImportError> {
        match map.get(member) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(member_error(member, "must be a string")),
        }
    };
    let name = |member: &'static str| -> Result<Option<String>, ImportError> {
        match text_member(member)? {
            None => Ok(None),
            Some(s) if s.is_empty() || s.len() > MAX_NAME || s.chars().any(char::is_control) => {
                Err(member_error(
                    member,
                    "must be 1 to 255 characters without control characters",
                ))
            }
            Some(s) => Ok(Some(s.to_string())),
        }
    };
    let required = |member: &'static str| -> Result<String, ImportError> {
        name(member)?.ok_or_else(|| member_error(member, "is missing"))
    };
    let token = |member: &'static str| -> Result<Option<&str>, ImportError> {
        match text_member(member)? {
            Some(s) if s.is_empty() || !is_usable_token(s) => Err(member_error(
                member,
                "must be printable ASCII, 1 to 16,384 bytes",
            )),
            t => Ok(t),
        }
    };
    let instant = |member: &'static str| -> Result<Option<Timestamp>, ImportError> {
        match map.get(member) {
            None | Some(serde_json::Value::Null) => Ok(None),
            // Seconds past the year 9999 are milliseconds (or nonsense) given
            // where seconds were meant.
            Some(serde_json::Value::Number(n)) => n
                .as_u64()
                .filter(|s| *s <= crate::clock::LAST_RFC3339_SECS)
                .map(|s| Some(Timestamp::from_secs(s)))
                .ok_or_else(|| {
                    member_error(
                        member,
                        "must be whole seconds since the epoch, before the year 10000",
                    )
                }),
            Some(serde_json::Value::String(s)) => humantime::parse_rfc3339_weak(s)
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| Some(Timestamp::from_millis(d.as_millis() as u64)))
                .ok_or_else(|| member_error(member, "must be an RFC 3339 date and time")),
            Some(_) => Err(member_error(
                member,
                "must be an RFC 3339 string or seconds since the epoch",
            )),
        }
    };
    let environment = match text_member("environment")? {
        None | Some("production") => Environment::Production,
        Some("sandbox") => Environment::Sandbox,
        Some(_) => return Err(member_error("environment", "must be production or sandbox")),
    };
    let refresh =
        token("refresh_token")?.ok_or_else(|| member_error("refresh_token", "is missing"))?;
    let access = match (token("access_token")?, instant("access_expires_at")?) {
        (Some(t), Some(expires_at)) => Some(AccessGrant {
            token: AccessToken::new(t),
            expires_at,
        }),
        (Some(_), None) => {
            return Err(member_error(
                "access_expires_at",
                "is missing (an access token without its expiry is never served)",
            ))
        }
        (None, _) => None,
    };
    Ok(Line {
        id: ConnectionId(required("id")?),
        identity: GrantIdentity {
            provider: required("provider")?,
            environment,
            client_id: required("client_id")?,
        },
        grant: ExistingGrant {
            refresh: RefreshToken::new(refresh),
            access,
            realm_id: name("realm_id")?,
            idle_deadline: instant("idle_deadline")?,
            hard_deadline: instant("hard_deadline")?,
        },
    })
}

/// Why `given` names no registered client: with one registered, the first
/// member that differs; with several, the whole identity.
fn identity_mismatch(
    line: usize,
    given: GrantIdentity,
    registered: &[GrantIdentity],
) -> ImportError {
    let [configured] = registered else {
        return ImportError::UnknownClient {
            line,
            given: crate::manager::describe(&given),
        };
    };
    let members = [
        ("provider", given.provider, configured.provider.clone()),
        (
            "environment",
            given.environment.to_string(),
            configured.environment.to_string(),
        ),
        ("client_id", given.client_id, configured.client_id.clone()),
    ];
    let (member, given, configured) = members.into_iter().find(|(_, a, b)| a != b).unwrap_or((
        "client_id",
        String::new(),
        String::new(),
    ));
    ImportError::Identity {
        line,
        member,
        given,
        configured,
    }
}

impl TokenManager {
    /// Stores a grant obtained elsewhere as connection `id`, under this manager's
    /// provider and client, through compare-and-swap like every other write.
    /// Nothing unknown is guessed ([`ConnectionRecord::from_existing`]): the
    /// connection is due for work until a refresh proves it, so the next
    /// keep-alive pass proves each imported grant alive and learns its real
    /// deadlines (a dead one is flagged `ReauthRequired` then, not when a sync
    /// needs it).
    ///
    /// A stored connection with the same refresh token is left as it is
    /// ([`Imported::Unchanged`]: importing twice changes nothing); one with
    /// another is replaced only with `options.replace`.
    pub async fn import(
        &self,
        id: &ConnectionId,
        grant: ExistingGrant,
        options: ImportOptions,
    ) -> Result<Imported, ManagerError> {
        let client = self.config().identity();
        self.import_as(&client, id, grant, options).await
    }

    /// [`import`](Self::import) for the registered client `client` (its
    /// [`Provider::identity`](crate::Provider::identity)).
    pub async fn import_as(
        &self,
        client: &GrantIdentity,
        id: &ConnectionId,
        grant: ExistingGrant,
        options: ImportOptions,
    ) -> Result<Imported, ManagerError> {
        let config = self.registered(client)?;
        let now = self.now();
        let record = ConnectionRecord::from_existing(id.clone(), config.identity(), grant, now);
        let stored = self.store().load(id).await?;
        let outcome = match &stored {
            None => Imported::Created,
            Some(s) if s.identity == record.identity && s.refresh == record.refresh => {
                return Ok(Imported::Unchanged)
            }
            Some(_) if !options.replace => return Ok(Imported::Exists),
            Some(_) => Imported::Replaced,
        };
        if options.dry_run {
            return Ok(outcome);
        }
        self.write_outside(stored.map(|s| s.generation), record)
            .await?;
        Ok(outcome)
    }

    /// Imports a file of JSON lines (see the [module](crate::import) docs):
    /// every line is checked first, and nothing is written unless all are
    /// well-formed and meant for this manager's client; then each is imported
    /// as by [`import`](Self::import). Blank lines are skipped.
    pub async fn import_lines(
        &self,
        input: impl BufRead,
        options: ImportOptions,
    ) -> Result<ImportReport, std::io::Error> {
        let registered = self.registered_identities();
        let mut report = ImportReport::default();
        let mut lines = Vec::new();
        let mut seen = std::collections::BTreeMap::new();
        for (n, text) in input.lines().enumerate() {
            let line = n + 1;
            let text = Zeroizing::new(text?);
            if text.trim().is_empty() {
                continue;
            }
            let checked = parse_line(line, &text).and_then(|l| {
                if !registered.contains(&l.identity) {
                    return Err(identity_mismatch(line, l.identity, &registered));
                }
                if let Some(first) = seen.insert(l.id.clone(), line) {
                    return Err(ImportError::Duplicate {
                        line,
                        id: l.id,
                        first,
                    });
                }
                Ok(l)
            });
            match checked {
                Ok(l) => lines.push((line, l)),
                Err(e) => report.errors.push(e),
            }
        }
        if !report.errors.is_empty() {
            return Ok(report);
        }
        for (line, l) in lines {
            match self.import_as(&l.identity, &l.id, l.grant, options).await {
                Ok(outcome) => report.imported.push((line, l.id, outcome)),
                Err(source) => report.errors.push(ImportError::Store { line, source }),
            }
        }
        Ok(report)
    }
}
