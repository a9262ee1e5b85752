//! The dashboard in a browser: a login form, a short-lived session cookie, a
//! logout.
//!
//! - `GET /dashboard/login` (public) shows a form that POSTs an admin key.
//! - `POST /dashboard/login` is refused (403) unless the request is same-origin
//!   ([`same_origin`]: an `Origin` naming this very host, and no `Sec-Fetch-Site`
//!   other than `same-origin`). The key from the form becomes the request's
//!   `X-API-Key` (every other credential header is dropped first), so the whole
//!   guarding stack authenticates it: failed-auth throttle, rate limit, audit log,
//!   and the scope check (`dashboard:read`). Then the handler mints a service
//!   token with the crate's `TokenIssuer` for the dashboard's own audience
//!   ([`crate::guard::DASHBOARD_AUDIENCE`], scope `dashboard:read`, 10 minutes)
//!   and sets it as the cookie [`SESSION_COOKIE`]: `HttpOnly`, `SameSite=Strict`,
//!   `Path=/dashboard`, `Max-Age` the token's lifetime. The token is bound to the
//!   key that signed in (its digest, in the scope
//!   [`crate::guard::SESSION_KEY_SCOPE`]); a key with usage credits gets no
//!   session, since a session would spend none.
//! - `GET /dashboard` takes the cookie's token as its bearer credential
//!   ([`cookie_to_bearer`]) and verifies it with a verifier that accepts only the
//!   dashboard audience; the API's verifier accepts only the API's audience, and
//!   no API route reads cookies: the cookie grants the dashboard, never the API.
//!   Then [`session_follows_key`] holds the session to its key as the key file
//!   stands now: revoked, expired, removed, without `dashboard:read`, or from an
//!   address outside its `allowed_ips`, and the session is refused at once.
//! - `POST /dashboard/logout` (same-origin only) clears the cookie.
//!
//! Nothing from the request is echoed or logged: refusals are fixed problem
//! documents, and the key and the token travel only in headers the access log
//! redacts.

use std::time::SystemTime;

use axum::Extension;
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, COOKIE, HOST, LOCATION, SET_COOKIE,
};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use portcullis::api_key::KeyDigest;
use portcullis::rejection::{Challenge, DenialReason, Rejection};
use portcullis::{AuthMethod, ClientIp, Principal, Scopes};

use crate::guard::Guard;
use crate::routes::problem;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "pc_dashboard";
/// The longest login form body accepted (bytes).
pub const FORM_LIMIT: usize = 1024;
/// The longest key or token taken from a form or a cookie (bytes).
const MAX_CREDENTIAL: usize = 4096;

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");
const ORIGIN: HeaderName = HeaderName::from_static("origin");

/// Whether a state-changing request comes from a page of this service: its
/// `Origin` is `http://<Host>` or `https://<Host>` (ASCII case aside), and its
/// `Sec-Fetch-Site`, if any, is `same-origin`. No `Origin` (or `null`) is refused:
/// browsers send it with every POST.
pub fn same_origin(origin: Option<&[u8]>, host: Option<&[u8]>, fetch_site: Option<&[u8]>) -> bool {
    if fetch_site.is_some_and(|s| !s.eq_ignore_ascii_case(b"same-origin")) {
        return false;
    }
    let (Some(origin), Some(host)) = (origin, host) else {
        return false;
    };
    if host.is_empty() || !host.iter().all(|b| b.is_ascii_graphic()) {
        return false;
    }
    let rest = if origin.len() > 7 && origin[..7].eq_ignore_ascii_case(b"http://") {
        &origin[7..]
    } else if origin.len() > 8 && origin[..8].eq_ignore_ascii_case(b"https://") {
        &origin[8..]
    } else {
        return false;
    };
    rest.eq_ignore_ascii_case(host)
}

/// The value of `name` in an `application/x-www-form-urlencoded` body, decoded
/// (`+` is a space, `%XX` a byte). `None` when it is missing, given twice, not
/// valid percent-encoding, or not 1 to 4096 visible ASCII characters: keys and
/// tokens never hold anything else.
pub fn form_value(body: &[u8], name: &str) -> Option<String> {
    let mut found = None;
    for pair in body.split(|b| *b == b'&') {
        let (k, v) = match pair.iter().position(|b| *b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &[][..]),
        };
        if k != name.as_bytes() {
            continue;
        }
        if found.is_some() {
            return None;
        }
        found = Some(v);
    }
    let raw = found?;
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |c: u8| (c as char).to_digit(16);
                let hi = hex(*raw.get(i + 1)?)?;
                let lo = hex(*raw.get(i + 2)?)?;
                out.push((hi * 16 + lo) as u8);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    let ok = !out.is_empty() && out.len() <= MAX_CREDENTIAL && out.iter().all(u8::is_ascii_graphic);
    ok.then(|| String::from_utf8(out).expect("visible ASCII"))
}

/// The session token in the `Cookie` headers: the value of the one cookie named
/// [`SESSION_COOKIE`]. `None` when there is none, more than one, or its value is not 1 to
/// 4096 characters of a JWT's alphabet (`A-Z a-z 0-9 - _ .`).
pub fn session_cookie<'a>(cookies: impl IntoIterator<Item = &'a [u8]>) -> Option<&'a str> {
    let mut found = None;
    for header in cookies {
        for pair in header.split(|b| *b == b';') {
            let pair = pair.trim_ascii();
            let Some(value) = pair
                .strip_prefix(SESSION_COOKIE.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
            else {
                continue;
            };
            if found.is_some() {
                return None;
            }
            found = Some(value);
        }
    }
    let v = found?;
    let ok = !v.is_empty()
        && v.len() <= MAX_CREDENTIAL
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    ok.then(|| std::str::from_utf8(v).expect("ASCII"))
}

fn header<'a>(h: &'a HeaderMap, name: &HeaderName) -> Option<&'a [u8]> {
    h.get(name).map(HeaderValue::as_bytes)
}

fn is_same_origin(h: &HeaderMap) -> bool {
    same_origin(
        header(h, &ORIGIN),
        header(h, &HOST),
        header(h, &SEC_FETCH_SITE),
    )
}

fn cross_origin() -> Response {
    tracing::warn!(event = "dashboard_cross_origin_refused");
    problem(
        StatusCode::FORBIDDEN,
        "This form accepts submissions from this site's own pages only.",
    )
}

/// The digest of the key a login form carries: [`form_key_to_header`] sets it
/// beside the `X-API-Key` header it makes, and [`login`] binds the session to it
/// once the stack has verified that header.
#[derive(Clone, Copy)]
struct SignInKey(KeyDigest);

/// Drops every credential a request carries (headers and cookies).
fn drop_credentials(h: &mut HeaderMap) {
    h.remove(AUTHORIZATION);
    h.remove(X_API_KEY);
    h.remove(COOKIE);
}

/// In front of the stack on `POST /dashboard/login`: refuses a request that is not
/// same-origin, else moves the form's `key` into `X-API-Key` (after dropping any
/// other credential), for the stack to authenticate. A body over [`FORM_LIMIT`]
/// is 413; a form without a usable key goes on without a credential (the stack
/// answers 401).
pub async fn form_key_to_header(req: Request, next: Next) -> Response {
    if !is_same_origin(req.headers()) {
        return cross_origin();
    }
    let form = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    if !form {
        return problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "The login form must be application/x-www-form-urlencoded.",
        );
    }
    let (mut parts, body) = req.into_parts();
    let Ok(body) = to_bytes(body, FORM_LIMIT).await else {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "The request body is larger than the limit.",
        );
    };
    drop_credentials(&mut parts.headers);
    // The body is consumed here; what goes on has none.
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.remove(CONTENT_TYPE);
    if let Some(key) = form_value(&body, "key")
        && let Ok(v) = HeaderValue::from_str(&key)
    {
        let mut v = v;
        v.set_sensitive(true);
        parts.headers.insert(X_API_KEY, v);
        // Which key the session will be bound to, once the stack has verified it
        // (the stack drops the credential header itself).
        parts.extensions.insert(SignInKey(KeyDigest::of(&key)));
    }
    next.run(Request::from_parts(parts, Body::empty())).await
}

/// In front of the stack on `GET /dashboard`: a request without a credential
/// header but with the session cookie gets the cookie's token as its bearer
/// credential. Every cookie is dropped from the request either way (nothing
/// downstream reads them, and none reaches a log).
pub async fn cookie_to_bearer(mut req: Request, next: Next) -> Response {
    let h = req.headers_mut();
    let has_credential = h.contains_key(AUTHORIZATION) || h.contains_key(X_API_KEY);
    let token = session_cookie(h.get_all(COOKIE).iter().map(HeaderValue::as_bytes))
        .map(|t| format!("Bearer {t}"));
    h.remove(COOKIE);
    if !has_credential
        && let Some(bearer) = token
        && let Ok(mut v) = HeaderValue::from_str(&bearer)
    {
        v.set_sensitive(true);
        h.insert(AUTHORIZATION, v);
    }
    next.run(req).await
}

fn page(title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}label{{display:block;margin:1em 0}}</style>\
         </head><body>{body}</body></html>\n"
    );
    let mut res = (StatusCode::OK, html).into_response();
    html_headers(res.headers_mut());
    res
}

/// The headers of every dashboard page: HTML, never cached, no scripts, forms
/// posting to this origin only, never framed, no referrer sent to other sites
/// (`same-origin`, not `no-referrer`: with the latter a browser sends
/// `Origin: null` with the form, and the same-origin check refuses it).
pub fn html_headers(h: &mut HeaderMap) {
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("same-origin"),
    );
}

/// `GET /dashboard/login`: the form.
pub async fn login_form() -> Response {
    page(
        "portcullis demo queue: sign in",
        "<h1>Sign in</h1><form method=\"post\" action=\"/dashboard/login\">\
         <label>Admin key <input type=\"password\" name=\"key\" autocomplete=\"off\" required></label>\
         <button type=\"submit\">Sign in</button></form>",
    )
}

fn see_other(to: &'static str, cookie: HeaderValue) -> Response {
    let mut res = StatusCode::SEE_OTHER.into_response();
    let h = res.headers_mut();
    h.insert(LOCATION, HeaderValue::from_static(to));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(SET_COOKIE, cookie);
    res
}

/// The refusal of a session (or of a login) whose key may not hold one
/// ([`Guard::session_refusal`]): 401 when the key is no longer listed or usable,
/// 403 when it lacks `dashboard:read`, refuses the client address, or has usage
/// credits. Audited with the reason and the principal.
fn session_refused(p: &Principal, reason: DenialReason) -> Response {
    tracing::info!(
        event = "dashboard_session_refused",
        reason = reason.as_str(),
        principal = %p.identity()
    );
    let challenge = Challenge::bearer(crate::guard::REALM)
        .expect("the realm is valid")
        .and_api_key();
    let rejection = match reason {
        DenialReason::InsufficientScope => Rejection::insufficient_scope(
            &challenge,
            &Scopes::parse(crate::auth::DASHBOARD_READ).expect("a valid scope"),
        ),
        DenialReason::KeyIpDenied | DenialReason::AuthMethodNotAllowed => {
            Rejection::forbidden(reason)
        }
        _ => Rejection::invalid_credential(&challenge, reason),
    };
    rejection.into_response()
}

fn client_ip(req: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    req.get::<ClientIp>().map(|c| c.addr())
}

/// Between the dashboard's stack and its page: a session (a dashboard token) holds
/// only while the key it was minted from would still open the dashboard itself
/// ([`Guard::session_refusal`]): revoking or expiring the key, taking its
/// `dashboard:read`, or a client address outside its `allowed_ips` ends its
/// sessions at once, not when their token expires. A request with an API key is
/// the stack's alone.
pub async fn session_follows_key(State(guard): State<Guard>, req: Request, next: Next) -> Response {
    let Some(p) = req.extensions().get::<Principal>() else {
        return next.run(req).await;
    };
    if p.method() != AuthMethod::ServiceToken {
        return next.run(req).await;
    }
    let key = p
        .scopes()
        .iter()
        .find_map(|s| s.strip_prefix(crate::guard::SESSION_KEY_SCOPE))
        .and_then(|d| KeyDigest::parse(d).ok());
    let refusal = match key {
        Some(key) => guard.session_refusal(&key, SystemTime::now(), client_ip(req.extensions())),
        None => Some(DenialReason::InvalidToken),
    };
    match refusal {
        None => next.run(req).await,
        Some(reason) => session_refused(p, reason),
    }
}

/// `POST /dashboard/login`, behind [`form_key_to_header`], the stack and the scope
/// check: the principal holds `dashboard:read`. Sets the session cookie, bound to
/// the key that signed in, and sends the browser to the dashboard. A key that may
/// not hold a session ([`Guard::session_refusal`]) gets none.
pub async fn login(Extension(guard): Extension<Guard>, req: Request) -> Response {
    let Some(p) = req.extensions().get::<Principal>() else {
        return Rejection::misconfigured().into_response();
    };
    // The form's key, which the stack has just verified.
    let Some(&SignInKey(key)) = req.extensions().get::<SignInKey>() else {
        return Rejection::misconfigured().into_response();
    };
    if let Some(reason) =
        guard.session_refusal(&key, SystemTime::now(), client_ip(req.extensions()))
    {
        return session_refused(p, reason);
    }
    let token = guard
        .dashboard_issuer(p.id(), &key)
        .ok()
        .and_then(|issuer| issuer.mint().ok());
    let Some(token) = token else {
        tracing::error!(event = "dashboard_session_not_minted");
        return Rejection::misconfigured().into_response();
    };
    let cookie = format!(
        "{SESSION_COOKIE}={}; Path=/dashboard; Max-Age={}; HttpOnly; SameSite=Strict",
        token.as_str(),
        crate::guard::DASHBOARD_SESSION.as_secs()
    );
    let Ok(mut cookie) = HeaderValue::from_str(&cookie) else {
        return Rejection::misconfigured().into_response();
    };
    cookie.set_sensitive(true);
    tracing::info!(event = "dashboard_login", principal = %p.identity());
    see_other("/dashboard", cookie)
}

/// `POST /dashboard/logout` (same-origin only): clears the cookie.
pub async fn logout(req: Request) -> Response {
    if !is_same_origin(req.headers()) {
        return cross_origin();
    }
    see_other(
        "/dashboard/login",
        HeaderValue::from_static(
            "pc_dashboard=; Path=/dashboard; Max-Age=0; HttpOnly; SameSite=Strict",
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn same_origin_needs_an_origin_naming_this_host() {
        let ok = |o: &str, h: &str, s: Option<&str>| {
            same_origin(Some(o.as_bytes()), Some(h.as_bytes()), s.map(str::as_bytes))
        };
        assert!(ok("http://127.0.0.1:8080", "127.0.0.1:8080", None));
        assert!(ok(
            "https://Demo.Example",
            "demo.example",
            Some("same-origin")
        ));
        for (o, h, s) in [
            ("http://127.0.0.1:8081", "127.0.0.1:8080", None),
            ("http://evil.example", "127.0.0.1:8080", None),
            ("null", "127.0.0.1:8080", None),
            ("http://127.0.0.1:8080/", "127.0.0.1:8080", None),
            ("ftp://127.0.0.1:8080", "127.0.0.1:8080", None),
            ("http://", "", None),
            (
                "http://127.0.0.1:8080",
                "127.0.0.1:8080",
                Some("cross-site"),
            ),
            ("http://127.0.0.1:8080", "127.0.0.1:8080", Some("same-site")),
            ("http://127.0.0.1:8080", "127.0.0.1:8080", Some("none")),
        ] {
            assert!(!ok(o, h, s), "{o} {h} {s:?}");
        }
        assert!(!same_origin(None, Some(b"h"), None), "no Origin");
        assert!(!same_origin(Some(b"http://h"), None, None), "no Host");
    }

    #[test]
    fn the_form_value_is_decoded_once_and_only_if_clean() {
        assert_eq!(
            form_value(b"key=pc_demo_abc", "key").as_deref(),
            Some("pc_demo_abc")
        );
        assert_eq!(form_value(b"x=1&key=a%5Fb", "key").as_deref(), Some("a_b"));
        for bad in [
            &b"key="[..],
            b"nokey=1",
            b"key=a&key=b",
            b"key=a+b",
            b"key=%zz",
            b"key=%4",
            b"key=%00abc",
            b"key=\xff",
        ] {
            assert_eq!(form_value(bad, "key"), None, "{bad:?}");
        }
        assert_eq!(form_value(&[b'a'; 5000], "key"), None);
    }

    #[test]
    fn the_session_cookie_is_the_one_cookie_of_its_name() {
        let one = |h: &'static str| session_cookie([h.as_bytes()]);
        assert_eq!(one("pc_dashboard=a.b-c_d"), Some("a.b-c_d"));
        assert_eq!(one("theme=dark; pc_dashboard=t.o.k"), Some("t.o.k"));
        assert_eq!(session_cookie([&b"a=1"[..], b"pc_dashboard=x"]), Some("x"));
        for bad in [
            "pc_dashboard=",
            "pc_dashboard=a; pc_dashboard=b",
            "pc_dashboard=a b",
            "pc_dashboard=\"quoted\"",
            "pc_dashboardx=a",
            "xpc_dashboard=a",
            "other=pc_dashboard=a",
        ] {
            assert_eq!(one(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn same_origin_is_exactly_scheme_and_host(host in "[a-z0-9.:-]{1,30}", other in "\\PC{0,40}", https in any::<bool>()) {
            let scheme = if https { "https://" } else { "http://" };
            let origin = format!("{scheme}{host}");
            prop_assert!(same_origin(Some(origin.as_bytes()), Some(host.as_bytes()), None));
            if other != origin && !other.eq_ignore_ascii_case(&origin) {
                prop_assert!(!same_origin(Some(other.as_bytes()), Some(host.as_bytes()), None));
            }
        }

        #[test]
        fn form_values_are_visible_ascii_or_nothing(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Some(v) = form_value(&body, "key") {
                prop_assert!(!v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic()));
            }
        }

        #[test]
        fn a_form_key_round_trips(key in "[A-Za-z0-9_.~-]{1,100}") {
            let body = format!("other=1&key={key}");
            prop_assert_eq!(form_value(body.as_bytes(), "key"), Some(key));
        }

        #[test]
        fn session_cookies_hold_only_a_token_alphabet(h in "\\PC{0,100}") {
            if let Some(v) = session_cookie([h.as_bytes()]) {
                prop_assert!(v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
            }
        }
    }
}
