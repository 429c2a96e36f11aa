//! The `tokenfence` operator CLI against the mock provider on loopback and a real
//! SQLite file: connect through the authorization-code flow, list, refresh,
//! revoke, re-encrypt; bad arguments exit 2; no secret is ever printed.

use tokenfence::crypto::EncryptionKey;
use tokenfence_sim::mock::{AUTHORIZE_PATH, REVOKE_PATH, TOKEN_PATH};

use crate::common::serve_mock;
use tokenfence_sim::provider::ProviderSpec;

struct Env {
    base: String,
    store: String,
    keyring: String,
    secret: &'static str,
    _dir: tempfile::TempDir,
}

impl Env {
    /// A fresh SQLite store in a temporary directory, a new key, the production
    /// app's secret, and the mock at `base`.
    fn new(base: String) -> Env {
        let dir = tempfile::tempdir().unwrap();
        Env {
            base,
            store: format!("sqlite:{}", dir.path().join("tokens.db").display()),
            keyring: format!(
                "1:{}",
                EncryptionKey::generate().unwrap().to_base64().as_str()
            ),
            secret: "prod-secret",
            _dir: dir,
        }
    }
}

async fn run(env: &Env, args: &[&str]) -> (i32, String) {
    let token_url = format!("{}{TOKEN_PATH}", env.base);
    let revoke_url = format!("{}{REVOKE_PATH}", env.base);
    let mut all = vec!["--token-url", &token_url, "--revoke-url", &revoke_url];
    all.extend_from_slice(args);
    let client = [
        ("TOKENFENCE_CLIENT_ID", "prod-app"),
        ("TOKENFENCE_CLIENT_SECRET", env.secret),
    ];
    exec(env, &all, &client).await
}

/// Runs the CLI on `env`'s store and keyring with `args` and `vars`; asserts that
/// no client secret is printed.
async fn exec(env: &Env, args: &[&str], vars: &[(&str, &str)]) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenfence"))
        .arg("--store")
        .arg(&env.store)
        .args(args)
        .env("TOKENFENCE_KEYRING", &env.keyring)
        .envs(vars.iter().copied())
        .output()
        .await
        .expect("run tokenfence");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for secret in [env.secret, "prod-secret", "sandbox-secret"] {
        assert!(!text.contains(secret), "a client secret leaked: {text}");
    }
    (out.status.code().unwrap_or(-1), text)
}

/// `tokenfence connect ID --listen 127.0.0.1:0` with a "browser": reads the
/// consent URL the CLI prints, passes the mock's consent page, and follows the
/// redirect to the CLI's own callback listener. The CLI's status and output.
async fn connect_with_browser(env: &Env, id: &str) -> (i32, String) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenfence"))
        .args(["--store", &env.store])
        .args(["--token-url", &format!("{}{TOKEN_PATH}", env.base)])
        .args(["--authorize-url", &format!("{}{AUTHORIZE_PATH}", env.base)])
        .args(["connect", id, "--listen", "127.0.0.1:0"])
        .env("TOKENFENCE_KEYRING", &env.keyring)
        .env("TOKENFENCE_CLIENT_ID", "prod-app")
        .env("TOKENFENCE_CLIENT_SECRET", env.secret)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let consent = loop {
        let line = lines.next_line().await.unwrap().expect("the consent URL");
        printed.push(line.clone());
        if line.starts_with("http") {
            break line;
        }
    };
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let reply = browser.get(&consent).send().await.unwrap();
    let callback = reply.headers()["location"].to_str().unwrap().to_owned();
    let page = browser.get(&callback).send().await.unwrap();
    assert_eq!(page.status(), 200);
    while let Some(line) = lines.next_line().await.unwrap() {
        printed.push(line);
    }
    let out = child.wait_with_output().await.unwrap();
    let text = format!(
        "{}\n{}",
        printed.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains(env.secret) && !text.contains("prod-secret"),
        "{text}"
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operate_a_connection_from_the_command_line() {
    let (mock, base) = serve_mock(ProviderSpec::intuit()).await;
    let env = Env::new(base.clone());

    // `connect --listen`: the consent URL on standard output, the callback
    // received by the CLI itself. A wrong secret does not connect (the mock
    // checks it on the code exchange as on refresh): said at once, nothing stored.
    let wrong = Env {
        secret: "not-the-secret",
        ..env
    };
    let (status, out) = connect_with_browser(&wrong, "realm-1").await;
    assert_eq!(status, 1, "{out}");
    assert!(out.contains("invalid_client"), "{out}");
    let env = Env {
        secret: "prod-secret",
        ..wrong
    };
    let (status, out) = connect_with_browser(&env, "realm-1").await;
    assert_eq!(status, 0, "{out}");
    assert!(
        out.contains("open this address to connect realm-1"),
        "{out}"
    );
    assert!(
        out.contains("connected realm-1 (g0, realm 9130350000000001)"),
        "{out}"
    );
    assert!(!out.contains("code="), "the code was printed: {out}");

    let (status, out) = run(&env, &["list"]).await;
    assert_eq!(status, 0, "{out}");
    assert!(
        out.contains("realm-1\tintuit/production prod-app\tactive\tg0"),
        "{out}"
    );

    let (status, out) = run(&env, &["refresh", "realm-1"]).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("refreshed realm-1: g1"), "{out}");
    assert_eq!(mock.stats().refreshes, 1);

    // A rejected secret: the real outcome, at once (it used to wait 60 s and
    // say "the token is valid"), and the block is the wrong secret's only.
    let wrong = Env {
        secret: "not-the-secret",
        ..env
    };
    let started = std::time::Instant::now();
    let (status, out) = run(&wrong, &["refresh", "realm-1"]).await;
    assert_eq!(status, 1, "{out}");
    assert!(out.contains("rejected the client credentials"), "{out}");
    assert!(out.contains("tried again at"), "{out}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    let (_, out) = run(&wrong, &["status", "realm-1"]).await;
    assert!(
        out.contains("degraded(1x client credentials rejected)"),
        "{out}"
    );
    // The same wrong secret again: held back, nothing sent.
    let requests = mock.stats().token_requests;
    let (status, out) = run(&wrong, &["refresh", "realm-1"]).await;
    assert_eq!(status, 1, "{out}");
    assert_eq!(
        mock.stats().token_requests,
        requests,
        "sent despite the block"
    );
    // ...unless an operator clears the block (still refused: the secret is wrong).
    let (status, _) = run(&wrong, &["refresh", "realm-1", "--clear-block"]).await;
    assert_eq!(status, 1);
    assert_eq!(mock.stats().token_requests, requests + 1);
    // The right secret is not held back by the wrong one's block.
    let env = Env {
        secret: "prod-secret",
        ..wrong
    };
    let (status, out) = run(&env, &["refresh", "realm-1"]).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("refreshed realm-1: g4"), "{out}");

    // Key rotation: add key 2, re-seal, then the old key can go.
    let new_key = format!(
        "2:{}",
        EncryptionKey::generate().unwrap().to_base64().as_str()
    );
    let env = Env {
        keyring: format!("{new_key},{}", env.keyring),
        ..env
    };
    let (status, out) = run(&env, &["reencrypt"]).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("re-sealed 1 records"), "{out}");
    let env = Env {
        keyring: new_key,
        ..env
    };
    let (status, out) = run(&env, &["list"]).await;
    assert!(
        status == 0 && out.contains("realm-1\tintuit/production prod-app\tactive\tg4"),
        "{out}"
    );

    let (status, out) = run(&env, &["revoke", "realm-1"]).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("revoked realm-1"), "{out}");
    let (status, out) = run(&env, &["status", "realm-1"]).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("disconnected"), "{out}");

    let (status, _) = run(&env, &["status", "nope"]).await;
    assert_eq!(status, 1);
}

#[tokio::test]
async fn bad_arguments_exit_2() {
    let env = Env {
        store: "memcached:nope".into(),
        ..Env::new("http://127.0.0.1:9".into())
    };
    let (status, out) = run(&env, &["list"]).await;
    assert_eq!(status, 2, "{out}");
    assert!(
        out.contains("--store is sqlite:PATH or postgres:URL"),
        "{out}"
    );
    let env = Env {
        keyring: "1:not-base64!".into(),
        ..env
    };
    let (status, out) = run(&env, &["list"]).await;
    assert_eq!(status, 2, "{out}");
}

/// A PostgreSQL URL carries a password: `--help` does not show the variable's
/// value, and a store that cannot be reached is reported without its URL.
#[tokio::test]
async fn a_database_password_is_never_printed() {
    let url = "postgres:postgres://app:pw-MARKER-7f3a@127.0.0.1:9/tokens";
    let help = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenfence"))
        .arg("--help")
        .env("TOKENFENCE_STORE", url)
        .output()
        .await
        .expect("run tokenfence");
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("TOKENFENCE_STORE"), "{text}");
    assert!(
        !text.contains("pw-MARKER-7f3a"),
        "--help printed it: {text}"
    );
    let env = Env {
        store: url.into(),
        ..Env::new("http://127.0.0.1:9".into())
    };
    let (status, out) = run(&env, &["list"]).await;
    assert_ne!(status, 0, "{out}");
    assert!(
        !out.contains("pw-MARKER-7f3a"),
        "the password was printed: {out}"
    );
}

/// `tokenfence import`: a grant made elsewhere (consent at the mock, tokens
/// handed over as another system would hold them) is checked, dry-run, imported
/// once, refreshed with the provider, and a second run changes nothing; a bad
/// file is refused line by line without echoing a token, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_existing_connections_from_the_command_line() {
    use tokenfence_sim::mock::Control;
    let (mock, base) = serve_mock(ProviderSpec::intuit()).await;
    let answer = mock.control(Control::Authorize {
        client_id: "prod-app".into(),
    });
    let refresh = answer["tokens"]["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let env = Env::new(base);
    let file = env._dir.path().join("export.jsonl");
    let path = file.to_str().unwrap();
    let good = format!(
        r#"{{"id":"company-1","provider":"intuit","environment":"production","client_id":"prod-app","refresh_token":"{refresh}","realm_id":"9130"}}"#
    );
    std::fs::write(&file, format!("{good}\n")).unwrap();

    let (status, out) = run(&env, &["import", path, "--dry-run"]).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("line 1: company-1 would be created"), "{out}");
    let (status, out) = run(&env, &["list"]).await;
    assert_eq!(status, 0, "{out}");
    assert!(
        out.contains("no connections in sqlite:"),
        "a dry run wrote: {out}"
    );

    let (status, out) = run(&env, &["import", path]).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("1 created"), "{out}");
    assert!(!out.contains(&refresh), "the token was printed: {out}");
    // Unproven and its deadlines unknown: due for keep-alive at once.
    let (status, out) = run(&env, &["status", "company-1"]).await;
    assert_eq!(status, 0, "{out}");
    assert!(
        out.contains(
            "company-1\tintuit/production prod-app\tactive, imported (not yet proven by a refresh)\tg0\tno access token\tidle deadline unknown"
        ),
        "{out}"
    );
    let (status, out) = run(&env, &["keep-alive", "--once"]).await;
    assert_eq!(status, 0, "{out}");
    assert_eq!(
        mock.stats().refreshes,
        1,
        "the provider took the imported token"
    );
    let (status, out) = run(&env, &["status", "company-1"]).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("access expires in 59 min"), "{out}");
    assert!(out.contains(" days)\thard deadline 20"), "{out}");
    let (status, out) = run(&env, &["--json", "list"]).await;
    assert_eq!(status, 0, "{out}");
    let object = out
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("a JSON line");
    let listed: serde_json::Value = serde_json::from_str(object).unwrap();
    assert_eq!(listed["id"], "company-1");
    assert_eq!(listed["status"], "active");
    assert_eq!(listed["realm_id"], "9130");
    assert!(
        listed["idle_deadline"].as_str().unwrap().ends_with('Z'),
        "{listed}"
    );
    // Intuit keeps the refresh token for about a day: the same token is
    // stored, and a second run changes nothing.
    let (status, out) = run(&env, &["import", path]).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("1 unchanged"), "{out}");

    let wrong_client = good.replace("prod-app", "sandbox-app");
    let bad = format!("{good}\n{wrong_client}\n{{\"id\":\"x\",\"refresh_token\":\"{refresh}\"\n");
    std::fs::write(&file, bad).unwrap();
    let (status, out) = run(&env, &["import", path]).await;
    assert_eq!(status, 1, "{out}");
    assert!(
        out.contains("line 2: `client_id` is `sandbox-app`"),
        "{out}"
    );
    assert!(out.contains("line 3: not a JSON object"), "{out}");
    assert!(out.contains("nothing imported"), "{out}");
    assert!(!out.contains(&refresh), "a token was echoed: {out}");
}

/// One CLI over connections of three clients of two providers: Intuit
/// production and sandbox, and a rotating provider described by a profile file;
/// each is refreshed with its own client at its own endpoint (the mocks refuse any
/// other), each client's credentials come from its own environment variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_providers_and_clients_from_one_command_line() {
    use tokenfence_sim::mock::Control;
    use tokenfence_sim::provider::BehaviourClass;
    let (intuit, intuit_base) = serve_mock(ProviderSpec::intuit()).await;
    let (acme, acme_base) = serve_mock(ProviderSpec::scaled(BehaviourClass::ReuseDetection)).await;
    let env = Env::new(intuit_base);
    let _ = acme_base;
    // Profile files for both, pointing at the mocks (a profile as a user writes it).
    let dir = env._dir.path();
    let intuit_file = dir.join("intuit.toml");
    std::fs::write(&intuit_file, intuit.spec().profile.to_toml()).unwrap();
    let acme_file = dir.join("acme.toml");
    let acme_profile = tokenfence_core::ProviderProfile {
        name: "acme".into(),
        ..acme.spec().profile
    };
    std::fs::write(&acme_file, acme_profile.to_toml()).unwrap();
    let token = |mock: &tokenfence_sim::mock::MockProvider, client: &str| {
        let answer = mock.control(Control::Authorize {
            client_id: client.into(),
        });
        answer["tokens"]["refresh_token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let lines = [
        ("books-prod", "intuit", "production", "prod-app", token(&intuit, "prod-app")),
        ("books-test", "intuit", "sandbox", "sandbox-app", token(&intuit, "sandbox-app")),
        ("acme-1", "acme", "production", "prod-app", token(&acme, "prod-app")),
    ]
    .map(|(id, provider, environment, client, refresh)| {
        format!(
            r#"{{"id":"{id}","provider":"{provider}","environment":"{environment}","client_id":"{client}","refresh_token":"{refresh}"}}"#
        )
    });
    let export = dir.join("export.jsonl");
    std::fs::write(&export, lines.join("\n")).unwrap();
    let sandbox = format!("{}@sandbox", intuit_file.display());
    let providers = [
        "--provider",
        intuit_file.to_str().unwrap(),
        "--provider",
        &sandbox,
        "--provider",
        acme_file.to_str().unwrap(),
    ];
    let vars = [
        ("TOKENFENCE_INTUIT_CLIENT_ID", "prod-app"),
        ("TOKENFENCE_INTUIT_CLIENT_SECRET", "prod-secret"),
        ("TOKENFENCE_INTUIT_SANDBOX_CLIENT_ID", "sandbox-app"),
        ("TOKENFENCE_INTUIT_SANDBOX_CLIENT_SECRET", "sandbox-secret"),
        ("TOKENFENCE_ACME_CLIENT_ID", "prod-app"),
        ("TOKENFENCE_ACME_CLIENT_SECRET", "prod-secret"),
    ];
    let cli = |extra: &[&str]| {
        let mut args = providers.to_vec();
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let call = |extra: &[&str]| {
        let args = cli(extra);
        let env = &env;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            exec(env, &args, &vars).await
        }
    };
    let (status, out) = call(&["import", export.to_str().unwrap()]).await;
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("3 created"), "{out}");
    for id in ["books-prod", "books-test", "acme-1"] {
        let (status, out) = call(&["refresh", id]).await;
        assert_eq!(status, 0, "{out}");
        assert!(out.contains(&format!("refreshed {id}: g1")), "{out}");
    }
    assert_eq!(intuit.stats().refreshes, 2);
    assert_eq!(acme.stats().refreshes, 1);
    let (status, out) = call(&["list"]).await;
    assert_eq!(status, 0, "{out}");
    for line in [
        "books-prod\tintuit/production prod-app\tactive\tg1",
        "books-test\tintuit/sandbox sandbox-app\tactive\tg1",
        "acme-1\tacme/production prod-app\tactive\tg1",
    ] {
        assert!(out.contains(line), "{line} in {out}");
    }

    // A client whose credentials are missing is named; nothing runs.
    let args = cli(&["refresh", "acme-1"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, out) = exec(&env, &args, &vars[..4]).await;
    assert_eq!(status, 2, "{out}");
    assert!(
        out.contains("set TOKENFENCE_ACME_CLIENT_ID in the environment"),
        "{out}"
    );
    // Endpoint overrides are for one provider only; an unknown provider is named.
    let (status, out) = call(&["--token-url", "http://127.0.0.1:1/t", "refresh", "acme-1"]).await;
    assert_eq!(status, 2, "{out}");
    assert!(out.contains("need exactly one --provider"), "{out}");
    let (status, out) = exec(&env, &["--provider", "intuitt", "refresh", "acme-1"], &vars).await;
    assert_eq!(status, 2, "{out}");
    assert!(out.contains("unknown provider `intuitt`"), "{out}");
    // A profile file with a mistake says which field.
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"bad\"\ntoken_url = \"http://example.com/t\"\n",
    )
    .unwrap();
    let (status, out) = exec(
        &env,
        &["--provider", bad.to_str().unwrap(), "refresh", "acme-1"],
        &vars,
    )
    .await;
    assert_eq!(status, 2, "{out}");
    assert!(
        out.contains("`token_url`") && out.contains("must use https"),
        "{out}"
    );
}
