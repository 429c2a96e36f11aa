//! The README's quick start, compiled with every build (`tokenfence` is the only
//! tokenfence crate it names). Run against Intuit with
//! `TOKENFENCE_KEYRING=1:BASE64KEY INTUIT_CLIENT_ID=... INTUIT_CLIENT_SECRET=...
//! REFRESH_TOKEN=... REALM_ID=... cargo run -p tokenfence --example quick_start`;
//! with `CONNECT=1` it connects REALM_ID through the consent flow instead.

use tokenfence::crypto::Keyring;
use tokenfence::store::SqliteStore;
use tokenfence::{
    ApiResult, ClientSecret, ConnectOptions, ConnectOutcome, ConnectionId, ExistingGrant,
    ImportOptions, Provider, RefreshToken, TokenManager,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = |name: &str| std::env::var(name).map_err(|_| format!("set {name}"));
    let keyring = Keyring::from_spec(&env("TOKENFENCE_KEYRING")?)?; // "1:BASE64KEY"
    let client_secret = ClientSecret::new(env("INTUIT_CLIENT_SECRET")?);
    let tokens = TokenManager::builder()
        .provider(Provider::intuit_production(
            env("INTUIT_CLIENT_ID")?,
            client_secret,
        ))
        .store(SqliteStore::open("tokens.db", keyring)?) // or PostgresStore::connect(url, keyring).await?
        .build()
        .await?;

    let realm = env("REALM_ID")?;
    let id = ConnectionId(realm.clone());
    if std::env::var("CONNECT").is_ok() {
        return connect(&tokens, &id).await;
    }

    // Bring a connection made elsewhere in (or connect it: `connect` below).
    let grant = ExistingGrant {
        refresh: RefreshToken::new(env("REFRESH_TOKEN")?),
        access: None,
        realm_id: Some(realm.clone()),
        idle_deadline: None,
        hard_deadline: None,
    };
    println!(
        "import: {}",
        tokens.import(&id, grant, ImportOptions::default()).await?
    );

    // Anywhere, from any number of tasks and processes: never stale, never raced.
    let access = tokens.access_token(&id).await?;

    // The API answered 401: report the token and get the one to retry with...
    let _fresh = tokens.reject(&id, &access).await?;
    // ...or let `call` do it: one retry with a fresh token, never more.
    let http = reqwest::Client::new();
    let url = format!("https://quickbooks.api.intuit.com/v3/company/{realm}/companyinfo/{realm}");
    let reply = tokens
        .call(&id, |token| {
            let request = http.get(&url).bearer_auth(token.expose()).send();
            async move {
                match request.await {
                    Ok(r) if r.status() == 401 => ApiResult::Unauthorized,
                    other => ApiResult::Done(other),
                }
            }
        })
        .await??;
    println!("company info: HTTP {}", reply.status());
    tokens.shutdown().await;
    Ok(())
}

/// Connect or reconnect `id` (with `CONNECT=1`): the consent URL, then the
/// callback's query (in a web app, your callback route's raw query string; here,
/// pasted from the browser's address bar).
async fn connect(
    tokens: &TokenManager,
    id: &ConnectionId,
) -> Result<(), Box<dyn std::error::Error>> {
    let redirect_uri = "http://localhost:8080/callback"; // as registered with the app
    let begun = tokens
        .begin_connect(id, redirect_uri, ConnectOptions::default())
        .await?;
    println!("open {}\nthen paste the address you land on:", begun.url);
    let mut callback = String::new();
    std::io::stdin().read_line(&mut callback)?;
    match tokens.finish_connect(callback.trim()).await? {
        ConnectOutcome::Connected { realm_id, .. } => println!("connected {realm_id:?}"),
        ConnectOutcome::Denied { error, .. } => println!("not authorized: {error}"),
    }
    tokens.shutdown().await;
    Ok(())
}
