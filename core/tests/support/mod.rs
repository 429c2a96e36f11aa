//! A discrete-event harness for driving real `Connection`s by hand: an in-memory
//! store with compare-and-swap and leases, several workers, and replies scripted by
//! the test (or by the small provider model in `provider.rs`).
#![allow(dead_code)]

pub mod provider;

use std::sync::Arc;
use tokenfence_core::*;

pub const T0: Timestamp = Timestamp::from_secs(1_800_000_000);
pub const CLIENT_SECRET: &str = "client-secret-do-not-log";

pub fn client(environment: Environment) -> ClientCredentials {
    ClientCredentials {
        client_id: match environment {
            Environment::Production => "prod-client".into(),
            Environment::Sandbox => "sandbox-client".into(),
        },
        client_secret: ClientSecret::new(CLIENT_SECRET),
        environment,
    }
}

pub fn config(profile: ProviderProfile, worker: &str) -> Arc<Config> {
    Arc::new(Config {
        profile,
        client: client(Environment::Production),
        worker: WorkerId(worker.into()),
        settings: Settings::default(),
    })
}

pub fn conn_id() -> ConnectionId {
    ConnectionId("realm-4620816365".into())
}

/// A stored record as an authorization would leave it, access token expired.
pub fn record(config: &Config, refresh: &str, now: Timestamp) -> ConnectionRecord {
    ConnectionRecord {
        generation: Generation(1),
        realm_id: Some("4620816365".into()),
        access: Some(AccessGrant {
            token: AccessToken::new("AT-expired"),
            expires_at: now,
        }),
        idle_deadline: config.profile.idle_window.map(|d| now.saturating_add(d)),
        hard_deadline: config.profile.hard_lifetime.map(|d| now.saturating_add(d)),
        ..ConnectionRecord::new(
            conn_id(),
            config.identity(),
            RefreshToken::new(refresh),
            now,
        )
    }
}

pub fn json_reply(status: u16, body: &str) -> HttpResponse {
    HttpResponse {
        status,
        headers: vec![("intuit_tid".into(), "1-abc".into())],
        body: body.as_bytes().to_vec(),
    }
}

/// An Intuit-style success body.
pub fn granted(access: &str, refresh: Option<&str>) -> HttpResponse {
    let refresh = refresh
        .map(|r| format!(r#""refresh_token":"{r}","x_refresh_token_expires_in":8726400,"#))
        .unwrap_or_default();
    json_reply(
        200,
        &format!(
            r#"{{"access_token":"{access}",{refresh}"token_type":"bearer","expires_in":3600}}"#
        ),
    )
}

pub fn invalid_grant() -> HttpResponse {
    json_reply(
        400,
        r#"{"error_description":"Incorrect or invalid refresh token","error":"invalid_grant"}"#,
    )
}

/// The store: one record, one lease row, optional injected outages.
#[derive(Default)]
pub struct Store {
    pub record: Option<ConnectionRecord>,
    pub lease: Option<Lease>,
    /// Fail this many of the next store commands.
    pub fail_next: u32,
    pub commits: u32,
    pub conflicts: u32,
}

impl Store {
    /// Carries out a store command; `None` for commands without an answer.
    pub fn apply(&mut self, now: Timestamp, output: &Output) -> Option<Input> {
        let is_store_cmd = matches!(
            output,
            Output::Load | Output::AcquireLease { .. } | Output::CompareAndSwap { .. }
        );
        if is_store_cmd && self.fail_next > 0 {
            self.fail_next -= 1;
            return Some(Input::StoreFailed);
        }
        match output {
            Output::Load => Some(Input::Loaded(self.record.clone().map(Box::new))),
            Output::AcquireLease { owner, ttl } => {
                let generation = self.record.as_ref().map(|r| r.generation);
                match &self.lease {
                    Some(l) if l.owner != *owner && l.expires_at > now => {
                        Some(Input::LeaseHeld { holder: l.clone() })
                    }
                    previous => {
                        let took_over = previous.clone();
                        let lease = Lease {
                            owner: owner.clone(),
                            acquired_at: now,
                            expires_at: now.saturating_add(*ttl),
                            generation,
                        };
                        self.lease = Some(lease.clone());
                        Some(Input::LeaseGranted {
                            lease,
                            record: self.record.clone().map(Box::new),
                            took_over,
                        })
                    }
                }
            }
            Output::ReleaseLease { owner } => {
                if self.lease.as_ref().is_some_and(|l| l.owner == *owner) {
                    self.lease = None;
                }
                None
            }
            Output::CompareAndSwap { expected, record } => {
                let stored = self.record.as_ref().map(|r| r.generation);
                if stored == *expected {
                    invariants::commit_on_current(*expected, stored).expect("S1");
                    self.commits += 1;
                    self.record = Some((**record).clone());
                    Some(Input::Committed {
                        generation: record.generation,
                    })
                } else {
                    self.conflicts += 1;
                    Some(Input::Conflict {
                        current: self.record.clone().map(Box::new),
                    })
                }
            }
            _ => None,
        }
    }
}

/// One worker: a machine plus what it delivered, emitted and sent.
pub struct Worker {
    pub conn: Connection,
    pub delivered: Vec<(RequestId, Result<AccessToken, AccessError>)>,
    pub events: Vec<Event>,
    pub sent: Vec<HttpRequest>,
    /// A request sent and not yet answered.
    pub outstanding: Option<HttpRequest>,
    /// Newest generation the store has shown this worker.
    pub newest: Generation,
}

impl Worker {
    fn new(conn: Connection) -> Worker {
        Worker {
            conn,
            delivered: vec![],
            events: vec![],
            sent: vec![],
            outstanding: None,
            newest: Generation(0),
        }
    }

    /// S5 for a token just delivered: find its expiry and generation in the machine.
    fn check_serve(&self, now: Timestamp, token: &AccessToken) {
        let (generation, expires_at) = self
            .conn
            .access_source(token)
            .expect("a served token comes from the machine's record");
        let margin = self.conn.config().settings.access_margin;
        invariants::fresh_serve(generation, expires_at, now, margin, self.newest).expect("S5");
    }
}

pub struct World {
    pub now: Timestamp,
    pub store: Store,
    pub workers: Vec<Worker>,
    next_request: u64,
}

impl World {
    pub fn new(
        profile: ProviderProfile,
        workers: usize,
        stored: impl FnOnce(&Config) -> ConnectionRecord,
    ) -> World {
        let configs: Vec<_> = (0..workers)
            .map(|i| config(profile.clone(), &format!("w{i}")))
            .collect();
        Self::with_configs(configs, stored)
    }

    pub fn with_configs(
        configs: Vec<Arc<Config>>,
        stored: impl FnOnce(&Config) -> ConnectionRecord,
    ) -> World {
        let record = stored(&configs[0]);
        World {
            now: T0,
            store: Store {
                record: Some(record),
                ..Store::default()
            },
            workers: configs
                .into_iter()
                .enumerate()
                .map(|(i, c)| Worker::new(Connection::new(conn_id(), c, i as u64 + 1)))
                .collect(),
            next_request: 0,
        }
    }

    /// Intuit, one worker, a stored record with an expired access token.
    pub fn intuit(workers: usize) -> World {
        World::new(ProviderProfile::intuit(), workers, |c| {
            record(c, "RT-1", T0)
        })
    }

    pub fn advance(&mut self, by: std::time::Duration) {
        self.now = self.now.saturating_add(by);
    }

    /// Feeds `input` to worker `w` and runs the store until the machine waits.
    pub fn input(&mut self, w: usize, input: Input) -> Result<(), InputError> {
        let now = self.now;
        self.workers[w].conn.handle_input(now, input)?;
        self.pump(w);
        Ok(())
    }

    fn pump(&mut self, w: usize) {
        let now = self.now;
        while let Some(out) = self.workers[w].conn.poll_output() {
            let worker = &mut self.workers[w];
            match out {
                Output::Deliver { request, result } => {
                    if let Ok(token) = &result {
                        worker.check_serve(now, token);
                    }
                    worker.delivered.push((request, result));
                }
                Output::Event(e) => worker.events.push(e),
                Output::Send(req) => {
                    invariants::right_credentials(
                        worker.conn.config(),
                        worker.conn.record().expect("record"),
                    )
                    .expect("S7");
                    assert!(worker.outstanding.is_none(), "one request at a time");
                    worker.sent.push(req.clone());
                    worker.outstanding = Some(req);
                }
                other => {
                    if let Some(answer) = self.store.apply(now, &other) {
                        let shown = answer.shown_generation().unwrap_or_default();
                        let worker = &mut self.workers[w];
                        worker.newest = worker.newest.max(shown);
                        self.workers[w]
                            .conn
                            .handle_input(now, answer)
                            .expect("store answers are expected");
                    }
                }
            }
        }
    }

    /// A caller on worker `w` asks for a token.
    pub fn request(&mut self, w: usize) -> RequestId {
        self.next_request += 1;
        let id = RequestId(self.next_request);
        self.input(w, Input::AccessRequested(id))
            .expect("always accepted");
        id
    }

    /// The provider answers worker `w`'s outstanding request.
    pub fn reply(&mut self, w: usize, reply: HttpResponse) {
        self.workers[w]
            .outstanding
            .take()
            .expect("a request is outstanding");
        self.input(w, Input::Replied(reply))
            .expect("reply expected");
    }

    /// Worker `w`'s outstanding request ends without a reply.
    pub fn lose(&mut self, w: usize, how: Input) {
        self.workers[w]
            .outstanding
            .take()
            .expect("a request is outstanding");
        self.input(w, how).expect("expected");
    }

    /// Fires worker `w`'s timer if it is due.
    pub fn tick(&mut self, w: usize) {
        if let Some(t) = self.workers[w].conn.poll_timeout() {
            if t <= self.now {
                self.input(w, Input::Timeout).expect("timeout accepted");
            }
        }
    }

    /// Advances time to worker `w`'s next timer and fires it.
    pub fn wake(&mut self, w: usize) -> Timestamp {
        let t = self.workers[w].conn.poll_timeout().expect("a timer is set");
        self.now = self.now.max(t);
        self.input(w, Input::Timeout).expect("timeout accepted");
        t
    }

    pub fn stored(&self) -> &ConnectionRecord {
        self.store.record.as_ref().expect("stored record")
    }

    pub fn result(&self, w: usize, id: RequestId) -> Option<&Result<AccessToken, AccessError>> {
        self.workers[w]
            .delivered
            .iter()
            .find(|(r, _)| *r == id)
            .map(|(_, res)| res)
    }

    pub fn token(&self, w: usize, id: RequestId) -> String {
        match self.result(w, id) {
            Some(Ok(t)) => t.expose().to_string(),
            other => panic!("expected a token for {id:?}, got {other:?}"),
        }
    }

    pub fn crash(&mut self, w: usize) {
        let config = Arc::new(self.workers[w].conn.config().clone());
        self.workers[w] = Worker::new(Connection::new(conn_id(), config, 99 + w as u64));
    }
}
