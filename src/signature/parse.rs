//! The parsers of signed requests, plain functions over header bytes: the
//! `Signature-Input` and `Signature` dictionaries (RFC 9421 §4), `Content-Digest`
//! (RFC 9530), and the signature base (RFC 9421 §2.5). Structured fields are parsed
//! by `sfv` (RFC 9651); nothing here decides whether a request is accepted.

use sfv::{BareItem, Dictionary, List, ListEntry, Parser};

/// The longest `Signature-Input`, `Signature` or `Content-Digest` field read.
pub(crate) const MAX_FIELD_LEN: usize = 4096;
/// The most components one signature may cover.
pub(crate) const MAX_COMPONENTS: usize = 32;

/// Why a signature's fields could not be read. Never carries request input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ParseError {
    /// Not a structured-field dictionary, too long, or not ASCII.
    Syntax,
    /// Not exactly one signature, or `Signature` lacks the label of `Signature-Input`.
    Label,
    /// A member of the wrong shape (e.g. an item where an inner list belongs).
    Shape,
    /// A parameter of the wrong type, or a required one missing.
    Parameter,
    /// A component identifier this verifier does not support (e.g. with parameters).
    Component,
}

/// A component a signature covers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Component {
    Method,
    Authority,
    Path,
    Query,
    RequestTarget,
    /// A header field, by its lowercase name.
    Field(String),
}

impl Component {
    /// Parses a component identifier's name (RFC 9421 §2): derived components by
    /// name, fields lowercase.
    pub(crate) fn parse(name: &str) -> Result<Self, ParseError> {
        Ok(match name {
            "@method" => Component::Method,
            "@authority" => Component::Authority,
            "@path" => Component::Path,
            "@query" => Component::Query,
            "@request-target" => Component::RequestTarget,
            n if n.starts_with('@') => return Err(ParseError::Component),
            n if !n.is_empty()
                && n.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
                }) =>
            {
                Component::Field(n.to_owned())
            }
            _ => return Err(ParseError::Component),
        })
    }

    pub(crate) fn name(&self) -> &str {
        match self {
            Component::Method => "@method",
            Component::Authority => "@authority",
            Component::Path => "@path",
            Component::Query => "@query",
            Component::RequestTarget => "@request-target",
            Component::Field(n) => n,
        }
    }
}

/// One signature as `Signature-Input` and `Signature` carry it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SignatureInput {
    pub(crate) label: String,
    pub(crate) components: Vec<Component>,
    pub(crate) keyid: String,
    pub(crate) created: i64,
    pub(crate) expires: Option<i64>,
    pub(crate) nonce: Option<String>,
    pub(crate) alg: Option<String>,
    /// The `@signature-params` value: the inner list as serialized (RFC 9651), the
    /// last line of the signature base.
    pub(crate) params_line: String,
    /// The signature's bytes.
    pub(crate) signature: Vec<u8>,
}

fn dictionary(field: &[u8]) -> Result<Dictionary, ParseError> {
    if field.len() > MAX_FIELD_LEN || !field.is_ascii() {
        return Err(ParseError::Syntax);
    }
    Parser::new(field).parse().map_err(|_| ParseError::Syntax)
}

/// Parses a request's one signature from its `Signature-Input` and `Signature`
/// field values (each the field lines joined with `, `). Exactly one signature is
/// accepted: the label `Signature-Input` names, with its value in `Signature`.
/// `keyid` and `created` are required; `expires`, `nonce`, `alg` are read if present.
pub(crate) fn parse_signature(
    input: &[u8],
    signature: &[u8],
) -> Result<SignatureInput, ParseError> {
    let inputs = dictionary(input)?;
    let signatures = dictionary(signature)?;
    if inputs.len() != 1 || signatures.len() != 1 {
        return Err(ParseError::Label);
    }
    let (Some((label, entry)), Some((sig_label, sig_entry))) = (inputs.first(), signatures.first())
    else {
        return Err(ParseError::Label);
    };
    if label != sig_label {
        return Err(ParseError::Label);
    }
    let ListEntry::InnerList(list) = entry else {
        return Err(ParseError::Shape);
    };
    let signature = match sig_entry {
        ListEntry::Item(item) if item.params.is_empty() => match &item.bare_item {
            BareItem::ByteSequence(b) if !b.is_empty() => b.clone(),
            _ => return Err(ParseError::Shape),
        },
        _ => return Err(ParseError::Shape),
    };
    if list.items.len() > MAX_COMPONENTS {
        return Err(ParseError::Component);
    }
    let mut components = Vec::with_capacity(list.items.len());
    for item in &list.items {
        let BareItem::String(name) = &item.bare_item else {
            return Err(ParseError::Shape);
        };
        if !item.params.is_empty() {
            return Err(ParseError::Component);
        }
        let c = Component::parse(name.as_str())?;
        // A component covered twice is an error (RFC 9421 §7.5.1).
        if components.contains(&c) {
            return Err(ParseError::Component);
        }
        components.push(c);
    }
    let (mut keyid, mut created, mut expires, mut nonce, mut alg) = (None, None, None, None, None);
    for (key, value) in &list.params {
        let string = || match value {
            BareItem::String(s) => Ok(s.as_str().to_owned()),
            _ => Err(ParseError::Parameter),
        };
        let integer = || match value {
            BareItem::Integer(i) => Ok(i64::from(*i)),
            _ => Err(ParseError::Parameter),
        };
        match key.as_str() {
            "keyid" => keyid = Some(string()?),
            "created" => created = Some(integer()?),
            "expires" => expires = Some(integer()?),
            "nonce" => nonce = Some(string()?),
            "alg" => alg = Some(string()?),
            // Other parameters (e.g. `tag`) are covered by the signature like the
            // rest of the line, and carry nothing this verifier acts on.
            _ => {}
        }
    }
    let (Some(keyid), Some(created)) = (keyid, created) else {
        return Err(ParseError::Parameter);
    };
    let params_line = serialize_inner_list(entry)?;
    Ok(SignatureInput {
        label: label.as_str().to_owned(),
        components,
        keyid,
        created,
        expires,
        nonce,
        alg,
        params_line,
        signature,
    })
}

/// An inner list serialized as RFC 9651 writes it: a list of that one member.
fn serialize_inner_list(entry: &ListEntry) -> Result<String, ParseError> {
    use sfv::FieldType;
    let list: List = vec![entry.clone()];
    list.serialize().ok_or(ParseError::Shape)
}

/// The digests a `Content-Digest` field carries that this crate computes:
/// `sha-256` and `sha-512` (RFC 9530 §5); other algorithms are skipped.
pub(crate) fn parse_content_digest(field: &[u8]) -> Result<Vec<(DigestAlg, Vec<u8>)>, ParseError> {
    let dict = dictionary(field)?;
    let mut out = Vec::new();
    for (name, entry) in &dict {
        let alg = match name.as_str() {
            "sha-256" => DigestAlg::Sha256,
            "sha-512" => DigestAlg::Sha512,
            _ => continue,
        };
        match entry {
            ListEntry::Item(item) => match &item.bare_item {
                BareItem::ByteSequence(b) => out.push((alg, b.clone())),
                _ => return Err(ParseError::Shape),
            },
            ListEntry::InnerList(_) => return Err(ParseError::Shape),
        }
    }
    Ok(out)
}

/// A digest algorithm of `Content-Digest`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DigestAlg {
    Sha256,
    Sha512,
}

impl DigestAlg {
    pub(crate) fn digest(self, body: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        match self {
            DigestAlg::Sha256 => sha2::Sha256::digest(body).to_vec(),
            DigestAlg::Sha512 => sha2::Sha512::digest(body).to_vec(),
        }
    }
}

/// The request facts a signature base is built from.
pub(crate) struct Message<'a> {
    pub(crate) method: &'a str,
    /// The authority (from the URI, else the `Host` field).
    pub(crate) authority: Option<&'a str>,
    pub(crate) path: &'a str,
    pub(crate) query: Option<&'a str>,
    pub(crate) headers: &'a http::HeaderMap,
}

/// The signature base (RFC 9421 §2.5): one line per covered component, then the
/// `@signature-params` line. `Err` if a covered component is absent from the
/// message or has a value that cannot be part of the base (not visible ASCII).
pub(crate) fn signature_base(
    msg: &Message<'_>,
    components: &[Component],
    params_line: &str,
) -> Result<String, Component> {
    let mut base = String::with_capacity(256);
    for c in components {
        let start = base.len();
        base.push('"');
        base.push_str(c.name());
        base.push_str("\": ");
        match c {
            Component::Method => base.push_str(msg.method),
            Component::Authority => {
                let a = msg.authority.ok_or_else(|| c.clone())?;
                base.extend(a.chars().map(|ch| ch.to_ascii_lowercase()));
            }
            Component::Path => base.push_str(if msg.path.is_empty() { "/" } else { msg.path }),
            Component::Query => {
                base.push('?');
                base.push_str(msg.query.unwrap_or(""));
            }
            Component::RequestTarget => {
                base.push_str(if msg.path.is_empty() { "/" } else { msg.path });
                if let Some(q) = msg.query {
                    base.push('?');
                    base.push_str(q);
                }
            }
            Component::Field(name) => {
                let mut values = msg.headers.get_all(name.as_str()).iter().peekable();
                if values.peek().is_none() {
                    return Err(c.clone());
                }
                let mut first = true;
                for v in values {
                    let v = v.to_str().map_err(|_| c.clone())?;
                    if !first {
                        base.push_str(", ");
                    }
                    first = false;
                    base.push_str(v.trim_matches([' ', '\t']));
                }
            }
        }
        // A value is one line of visible ASCII (field values are; a URI cannot
        // hold a line break), so no value can forge another line of the base.
        if base[start..]
            .bytes()
            .any(|b| b.is_ascii_control() && b != b'\t')
        {
            return Err(c.clone());
        }
        base.push('\n');
    }
    base.push_str("\"@signature-params\": ");
    base.push_str(params_line);
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B25_INPUT: &str = r#"sig-b25=("date" "@authority" "content-type");created=1618884473;keyid="test-shared-secret""#;

    #[test]
    fn reads_one_signature() {
        let s = parse_signature(
            B25_INPUT.as_bytes(),
            b"sig-b25=:pxcQw6G3AjtMBQjwo8XzkZf/bws5LelbaMk5rGIGtE8=:",
        )
        .unwrap();
        assert_eq!(s.label, "sig-b25");
        assert_eq!(s.keyid, "test-shared-secret");
        assert_eq!(s.created, 1_618_884_473);
        assert_eq!(
            s.components,
            [
                Component::Field("date".into()),
                Component::Authority,
                Component::Field("content-type".into())
            ]
        );
        assert_eq!(
            s.params_line,
            r#"("date" "@authority" "content-type");created=1618884473;keyid="test-shared-secret""#
        );
        assert_eq!(s.signature.len(), 32);
    }

    #[test]
    fn refuses_what_it_cannot_verify_exactly() {
        let sig = b"a=:AAAA:";
        for (input, signature, err) in [
            (
                &b"a=(\"@method\");created=1"[..],
                &sig[..],
                ParseError::Parameter,
            ),
            (b"a=(\"@method\");keyid=\"k\"", sig, ParseError::Parameter),
            (
                b"a=(\"@method\");created=\"1\";keyid=\"k\"",
                sig,
                ParseError::Parameter,
            ),
            (
                b"a=(\"@method\" \"@method\");created=1;keyid=\"k\"",
                sig,
                ParseError::Component,
            ),
            (
                b"a=(\"@status\");created=1;keyid=\"k\"",
                sig,
                ParseError::Component,
            ),
            (
                b"a=(\"Date\");created=1;keyid=\"k\"",
                sig,
                ParseError::Component,
            ),
            (
                b"a=(\"date\";sf);created=1;keyid=\"k\"",
                sig,
                ParseError::Component,
            ),
            (b"a=(date);created=1;keyid=\"k\"", sig, ParseError::Shape),
            (b"a=\"x\";created=1;keyid=\"k\"", sig, ParseError::Shape),
            (
                b"b=(\"@method\");created=1;keyid=\"k\"",
                sig,
                ParseError::Label,
            ),
            (
                b"a=();created=1;keyid=\"k\", b=();created=1;keyid=\"k\"",
                sig,
                ParseError::Label,
            ),
            (
                b"a=();created=1;keyid=\"k\"",
                b"a=\"AAAA\"",
                ParseError::Shape,
            ),
            (b"a=();created=1;keyid=\"k\"", b"a=::", ParseError::Shape),
            (b"a=(", sig, ParseError::Syntax),
            (
                "a=(\"é\");created=1;keyid=\"k\"".as_bytes(),
                sig,
                ParseError::Syntax,
            ),
        ] {
            assert_eq!(
                parse_signature(input, signature),
                Err(err),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn content_digest_keeps_the_algorithms_it_knows() {
        let d = parse_content_digest(b"sha-256=:AAAA:, md5=:AAAA:, sha-512=:AQID:").unwrap();
        assert_eq!(
            d,
            [
                (DigestAlg::Sha256, vec![0, 0, 0]),
                (DigestAlg::Sha512, vec![1, 2, 3])
            ]
        );
        assert_eq!(parse_content_digest(b"sha-256=1"), Err(ParseError::Shape));
        assert_eq!(parse_content_digest(b"sha-256=:"), Err(ParseError::Syntax));
    }

    proptest! {
        /// Any bytes: the parsers answer, never panic, and what they accept
        /// round-trips: the `@signature-params` line parses back to the same
        /// signature.
        #[test]
        fn parsers_never_panic_and_accepted_input_round_trips(
            input in proptest::collection::vec(any::<u8>(), 0..300),
            signature in proptest::collection::vec(any::<u8>(), 0..100),
        ) {
            let _ = parse_content_digest(&input);
            if let Ok(s) = parse_signature(&input, &signature) {
                let again = parse_signature(
                    format!("{}={}", s.label, s.params_line).as_bytes(),
                    &signature,
                )
                .unwrap();
                prop_assert_eq!(again, s);
            }
        }

        /// Signatures built from arbitrary components and parameters parse to
        /// exactly what was written, whatever the spacing between members.
        #[test]
        fn written_signatures_parse_back(
            fields in proptest::collection::btree_set("[a-z][a-z0-9-]{0,10}", 0..6),
            created in 0i64..4_000_000_000,
            expires in proptest::option::of(0i64..4_000_000_000),
            nonce in proptest::option::of("[A-Za-z0-9+/=]{1,40}"),
            keyid in "[ -~&&[^\"\\\\]]{1,40}",
            sig in proptest::collection::vec(any::<u8>(), 1..80),
            pad in " {0,3}",
        ) {
            use base64::Engine as _;
            let mut components = vec![Component::Method, Component::Path];
            components.extend(fields.iter().cloned().map(Component::Field));
            let names: Vec<String> = components.iter().map(|c| format!("\"{}\"", c.name())).collect();
            let mut line = format!("({});created={created};keyid=\"{keyid}\"", names.join(" "));
            if let Some(e) = expires {
                line.push_str(&format!(";expires={e}"));
            }
            if let Some(n) = &nonce {
                line.push_str(&format!(";nonce=\"{n}\""));
            }
            let b64 = base64::engine::general_purpose::STANDARD.encode(&sig);
            let s = parse_signature(
                format!("{pad}sig1={line}{pad}").as_bytes(),
                format!("sig1=:{b64}:").as_bytes(),
            )
            .unwrap();
            prop_assert_eq!(&s.components, &components);
            prop_assert_eq!((s.created, s.expires, &s.nonce, &s.keyid), (created, expires, &nonce, &keyid));
            prop_assert_eq!(&s.params_line, &line);
            prop_assert_eq!(&s.signature, &sig);
        }
    }
}
