//! `tokenfence`: operate real connections from a store.
//!
//! ```text
//! tokenfence [--store sqlite:PATH|postgres:URL] [--provider PROVIDER]...
//!            [--token-url URL --revoke-url URL --authorize-url URL] COMMAND
//!   list                      every connection with its status and deadlines
//!   status ID                 one connection
//!   refresh ID [--clear-block] refresh now, print the new generation or why not
//!   keep-alive [--once]       scan the store and refresh what is due, forever or once
//!   revoke ID                 revoke at the provider and mark disconnected
//!   connect ID (--listen ADDR | --redirect-uri URI) [--replace-realm]
//!                             consent URL, then the callback: connect or reconnect
//!   reencrypt                 re-seal every record under the newest key
//!   import FILE [--replace] [--dry-run]
//!                             bring existing connections in (JSON lines)
//!   serve [--listen ADDR] [--public-url URL]
//!                             the operator console in the browser
//! ```
//! PROVIDER is `intuit` (production credentials), another built-in profile (xero,
//! atlassian, google, github) or a profile file (.toml or .json), with `@sandbox`
//! for a sandbox (development) client (`intuit-sandbox` is `intuit@sandbox`);
//! repeat `--provider` to serve connections of several providers and clients from
//! one store.
//!
//! Secrets come from the environment, never from arguments: `TOKENFENCE_KEYRING`
//! (`id:base64key,...`; `id:base64key:open` for a key that opens but does not seal
//! yet, stage 1 of a roll-out), and each provider's client credentials:
//! `TOKENFENCE_<NAME>_CLIENT_ID` and `TOKENFENCE_<NAME>_CLIENT_SECRET`, NAME the
//! provider argument's profile name in capitals with `-` and `.` as `_` (e.g.
//! `TOKENFENCE_INTUIT_SANDBOX_CLIENT_ID`); with one provider, `TOKENFENCE_CLIENT_ID`
//! and `TOKENFENCE_CLIENT_SECRET` also do.
//! Exit status: 0 success, 1 failure, 2 bad arguments or configuration. Logs go
//! to standard error at `info` (`RUST_LOG` to change it); `--json` makes `list`
//! and `status` print JSON for scripts.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokenfence::clock::{rfc3339, Clock, SystemClock};
use tokenfence::crypto::Keyring;
use tokenfence::store::{PostgresStore, SqliteStore, Store};
use tokenfence::{ConnectionStatus, ImportOptions, Imported, Provider, TokenManager};
use tokenfence_core::{
    ClientCredentials, ClientSecret, ConnectionId, Environment, ProviderProfile, Status, Timestamp,
};

#[derive(Parser)]
#[command(
    name = "tokenfence",
    version,
    about = "Operate OAuth connections kept by tokenfence"
)]
struct Cli {
    /// The store: sqlite:PATH (default sqlite:tokens.db) or postgres:URL. The
    /// variable's value is not shown in `--help`: a URL may carry a password.
    #[arg(
        long,
        env = "TOKENFENCE_STORE",
        hide_env_values = true,
        default_value = "sqlite:tokens.db"
    )]
    store: String,
    /// intuit (production credentials), xero, atlassian, google, github, or a
    /// profile file (.toml or .json); `@sandbox` for a sandbox client
    /// (intuit-sandbox = intuit@sandbox). Repeat for several providers or clients.
    #[arg(long, default_values_t = ["intuit".to_string()])]
    provider: Vec<String>,
    /// Override the token endpoint (e.g. a `tokenfence-sim mock-provider` on
    /// loopback); only with one --provider.
    #[arg(long)]
    token_url: Option<String>,
    /// Override the revocation endpoint.
    #[arg(long)]
    revoke_url: Option<String>,
    /// Override the consent (authorization) endpoint.
    #[arg(long)]
    authorize_url: Option<String>,
    /// `list` and `status` print JSON (one object per connection, one per line).
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every connection with its status and deadlines.
    List,
    /// One connection.
    Status { id: String },
    /// Refresh now and print the new generation, or why there is none.
    Refresh {
        id: String,
        /// Refresh even if a configuration failure recorded with these same
        /// client credentials says to wait (the app's settings were fixed at the
        /// provider). Other credentials are never held back by it.
        #[arg(long)]
        clear_block: bool,
    },
    /// Scan the store: refresh what is due (keep-alive, refreshes in doubt, abandoned
    /// leases) and announce hard deadlines whose notice came due.
    KeepAlive {
        /// Scan once and exit.
        #[arg(long)]
        once: bool,
    },
    /// Revoke at the provider and mark the connection disconnected.
    Revoke { id: String },
    /// Connect (or reconnect) ID: prints the provider's consent URL, then takes
    /// the callback: with --listen, on a loopback address it serves itself (the
    /// redirect URI is http://ADDR/callback); otherwise paste the address the
    /// browser landed on into standard input. The code never appears as an
    /// argument.
    Connect {
        id: String,
        /// Receive the callback on this loopback address (port 0: any free one).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// The redirect URI registered with the provider (required without --listen).
        #[arg(long)]
        redirect_uri: Option<String>,
        /// On a reconnect, accept another company than the connection's (its old
        /// grant is revoked).
        #[arg(long)]
        replace_realm: bool,
    },
    /// The operator console in the browser: connections, Reconnect, the provider's
    /// callback at /callback, Intuit's disconnect landing page at /disconnected,
    /// /metrics and /healthz. Off loopback it needs TOKENFENCE_ADMIN_TOKEN.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// The console's address as browsers and the provider reach it (the
        /// redirect URI is this plus /callback); by default http://LISTEN.
        #[arg(long)]
        public_url: Option<String>,
        /// Connections per page.
        #[arg(long, default_value_t = 50)]
        page_size: usize,
    },
    /// Re-seal every record under the sealing key of the keyring (in batches of
    /// 500 rows, each its own short transaction).
    Reencrypt,
    /// Bring existing connections in from a file of JSON lines (`-` for standard
    /// input): id, provider, environment, client_id, refresh_token, and optionally
    /// access_token with access_expires_at, realm_id, idle_deadline, hard_deadline.
    /// Every line is checked before anything is written.
    Import {
        file: String,
        /// Replace stored connections that hold another refresh token.
        #[arg(long)]
        replace: bool,
        /// Check and say what would happen; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

enum AnyStore {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

impl AnyStore {
    fn shared(&self) -> Arc<dyn Store> {
        match self {
            AnyStore::Sqlite(s) => Arc::new(s.clone()),
            AnyStore::Postgres(s) => Arc::new(s.clone()),
        }
    }
}

/// The store as it may be printed: a PostgreSQL URL without its password and
/// without its query (which may carry `password=` or `sslpassword=`); a
/// connection string of `key=value` pairs, which may hold one anywhere, is not
/// shown at all.
fn store_label(store: &str) -> String {
    const HIDDEN: &str = "postgres (connection string not shown)";
    match store.split_once(':') {
        Some(("postgres", rest)) => match url::Url::parse(rest) {
            Ok(mut u) => {
                u.set_query(None);
                if u.password().is_some() && u.set_password(Some("***")).is_err() {
                    return HIDDEN.into();
                }
                format!("postgres:{u}")
            }
            Err(_) => HIDDEN.into(),
        },
        _ => store.into(),
    }
}

fn usage(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("tokenfence: {message}");
    ExitCode::from(2)
}

fn failure(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("tokenfence: {message}");
    ExitCode::from(1)
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("set {name} in the environment"))
}

fn now() -> Timestamp {
    SystemClock.now()
}

/// The provider a `--provider` argument names, with its client credentials from
/// the environment (`single`: the only provider, which may also use the plain
/// `TOKENFENCE_CLIENT_ID` and `TOKENFENCE_CLIENT_SECRET`).
fn provider(arg: &str, single: bool) -> Result<Provider, String> {
    let (named, environment) = match arg
        .strip_suffix("@sandbox")
        .or_else(|| arg.strip_suffix("-sandbox").filter(|n| *n == "intuit"))
    {
        Some(named) => (named, Environment::Sandbox),
        None => (arg, Environment::Production),
    };
    let profile = ProviderProfile::named_or_file(named)
        .map_err(|e| format!("{e}; add @sandbox for a sandbox client (intuit-sandbox)"))?;
    let name = match environment {
        Environment::Sandbox => format!("{}_sandbox", profile.name),
        Environment::Production => profile.name.clone(),
    };
    let prefix = format!(
        "TOKENFENCE_{}_",
        name.to_ascii_uppercase().replace(['-', '.'], "_")
    );
    let var = |what: &str| {
        let own = format!("{prefix}{what}");
        std::env::var(&own)
            .or_else(|e| {
                if single {
                    std::env::var(format!("TOKENFENCE_{what}"))
                } else {
                    Err(e)
                }
            })
            .map_err(|_| {
                if single {
                    format!("set {own} (or TOKENFENCE_{what}) in the environment")
                } else {
                    format!("set {own} in the environment")
                }
            })
    };
    let client = ClientCredentials {
        client_id: var("CLIENT_ID")?,
        client_secret: ClientSecret::new(var("CLIENT_SECRET")?),
        environment,
    };
    Ok(Provider { profile, client })
}

/// How far `t` is from now, in the largest whole unit: "in 59 min", "3 days ago".
fn from_now(t: Timestamp) -> String {
    let now = now();
    let (span, future) = if t >= now {
        (t.saturating_since(now), true)
    } else {
        (now.saturating_since(t), false)
    };
    let secs = span.as_secs();
    let amount = match secs {
        0..=119 => format!("{secs} s"),
        120..=7_199 => format!("{} min", secs / 60),
        7_200..=172_799 => format!("{} h", secs / 3_600),
        _ => format!("{} days", secs / 86_400),
    };
    if future {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

fn status_word(s: &ConnectionStatus) -> String {
    let word = match s.status {
        Status::Active => "active".to_string(),
        Status::Degraded { failures, last, .. } => format!("degraded({failures}x {last})"),
        Status::ReauthRequired { reason, .. } => format!("reauth-required: {reason}"),
        Status::Disconnected { .. } => "disconnected".into(),
    };
    match s.imported_at {
        Some(_) => format!("{word}, imported (not yet proven by a refresh)"),
        None => word,
    }
}

fn status_line(id: &str, s: &ConnectionStatus) -> String {
    let access = s.access_expires_at.map_or_else(
        || "no access token".into(),
        |t| {
            if t > now() {
                format!("access expires {}", from_now(t))
            } else {
                format!("access expired {}", from_now(t))
            }
        },
    );
    let deadline = |name: &str, t: Option<Timestamp>| {
        t.map_or_else(
            || format!("{name} unknown"),
            |t| {
                format!(
                    "{name} {} ({})",
                    rfc3339(t).split('T').next().unwrap_or_default(),
                    from_now(t)
                )
            },
        )
    };
    let who = &s.identity;
    format!(
        "{id}\t{}/{} {}\t{}\t{}\t{access}\t{}\t{}",
        who.provider,
        who.environment,
        who.client_id,
        status_word(s),
        s.generation,
        deadline("idle deadline", s.idle_deadline),
        deadline("hard deadline", s.hard_deadline)
    )
}

fn status_json(id: &str, s: &ConnectionStatus) -> String {
    let at = |t: Option<Timestamp>| t.map(rfc3339);
    serde_json::json!({
        "id": id,
        "provider": s.identity.provider,
        "environment": s.identity.environment.to_string(),
        "client_id": s.identity.client_id,
        "status": status_word(s),
        "generation": s.generation.0,
        "realm_id": s.realm_id,
        "access_expires_at": at(s.access_expires_at),
        "idle_deadline": at(s.idle_deadline),
        "hard_deadline": at(s.hard_deadline),
        "last_refreshed_at": at(s.last_refreshed_at),
    })
    .to_string()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let show = if cli.json { status_json } else { status_line };
    let keyring = match env("TOKENFENCE_KEYRING")
        .and_then(|k| Keyring::from_spec(&k).map_err(|e| e.to_string()))
    {
        Ok(k) => k,
        Err(e) => return usage(e),
    };
    let store = match cli.store.split_once(':') {
        Some(("sqlite", path)) => SqliteStore::open(path, keyring).map(AnyStore::Sqlite),
        Some(("postgres", url)) => PostgresStore::connect(url, keyring)
            .await
            .map(AnyStore::Postgres),
        _ => return usage("--store is sqlite:PATH or postgres:URL"),
    };
    let store = match store {
        Ok(s) => s,
        Err(e) => return failure(e),
    };
    match cli.command {
        Command::List => {
            let shared = store.shared();
            let ids = match shared.list().await {
                Ok(ids) => ids,
                Err(e) => return failure(e),
            };
            if ids.is_empty() && !cli.json {
                println!("no connections in {}", store_label(&cli.store));
            }
            for id in ids {
                match shared.load(&id).await {
                    Ok(Some(r)) => println!("{}", show(&id.0, &ConnectionStatus::from(&r))),
                    Ok(None) => {}
                    Err(e) => println!("{}\tunreadable: {e}", id.0),
                }
            }
            return ExitCode::SUCCESS;
        }
        Command::Reencrypt => {
            let n = match &store {
                AnyStore::Sqlite(s) => s.reencrypt_all().await,
                AnyStore::Postgres(s) => s.reencrypt_all().await,
            };
            return match n {
                Ok(n) => {
                    println!("re-sealed {n} records");
                    ExitCode::SUCCESS
                }
                Err(e) => failure(e),
            };
        }
        _ => {}
    }
    let mut providers = match cli
        .provider
        .iter()
        .map(|arg| provider(arg, cli.provider.len() == 1))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(p) => p,
        Err(e) => return usage(e),
    };
    if cli.token_url.is_some() || cli.revoke_url.is_some() || cli.authorize_url.is_some() {
        let [provider] = &mut providers[..] else {
            return usage("--token-url, --revoke-url and --authorize-url need exactly one --provider (give each provider a profile file instead)");
        };
        if let Some(url) = cli.authorize_url {
            provider.profile.authorize_url = Some(url);
        }
        if let Some(url) = cli.token_url {
            provider.profile.token_url = url;
        }
        if let Some(url) = cli.revoke_url {
            provider.profile.revoke_url = Some(url);
        }
    }
    let builder = providers
        .into_iter()
        .fold(TokenManager::builder(), |b, p| b.provider(p));
    let tokens = match builder
        .shared_store(store.shared())
        .keepalive_scan(None)
        .build()
        .await
    {
        Ok(t) => t,
        Err(e) => return usage(e),
    };
    let code = run(&tokens, cli.command, show).await;
    tokens.shutdown().await;
    code
}

async fn run(
    tokens: &TokenManager,
    command: Command,
    show: fn(&str, &ConnectionStatus) -> String,
) -> ExitCode {
    match command {
        Command::Status { id } => match tokens.status(&ConnectionId(id.clone())).await {
            Ok(Some(s)) => {
                println!("{}", show(&id, &s));
                ExitCode::SUCCESS
            }
            Ok(None) => failure(format!("no connection `{id}`")),
            Err(e) => failure(e),
        },
        Command::Refresh { id, clear_block } => {
            let id = ConnectionId(id);
            match tokens.refresh_now(&id, clear_block).await {
                Ok(_) => match tokens.status(&id).await {
                    Ok(Some(s)) => {
                        println!("refreshed {id}: {}", s.generation);
                        ExitCode::SUCCESS
                    }
                    Ok(None) => failure(format!("no connection `{id}`")),
                    Err(e) => failure(e),
                },
                Err(e) => failure(e),
            }
        }
        Command::KeepAlive { once } => keep_alive(tokens, once).await,
        Command::Revoke { id } => match tokens.disconnect(&ConnectionId(id.clone())).await {
            Ok(true) => {
                println!("revoked {id} at the provider and marked it disconnected");
                ExitCode::SUCCESS
            }
            Ok(false) => {
                println!("marked {id} disconnected; the provider did not confirm the revocation");
                ExitCode::SUCCESS
            }
            Err(e) => failure(e),
        },
        Command::Connect {
            id,
            listen,
            redirect_uri,
            replace_realm,
        } => {
            connect(
                tokens,
                ConnectionId(id),
                listen,
                redirect_uri,
                replace_realm,
            )
            .await
        }
        Command::Import {
            file,
            replace,
            dry_run,
        } => import(tokens, &file, ImportOptions { replace, dry_run }).await,
        Command::Serve {
            listen,
            public_url,
            page_size,
        } => serve(tokens, listen, public_url, page_size).await,
        Command::List | Command::Reencrypt => ExitCode::SUCCESS,
    }
}

/// `serve`: the console until Ctrl-C.
async fn serve(
    tokens: &TokenManager,
    listen: std::net::SocketAddr,
    public_url: Option<String>,
    page_size: usize,
) -> ExitCode {
    let admin_token = std::env::var("TOKENFENCE_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    if !listen.ip().is_loopback() && admin_token.as_ref().is_none_or(|t| t.len() < 16) {
        return usage("off loopback, serve needs TOKENFENCE_ADMIN_TOKEN (16 characters or more)");
    }
    let metrics = match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        Ok(handle) => Some(handle),
        Err(e) => return failure(format!("cannot record metrics: {e}")),
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => return failure(format!("cannot listen on {listen}: {e}")),
    };
    let address = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let config = tokenfence::console::ConsoleConfig {
        public_url: public_url.unwrap_or_else(|| format!("http://{address}")),
        admin_token,
        page_size,
        metrics,
    };
    let app = match tokenfence::console::router(tokens.clone(), config) {
        Ok(app) => app,
        Err(e) => return failure(e),
    };
    println!("console on http://{address}/ (Ctrl-C to stop)");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failure(e),
    }
}

/// `connect`: begin, show the consent URL, take one callback, finish.
async fn connect(
    tokens: &TokenManager,
    id: ConnectionId,
    listen: Option<std::net::SocketAddr>,
    redirect_uri: Option<String>,
    replace_realm: bool,
) -> ExitCode {
    let listener = match listen {
        Some(addr) if !addr.ip().is_loopback() => {
            return usage("--listen takes a loopback address (the callback carries a code)")
        }
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => return failure(format!("cannot listen on {addr}: {e}")),
        },
        None => None,
    };
    let redirect_uri = match (&listener, redirect_uri) {
        (_, Some(uri)) => uri,
        (Some(l), None) => match l.local_addr() {
            Ok(addr) => format!("http://{addr}/callback"),
            Err(e) => return failure(e),
        },
        (None, None) => return usage("connect needs --listen ADDR or --redirect-uri URI"),
    };
    let options = tokenfence::ConnectOptions {
        replace_realm,
        ..Default::default()
    };
    let begun = match tokens.begin_connect(&id, &redirect_uri, options).await {
        Ok(b) => b,
        Err(e) => return failure(e),
    };
    let what = if begun.reconnect {
        "reconnect"
    } else {
        "connect"
    };
    println!(
        "open this address to {what} {id} (valid until {}):",
        rfc3339(begun.expires_at)
    );
    println!("{}", begun.url);
    let callback = match listener {
        Some(listener) => {
            println!("waiting for the callback on {redirect_uri}");
            match tokenfence::callback::receive_one(listener).await {
                Ok(query) => query,
                Err(e) => return failure(format!("callback: {e}")),
            }
        }
        None => {
            println!("then paste the address your browser landed on:");
            let mut line = String::new();
            if let Err(e) = std::io::stdin().read_line(&mut line) {
                return failure(e);
            }
            line.trim().to_owned()
        }
    };
    match tokens.finish_connect(&callback).await {
        Ok(tokenfence::ConnectOutcome::Connected {
            connection,
            generation,
            realm_id,
            reconnected,
            ..
        }) => {
            let realm = realm_id.map_or(String::new(), |r| format!(", realm {r}"));
            let word = if reconnected {
                "reconnected"
            } else {
                "connected"
            };
            println!("{word} {connection} ({generation}{realm})");
            ExitCode::SUCCESS
        }
        Ok(tokenfence::ConnectOutcome::Denied {
            connection,
            error,
            description,
        }) => failure(format!(
            "the provider refused to authorize {connection}: {error}{}",
            description.map_or(String::new(), |d| format!(" ({d})"))
        )),
        Err(e) => failure(e),
    }
}

async fn import(tokens: &TokenManager, file: &str, options: ImportOptions) -> ExitCode {
    let input: Box<dyn std::io::BufRead> = if file == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        match std::fs::File::open(file) {
            Ok(f) => Box::new(std::io::BufReader::new(f)),
            Err(e) => return failure(format!("cannot open {file}: {e}")),
        }
    };
    let report = match tokens.import_lines(input, options).await {
        Ok(r) => r,
        Err(e) => return failure(format!("cannot read {file}: {e}")),
    };
    for e in &report.errors {
        eprintln!("tokenfence: {e}");
    }
    let would = if options.dry_run { "would be " } else { "" };
    for (line, id, outcome) in &report.imported {
        println!("line {line}: {id} {would}{outcome}");
    }
    if !report.errors.is_empty() && report.imported.is_empty() {
        eprintln!(
            "tokenfence: nothing imported: {} line(s) to fix first",
            report.errors.len()
        );
    } else {
        println!(
            "{}{} created, {} replaced, {} unchanged, {} left alone, {} failed",
            if options.dry_run { "dry run: " } else { "" },
            report.count(Imported::Created),
            report.count(Imported::Replaced),
            report.count(Imported::Unchanged),
            report.count(Imported::Exists),
            report.errors.len()
        );
    }
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn keep_alive(tokens: &TokenManager, once: bool) -> ExitCode {
    let mut events = tokens.subscribe();
    let printer = tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            println!("{}\t{:?}", e.connection, e.event);
        }
    });
    let mut notices_after = None;
    let code = loop {
        let sweep = match tokens.sweep(notices_after).await {
            Ok(s) => s,
            Err(e) => break failure(e),
        };
        notices_after = Some(sweep.scanned_until);
        if once {
            // The sweep waited for its refreshes and notices; let the printer catch up.
            tokio::time::sleep(Duration::from_millis(200)).await;
            break ExitCode::SUCCESS;
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    };
    printer.abort();
    code
}

#[cfg(test)]
mod tests {
    use super::store_label;

    #[test]
    fn a_store_label_never_shows_a_password() {
        assert_eq!(store_label("sqlite:tokens.db"), "sqlite:tokens.db");
        assert_eq!(
            store_label("postgres:postgres://app:s3cr3t-pw@db.internal:5432/tokens"),
            "postgres:postgres://app:***@db.internal:5432/tokens"
        );
        assert_eq!(
            store_label("postgres:postgres://app@db.internal/tokens"),
            "postgres:postgres://app@db.internal/tokens"
        );
        assert_eq!(
            store_label("postgres:postgres://app:x@db/tokens?password=s3cr3t-pw&sslmode=require"),
            "postgres:postgres://app:***@db/tokens"
        );
        assert_eq!(
            store_label("postgres:postgres://app@db/tokens?sslpassword=s3cr3t-pw"),
            "postgres:postgres://app@db/tokens"
        );
        let label = store_label("postgres:host=db user=app password=s3cr3t-pw");
        assert_eq!(label, "postgres (connection string not shown)");
    }
}
