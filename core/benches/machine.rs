//! Criterion benchmarks of the core: the hot-path decision for a connection whose
//! access token is valid, and a full refresh cycle through the machine (load,
//! lease, request building, reply parsing, compare-and-swap, delivery).
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::sync::Arc;
use tokenfence_core::*;

const NOW: Timestamp = Timestamp::from_secs(1_800_000_000);

fn config() -> Arc<Config> {
    Arc::new(Config {
        profile: ProviderProfile::intuit(),
        client: ClientCredentials {
            client_id: "ABclient".into(),
            client_secret: ClientSecret::new("secret"),
            environment: Environment::Production,
        },
        worker: WorkerId("bench".into()),
        settings: Settings::default(),
    })
}

fn stored(config: &Config, access_valid: bool) -> ConnectionRecord {
    ConnectionRecord {
        generation: Generation(1),
        realm_id: Some("1".into()),
        access: Some(AccessGrant {
            token: AccessToken::new("AT-1"),
            expires_at: if access_valid {
                NOW.saturating_add(hours(1))
            } else {
                NOW
            },
        }),
        idle_deadline: Some(NOW.saturating_add(days(100))),
        hard_deadline: Some(NOW.saturating_add(days(1800))),
        ..ConnectionRecord::new(
            ConnectionId("realm-1".into()),
            config.identity(),
            RefreshToken::new("RT-1"),
            NOW,
        )
    }
}

const REPLY: &[u8] = br#"{"access_token":"eyJlbmMiOiJBMTI4Q0JDLUhTMjU2IiwiYWxnIjoiZGlyIn0..AT-2","refresh_token":"AB11795398577f8nV2iN5bPgI6ZXYX6WjGXiGpLqUHhEKzvd7N","token_type":"bearer","expires_in":3600,"x_refresh_token_expires_in":8726400}"#;

/// Drives one access request through a whole refresh, answering as a store and a
/// provider would. Returns the delivered token length.
fn refresh_cycle(config: &Arc<Config>, record: &ConnectionRecord) -> usize {
    let mut conn = Connection::new(record.id.clone(), config.clone(), 1);
    let mut stored = record.clone();
    let mut input = Some(Input::AccessRequested(RequestId(1)));
    let mut delivered = 0;
    while let Some(i) = input.take() {
        conn.handle_input(NOW, i).expect("expected input");
        while let Some(out) = conn.poll_output() {
            input = match out {
                Output::Load => Some(Input::Loaded(Some(Box::new(stored.clone())))),
                Output::AcquireLease {
                    owner,
                    ttl,
                    request,
                } => Some(Input::LeaseGranted {
                    lease: Lease {
                        owner,
                        acquired_at: NOW,
                        expires_at: NOW.saturating_add(ttl),
                        generation: Some(stored.generation),
                        request,
                    },
                    record: Some(Box::new(stored.clone())),
                    took_over: None,
                }),
                Output::Send(request) => {
                    black_box(&request);
                    Some(Input::Replied(HttpResponse {
                        status: 200,
                        headers: vec![("intuit_tid".into(), "1-2-3".into())],
                        body: REPLY.to_vec(),
                    }))
                }
                Output::CompareAndSwap { record, .. } => {
                    stored = *record;
                    Some(Input::Committed {
                        generation: stored.generation,
                    })
                }
                Output::Deliver { result, .. } => {
                    delivered = result.map(|t| t.len()).unwrap_or(0);
                    None
                }
                Output::ReleaseLease(_) | Output::Event(_) => None,
            }
            .or(input);
        }
    }
    delivered
}

fn benches(c: &mut Criterion) {
    let config = config();
    let valid = stored(&config, true);
    let mut warm = Connection::new(valid.id.clone(), config.clone(), 1);
    warm.handle_input(NOW, Input::AccessRequested(RequestId(1)))
        .expect("request");
    while let Some(out) = warm.poll_output() {
        if out == Output::Load {
            warm.handle_input(NOW, Input::Loaded(Some(Box::new(valid.clone()))))
                .expect("load");
        }
    }
    assert!(warm.cached_access(NOW).is_some());
    c.bench_function("hot_path_cached_access", |b| {
        b.iter(|| {
            black_box(&warm)
                .cached_access(black_box(NOW))
                .map(|t| t.len())
        })
    });

    let expired = stored(&config, false);
    assert!(refresh_cycle(&config, &expired) > 0);
    c.bench_function("full_refresh_cycle", |b| {
        b.iter(|| refresh_cycle(black_box(&config), black_box(&expired)))
    });

    let reply = HttpResponse {
        status: 200,
        headers: vec![],
        body: REPLY.to_vec(),
    };
    let profile = ProviderProfile::intuit();
    c.bench_function("parse_token_reply", |b| {
        b.iter(|| parse_token_reply(black_box(&profile), black_box(&reply)).is_ok())
    });
}

criterion_group!(core_benches, benches);
criterion_main!(core_benches);
