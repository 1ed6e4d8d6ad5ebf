//! URL and body templates of webhook sinks: `{device_id}`-style placeholders filled per event.
//!
//! `{` directly followed by an identifier and `}` is a placeholder; any other brace is text, so a
//! JSON body needs no escaping. A template is split into text and placeholders once, at config
//! load, and rendering is a concatenation. A URL takes placeholders only in its path and query,
//! every value percent-encoded: an event can never send the request to another host (gateways
//! sit on building LANs). A body is checked once with hostile values, so whatever a device is
//! called, the rendered body is valid JSON.

use std::ops::Range;

/// The values of one event, borrowed from it.
#[derive(Debug, Clone, Copy)]
pub struct Vars<'a> {
    pub device_id: &'a str,
    pub plant_id: Option<&'a str>,
    pub module_id: Option<&'a str>,
    pub gateway_id: &'a str,
    /// The event's `type`.
    pub kind: &'a str,
    pub event_id: &'a str,
    pub seq: u64,
    /// The event's `observed_at`, RFC 3339.
    pub observed_at: &'a str,
    /// The whole event envelope, JSON.
    pub event_json: &'a str,
}

/// A placeholder name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    DeviceId,
    PlantId,
    ModuleId,
    GatewayId,
    Type,
    EventId,
    Seq,
    ObservedAt,
    Event,
}

impl Var {
    /// Placeholders of a URL: identifiers only (a URL has no use for a time or a whole event).
    const URL: &'static [Var] = &[
        Var::DeviceId,
        Var::PlantId,
        Var::ModuleId,
        Var::GatewayId,
        Var::Type,
        Var::EventId,
    ];

    /// Placeholders of a body.
    const BODY: &'static [Var] = &[
        Var::DeviceId,
        Var::PlantId,
        Var::ModuleId,
        Var::GatewayId,
        Var::Type,
        Var::EventId,
        Var::Seq,
        Var::ObservedAt,
        Var::Event,
    ];

    fn name(self) -> &'static str {
        match self {
            Var::DeviceId => "device_id",
            Var::PlantId => "plant_id",
            Var::ModuleId => "module_id",
            Var::GatewayId => "gateway_id",
            Var::Type => "type",
            Var::EventId => "event_id",
            Var::Seq => "seq",
            Var::ObservedAt => "observed_at",
            Var::Event => "event",
        }
    }

    /// The value of a string placeholder; `None` for `{seq}` and `{event}`, which are not text.
    fn text<'a>(self, v: &Vars<'a>) -> Option<&'a str> {
        match self {
            Var::DeviceId => Some(v.device_id),
            Var::PlantId => Some(v.plant_id.unwrap_or("")),
            Var::ModuleId => Some(v.module_id.unwrap_or("")),
            Var::GatewayId => Some(v.gateway_id),
            Var::Type => Some(v.kind),
            Var::EventId => Some(v.event_id),
            Var::ObservedAt => Some(v.observed_at),
            Var::Seq | Var::Event => None,
        }
    }
}

/// A piece of a parsed template.
#[derive(Debug, Clone)]
enum Segment {
    Text(String),
    Var(Var),
}

/// Splits `s` into text and placeholders (with the byte offset of each piece); a placeholder not
/// in `known` is an error naming it.
fn split(s: &str, known: &[Var], what: &str) -> Result<Vec<(usize, Segment)>, String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut text_from = 0;
    let mut i = 0;
    while i < b.len() {
        let Some(len) = placeholder_len(&b[i..]) else {
            i += 1;
            continue;
        };
        let name = &s[i + 1..i + len - 1];
        let Some(var) = known.iter().copied().find(|v| v.name() == name) else {
            return Err(unknown(name, known, what));
        };
        if text_from < i {
            out.push((text_from, Segment::Text(s[text_from..i].to_owned())));
        }
        out.push((i, Segment::Var(var)));
        i += len;
        text_from = i;
    }
    if text_from < b.len() {
        out.push((text_from, Segment::Text(s[text_from..].to_owned())));
    }
    Ok(out)
}

/// Length of the `{identifier}` at the start of `b`, braces included.
fn placeholder_len(b: &[u8]) -> Option<usize> {
    if b.first() != Some(&b'{')
        || !b
            .get(1)
            .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
    {
        return None;
    }
    let ident = b[1..]
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric() || **c == b'_')
        .count();
    (b.get(1 + ident) == Some(&b'}')).then_some(ident + 2)
}

fn unknown(name: &str, known: &[Var], what: &str) -> String {
    let list: Vec<String> = known.iter().map(|v| format!("{{{}}}", v.name())).collect();
    let body_only = Var::BODY
        .iter()
        .any(|v| v.name() == name && !known.contains(v));
    let note = if body_only {
        format!(" ({{{name}}} works in body templates only)")
    } else {
        String::new()
    };
    format!(
        "unknown placeholder {{{name}}} in the {what}{note}; use one of {}",
        list.join(", ")
    )
}

/// A piece of a parsed URL template; a placeholder remembers whether it is in the path.
#[derive(Debug, Clone)]
enum UrlSegment {
    Text(String),
    Var { var: Var, in_path: bool },
}

/// A webhook URL with placeholders in its path and query.
#[derive(Debug, Clone)]
pub struct UrlTemplate {
    segments: Vec<UrlSegment>,
    sample: url::Url,
}

impl UrlTemplate {
    /// Validates: placeholders only in the path and query (never scheme, userinfo, host, port,
    /// fragment), so an event cannot choose where the request goes; the URL with sample values
    /// parses with the `url` crate. Error strings are lowercase and say what to change.
    ///
    /// # Errors
    /// An unknown placeholder, a placeholder outside the path and query, or a URL that does not
    /// parse.
    pub fn parse(s: &str) -> Result<UrlTemplate, String> {
        let pieces = split(s, Var::URL, "url")?;
        let mut segments = Vec::with_capacity(pieces.len());
        for (at, seg) in pieces {
            segments.push(match seg {
                Segment::Text(t) => UrlSegment::Text(t),
                Segment::Var(var) => {
                    let in_path = match url_part(s, at) {
                        UrlPart::Path => true,
                        UrlPart::Query => false,
                        UrlPart::Outside(part) => {
                            return Err(format!(
                                "placeholder {{{}}} is in the url's {part}; placeholders may only be in the path or query, after scheme://host/",
                                var.name()
                            ));
                        }
                    };
                    UrlSegment::Var { var, in_path }
                }
            });
        }
        let (sample_text, _) = fill_url(&segments, |var| var.name());
        let sample = url::Url::parse(&sample_text).map_err(|e| {
            format!(
                "url does not parse ({e}); write a full url such as https://host/path/{{device_id}}"
            )
        })?;
        Ok(UrlTemplate { segments, sample })
    }

    /// Whether the URL depends on the event at all.
    pub fn has_placeholders(&self) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, UrlSegment::Var { .. }))
    }

    /// The URL with sample values (for config validation of scheme/host by the caller).
    pub fn sample(&self) -> url::Url {
        self.sample.clone()
    }

    /// Fills placeholders, percent-encoding every value (everything except ALPHA / DIGIT /
    /// `- . _ ~` is %XX-encoded, so a device id like `a/b?c#d e` cannot change the path structure
    /// or add query params). `None` → empty.
    ///
    /// # Errors
    /// A value that makes a path segment `.` or `..` (say a device called `..`): URL parsers
    /// resolve it, encoded or not, and the request would go to another path.
    pub fn render(&self, v: &Vars<'_>) -> Result<url::Url, String> {
        let (text, in_path) = fill_url(&self.segments, |var| var.text(v).unwrap_or(""));
        for (var, at) in in_path {
            let start = text[..at.start].rfind(['/', '\\']).map_or(0, |i| i + 1);
            let end = text[at.end..]
                .find(['/', '\\', '?', '#'])
                .map_or(text.len(), |i| at.end + i);
            let segment = &text[start..end];
            if is_dot_segment(segment) {
                return Err(format!(
                    "{{{}}} = {:?} makes the url path segment {segment:?}, which would send the request to another path",
                    var.name(),
                    var.text(v).unwrap_or("")
                ));
            }
        }
        url::Url::parse(&text).map_err(|e| format!("rendered url does not parse: {e}"))
    }
}

/// The URL text with each placeholder's value percent-encoded, and where in that text the
/// values of path placeholders went.
fn fill_url<'a>(
    segments: &[UrlSegment],
    value: impl Fn(Var) -> &'a str,
) -> (String, Vec<(Var, Range<usize>)>) {
    let mut out = String::new();
    let mut in_path = Vec::new();
    for seg in segments {
        match seg {
            UrlSegment::Text(t) => out.push_str(t),
            UrlSegment::Var { var, in_path: p } => {
                let start = out.len();
                push_percent_encoded(&mut out, value(*var));
                if *p {
                    in_path.push((*var, start..out.len()));
                }
            }
        }
    }
    (out, in_path)
}

/// Whether URL parsers take `s` as `.` or `..` (WHATWG URL: `%2e` counts as a dot).
fn is_dot_segment(s: &str) -> bool {
    let s = s.to_ascii_lowercase();
    matches!(s.as_str(), "." | "%2e" | ".." | ".%2e" | "%2e." | "%2e%2e")
}

/// Appends `v` with every byte except the RFC 3986 unreserved set as `%XX`.
fn push_percent_encoded(out: &mut String, v: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in v.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
}

/// Where a byte of a URL template is.
enum UrlPart {
    Path,
    Query,
    /// Somewhere a placeholder must not be: `scheme`, `userinfo`, `host`, `port`, `fragment`.
    Outside(&'static str),
}

/// The part of the URL template `s` that the placeholder at byte `at` is in. Placeholder names
/// hold none of `:/?#@[]`, so the template's own text shows the structure. The authority found
/// here ends at the first `/`, `?` or `#`, never earlier than where a URL parser ends it.
fn url_part(s: &str, at: usize) -> UrlPart {
    let Some(auth_start) = s.find("://").map(|i| i + 3).filter(|&i| i <= at) else {
        return UrlPart::Outside("scheme");
    };
    let auth_end = s[auth_start..]
        .find(['/', '?', '#'])
        .map_or(s.len(), |i| auth_start + i);
    if at < auth_end {
        let auth = &s[auth_start..auth_end];
        let rel = at - auth_start;
        let host_start = auth.rfind('@').map_or(0, |i| i + 1);
        if rel < host_start {
            return UrlPart::Outside("userinfo");
        }
        let host_port = &auth[host_start..];
        // A colon inside an IPv6 literal `[..]` is not the port's.
        let port_colon = host_port
            .rfind(':')
            .filter(|&c| !host_port[c..].contains(']'));
        return match port_colon {
            Some(c) if rel > host_start + c => UrlPart::Outside("port"),
            _ => UrlPart::Outside("host"),
        };
    }
    let rest = &s[auth_end..];
    let fragment = rest.find('#').map_or(s.len(), |i| auth_end + i);
    if at > fragment {
        return UrlPart::Outside("fragment");
    }
    let query = rest.find('?').map_or(s.len(), |i| auth_end + i);
    if at > query {
        UrlPart::Query
    } else {
        UrlPart::Path
    }
}

/// A webhook body with placeholders, known to render valid JSON.
#[derive(Debug, Clone)]
pub struct BodyTemplate {
    segments: Vec<Segment>,
}

/// What a device could be called at worst: quotes, backslashes, control characters, non-ASCII.
const HOSTILE: &str = "q\"b\\s/n\nr\rt\tc\u{1}\u{1f}é€😀{x}";

/// An event for validation: an object with nested values, as `{event}` always is.
const SAMPLE_EVENT: &str = r#"{"id":"sample","seq":42,"type":"mode","state":{"mode":"MANUAL","setpoint":{"value":"21.0","unit":"C"},"program":null}}"#;

impl BodyTemplate {
    /// Validates by rendering with hostile sample values (quotes, backslashes, control chars,
    /// non-ASCII, a sample event JSON object) and parsing the result as JSON: a template that
    /// works for a device called `kitchen` must not break on one called `say "hi"`.
    ///
    /// # Errors
    /// An unknown placeholder, or a template that would produce invalid JSON.
    pub fn parse(s: &str) -> Result<BodyTemplate, String> {
        let segments = split(s, Var::BODY, "body")?
            .into_iter()
            .map(|(_, seg)| seg)
            .collect();
        let t = BodyTemplate { segments };
        let sample = Vars {
            device_id: HOSTILE,
            plant_id: Some(HOSTILE),
            module_id: Some(HOSTILE),
            gateway_id: HOSTILE,
            kind: HOSTILE,
            event_id: HOSTILE,
            seq: 42,
            observed_at: HOSTILE,
            event_json: SAMPLE_EVENT,
        };
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&t.render(&sample)) {
            return Err(format!(
                "would produce invalid JSON: {e} (with sample values); put string placeholders inside quotes, e.g. \"{{device_id}}\", and {{seq}} and {{event}} outside them"
            ));
        }
        Ok(t)
    }

    /// String placeholders are JSON-escaped (as string content, no quotes added); `{seq}` is its
    /// digits; `{event}` is inserted raw (it is JSON already).
    pub fn render(&self, v: &Vars<'_>) -> String {
        let mut out = String::with_capacity(
            self.segments
                .iter()
                .map(|s| match s {
                    Segment::Text(t) => t.len(),
                    Segment::Var(Var::Event) => v.event_json.len(),
                    Segment::Var(_) => 16,
                })
                .sum(),
        );
        for seg in &self.segments {
            match seg {
                Segment::Text(t) => out.push_str(t),
                Segment::Var(Var::Seq) => out.push_str(&v.seq.to_string()),
                Segment::Var(Var::Event) => out.push_str(v.event_json),
                Segment::Var(var) => push_json_escaped(&mut out, var.text(v).unwrap_or("")),
            }
        }
        out
    }
}

/// Appends `v` escaped as the content of a JSON string (RFC 8259 §7); non-ASCII stays as is.
fn push_json_escaped(out: &mut String, v: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c => match u8::try_from(c) {
                Ok(b @ 0..0x20) => {
                    out.push_str("\\u00");
                    out.push(char::from(HEX[usize::from(b >> 4)]));
                    out.push(char::from(HEX[usize::from(b & 0x0f)]));
                }
                _ => out.push(c),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(device_id: &'a str, plant_id: Option<&'a str>) -> Vars<'a> {
        Vars {
            device_id,
            plant_id,
            module_id: Some("mod-1"),
            gateway_id: "gw-0042",
            kind: "setpoint",
            event_id: "01a20ae9-d836-7336-9a5a-de87b2f5b153",
            seq: 5,
            observed_at: "2026-11-24T00:17:07.126Z",
            event_json: r#"{"id":"e1","state":{"mode":"MANUAL"}}"#,
        }
    }

    fn url_err(s: &str) -> String {
        UrlTemplate::parse(s).unwrap_err()
    }

    fn body_err(s: &str) -> String {
        BodyTemplate::parse(s).unwrap_err()
    }

    #[test]
    fn url_values_are_percent_encoded_in_path_and_query() {
        let t = UrlTemplate::parse(
            "https://hooks.example.com/p/{plant_id}/d/{device_id}?t={type}&d={device_id}",
        )
        .unwrap();
        assert!(t.has_placeholders());
        let u = t.render(&vars("a/b?c#d e%&=é~.-_", Some("p1"))).unwrap();
        assert_eq!(
            u.as_str(),
            "https://hooks.example.com/p/p1/d/a%2Fb%3Fc%23d%20e%25%26%3D%C3%A9~.-_?t=setpoint&d=a%2Fb%3Fc%23d%20e%25%26%3D%C3%A9~.-_"
        );
        assert_eq!(u.host_str(), Some("hooks.example.com"));
        assert_eq!(u.path_segments().unwrap().count(), 4);
        assert_eq!(u.fragment(), None);
        let pairs: Vec<(String, String)> = u.query_pairs().into_owned().collect();
        assert_eq!(
            pairs,
            [
                ("t".to_owned(), "setpoint".to_owned()),
                ("d".to_owned(), "a/b?c#d e%&=é~.-_".to_owned())
            ]
        );
    }

    #[test]
    fn url_missing_plant_renders_empty() {
        let t = UrlTemplate::parse("https://h.example/{plant_id}/x?m={module_id}").unwrap();
        let mut v = vars("d", None);
        v.module_id = None;
        assert_eq!(t.render(&v).unwrap().as_str(), "https://h.example//x?m=");
    }

    #[test]
    fn url_dot_segment_values_are_refused_in_the_path_only() {
        let t = UrlTemplate::parse("https://h.example/devices/{device_id}/state?d={device_id}")
            .unwrap();
        for bad in [".", ".."] {
            assert_eq!(
                t.render(&vars(bad, None)).unwrap_err(),
                format!(
                    "{{device_id}} = {bad:?} makes the url path segment {bad:?}, which would send the request to another path"
                )
            );
        }
        // Made of a value and text around it, or of two values, one of them empty.
        let t = UrlTemplate::parse("https://h.example/a/.{device_id}/b").unwrap();
        assert!(t.render(&vars(".", None)).is_err());
        let t = UrlTemplate::parse("https://h.example/a/%2E{plant_id}{device_id}").unwrap();
        assert_eq!(
            t.render(&vars(".", None)).unwrap_err(),
            "{plant_id} = \"\" makes the url path segment \"%2E.\", which would send the request to another path"
        );
        // In the query, or inside a longer segment, dots are plain text.
        let q = UrlTemplate::parse("https://h.example/devices?d={device_id}").unwrap();
        assert_eq!(
            q.render(&vars("..", None)).unwrap().as_str(),
            "https://h.example/devices?d=.."
        );
        let t = UrlTemplate::parse("https://h.example/devices/{device_id}/state").unwrap();
        assert_eq!(
            t.render(&vars("...", None)).unwrap().as_str(),
            "https://h.example/devices/.../state"
        );
        let t = UrlTemplate::parse("https://h.example/d-{device_id}/state").unwrap();
        assert_eq!(
            t.render(&vars("..", None)).unwrap().as_str(),
            "https://h.example/d-../state"
        );
    }

    #[test]
    fn url_placeholder_in_host_is_refused() {
        for s in [
            "https://{device_id}.example.com/x",
            "https://example.{device_id}/x",
            "https://user@{device_id}/x",
            "https://[::1{device_id}]:8443/x",
        ] {
            assert_eq!(
                url_err(s),
                "placeholder {device_id} is in the url's host; placeholders may only be in the path or query, after scheme://host/",
                "{s}"
            );
        }
    }

    #[test]
    fn url_placeholder_in_userinfo_is_refused() {
        for s in [
            "https://{device_id}@example.com/x",
            "https://user:{device_id}@example.com/x",
        ] {
            assert_eq!(
                url_err(s),
                "placeholder {device_id} is in the url's userinfo; placeholders may only be in the path or query, after scheme://host/",
                "{s}"
            );
        }
    }

    #[test]
    fn url_placeholder_in_port_is_refused() {
        for s in [
            "https://example.com:{device_id}/x",
            "https://example.com:80{device_id}?q=1",
            "https://[::1]:{device_id}/x",
        ] {
            assert_eq!(
                url_err(s),
                "placeholder {device_id} is in the url's port; placeholders may only be in the path or query, after scheme://host/",
                "{s}"
            );
        }
    }

    #[test]
    fn url_placeholder_in_scheme_or_fragment_is_refused() {
        assert!(url_err("{type}://example.com/x").contains("in the url's scheme"));
        assert!(url_err("https:{type}//example.com/x").contains("in the url's scheme"));
        assert!(url_err("example.com/{type}").contains("in the url's scheme"));
        assert!(url_err("https://example.com/x#{type}").contains("in the url's fragment"));
        assert!(url_err("https://example.com/x?a=1#b{type}").contains("in the url's fragment"));
    }

    #[test]
    fn unknown_placeholder_is_refused_naming_it_and_the_known_ones() {
        assert_eq!(
            url_err("https://example.com/{device}"),
            "unknown placeholder {device} in the url; use one of {device_id}, {plant_id}, {module_id}, {gateway_id}, {type}, {event_id}"
        );
        assert_eq!(
            url_err("https://example.com/{seq}"),
            "unknown placeholder {seq} in the url ({seq} works in body templates only); use one of {device_id}, {plant_id}, {module_id}, {gateway_id}, {type}, {event_id}"
        );
        assert_eq!(
            body_err(r#"{"d":"{Device_Id}"}"#),
            "unknown placeholder {Device_Id} in the body; use one of {device_id}, {plant_id}, {module_id}, {gateway_id}, {type}, {event_id}, {seq}, {observed_at}, {event}"
        );
    }

    #[test]
    fn url_that_does_not_parse_is_refused_and_a_plain_one_is_kept() {
        assert!(url_err("https://exa mple.com/{device_id}").starts_with("url does not parse ("));
        let t = UrlTemplate::parse("https://example.com/v1/events?x=1").unwrap();
        assert!(!t.has_placeholders());
        assert_eq!(
            t.render(&vars("d", None)).unwrap().as_str(),
            "https://example.com/v1/events?x=1"
        );
    }

    #[test]
    fn url_sample_fills_names_for_the_callers_checks() {
        let t = UrlTemplate::parse("http://127.0.0.1:8080/{gateway_id}/{device_id}?e={event_id}")
            .unwrap();
        let s = t.sample();
        assert_eq!(
            s.as_str(),
            "http://127.0.0.1:8080/gateway_id/device_id?e=event_id"
        );
        assert_eq!((s.scheme(), s.port()), ("http", Some(8080)));
    }

    #[test]
    fn body_keeps_literal_braces() {
        let t = BodyTemplate::parse(
            r#"{"a":{"b":[{}]},"d":"{device_id}","x":"{ not } {1a} {a-b} {}","n":{"s":{seq}}}"#,
        )
        .unwrap();
        assert_eq!(
            t.render(&vars("kitchen", None)),
            r#"{"a":{"b":[{}]},"d":"kitchen","x":"{ not } {1a} {a-b} {}","n":{"s":5}}"#
        );
        // `{{…}}`: the outer braces are text, the inner pair a placeholder.
        let t = BodyTemplate::parse(r#"{"x":"{{type}}"}"#).unwrap();
        assert_eq!(t.render(&vars("d", None)), r#"{"x":"{setpoint}"}"#);
    }

    #[test]
    fn body_json_escapes_string_values() {
        let t = BodyTemplate::parse(r#"{"d":"<{device_id}>"}"#).unwrap();
        let got = t.render(&vars("a\"b\\c\nd\re\tf\u{1}g\u{8}\u{c}\u{1f}é€😀", None));
        assert_eq!(got, r#"{"d":"<a\"b\\c\nd\re\tf\u0001g\b\f\u001fé€😀>"}"#);
        let back: serde_json::Value = serde_json::from_str(&got).unwrap();
        assert_eq!(back["d"], "<a\"b\\c\nd\re\tf\u{1}g\u{8}\u{c}\u{1f}é€😀>");
    }

    #[test]
    fn body_inserts_event_raw_and_seq_as_digits() {
        let t = BodyTemplate::parse(
            r#"{"gw":"{gateway_id}","id":"{event_id}","at":"{observed_at}","seq":{seq},"event":{event}}"#,
        )
        .unwrap();
        assert_eq!(
            t.render(&vars("d", None)),
            r#"{"gw":"gw-0042","id":"01a20ae9-d836-7336-9a5a-de87b2f5b153","at":"2026-11-24T00:17:07.126Z","seq":5,"event":{"id":"e1","state":{"mode":"MANUAL"}}}"#
        );
        let mut v = vars("d", None);
        v.seq = u64::MAX;
        assert_eq!(
            BodyTemplate::parse("[{seq}]").unwrap().render(&v),
            "[18446744073709551615]"
        );
    }

    #[test]
    fn body_missing_plant_and_module_render_empty() {
        let t = BodyTemplate::parse(r#"{"p":"{plant_id}","m":"{module_id}"}"#).unwrap();
        let mut v = vars("d", None);
        v.module_id = None;
        assert_eq!(t.render(&v), r#"{"p":"","m":""}"#);
    }

    #[test]
    fn body_that_would_produce_invalid_json_is_refused() {
        for s in [
            r#"{"d":{device_id}}"#,
            r#"{"e":"{event}"}"#,
            r#"{"d":"{device_id}"#,
            "",
            r#"{"a":1}{"b":2}"#,
        ] {
            let e = body_err(s);
            assert!(e.starts_with("would produce invalid JSON: "), "{s}: {e}");
            assert!(
                e.ends_with("; put string placeholders inside quotes, e.g. \"{device_id}\", and {seq} and {event} outside them"),
                "{s}: {e}"
            );
        }
        // Not JSON-object bodies are fine as long as they are JSON.
        assert!(BodyTemplate::parse(r#""{device_id}""#).is_ok());
        assert!(BodyTemplate::parse("[{event},{seq}]").is_ok());
    }
}
