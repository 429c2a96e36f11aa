//! `tokenfence-sim mock-provider` serving a mixed fleet: a built-in profile and a
//! profile file at once, each under its name, each with its own grants, refresh
//! endpoint and counters.

use tokio::io::{AsyncBufReadExt, BufReader};

async fn json(response: reqwest::Response) -> serde_json::Value {
    serde_json::from_str(&response.text().await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mock_process_serves_two_providers_under_their_names() {
    let auth0 = concat!(env!("CARGO_MANIFEST_DIR"), "/../profiles/auth0.toml");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenfence-sim"))
        .args(["mock-provider", "--profile", "intuit", "--profile", auth0])
        .args(["--addr", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the mock");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut bases = Vec::new();
    while bases.len() < 2 {
        let line = lines.next_line().await.unwrap().expect("the mock's banner");
        if let Some(rest) = line.strip_prefix("mock provider ") {
            let (name, at) = rest.split_once(" on ").unwrap();
            bases.push((name.to_owned(), at.to_owned()));
        }
    }
    let names: Vec<&str> = bases.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["intuit", "auth0"]);
    let http = reqwest::Client::new();
    for (name, base) in &bases {
        assert!(base.ends_with(&format!("/{name}")), "{base}");
        let grant = json(
            http.post(format!("{base}/control"))
                .header("content-type", "application/json")
                .body(r#"{"op":"authorize","client_id":"prod-app"}"#)
                .send()
                .await
                .unwrap(),
        )
        .await;
        let refresh = grant["tokens"]["refresh_token"].as_str().unwrap();
        // Auth0's profile sends the client in the form body, Intuit's in Basic.
        let body = format!(
            "grant_type=refresh_token&refresh_token={refresh}&client_id=prod-app&client_secret=prod-secret"
        );
        let reply = http
            .post(format!("{base}{}", tokenfence_sim::mock::TOKEN_PATH))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("authorization", "Basic cHJvZC1hcHA6cHJvZC1zZWNyZXQ=")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200, "{name}");
        let tokens = json(reply).await;
        // Each under its own lifetimes: Intuit 1 h, the profile file's 24 h.
        let expected = if name == "intuit" { 3_600 } else { 86_400 };
        assert_eq!(tokens["expires_in"], expected, "{name}: {tokens}");
    }
    // Each mock counted its own refresh only.
    for (_, base) in &bases {
        let stats = json(
            http.get(format!("{base}/control/stats"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(stats["refreshes"], 1, "{base}: {stats}");
        assert_eq!(stats["grants"], 1, "{base}: {stats}");
    }
}
