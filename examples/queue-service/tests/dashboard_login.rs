//! The dashboard's login, run as the binary runs: whatever a browser or an attacker
//! sends (a key from another origin, a wrong key, forged or foreign session
//! cookies), the demo's log never holds a key, a session token or the request's
//! input in clear.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_from_a_login_or_a_cookie_is_logged_in_clear() {
    let creds = Creds::new();
    let demo = DemoProcess::spawn(&creds.env_in_memory(&[]));
    let host = demo.addr.to_string();
    let origin = format!("http://{host}");
    let form = |key: &str| format!("key={key}");
    let post = |body: String, origin: Option<String>| {
        let addr = demo.addr;
        async move {
            let mut headers = vec![(
                "Content-Type".to_owned(),
                "application/x-www-form-urlencoded".to_owned(),
            )];
            if let Some(o) = origin {
                headers.push(("Origin".to_owned(), o));
            }
            let h: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            http_raw(addr, "POST", "/dashboard/login", &h, &body).await
        }
    };
    let planted_key = "pc_test_plantedWrongKey7c1d0000000000";
    let planted_cookie = "planted.cookie-value.9e2a";
    // From another origin, with the right key.
    let r = post(form(&creds.admin), Some("http://evil.example".into())).await;
    assert_eq!(r.status, 403, "{r:?}");
    // A wrong key, same origin.
    let r = post(form(planted_key), Some(origin.clone())).await;
    assert_eq!(r.status, 401, "{r:?}");
    // The right key: a session.
    let r = post(form(&creds.admin), Some(origin.clone())).await;
    assert_eq!(r.status, 303, "{r:?}");
    let cookie = r.header("set-cookie").unwrap().to_owned();
    let token = cookie
        .split(';')
        .next()
        .unwrap()
        .strip_prefix("pc_dashboard=")
        .unwrap()
        .to_owned();
    let with = |t: &str| format!("pc_dashboard={t}");
    let r = http(
        demo.addr,
        "GET",
        "/dashboard",
        &[("Cookie", &with(&token))],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = http(
        demo.addr,
        "GET",
        "/v1/admin/stats",
        &[("Authorization", &format!("Bearer {token}"))],
        None,
    )
    .await;
    assert_eq!(r.status, 401, "the session is not an API credential: {r:?}");
    let r = http(
        demo.addr,
        "GET",
        "/dashboard",
        &[("Cookie", &with(planted_cookie))],
        None,
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    let log = demo.kill();
    assert!(log.contains("dashboard_login"), "{log}");
    assert!(log.contains("dashboard_cross_origin_refused"), "{log}");
    let signature = token.rsplit('.').next().unwrap();
    for secret in [
        creds.admin.as_str(),
        planted_key,
        planted_cookie,
        signature,
        "evil.example",
    ] {
        assert!(!log.contains(secret), "logged in clear: {secret}\n{log}");
    }
}
