//! axum 0.8 over real TCP (`axum::serve` with connect info): the extractors for
//! `Principal`, `ClientIp` and the verified token, their refusals when the layer that
//! provides them is missing (logged once), the three ways to mount the stack
//! (`Router::layer`, `route_layer`, `stack.layer(router)`), and a route that accepts
//! service tokens only.

use std::net::SocketAddr;

use axum::Router;
use axum::routing::get;
use portcullis::api_key::{ApiKeys, GeneratedKey, KeyStore, generate_key};
use portcullis::scope::RequireScopeLayer;
use portcullis::stack::StackLayer;
use portcullis::{ClientIp, Principal};
use tower::Layer;

use crate::common::{self, Reply, ip};
use crate::log_capture::capture;

fn key_store(id: &str, scopes: &str) -> (ApiKeys, GeneratedKey) {
    let key = generate_key("pc_test").unwrap();
    let file = format!(
        "[[keys]]\nid = \"{id}\"\ndigest = \"{}\"\nscopes = [{scopes}]\n",
        key.digest()
    );
    (ApiKeys::new(KeyStore::from_toml(&file).unwrap()), key)
}

async fn listen() -> (tokio::net::TcpListener, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Serves `router` with connect info, as the README says.
async fn serve(router: Router) -> SocketAddr {
    let (listener, addr) = listen().await;
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

async fn get_as(addr: SocketAddr, from: &str, path: &str, headers: &[String]) -> Reply {
    let headers: Vec<&[u8]> = headers.iter().map(|h| h.as_bytes()).collect();
    common::get_path_from(Some(ip(from)), addr, path, &headers).await
}

fn api_key(key: &GeneratedKey) -> String {
    format!("X-API-Key: {}", key.expose_secret())
}

async fn who(p: Principal, ip: ClientIp) -> String {
    format!("{} {} {ip}", p.method().as_str(), p.id())
}

fn assert_problem(r: &Reply, status: u16) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    assert!(r.body.contains(&format!("\"status\":{status}")), "{r:?}");
}

#[tokio::test]
async fn extractors_behind_router_layer() {
    let (keys, key) = key_store("axum-client", "\"jobs:read\"");
    let stack = StackLayer::builder().api_keys(keys).build().unwrap();
    let router = Router::new()
        .route("/who", get(who))
        .route(
            "/maybe-ip",
            get(|ip: Option<ClientIp>| async move { format!("{ip:?}") }),
        )
        .layer(stack);
    let addr = serve(router).await;
    let r = get_as(addr, "127.0.0.151", "/who", &[api_key(&key)]).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "api_key axum-client 127.0.0.151")
    );
    // Router::layer runs the stack on unmatched paths too.
    let r = get_as(addr, "127.0.0.151", "/nowhere", &[]).await;
    assert_problem(&r, 401);
    let r = get_as(addr, "127.0.0.151", "/maybe-ip", &[api_key(&key)]).await;
    assert_eq!(r.body, "Some(ClientIp(127.0.0.151))");
}

#[tokio::test]
async fn stack_layer_around_a_router_serves_with_connect_info() {
    let (keys, key) = key_store("axum-wrapped", "\"jobs:read\"");
    let stack = StackLayer::builder().api_keys(keys).build().unwrap();
    let router = Router::new().route("/who", get(who));
    let (listener, addr) = listen().await;
    let app = stack.layer(router);
    tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info())
            .await
            .unwrap();
    });
    let r = get_as(addr, "127.0.0.152", "/who", &[api_key(&key)]).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "api_key axum-wrapped 127.0.0.152")
    );
    let r = get_as(addr, "127.0.0.152", "/who", &[]).await;
    assert_problem(&r, 401);
}

#[tokio::test]
async fn a_missing_layer_is_a_500_problem_logged_once_with_the_layer_to_mount() {
    capture();
    // No portcullis layer at all, but served with connect info.
    let router = Router::new()
        .route(
            "/principal",
            get(|p: Principal| async move { p.id().to_owned() }),
        )
        .route("/ip", get(|ip: ClientIp| async move { ip.to_string() }));
    let addr = serve(router).await;
    for _ in 0..3 {
        let r = get_as(
            addr,
            "127.0.0.153",
            "/principal",
            &["X-Secret: axum-sentinel-1".into()],
        )
        .await;
        assert_problem(&r, 500);
        assert!(!r.body.contains("sentinel"));
        let r = get_as(addr, "127.0.0.153", "/ip", &[]).await;
        assert_problem(&r, 500);
    }
    let text = capture().text();
    assert_eq!(
        text.matches("did not pass through AuthenticateLayer")
            .count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.matches("did not pass through ClientIpLayer").count(),
        1
    );
    assert!(!text.contains("axum-sentinel-1"));
}

#[tokio::test]
async fn an_unresolved_client_address_is_403_or_none_not_a_wiring_error() {
    let (keys, key) = key_store("axum-proxied", "\"jobs:read\"");
    let stack = StackLayer::builder()
        .api_keys(keys)
        .trusted_proxies("127.0.0.0/8")
        .build()
        .unwrap();
    let router = Router::new()
        .route("/ip", get(|ip: ClientIp| async move { ip.to_string() }))
        .route(
            "/maybe-ip",
            get(|ip: Option<ClientIp>| async move { format!("{ip:?}") }),
        )
        .layer(stack);
    let addr = serve(router).await;
    // The trusted proxy reports no usable client: no address is resolved.
    let headers = [api_key(&key), "X-Forwarded-For: unknown".to_owned()];
    let r = get_as(addr, "127.0.0.154", "/maybe-ip", &headers).await;
    assert_eq!((r.status, r.body.as_str()), (200, "None"));
    let r = get_as(addr, "127.0.0.154", "/ip", &headers).await;
    assert_problem(&r, 403);
}

#[tokio::test]
async fn route_layer_scopes_only_the_matched_route() {
    let (keys, key) = key_store("axum-reader", "\"jobs:read\"");
    let stack = StackLayer::builder().api_keys(keys).build().unwrap();
    let router = Router::new()
        .route("/read", get(who))
        .route(
            "/write",
            get(who).route_layer(RequireScopeLayer::new("jobs:write").unwrap()),
        )
        .layer(stack);
    let addr = serve(router).await;
    assert_eq!(
        get_as(addr, "127.0.0.155", "/read", &[api_key(&key)])
            .await
            .status,
        200
    );
    let r = get_as(addr, "127.0.0.155", "/write", &[api_key(&key)]).await;
    assert_problem(&r, 403);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .contains("insufficient_scope")
    );
}

#[cfg(feature = "jwt")]
mod tokens {
    use super::*;
    use portcullis::AuthMethod;
    use portcullis::jwt::{
        Algorithm, KeySet, SigningKey, TokenIssuer, TokenVerifier, VerifiedToken,
    };

    const EC_KEY: &[u8] = include_bytes!("../data/jwt/ec.key.pem");
    const ISS: &str = "https://ci.example";
    const AUD: &str = "jobs-api";

    fn token(sub: &str) -> String {
        let issuer = TokenIssuer::builder(
            SigningKey::from_pem(Algorithm::ES256, EC_KEY)
                .unwrap()
                .kid("ec-1"),
        )
        .issuer(ISS)
        .subject(sub)
        .audience(AUD)
        .scope("jobs:work")
        .build()
        .unwrap();
        format!("Authorization: Bearer {}", issuer.mint().unwrap().as_str())
    }

    fn stack(keys: ApiKeys) -> StackLayer {
        let verifier = TokenVerifier::builder()
            .keys(KeySet::from_jwks(include_str!("../data/jwt/jwks.json")).unwrap())
            .issuer(ISS)
            .audience(AUD)
            .build()
            .unwrap();
        StackLayer::builder()
            .api_keys(keys)
            .service_tokens(verifier)
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn a_token_only_route_refuses_an_api_key_that_holds_the_scope() {
        capture();
        let (keys, key) = key_store("axum-key-worker", "\"jobs:work\"");
        let workers = RequireScopeLayer::new("jobs:work")
            .unwrap()
            .methods(&[AuthMethod::ServiceToken])
            .unwrap();
        let router = Router::new()
            .route("/work", get(who).route_layer(workers))
            .route("/any", get(who))
            .layer(stack(keys));
        let addr = serve(router).await;
        let r = get_as(addr, "127.0.0.156", "/work", &[token("axum-token-worker")]).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "service_token axum-token-worker 127.0.0.156")
        );
        // The same scope through an API key: refused, problem+json, audited.
        let r = get_as(addr, "127.0.0.156", "/work", &[api_key(&key)]).await;
        assert_problem(&r, 403);
        assert!(r.header("www-authenticate").is_none());
        assert!(!r.body.contains(key.expose_secret()));
        let denied: Vec<_> = capture()
            .events_with("axum-key-worker")
            .into_iter()
            .filter(|e| e["fields"]["event"] == "scope_denied")
            .collect();
        assert_eq!(denied.len(), 1, "{denied:?}");
        assert_eq!(denied[0]["fields"]["reason"], "auth_method_not_allowed");
        assert_eq!(denied[0]["fields"]["method"], "api_key");
        assert_eq!(denied[0]["fields"]["allowed_methods"], "service_token");
        assert!(!capture().text().contains(key.expose_secret()));
        // Elsewhere the key is fine.
        let r = get_as(addr, "127.0.0.156", "/any", &[api_key(&key)]).await;
        assert_eq!(r.status, 200);
    }

    #[tokio::test]
    async fn the_verified_token_extractor() {
        let (keys, key) = key_store("axum-token-key", "\"jobs:work\"");
        let router = Router::new()
            .route(
                "/claims",
                get(|t: VerifiedToken| async move { format!("{} {}", t.subject(), t.issuer()) }),
            )
            .route(
                "/maybe",
                get(|t: Option<VerifiedToken>| async move {
                    t.map_or_else(|| "no token".to_owned(), |t| t.subject().to_owned())
                }),
            )
            .layer(stack(keys));
        let addr = serve(router).await;
        let r = get_as(addr, "127.0.0.157", "/claims", &[token("axum-claims")]).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, "axum-claims https://ci.example")
        );
        let r = get_as(addr, "127.0.0.157", "/maybe", &[token("axum-claims")]).await;
        assert_eq!(r.body, "axum-claims");
        let r = get_as(addr, "127.0.0.157", "/maybe", &[api_key(&key)]).await;
        assert_eq!((r.status, r.body.as_str()), (200, "no token"));
        let r = get_as(addr, "127.0.0.157", "/claims", &[api_key(&key)]).await;
        assert_problem(&r, 403);
    }
}
