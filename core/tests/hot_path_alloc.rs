//! The hot path (a cached, valid access token) allocates nothing: counted with a
#![allow(unsafe_code)] // a counting global allocator needs it; the library forbids unsafe.
//! global allocator wrapper, not timed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokenfence_core::*;

struct Counting;
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn cached_access_allocates_nothing() {
    let now = Timestamp::from_secs(1_800_000_000);
    let config = Arc::new(Config {
        profile: ProviderProfile::intuit(),
        client: ClientCredentials {
            client_id: "c".into(),
            client_secret: ClientSecret::new("s"),
            environment: Environment::Production,
        },
        worker: WorkerId("w".into()),
        settings: Settings::default(),
    });
    let record = ConnectionRecord {
        access: Some(AccessGrant {
            token: AccessToken::new("AT"),
            expires_at: now.saturating_add(hours(1)),
        }),
        ..ConnectionRecord::new(
            ConnectionId("c1".into()),
            config.identity(),
            RefreshToken::new("RT"),
            now,
        )
    };
    let mut conn = Connection::new(record.id.clone(), config, 1);
    conn.handle_input(now, Input::AccessRequested(RequestId(1)))
        .unwrap();
    assert_eq!(conn.poll_output(), Some(Output::Load));
    conn.handle_input(now, Input::Loaded(Some(Box::new(record))))
        .unwrap();
    while conn.poll_output().is_some() {}

    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let mut served = 0;
    for i in 0..10_000u64 {
        let t = now.saturating_add(std::time::Duration::from_millis(i));
        served += conn.cached_access(t).map(|t| t.len()).unwrap_or(0);
    }
    let after = ALLOCATIONS.load(Ordering::Relaxed);
    assert_eq!(served, 20_000);
    assert_eq!(after - before, 0, "the hot path allocated");
}
