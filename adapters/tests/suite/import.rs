//! Importing existing connections: JSON lines checked before anything is
//! written, errors that name the line and never a token, S7 on every line,
//! idempotent re-runs, `replace` and `dry_run`, and imported grants that work.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokenfence::clock::{Clock, SystemClock};
use tokenfence::store::{MemoryStore, Store};
use tokenfence::{ImportOptions, Imported};
use tokenfence_core::*;

use crate::common::{memory_manager, provider, Scripted};

fn line(id: &str, refresh: &str, extra: &str) -> String {
    format!(
        r#"{{"id":"{id}","provider":"intuit","environment":"production","client_id":"prod-client","refresh_token":"{refresh}","realm_id":"{id}"{extra}}}"#
    )
}

const WRITE: ImportOptions = ImportOptions {
    replace: false,
    dry_run: false,
};

#[tokio::test]
async fn a_file_is_imported_once_and_a_second_run_changes_nothing() {
    let store = Arc::new(MemoryStore::new());
    let tokens = memory_manager(store.clone(), Scripted::new(Duration::ZERO)).await;
    let file = [
        line("1", "RT-1", ""),
        String::new(),
        line("2", "RT-b", r#","hard_deadline":"2031-01-01T00:00:00Z""#),
        line("3", "RT-c", r#","idle_deadline":1900000000"#),
    ]
    .join("\n");
    let report = tokens.import_lines(file.as_bytes(), WRITE).await.unwrap();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.count(Imported::Created), 3);
    assert_eq!(report.imported[1].0, 3, "line numbers count blank lines");
    let two = store
        .load(&ConnectionId("2".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(two.refresh.expose(), "RT-b");
    assert_eq!(two.realm_id.as_deref(), Some("2"));
    assert_eq!(two.identity, provider().identity());
    assert_eq!(two.hard_deadline, Some(Timestamp::from_secs(1_924_992_000)));
    let three = store
        .load(&ConnectionId("3".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        three.idle_deadline,
        Some(Timestamp::from_secs(1_900_000_000))
    );
    // Run again: nothing to do.
    let again = tokens.import_lines(file.as_bytes(), WRITE).await.unwrap();
    assert_eq!(again.count(Imported::Unchanged), 3);
    assert!(again.is_clean());
    let two_again = store
        .load(&ConnectionId("2".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(two_again.generation, two.generation, "not rewritten");
    tokens.shutdown().await;
}

#[tokio::test]
async fn another_grant_for_a_stored_id_is_left_alone_unless_replace_and_dry_run_writes_nothing() {
    let store = Arc::new(MemoryStore::new());
    let tokens = memory_manager(store.clone(), Scripted::new(Duration::ZERO)).await;
    let first = line("1", "RT-old", "");
    tokens.import_lines(first.as_bytes(), WRITE).await.unwrap();
    let newer = line("1", "RT-new", "");
    let kept = tokens.import_lines(newer.as_bytes(), WRITE).await.unwrap();
    assert_eq!(kept.count(Imported::Exists), 1);
    assert!(!kept.is_clean());
    let id = ConnectionId("1".into());
    assert_eq!(
        store.load(&id).await.unwrap().unwrap().refresh.expose(),
        "RT-old"
    );
    for dry_run in [true, false] {
        let options = ImportOptions {
            replace: true,
            dry_run,
        };
        let report = tokens
            .import_lines(newer.as_bytes(), options)
            .await
            .unwrap();
        assert_eq!(report.count(Imported::Replaced), 1);
        let stored = store.load(&id).await.unwrap().unwrap();
        let expected = if dry_run { "RT-old" } else { "RT-new" };
        assert_eq!(stored.refresh.expose(), expected, "dry run {dry_run}");
    }
    tokens.shutdown().await;
}

#[tokio::test]
async fn bad_lines_are_named_never_echoed_and_nothing_is_written() {
    let store = Arc::new(MemoryStore::new());
    let tokens = memory_manager(store.clone(), Scripted::new(Duration::ZERO)).await;
    let secret = "RT-secret-do-not-echo";
    let file = [
        line("ok", "RT-fine", ""),
        format!(r#"{{"id":"x","refresh_token":"{secret}" oops"#),
        line("ctl", &format!("{secret}\\u0001"), ""),
        line("sandbox", secret, "").replace("production", "sandbox"),
        line("other", secret, "").replace("prod-client", "someone-else"),
        format!(r#"{{"provider":"intuit","client_id":"prod-client","refresh_token":"{secret}"}}"#),
        line("ok", secret, ""),
        line("at", secret, &format!(r#","access_token":"{secret}""#)),
        line("when", secret, &format!(r#","idle_deadline":"{secret}""#)),
        line("odd", secret, &format!(r#","refresh":"{secret}""#)),
        format!(r#"["{secret}"]"#),
        line("ms", secret, r#","hard_deadline":1924992000000"#),
    ]
    .join("\n");
    let report = tokens.import_lines(file.as_bytes(), WRITE).await.unwrap();
    let messages: Vec<String> = report.errors.iter().map(|e| e.to_string()).collect();
    let expected = [
        "line 2: not a JSON object",
        "line 3: `refresh_token` must be printable ASCII",
        "line 4: `environment` is `sandbox` but this manager's client has `production`",
        "line 5: `client_id` is `someone-else`",
        "line 6: `id` is missing",
        "line 7: connection `ok` already appears on line 1",
        "line 8: `access_expires_at` is missing",
        "line 9: `idle_deadline` must be an RFC 3339 date and time",
        "line 10: `refresh` is not a known member",
        "line 11: not a JSON object (not an object)",
        "line 12: `hard_deadline` must be whole seconds since the epoch, before the year 10000",
    ];
    assert_eq!(messages.len(), expected.len(), "{messages:#?}");
    for (m, e) in messages.iter().zip(expected) {
        assert!(m.starts_with(e), "{m} should start with {e}");
        assert!(!m.contains("secret"), "a token was echoed: {m}");
    }
    assert!(report.imported.is_empty());
    assert!(store.list().await.unwrap().is_empty(), "nothing written");
    tokens.shutdown().await;
}

#[tokio::test]
async fn an_imported_grant_is_kept_alive_at_once_and_serves() {
    let store = Arc::new(MemoryStore::new());
    let transport = Scripted::new(Duration::ZERO);
    let tokens = memory_manager(store.clone(), transport.clone()).await;
    let now = SystemClock.now();
    let later = now.saturating_add(Duration::from_secs(1800));
    let file = [
        line(
            "fresh",
            "RT-x",
            &format!(
                r#","access_token":"AT-imported","access_expires_at":{}"#,
                later.as_millis() / 1000
            ),
        ),
        line("1", "RT-1", ""),
    ]
    .join("\n");
    tokens.import_lines(file.as_bytes(), WRITE).await.unwrap();
    // The imported access token is served until its expiry, without a call.
    let fresh = ConnectionId("fresh".into());
    assert_eq!(
        tokens.access_token(&fresh).await.unwrap().expose(),
        "AT-imported"
    );
    assert_eq!(transport.calls.load(Ordering::SeqCst), 0);
    // Without a known idle deadline keep-alive is due at once: the first pass
    // proves the grant alive and learns its deadlines.
    let lead = Settings::default().keepalive_lead;
    let due: Vec<_> = store
        .due_for_work(SystemClock.now(), lead, None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.id.0)
        .collect();
    assert!(
        due.contains(&"1".to_string()) && due.contains(&"fresh".to_string()),
        "{due:?}"
    );
    let sweep = tokens.sweep(None).await.unwrap();
    assert_eq!(sweep.due.len(), 2);
    let one = store
        .load(&ConnectionId("1".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        one.refresh.expose(),
        "RT-2",
        "refreshed with the imported token"
    );
    assert!(
        one.idle_deadline.unwrap()
            > SystemClock
                .now()
                .saturating_add(Duration::from_secs(86_400 * 99))
    );
    tokens.shutdown().await;
}
