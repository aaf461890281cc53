//! The request parsers of the `/v2` handlers: table tests and property tests.

use super::uploads::content_range;
use super::*;

#[test]
fn parses_range_forms() {
    assert_eq!(
        parse_range("bytes=0-9"),
        Some(RangeRequest::From {
            start: 0,
            end: Some(9)
        })
    );
    assert_eq!(
        parse_range("bytes=5-"),
        Some(RangeRequest::From {
            start: 5,
            end: None
        })
    );
    assert_eq!(
        parse_range("bytes=-3"),
        Some(RangeRequest::Suffix { len: 3 })
    );
    assert_eq!(parse_range("bytes=0-1,4-5"), None);
    assert_eq!(parse_range("items=0-1"), None);
    assert_eq!(parse_range("bytes=x-1"), None);
}

#[test]
fn an_answer_moved_into_the_request_map_keeps_every_header_and_no_request_header() {
    let mut request = HeaderMap::with_capacity(16);
    request.insert(header::HOST, HeaderValue::from_static("registry.test"));
    request.insert(header::RANGE, HeaderValue::from_static("bytes=0-1"));
    let room = request.capacity();
    let mut response = Response::new(Body::empty());
    let answer = response.headers_mut();
    answer.insert(header::CONTENT_LENGTH, HeaderValue::from(7));
    answer.append(header::LINK, HeaderValue::from_static("<a>; rel=\"next\""));
    answer.append(header::LINK, HeaderValue::from_static("<b>; rel=\"prev\""));
    answer.insert(header::ETAG, HeaderValue::from_static("\"x\""));

    reuse_header_map(&mut response, request);

    let headers = response.headers();
    assert_eq!(headers.len(), 4);
    assert!(headers.get(header::HOST).is_none());
    assert!(headers.get(header::RANGE).is_none());
    assert_eq!(headers[header::CONTENT_LENGTH], "7");
    assert_eq!(headers[header::ETAG], "\"x\"");
    let links: Vec<_> = headers.get_all(header::LINK).iter().collect();
    assert_eq!(links, ["<a>; rel=\"next\"", "<b>; rel=\"prev\""]);
    assert_eq!(
        headers.capacity(),
        room,
        "the request's map is the one reused"
    );
}

#[test]
fn the_registry_api_is_every_path_under_v2_and_nothing_else() {
    for path in ["/v2", "/v2/", "/v2/_catalog", "/v2/a/b/manifests/latest"] {
        assert!(is_v2_path(path), "{path}");
    }
    for path in [
        "/",
        "/v20",
        "/v2x/tags",
        "/api/v1/users",
        "/token",
        "/V2/",
        "v2/",
    ] {
        assert!(!is_v2_path(path), "{path}");
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn range_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "(bytes|items|)=? ?[0-9]{0,25}-?[0-9]{0,25}(,[0-9-]{0,10})?(/[0-9*]{0,10})?",
        ]
    }

    fn with_content_range(value: &str, length: Option<u64>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Ok(v) = axum::http::HeaderValue::from_str(value) {
            headers.insert(header::CONTENT_RANGE, v);
        }
        if let Some(len) = length {
            headers.insert(header::CONTENT_LENGTH, len.into());
        }
        headers
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn ranges_never_panic_and_read_back(text in range_text()) {
            let _ = parse_range(&text);
        }

        #[test]
        fn well_formed_ranges_read_as_written(start in any::<u64>(), len in any::<u64>(), form in 0..3u8) {
            let (text, want) = match form {
                0 => (format!("bytes={start}-{}", start.saturating_add(len)),
                      RangeRequest::From { start, end: Some(start.saturating_add(len)) }),
                1 => (format!("bytes={start}-"), RangeRequest::From { start, end: None }),
                _ => (format!("bytes=-{len}"), RangeRequest::Suffix { len }),
            };
            prop_assert_eq!(parse_range(&text), Some(want));
        }

        #[test]
        fn content_ranges_never_panic(text in range_text(), length in proptest::option::of(any::<u64>())) {
            let _ = content_range(&with_content_range(&text, length));
        }

        #[test]
        fn well_formed_content_ranges_give_their_start(start in 0..u64::MAX / 2, len in 1..u64::MAX / 2, prefix in any::<bool>()) {
            let end = start + len - 1;
            let text = format!("{}{start}-{end}", if prefix { "bytes " } else { "" });
            let headers = with_content_range(&text, Some(len));
            prop_assert_eq!(content_range(&headers).ok().flatten(), Some(start));
            let wrong_length = with_content_range(&text, Some(len + 1));
            prop_assert!(content_range(&wrong_length).is_err());
        }
    }
}
