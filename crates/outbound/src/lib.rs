//! The one guard every outbound connection to a user-supplied address passes through:
//! webhook targets today, proxy-cache upstreams and replication endpoints later. A user who
//! may name a URL must not be able to make the registry reach what only the registry can
//! reach (its own admin port, the cloud's metadata service at 169.254.169.254, a database on
//! the private network). So addresses that are not globally routable are refused unless an
//! administrator lists their range in `[outbound] allow_cidrs`, and the check holds where
//! it matters:
//!
//! - for a host name, on the addresses DNS returned, and the HTTP client connects only to
//!   the addresses that passed (no second lookup a rebinding DNS server could answer
//!   differently);
//! - for an IP literal, before connecting;
//! - on every redirect, for the new URL the same way;
//! - through no proxy from the environment (a proxy would make the check moot).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

pub use url::Url;

/// Why an outbound address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboundError {
    /// Not an absolute http(s) URL.
    #[error("{0}")]
    BadUrl(String),
    /// The address is in a range that is not allowed.
    #[error("{host} is {address}, a {kind} address: refused unless [outbound] allow_cidrs lists its range")]
    Refused {
        /// The host as the URL named it.
        host: String,
        /// The address it is or resolved to.
        address: IpAddr,
        /// Loopback, private, link-local…
        kind: &'static str,
    },
    /// The name did not resolve.
    #[error("{host}: {reason}")]
    Resolve {
        /// The host name.
        host: String,
        /// Why.
        reason: String,
    },
    /// An allowed range could not be parsed.
    #[error("allow_cidrs: {0:?} is not an address range like 10.0.0.0/8 or fd00::/8")]
    BadRange(String),
}

/// The longest URL accepted: enough for any real endpoint, and a bound on what is stored.
pub const MAX_URL_LEN: usize = 2048;

/// Which non-public ranges an administrator allows outbound connections to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboundPolicy {
    allow: Vec<IpNet>,
}

impl OutboundPolicy {
    /// Allows the listed ranges (`10.0.0.0/8`, `::1/128`, or a bare address).
    pub fn allowing<S: AsRef<str>>(ranges: &[S]) -> Result<Self, OutboundError> {
        let allow = ranges
            .iter()
            .map(|r| {
                let r = r.as_ref().trim();
                r.parse::<IpNet>()
                    .or_else(|_| r.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| OutboundError::BadRange(r.to_owned()))
            })
            .collect::<Result<_, _>>()?;
        Ok(OutboundPolicy { allow })
    }

    /// The allowed ranges, as configured.
    pub fn allowed(&self) -> &[IpNet] {
        &self.allow
    }

    /// Whether `address` may be dialled: it is globally routable, or in an allowed range.
    pub fn check_ip(&self, host: &str, address: IpAddr) -> Result<(), OutboundError> {
        let address = canonical(address);
        match special_kind(address) {
            None => Ok(()),
            Some(_) if self.allow.iter().any(|net| net.contains(&address)) => Ok(()),
            Some(kind) => Err(OutboundError::Refused {
                host: host.to_owned(),
                address,
                kind,
            }),
        }
    }

    /// Parses and checks a URL a user supplied: absolute, `http` or `https`, no user
    /// information (credentials belong in the policy's own fields, not in a URL that is
    /// listed back), bounded length, and an IP literal host in an allowed range. A host
    /// name is checked again when it is resolved.
    pub fn check_url(&self, text: &str) -> Result<Url, OutboundError> {
        if text.len() > MAX_URL_LEN {
            return Err(OutboundError::BadUrl(format!(
                "the URL is longer than {MAX_URL_LEN} bytes"
            )));
        }
        let url = Url::parse(text).map_err(|e| OutboundError::BadUrl(format!("{e}")))?;
        self.check_parsed(&url)?;
        Ok(url)
    }

    fn check_parsed(&self, url: &Url) -> Result<(), OutboundError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(OutboundError::BadUrl(format!(
                "only http and https URLs are allowed, not {}:",
                url.scheme()
            )));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(OutboundError::BadUrl(
                "the URL must not carry a user name or password".to_owned(),
            ));
        }
        match url.host() {
            None => Err(OutboundError::BadUrl("the URL has no host".to_owned())),
            Some(url::Host::Ipv4(ip)) => self.check_ip(&ip.to_string(), IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_ip(&ip.to_string(), IpAddr::V6(ip)),
            Some(url::Host::Domain(_)) => Ok(()),
        }
    }

    /// Resolves `host` and keeps the addresses this policy allows; an error naming the
    /// first refused address when none is left.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, OutboundError> {
        let resolve_error = |reason: String| OutboundError::Resolve {
            host: host.to_owned(),
            reason,
        };
        let found = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| resolve_error("name resolution timed out".to_owned()))?
            .map_err(|e| resolve_error(e.to_string()))?;
        let mut allowed = Vec::new();
        let mut refused = None;
        for addr in found {
            match self.check_ip(host, addr.ip()) {
                Ok(()) => allowed.push(addr),
                Err(e) => refused = refused.or(Some(e)),
            }
        }
        match (allowed.is_empty(), refused) {
            (false, _) => Ok(allowed),
            (true, Some(refused)) => Err(refused),
            (true, None) => Err(resolve_error("no addresses".to_owned())),
        }
    }

    /// An HTTP client whose every connection passes this policy: names resolve through
    /// [`OutboundPolicy::resolve`], redirects are checked (at most `max_redirects`), and
    /// proxies from the environment are ignored. `timeout` bounds a whole request.
    pub fn http_client(
        &self,
        timeout: Duration,
        max_redirects: usize,
    ) -> Result<reqwest::Client, OutboundError> {
        self.http_client_verifying(timeout, max_redirects, true)
    }

    /// [`OutboundPolicy::http_client`], but with `verify_certificates` false it accepts
    /// any TLS certificate: for a registry an administrator marked insecure (one with a
    /// self-made certificate). The address guard applies all the same.
    pub fn http_client_verifying(
        &self,
        timeout: Duration,
        max_redirects: usize,
        verify_certificates: bool,
    ) -> Result<reqwest::Client, OutboundError> {
        let redirect_policy = self.clone();
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > max_redirects {
                return attempt.error(OutboundError::BadUrl(format!(
                    "more than {max_redirects} redirects"
                )));
            }
            match redirect_policy.check_parsed(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(e) => attempt.error(e),
            }
        });
        reqwest::Client::builder()
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver(self.clone())))
            .redirect(redirects)
            .connect_timeout(CONNECT_TIMEOUT.min(timeout))
            .timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .danger_accept_invalid_certs(!verify_certificates)
            .build()
            .map_err(|e| OutboundError::BadUrl(format!("building the HTTP client: {e}")))
    }
}

/// The most a name lookup may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a TCP (and TLS) connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves names for the HTTP client through the policy, so the client connects only to
/// addresses that passed it.
struct GuardedResolver(OutboundPolicy);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let addrs = policy.resolve(name.as_str(), 0).await?;
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// An IPv4 address carried in IPv6 (mapped, or NAT64's well-known prefix) is judged as
/// the IPv4 address it reaches.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let o = v6.octets();
                return IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

/// What makes an address not globally routable, if anything.
fn special_kind(address: IpAddr) -> Option<&'static str> {
    match address {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => special_v6(v6),
    }
}

fn special_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if a == 0 || ip.is_broadcast() {
        Some("unspecified")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (carrier-grade NAT)")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if a >= 240
        || (a == 198 && (b == 18 || b == 19))
        || (a == 192 && b == 0 && ip.octets()[2] == 0)
        || ip.is_documentation()
    {
        Some("reserved")
    } else {
        None
    }
}

fn special_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if first & 0xfe00 == 0xfc00 {
        Some("private (unique local)")
    } else if first & 0xffc0 == 0xfe80 || first & 0xffc0 == 0xfec0 {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if first == 0x2001 && ip.segments()[1] == 0x0db8 {
        Some("reserved")
    } else if first == 0x2002 {
        // 6to4 embeds an IPv4 address the relay would reach.
        let s = ip.segments();
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        special_v4(v4)
    } else if first & 0xe000 != 0x2000 {
        // Only 2000::/3 is global unicast.
        Some("reserved")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(policy: &OutboundPolicy, url: &str) -> bool {
        matches!(policy.check_url(url), Err(OutboundError::Refused { .. }))
    }

    #[test]
    fn non_public_literals_are_refused_by_default() {
        let policy = OutboundPolicy::default();
        for url in [
            "http://127.0.0.1/",
            "http://127.1.2.3:8080/x",
            "http://10.0.0.1/",
            "http://172.16.5.4/",
            "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://0.0.0.0/",
            "http://100.64.0.1/",
            "http://[::1]/",
            "http://[::]/",
            "http://[fe80::1]/",
            "http://[fd00::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:169.254.169.254]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://[2002:7f00:1::]/",
            "http://224.0.0.1/",
            "http://255.255.255.255/",
            // Spellings the URL parser normalises to loopback.
            "http://2130706433/",
            "http://0x7f.1/",
            "http://127.1/",
        ] {
            assert!(refused(&policy, url), "{url} was not refused");
        }
    }

    #[test]
    fn public_addresses_and_names_pass() {
        let policy = OutboundPolicy::default();
        for url in [
            "https://93.184.216.34/hook",
            "http://[2606:4700::1111]/",
            "https://hooks.example.com/path?q=1",
        ] {
            assert!(policy.check_url(url).is_ok(), "{url} was refused");
        }
    }

    #[test]
    fn allowed_ranges_open_exactly_those_addresses() {
        let policy = OutboundPolicy::allowing(&["127.0.0.1/32", "10.1.0.0/16", "::1"]).unwrap();
        assert!(policy.check_url("http://127.0.0.1:9/").is_ok());
        assert!(policy.check_url("http://[::1]:9/").is_ok());
        assert!(policy.check_url("http://10.1.200.3/").is_ok());
        assert!(refused(&policy, "http://127.0.0.2/"));
        assert!(refused(&policy, "http://10.2.0.1/"));
        assert!(OutboundPolicy::allowing(&["10.0.0.0/33"]).is_err());
        assert!(OutboundPolicy::allowing(&["localhost"]).is_err());
    }

    #[test]
    fn other_schemes_credentials_and_long_urls_are_bad() {
        let policy = OutboundPolicy::default();
        for url in [
            "file:///etc/passwd",
            "gopher://example.com/",
            "ftp://example.com/",
            "https://user:pw@example.com/",
            "/relative",
            "",
        ] {
            assert!(
                matches!(policy.check_url(url), Err(OutboundError::BadUrl(_))),
                "{url}"
            );
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(matches!(
            policy.check_url(&long),
            Err(OutboundError::BadUrl(_))
        ));
    }

    #[tokio::test]
    async fn names_are_judged_by_what_they_resolve_to() {
        let policy = OutboundPolicy::default();
        let err = policy.resolve("localhost", 80).await.unwrap_err();
        assert!(matches!(err, OutboundError::Refused { .. }), "{err}");
        let only_v4 = OutboundPolicy::allowing(&["127.0.0.0/8"]).unwrap();
        let addrs = only_v4.resolve("localhost", 80).await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.is_ipv4()));
    }

    /// A one-shot HTTP server on `addr` answering every request with `response`.
    async fn answer_with(listener: tokio::net::TcpListener, response: String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            let _ = socket.write_all(response.as_bytes()).await;
        }
    }

    #[tokio::test]
    async fn the_client_refuses_names_and_redirects_into_refused_ranges() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Redirects to another loopback address, which the policy does not allow.
        let redirect = format!(
            "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.2:{port}/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let server = tokio::spawn(answer_with(listener, redirect));

        let policy = OutboundPolicy::allowing(&["127.0.0.1/32"]).unwrap();
        let client = policy.http_client(Duration::from_secs(5), 3).unwrap();
        let err = client
            .get(format!("http://127.0.0.1:{port}/"))
            .send()
            .await
            .unwrap_err();
        assert!(err.is_redirect(), "{err:?}");
        let chain = format!("{:?}", err);
        assert!(chain.contains("127.0.0.2"), "{chain}");

        // A host name resolving to loopback, with loopback not allowed.
        let strict = OutboundPolicy::default();
        let client = strict.http_client(Duration::from_secs(5), 3).unwrap();
        let err = client
            .get(format!("http://localhost:{port}/"))
            .send()
            .await
            .unwrap_err();
        assert!(err.is_connect(), "{err:?}");
        assert!(format!("{err:?}").contains("loopback"), "{err:?}");
        server.abort();
    }
}
