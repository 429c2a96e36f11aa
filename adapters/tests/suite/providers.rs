//! One manager, several providers and clients (issue 12): an Intuit production
//! client, an Intuit sandbox client and a second, rotating and reuse-detecting
//! provider, against two mock providers at once. Every connection is refreshed
//! with the client it was authorized with (the mocks refuse any other); one
//! that names no registered client is refused before anything is sent (S7).

use std::sync::Arc;
use tokenfence::store::MemoryStore;
use tokenfence::{
    AccessError, ClientCredentials, ClientSecret, ConfigError, ConnectionId, Environment,
    ExistingGrant, ImportError, ImportOptions, ManagerError, Provider, RefreshToken, SecretString,
    TokenManager,
};
use tokenfence_core::GrantIdentity;
use tokenfence_sim::mock::{Control, MockProvider};

use crate::common::{consent_code, serve_mock};
use tokenfence_sim::provider::{BehaviourClass, ProviderSpec};

fn client(id: &str, secret: &str, environment: Environment) -> ClientCredentials {
    ClientCredentials {
        client_id: id.into(),
        client_secret: ClientSecret::new(secret),
        environment,
    }
}

/// A refresh token of a new grant of `client_id` at `mock`.
fn authorized(mock: &MockProvider, client_id: &str) -> RefreshToken {
    let answer = mock.control(Control::Authorize {
        client_id: client_id.into(),
    });
    RefreshToken::new(answer["tokens"]["refresh_token"].as_str().unwrap())
}

/// The production and sandbox clients of the Intuit mock `intuit`.
fn intuit_clients(intuit: &MockProvider) -> (Provider, Provider) {
    let production = Provider {
        profile: intuit.spec().profile.clone(),
        client: client("prod-app", "prod-secret", Environment::Production),
    };
    let sandbox = Provider {
        client: client("sandbox-app", "sandbox-secret", Environment::Sandbox),
        ..production.clone()
    };
    (production, sandbox)
}

/// A manager of `providers` over `store`, without a keep-alive task.
async fn manager(
    providers: impl IntoIterator<Item = Provider>,
    store: Arc<dyn tokenfence::store::Store>,
) -> TokenManager {
    providers
        .into_iter()
        .fold(TokenManager::builder(), |b, p| b.provider(p))
        .shared_store(store)
        .keepalive_scan(None)
        .build()
        .await
        .unwrap()
}

fn existing(refresh: RefreshToken) -> ExistingGrant {
    ExistingGrant {
        refresh,
        access: None,
        realm_id: None,
        idle_deadline: None,
        hard_deadline: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_manager_serves_intuit_production_sandbox_and_another_provider() {
    let (intuit, _) = serve_mock(ProviderSpec::intuit()).await;
    let (other, _) = serve_mock(ProviderSpec::scaled(BehaviourClass::ReuseDetection)).await;
    let (production, sandbox) = intuit_clients(&intuit);
    // No environment to pick for a provider without them.
    let rotating = Provider::new(
        other.spec().profile.clone(),
        "prod-app",
        ClientSecret::new("prod-secret"),
    );
    let store = Arc::new(MemoryStore::new());
    let tokens = manager(
        [production.clone(), sandbox.clone(), rotating.clone()],
        store.clone(),
    )
    .await;
    assert_eq!(
        tokens.registered_identities(),
        vec![
            production.identity(),
            sandbox.identity(),
            rotating.identity()
        ]
    );

    // A grant of each client, brought in under the client it belongs to.
    let connections = [
        ("qbo-prod", &production, authorized(&intuit, "prod-app")),
        ("qbo-sandbox", &sandbox, authorized(&intuit, "sandbox-app")),
        ("other", &rotating, authorized(&other, "prod-app")),
    ];
    for (id, provider, refresh) in &connections {
        tokens
            .import_as(
                &provider.identity(),
                &ConnectionId((*id).into()),
                existing(refresh.clone()),
                ImportOptions::default(),
            )
            .await
            .unwrap();
    }
    // Each refreshes with its own credentials (a mock refuses a grant presented by
    // another client, and an unknown secret), twice for the rotating one.
    for round in 0..2 {
        for (id, _, _) in &connections {
            let token = tokens.access_token(&ConnectionId((*id).into())).await;
            assert!(token.is_ok(), "{id}: {token:?}");
            if round == 0 {
                continue;
            }
            // The rotating provider's token is refused by its API: a fresh one.
            if *id == "other" {
                let fresh = tokens
                    .reject(&ConnectionId((*id).into()), &token.unwrap())
                    .await;
                assert!(fresh.is_ok(), "{fresh:?}");
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    }
    assert_eq!(
        intuit.stats().refreshes,
        2,
        "one refresh per Intuit connection"
    );
    assert_eq!(other.stats().refreshes, 2, "first use and the 401");
    assert_eq!(other.stats().rotations, 2);
    assert_eq!(
        intuit.stats().token_requests,
        2,
        "nothing refused at Intuit"
    );
    assert_eq!(other.stats().token_requests, 2);

    // A connection of a client this manager does not have: refused, not sent.
    let stranger = Provider {
        client: client("someone-elses-app", "x", Environment::Production),
        ..production.clone()
    };
    let alone = manager([stranger.clone()], store.clone()).await;
    let id = ConnectionId("stranger".into());
    alone
        .import(
            &id,
            existing(RefreshToken::new("RT-x")),
            ImportOptions::default(),
        )
        .await
        .unwrap();
    alone.shutdown().await;
    let refused = tokens.access_token(&id).await;
    assert!(
        matches!(
            refused,
            Err(ManagerError::Access(AccessError::Config(
                ConfigError::IdentityMismatch { .. }
            )))
        ),
        "{refused:?}"
    );
    assert_eq!(
        intuit.stats().token_requests,
        2,
        "sent with the wrong client"
    );

    // Import lines pick the client each line names; one naming none is refused.
    let line = |id: &str, provider: &str, environment: &str, client_id: &str| {
        format!(
            r#"{{"id":"{id}","provider":"{provider}","environment":"{environment}","client_id":"{client_id}","refresh_token":"RT-{id}"}}"#
        )
    };
    let file = [
        line("l-prod", "intuit", "production", "prod-app"),
        line("l-sandbox", "intuit", "sandbox", "sandbox-app"),
        line("l-other", &rotating.profile.name, "production", "prod-app"),
        line("l-none", "intuit", "sandbox", "prod-app"),
    ]
    .join("\n");
    let report = tokens
        .import_lines(file.as_bytes(), ImportOptions::default())
        .await
        .unwrap();
    assert!(report.imported.is_empty(), "nothing written with an error");
    assert!(
        matches!(
            report.errors.as_slice(),
            [ImportError::UnknownClient { line: 4, .. }]
        ),
        "{:?}",
        report.errors
    );
    let fixed = file.lines().take(3).collect::<Vec<_>>().join("\n");
    let report = tokens
        .import_lines(fixed.as_bytes(), ImportOptions::default())
        .await
        .unwrap();
    assert_eq!(report.imported.len(), 3, "{:?}", report.errors);
    let status = |id: &str| {
        let store = store.clone();
        let id = ConnectionId(id.into());
        async move {
            use tokenfence::store::Store;
            store.load(&id).await.unwrap().unwrap().identity
        }
    };
    assert_eq!(status("l-sandbox").await, sandbox.identity());
    assert_eq!(status("l-other").await, rotating.identity());

    // Consent with the sandbox app, exchanged with the sandbox credentials.
    let authorize = intuit.spec().profile.authorize_url.clone().unwrap();
    let code = consent_code(&authorize, "sandbox-app").await;
    let id = ConnectionId("qbo-sandbox-2".into());
    tokens
        .connect_with_code_as(
            &sandbox.identity(),
            &id,
            SecretString::new(code),
            "http://127.0.0.1:1/cb",
            Some("9130".into()),
        )
        .await
        .unwrap();
    assert_eq!(status("qbo-sandbox-2").await, sandbox.identity());
    assert!(tokens.access_token(&id).await.is_ok());
    let unknown = GrantIdentity {
        client_id: "nobody".into(),
        ..sandbox.identity()
    };
    let refused = tokens
        .connect_with_code_as(
            &unknown,
            &id,
            SecretString::new("code"),
            "http://x/cb",
            None,
        )
        .await;
    assert!(
        matches!(refused, Err(ManagerError::UnknownClient(_))),
        "{refused:?}"
    );
    tokens.shutdown().await;
}

/// With several clients registered, a new connection actor reads the record to
/// pick the client its identity names. A store that fails that one read must not
/// leave the actor on the default client (every call then refused as another
/// client's connection until the actor retires): the pick is made again before
/// the next piece of work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failure_when_an_actor_starts_does_not_pin_it_to_the_wrong_client() {
    use std::sync::atomic::Ordering;
    let (intuit, _) = serve_mock(ProviderSpec::intuit()).await;
    let (production, sandbox) = intuit_clients(&intuit);
    let store = Arc::new(crate::common::Watched::default());
    let tokens = manager([production.clone(), sandbox.clone()], store.clone()).await;
    let id = ConnectionId("qbo-sandbox".into());
    tokens
        .import_as(
            &sandbox.identity(),
            &id,
            existing(authorized(&intuit, "sandbox-app")),
            ImportOptions::default(),
        )
        .await
        .unwrap();
    store.down.store(true, Ordering::SeqCst);
    let first = tokens.access_token(&id).await;
    assert!(
        matches!(
            first,
            Err(ManagerError::Access(AccessError::Transient { .. }))
        ),
        "{first:?}"
    );
    store.down.store(false, Ordering::SeqCst);
    // The store is back: a caller gets a token (after the machine's back-off at
    // most), not a refusal as another client's connection.
    let mut last = tokens.access_token(&id).await;
    for _ in 0..25 {
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        last = tokens.access_token(&id).await;
    }
    assert!(last.is_ok(), "{last:?}");
    assert_eq!(intuit.stats().refreshes, 1);
    tokens.shutdown().await;
}
