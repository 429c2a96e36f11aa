//! The README's quick start, compiled with every build (`tokenfence` is the only
//! tokenfence crate it names). Run against Intuit with
//! `TOKENFENCE_KEYRING=1:BASE64KEY INTUIT_CLIENT_ID=... INTUIT_CLIENT_SECRET=...
//! REFRESH_TOKEN=... REALM_ID=... cargo run -p tokenfence --example quick_start`.

use tokenfence::crypto::Keyring;
use tokenfence::store::SqliteStore;
use tokenfence::{
    ApiResult, ClientSecret, ConnectionId, ExistingGrant, ImportOptions, Provider, RefreshToken,
    TokenManager,
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

    // Bring a connection made elsewhere in (or `connect_with_code` after consent).
    let realm = env("REALM_ID")?;
    let id = ConnectionId(realm.clone());
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
