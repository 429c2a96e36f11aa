//! Readable traces: numbered steps with the worker, the action, what the driver fed
//! and drained, the store (generation, status, token, lease) and the provider.

use super::state::{describe_record, show_refresh, State, StoreCommand};
use super::{step::Log, Action, TokenfenceModel, T0};
use stateright::Path;
use tokenfence_core::Timestamp;

/// A short label for an action.
pub fn action_label(action: &Action) -> String {
    let w = |w: &usize| format!("w{}", w + 1);
    match action {
        Action::Request(i) => format!("{}: a caller requests access", w(i)),
        Action::Store(i) => format!("{}: carries out its store command", w(i)),
        Action::StoreFails { w: i, applied } => format!(
            "{}: the store fails{}",
            w(i),
            if *applied {
                " after applying the command"
            } else {
                ""
            }
        ),
        Action::Pause(i) => format!("{}: store command done, then the worker pauses", w(i)),
        Action::Resume(i) => format!("{}: resumes", w(i)),
        Action::Reply(i) => format!("{}: the provider answers", w(i)),
        Action::ServerError(i) => format!("{}: the provider answers 503", w(i)),
        Action::RateLimited(i) => format!("{}: the provider answers 429", w(i)),
        Action::ConnectError(i) => format!("{}: the request cannot be sent", w(i)),
        Action::LoseReply(i) => format!("{}: the provider processes, the reply is lost", w(i)),
        Action::Garble(i) => format!("{}: the provider processes, the reply is truncated", w(i)),
        Action::GiveUp(i) => format!("{}: gives up waiting for the reply", w(i)),
        Action::Timer(i) => format!("{}: its timer fires", w(i)),
        Action::Crash(i) => format!("{}: crashes and restarts", w(i)),
        Action::OrphanArrives(_) => "a crashed worker's request reaches the provider".into(),
        Action::Revoke => "the user disconnects the app at the provider".into(),
        Action::Reject(i) => format!("{}: a caller reports a 401 for its token", w(i)),
        Action::Tick(t) => format!("time jumps to {}", rel(*t)),
    }
}

fn rel(t: Timestamp) -> String {
    let ms = t.as_millis() as i64 - T0.as_millis() as i64;
    format!(
        "T{}{}.{:03}s",
        if ms < 0 { "-" } else { "+" },
        ms.abs() / 1000,
        ms.abs() % 1000
    )
}

/// The state in a few lines: clock, store, provider, workers.
pub fn summary(m: &TokenfenceModel, s: &State) -> String {
    let mut out = Vec::new();
    out.push(format!(
        "   clock {} (faults left {}, time jumps left {})",
        rel(s.now),
        s.faults_left,
        s.ticks_left
    ));
    let row = s.store.row(super::connection_id());
    let record = row
        .and_then(|r| r.record.as_ref())
        .map(describe_record)
        .unwrap_or_else(|| "no record".into());
    let lease = row
        .and_then(|r| r.lease.as_ref())
        .map(|l| {
            format!(
                "lease {} until {}",
                l.lease.owner.0,
                rel(l.lease.expires_at)
            )
        })
        .unwrap_or_else(|| "no lease".into());
    out.push(format!("   store    {record}; {lease}"));
    let p = &s.provider;
    if let Some(g) = p.grant(m.grant) {
        let mut tokens: Vec<String> = p
            .tokens()
            .filter(|(_, t)| t.grant == m.grant)
            .map(|(n, t)| (n.to_string(), t))
            .filter(|(v, _)| *v != g.current)
            .filter(|(v, t)| p.accepts(v, s.now) || t.lost)
            .map(|(v, t)| {
                format!(
                    "{v}{}{}",
                    if p.accepts(&v, s.now) {
                        " in grace"
                    } else {
                        ""
                    },
                    if t.lost { " (reply lost)" } else { "" }
                )
            })
            .collect();
        if p.token(&g.current).is_some_and(|t| t.lost) {
            tokens.push(format!("{} (reply lost)", g.current));
        }
        let alive = if p.accepts(&g.current, s.now) {
            "accepted".to_string()
        } else {
            match g.ended {
                Some(e) => format!("dead: {e:?}"),
                None => "dead: expired".into(),
            }
        };
        out.push(format!(
            "   provider current {} ({alive}){}{}",
            g.current,
            if tokens.is_empty() {
                String::new()
            } else {
                format!("; also {}", tokens.join(", "))
            },
            if g.replays_outside_grace > 0 {
                format!("; {} replay(s) outside grace", g.replays_outside_grace)
            } else {
                String::new()
            }
        ));
    }
    for (i, w) in s.workers.iter().enumerate() {
        let mut parts = Vec::new();
        if let Some(r) = w.conn.record() {
            parts.push(format!(
                "sees {} {}",
                r.generation,
                show_refresh(&r.refresh)
            ));
        }
        if let Some(r) = w.conn.in_flight() {
            parts.push(format!("refreshing from {}", r.generation));
        }
        if let Some(r) = w.conn.uncommitted() {
            parts.push(format!("holds uncommitted {}", show_refresh(&r.refresh)));
        }
        match &w.pending {
            Some(StoreCommand::Load) => parts.push("next: Load".into()),
            Some(StoreCommand::AcquireLease { .. }) => parts.push("next: AcquireLease".into()),
            Some(StoreCommand::Cas { expected, .. }) => parts.push(format!(
                "next: CAS on {}",
                expected.map_or("none".into(), |g| g.to_string())
            )),
            None => {}
        }
        if let Some(f) = &w.net {
            parts.push(if f.lost {
                "reply lost".into()
            } else {
                format!("request on the wire until {}", rel(f.request.send_deadline))
            });
        }
        if w.paused.is_some() {
            parts.push("PAUSED".into());
        }
        if w.conn.waiting() > 0 {
            parts.push(format!("{} caller(s) waiting", w.conn.waiting()));
        }
        if let Some(t) = w.conn.poll_timeout() {
            parts.push(format!("timer {}", rel(t)));
        }
        let name = if m.misconfigured(i) {
            format!("w{} (sandbox creds)", i + 1)
        } else {
            format!("w{}#{}", i + 1, w.incarnation)
        };
        out.push(format!(
            "   {name:<9} {}",
            if parts.is_empty() {
                "idle".into()
            } else {
                parts.join("; ")
            }
        ));
    }
    for (b, why) in &s.breaches {
        out.push(format!("   BROKEN {b:?}: {why}"));
    }
    let violated: Vec<&str> = super::props::safety()
        .into_iter()
        .filter(|(_, holds)| !holds(m, s))
        .map(|(name, _)| name)
        .collect();
    if !violated.is_empty() {
        out.push(format!("   VIOLATES {}", violated.join("; ")));
    }
    out.join("\n")
}

/// A numbered trace of `path`.
pub fn render(m: &TokenfenceModel, path: &Path<State, Action>) -> Vec<String> {
    let steps = path.clone().into_vec();
    let mut out = Vec::new();
    if let Some((first, _)) = steps.first() {
        out.push(format!("0. initial state\n{}", summary(m, first)));
    }
    for (i, (state, action)) in steps.iter().enumerate() {
        let Some(action) = action else { continue };
        let mut log = Log::on();
        let Some(next) = m.apply(state, action, &mut log) else {
            continue;
        };
        let detail = log
            .lines()
            .iter()
            .map(|l| format!("   | {l}"))
            .collect::<Vec<_>>()
            .join("\n");
        out.push(format!(
            "{}. {} [{}]\n{}{}{}",
            i + 1,
            action_label(action),
            rel(state.now),
            detail,
            if detail.is_empty() { "" } else { "\n" },
            summary(m, &next)
        ));
    }
    out
}
