//! The operator console over real HTTP: a connection that needs reconnecting is
//! shown as such and reconnected through its button, the consent page and the
//! callback; forms without the CSRF token and requests without the admin token
//! are refused; nothing secret is ever rendered; /metrics and /healthz answer.

use std::sync::OnceLock;
use tokenfence::console::{router, ConsoleConfig};
use tokenfence::crypto::{EncryptionKey, KeyId, Keyring};
use tokenfence::store::{SqliteStore, Store};
use tokenfence::{ConnectOptions, ExistingGrant, ImportOptions, Provider, TokenManager};
use tokenfence_core::*;
use tokenfence_sim::mock::{Control, MockProvider};
use tokenfence_sim::provider::ProviderSpec;

use crate::common::serve_mock;

fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .unwrap()
        })
        .clone()
}

struct Console {
    base: String,
    mock: MockProvider,
    store: SqliteStore,
    tokens: TokenManager,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// The console of `tokens` on a loopback port, and its base URL.
async fn serve_console(
    tokens: &TokenManager,
    admin_token: Option<&str>,
    page_size: usize,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(
        tokens.clone(),
        ConsoleConfig {
            public_url: base.clone(),
            admin_token: admin_token.map(str::to_owned),
            page_size,
            metrics: Some(metrics_handle()),
        },
    )
    .unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

async fn console(admin_token: Option<&str>, page_size: usize) -> Console {
    let (mock, _) = serve_mock(ProviderSpec::intuit()).await;
    let dir = tempfile::tempdir().unwrap();
    let keyring = Keyring::new(KeyId(1), EncryptionKey::from_slice(&[3; 32]).unwrap());
    let store = SqliteStore::open(dir.path().join("tokens.db"), keyring).unwrap();
    let tokens = TokenManager::builder()
        .provider(Provider {
            profile: mock.spec().profile,
            client: mock.spec().clients[0].credentials(),
        })
        .store(store.clone())
        .keepalive_scan(None)
        .build()
        .await
        .unwrap();
    let base = serve_console(&tokens, admin_token, page_size).await;
    Console {
        base,
        mock,
        store,
        tokens,
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        _dir: dir,
    }
}

impl Console {
    async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// Connects `id` through the flow (the user consents at once).
    async fn connected(&self, id: &str) {
        let begun = self
            .tokens
            .begin_connect(
                &ConnectionId(id.into()),
                &format!("{}/callback", self.base),
                ConnectOptions::default(),
            )
            .await
            .unwrap();
        let consent = self.http.get(&begun.url).send().await.unwrap();
        let callback = consent.headers()["location"].to_str().unwrap().to_owned();
        let back = self.http.get(&callback).send().await.unwrap();
        assert_eq!(back.status(), 303);
    }

    /// Imports a grant made elsewhere as `id`.
    async fn imported(&self, id: &str) {
        let grant = ExistingGrant {
            refresh: RefreshToken::new(format!("RT-{id}")),
            access: None,
            realm_id: None,
            idle_deadline: None,
            hard_deadline: None,
        };
        self.tokens
            .import(&ConnectionId(id.into()), grant, ImportOptions::default())
            .await
            .unwrap();
    }

    /// Every secret the store holds, to search pages for.
    async fn secrets(&self) -> Vec<String> {
        let mut all = Vec::new();
        for id in self.store.list().await.unwrap() {
            let r = self.store.load(&id).await.unwrap().unwrap();
            all.push(r.refresh.expose().to_owned());
            if let Some(a) = r.access {
                all.push(a.token.expose().to_owned());
            }
        }
        all.push("prod-secret".into());
        all
    }
}

fn csrf_of(page: &str) -> String {
    let at = page.find("name=csrf value=\"").expect("a form") + "name=csrf value=\"".len();
    page[at..at + 48].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_needs_reconnecting_is_shown_and_reconnected_from_the_console() {
    let c = console(None, 50).await;
    c.connected("qbo-1").await;
    // The user disconnects the app at Intuit; the next refresh finds the grant gone.
    c.mock.control(Control::Revoke { grant: None });
    let _ = c
        .tokens
        .refresh_now(&ConnectionId("qbo-1".into()), false)
        .await;

    let (status, page) = c.get("/").await;
    assert_eq!(status, 200);
    assert!(page.contains("needs reconnect (invalid grant"), "{page}");
    assert!(page.contains("9130350000000001"), "the realm is shown");
    assert!(
        page.contains("<td>not served</td>"),
        "a dead connection's token is not offered"
    );
    let (_, filtered) = c.get("/?filter=reconnect").await;
    assert!(filtered.contains("data-id=\"qbo-1\""));
    let (_, soon) = c.get("/?filter=deadline").await;
    assert!(
        !soon.contains("data-id=\"qbo-1\""),
        "its deadlines are years away"
    );
    for secret in c.secrets().await {
        assert!(!page.contains(&secret), "a secret was rendered");
    }

    // A form from elsewhere (no or a wrong CSRF token) begins nothing.
    for body in ["", "csrf=0123"] {
        let r = c
            .http
            .post(format!("{}/connections/qbo-1/reconnect", c.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(matches!(r.status().as_u16(), 403 | 422), "{}", r.status());
    }

    // The button: to the consent page, back through the callback, Active.
    let r = c
        .http
        .post(format!("{}/connections/qbo-1/reconnect", c.base))
        .form(&[("csrf", csrf_of(&page))])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let consent = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(consent.starts_with(&c.mock.spec().profile.authorize_url.unwrap()));
    let callback = c.http.get(&consent).send().await.unwrap().headers()["location"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(callback.starts_with(&format!("{}/callback?", c.base)));
    let back = c.http.get(&callback).send().await.unwrap();
    assert_eq!(back.status(), 303);
    let notice = back.headers()["location"].to_str().unwrap().to_owned();
    let (_, page) = c.get(&notice).await;
    assert!(
        page.contains("Reconnected qbo-1 (company 9130350000000001)"),
        "{page}"
    );
    assert!(page.contains("<td class=ok>active</td>"), "{page}");
    // The same callback again: a sentence, not a stack trace; nothing changed.
    let (status, again) = c.get(&callback[c.base.len()..]).await;
    assert_eq!(status, 400);
    assert!(again.contains("unknown or already used state"), "{again}");

    // Metrics and health.
    let (status, metrics) = c.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("tokenfence_connections{provider=\"intuit\",status=\"active\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("tokenfence_events_total{"), "{metrics}");
    let (status, health) = c.get("/healthz").await;
    assert_eq!((status, health.starts_with("ok")), (200, true), "{health}");
    let (status, landing) = c.get("/disconnected?realmId=9130350000000001").await;
    assert_eq!(status, 200);
    assert!(landing.contains("disconnected from QuickBooks for company 9130350000000001"));
    c.tokens.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_guards_every_operator_route_and_pages_escape_what_they_show() {
    let c = console(Some("an-admin-token-of-some-length"), 2).await;
    for (path, expected) in [("/", 401), ("/metrics", 401), ("/login?token=wrong", 401)] {
        assert_eq!(c.get(path).await.0, expected, "{path}");
    }
    let r = c
        .http
        .post(format!("{}/connections/x/reconnect", c.base))
        .form(&[("csrf", "whatever")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // The provider's callback and the health check need no token.
    assert_eq!(c.get("/callback?state=nope&code=x").await.0, 400);
    assert_eq!(c.get("/healthz").await.0, 200);

    // Five connections, one with a hostile id; two per page.
    for n in 0..4 {
        c.imported(&format!("company-{n}")).await;
    }
    c.imported("<script>alert(1)</script>").await;
    let signed = |path: &str| {
        c.http
            .get(format!("{}{path}", c.base))
            .bearer_auth("an-admin-token-of-some-length")
            .send()
    };
    let page = signed("/").await.unwrap().text().await.unwrap();
    assert!(
        page.contains("5 connection(s)") && page.contains("page 1 of 3"),
        "{page}"
    );
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(!page.contains("<script>"), "{page}");
    let last = signed("/?page=3").await.unwrap().text().await.unwrap();
    assert!(
        last.contains("page 3 of 3") && last.contains("company-3"),
        "{last}"
    );
    // Signing in once sets a cookie the browser sends from then on.
    let login = c.get("/login?token=an-admin-token-of-some-length").await;
    assert_eq!(login.0, 303);
    let r = c
        .http
        .get(format!(
            "{}/login?token=an-admin-token-of-some-length",
            c.base
        ))
        .send()
        .await
        .unwrap();
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    let r = c
        .http
        .get(format!("{}/", c.base))
        .header("cookie", cookie.split(';').next().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for secret in c.secrets().await {
        assert!(!page.contains(&secret), "a secret was rendered");
    }
    c.tokens.shutdown().await;
}

/// chromedriver on a free loopback port, killed when dropped.
async fn chromedriver() -> (tokio::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = tokio::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver (Debian's chromium-driver; ./scripts/test installs it)");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return (child, port);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not start");
}

/// Screenshots are kept as test artifacts in target/screenshots/.
fn keep_screenshot(name: &str, png: &[u8]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), png).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_headless_chromium_an_operator_reconnects_a_connection() {
    use fantoccini::{ClientBuilder, Locator};
    let c = console(None, 50).await;
    c.connected("qbo-4620816365").await;
    c.connected("qbo-9130354213").await;
    c.mock.control(Control::Revoke { grant: Some(0) });
    let _ = c
        .tokens
        .refresh_now(&ConnectionId("qbo-4620816365".into()), false)
        .await;
    // The consent page a person sees, with its buttons.
    c.mock.control(Control::ConsentPage { on: true });

    let (_driver, port) = chromedriver().await;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1400,500"],
        }),
    );
    // chromedriver speaks plain HTTP on loopback: no TLS stack needed.
    let http = hyper_util::client::legacy::connect::HttpConnector::new();
    let browser = ClientBuilder::new(http)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a browser session");
    browser.goto(&format!("{}/", c.base)).await.unwrap();
    let row = "tr[data-id='qbo-4620816365']";
    let status = browser
        .find(Locator::Css(&format!("{row} td.dead")))
        .await
        .unwrap();
    assert!(status
        .text()
        .await
        .unwrap()
        .starts_with("needs reconnect (invalid grant"));
    keep_screenshot(
        "console-needs-reconnect.png",
        &browser.screenshot().await.unwrap(),
    );

    let started = std::time::Instant::now();
    browser
        .find(Locator::Css(&format!("{row} button")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let connect = browser
        .wait()
        .for_element(Locator::Id("connect"))
        .await
        .unwrap();
    keep_screenshot("consent.png", &browser.screenshot().await.unwrap());
    connect.click().await.unwrap();
    let notice = browser
        .wait()
        .for_element(Locator::Id("notice"))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(
        notice.text().await.unwrap(),
        "Reconnected qbo-4620816365 (company 9130350000000001)"
    );
    let status = browser
        .find(Locator::Css(&format!("{row} td.ok")))
        .await
        .unwrap();
    assert_eq!(status.text().await.unwrap(), "active");
    keep_screenshot(
        "console-reconnected.png",
        &browser.screenshot().await.unwrap(),
    );
    eprintln!("Reconnect click to Active on the page, in headless Chromium: {took:?}");
    let page = browser.source().await.unwrap();
    for secret in c.secrets().await {
        assert!(!page.contains(&secret), "a secret was rendered");
    }
    browser.close().await.unwrap();
    c.tokens.shutdown().await;
}

/// A store that lists its rows but does not answer reads (an outage between the
/// two) is a failed scan on /metrics, not rows the keyring cannot open: the
/// connection gauges are missing and `tokenfence_store_scan_ok` is 0 until the
/// store answers again.
#[tokio::test]
async fn metrics_tell_a_store_outage_from_unreadable_rows() {
    use crate::common::{granting_manager, keepalive_due, provider, seed, Granting, Watched};
    let store = std::sync::Arc::new(Watched::default());
    let now = tokenfence::clock::Clock::now(&tokenfence::clock::SystemClock);
    seed(
        &store.inner,
        [keepalive_due("co-1", provider().identity(), now)],
    )
    .await;
    let tokens = granting_manager(store.clone(), Granting::new(std::time::Duration::ZERO), 1).await;
    let base = serve_console(&tokens, None, 10).await;
    let metrics = || async {
        let r = reqwest::get(format!("{base}/metrics")).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let (status, up) = metrics().await;
    assert_eq!(status, 200);
    assert!(up.contains("tokenfence_store_scan_ok 1"), "{up}");
    assert!(up.contains("tokenfence_connections_unreadable 0"), "{up}");
    assert!(
        up.contains("tokenfence_connections{provider=\"intuit\",status=\"active\"} 1"),
        "{up}"
    );

    store.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, down) = metrics().await;
    assert_eq!(status, 200, "the process's own metrics are still served");
    assert!(down.contains("tokenfence_store_scan_ok 0"), "{down}");
    assert!(
        !down.contains("tokenfence_connections_unreadable"),
        "{down}"
    );
    assert!(!down.contains("tokenfence_connections{"), "{down}");
    tokens.shutdown().await;
}
