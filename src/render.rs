//! Claimed row → the exact bytes that go out. Every error here is the row's own fault
//! and permanent: retrying cannot fix a malformed address.

use lettre::Message;
use lettre::address::Envelope;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Attachment as AttachmentPart, Mailbox, MultiPart, SinglePart};

use crate::store::{Attachment, ClaimedRow};

/// A message ready for any transport.
#[derive(Debug)]
pub struct Rendered {
    pub envelope: Envelope,
    /// RFC 5322 bytes, CRLF line endings, Bcc removed.
    pub bytes: Vec<u8>,
}

/// Why a row cannot become a message, in words for the person who reads `queue show`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct RenderError(pub String);

fn bad(why: impl Into<String>) -> RenderError {
    RenderError(why.into())
}

/// Headers the daemon writes itself; a row may not set them through `headers`.
const RESERVED_HEADERS: [&str; 13] = [
    "from",
    "sender",
    "to",
    "cc",
    "bcc",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "return-path",
];

pub fn render(
    row: &ClaimedRow,
    attachments: &[Attachment],
    from: &Mailbox,
    max_bytes: u64,
) -> Result<Rendered, RenderError> {
    let mut builder = Message::builder()
        .from(from.clone())
        .message_id(Some(row.message_id.clone()))
        .subject(single_line("subject", &row.subject)?);

    let to = addresses("to", Some(&row.to_addrs))?;
    let cc = addresses("cc", row.cc_addrs.as_deref())?;
    let bcc = addresses("bcc", row.bcc_addrs.as_deref())?;
    if to.is_empty() && cc.is_empty() && bcc.is_empty() {
        return Err(bad(
            "the message has no recipient: to, cc and bcc are all empty",
        ));
    }
    for m in to {
        builder = builder.to(m);
    }
    for m in cc {
        builder = builder.cc(m);
    }
    for m in bcc {
        builder = builder.bcc(m);
    }
    if let Some(reply_to) = row.reply_to.as_deref().filter(|r| !r.trim().is_empty()) {
        builder = builder.reply_to(mailbox("reply_to", reply_to)?);
    }
    for header in extra_headers(row.headers.as_deref())? {
        builder = builder.raw_header(header);
    }

    let attached: u64 = attachments.iter().map(|a| a.content.len() as u64).sum();
    // Base64 grows attachments by a third; refuse before building a huge message.
    if attached / 3 * 4 > max_bytes {
        return Err(too_large(attached / 3 * 4, max_bytes));
    }
    let body = body(row)?;
    let message = if attachments.is_empty() {
        match body {
            Body::Single(part) => builder.singlepart(part),
            Body::Alternative(part) => builder.multipart(part),
        }
    } else {
        let mut mixed = match body {
            Body::Single(part) => MultiPart::mixed().singlepart(part),
            Body::Alternative(part) => MultiPart::mixed().multipart(part),
        };
        for a in attachments {
            mixed = mixed.singlepart(attachment(a)?);
        }
        builder.multipart(mixed)
    }
    .map_err(|e| bad(format!("the message cannot be built: {e}")))?;

    let bytes = message.formatted();
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(bytes.len() as u64, max_bytes));
    }
    Ok(Rendered {
        envelope: message.envelope().clone(),
        bytes,
    })
}

fn too_large(bytes: u64, max: u64) -> RenderError {
    bad(format!(
        "the message is {bytes} bytes with its attachments, over the limit of {max} bytes (delivery.max_message_bytes)"
    ))
}

enum Body {
    Single(SinglePart),
    Alternative(MultiPart),
}

fn body(row: &ClaimedRow) -> Result<Body, RenderError> {
    let text = row.body_text.clone().filter(|t| !t.is_empty());
    let html = row.body_html.clone().filter(|t| !t.is_empty());
    match (text, html) {
        (Some(text), Some(html)) => Ok(Body::Alternative(MultiPart::alternative_plain_html(
            text, html,
        ))),
        (Some(text), None) => Ok(Body::Single(SinglePart::plain(text))),
        (None, Some(html)) => Ok(Body::Single(SinglePart::html(html))),
        (None, None) => Err(bad(
            "the message has no body: body_text and body_html are both empty",
        )),
    }
}

fn attachment(a: &Attachment) -> Result<SinglePart, RenderError> {
    let content_type = ContentType::parse(&a.content_type).map_err(|_| {
        bad(format!(
            "attachment {:?} has an invalid content type {:?}",
            a.filename, a.content_type
        ))
    })?;
    if a.filename.trim().is_empty() || a.filename.contains(['\r', '\n']) {
        return Err(bad(format!(
            "attachment filename {:?} is empty or has a line break",
            a.filename
        )));
    }
    Ok(AttachmentPart::new(a.filename.clone()).body(a.content.clone(), content_type))
}

/// A JSON array of addresses (`"a@b.example"` or `"Name <a@b.example>"`); NULL or an
/// empty array is no address.
fn addresses(field: &str, json: Option<&str>) -> Result<Vec<Mailbox>, RenderError> {
    let Some(json) = json.map(str::trim).filter(|j| !j.is_empty()) else {
        return Ok(Vec::new());
    };
    let list: Vec<String> = serde_json::from_str(json).map_err(|e| {
        bad(format!(
            "{field} is not a JSON array of addresses like [\"a@example.com\"]: {e}"
        ))
    })?;
    list.iter().map(|a| mailbox(field, a)).collect()
}

fn mailbox(field: &str, text: &str) -> Result<Mailbox, RenderError> {
    if text.contains(['\r', '\n']) {
        return Err(bad(format!(
            "{field} address {text:?} contains a line break"
        )));
    }
    text.trim().parse::<Mailbox>().map_err(|e| {
        bad(format!(
            "{field} address {text:?} is not a valid e-mail address ({e})"
        ))
    })
}

fn single_line<'a>(field: &str, value: &'a str) -> Result<&'a str, RenderError> {
    if value.contains(['\r', '\n']) {
        return Err(bad(format!(
            "{field} contains a line break, which would inject headers"
        )));
    }
    Ok(value)
}

/// A JSON object of extra headers, e.g. `{"X-TEOS-Booking": "4711"}`.
fn extra_headers(json: Option<&str>) -> Result<Vec<HeaderValue>, RenderError> {
    let Some(json) = json
        .map(str::trim)
        .filter(|j| !j.is_empty() && *j != "null")
    else {
        return Ok(Vec::new());
    };
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(json).map_err(|e| {
            bad(format!(
                "headers is not a JSON object like {{\"X-Name\": \"value\"}}: {e}"
            ))
        })?;
    map.into_iter()
        .map(|(name, value)| {
            let value = match value {
                serde_json::Value::String(s) => s,
                other => {
                    return Err(bad(format!(
                        "header {name} must have a text value, not {other}"
                    )));
                }
            };
            if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                return Err(bad(format!(
                    "header {name} is set by the daemon and cannot be given in headers"
                )));
            }
            let header = HeaderName::new_from_ascii(name.clone())
                .map_err(|_| bad(format!("{name:?} is not a valid header name")))?;
            single_line(&format!("header {name}"), &value)?;
            Ok(HeaderValue::new(header, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> ClaimedRow {
        ClaimedRow {
            id: 1,
            module: "room_booking".into(),
            sender: None,
            to_addrs: r#"["Ann <ann@example.com>"]"#.into(),
            cc_addrs: None,
            bcc_addrs: Some(r#"["hidden@example.com"]"#.into()),
            reply_to: None,
            subject: "Room 4.12 booked".into(),
            body_text: Some("See you there".into()),
            body_html: None,
            headers: Some(r#"{"X-TEOS-Booking": "4711"}"#.into()),
            priority: 100,
            attempts: 1,
            max_attempts: None,
            message_id: "<abc@teos.example>".into(),
            attachment_count: 0,
        }
    }

    fn from() -> Mailbox {
        "TEOS <teos@example.com>".parse().unwrap()
    }

    fn text(r: &Rendered) -> String {
        String::from_utf8(r.bytes.clone()).unwrap()
    }

    #[test]
    fn renders_headers_and_keeps_bcc_out_of_the_bytes() {
        let r = render(&row(), &[], &from(), 1 << 20).unwrap();
        let t = text(&r);
        assert!(t.contains("Message-ID: <abc@teos.example>\r\n"), "{t}");
        assert!(t.contains("X-TEOS-Booking: 4711\r\n"), "{t}");
        assert!(!t.contains("hidden@"), "{t}");
        assert_eq!(r.envelope.to().len(), 2);
    }

    #[test]
    fn header_injection_is_refused() {
        let mut r = row();
        r.subject = "Hi\r\nBcc: victim@example.com".into();
        assert!(
            render(&r, &[], &from(), 1 << 20)
                .unwrap_err()
                .0
                .contains("line break")
        );
        let mut r = row();
        r.headers = Some(r#"{"X-A": "1\r\nBcc: victim@example.com"}"#.into());
        assert!(
            render(&r, &[], &from(), 1 << 20)
                .unwrap_err()
                .0
                .contains("line break")
        );
    }

    #[test]
    fn bad_rows_say_what_is_wrong() {
        type Change = fn(&mut ClaimedRow);
        let cases: [(&str, Change); 6] = [
            ("no recipient", |r| {
                r.to_addrs = "[]".into();
                r.bcc_addrs = None;
            }),
            ("not a JSON array", |r| {
                r.to_addrs = "ann@example.com".into()
            }),
            ("not a valid e-mail address", |r| {
                r.to_addrs = r#"["ann at example"]"#.into()
            }),
            ("no body", |r| r.body_text = None),
            ("set by the daemon", |r| {
                r.headers = Some(r#"{"From": "x@y.z"}"#.into())
            }),
            ("not a JSON object", |r| r.headers = Some("[1".into())),
        ];
        for (expected, change) in cases {
            let mut r = row();
            change(&mut r);
            let err = render(&r, &[], &from(), 1 << 20).unwrap_err();
            assert!(err.0.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn oversize_attachment_is_refused_before_building() {
        let big = Attachment {
            filename: "report.pdf".into(),
            content_type: "application/pdf".into(),
            content: vec![0; 3000],
        };
        let err = render(&row(), &[big], &from(), 2000).unwrap_err();
        assert!(err.0.contains("over the limit"), "{err}");
    }
}
