//! The address of a capsync server's RPC port (`host:port`), and why a given text is not one.
//!
//! Users paste what they have at hand: a share-page link, the HTTP port, a bare host name.
//! Each of those gets an answer saying what was wrong and what to give instead, at argument
//! parsing time, before anything is sent. No error repeats the text it was given: a
//! share-page link carries a viewer token after its `#`.

use std::fmt;
use std::str::FromStr;

/// The port `capsync-server` listens on for RPC unless told otherwise.
pub const DEFAULT_RPC_PORT: u16 = 7420;

/// The port of the server's HTTP gateway (share pages) unless told otherwise.
pub const DEFAULT_HTTP_PORT: u16 = 7421;

/// A server's RPC address: a host name or IP address, and a port.
///
/// Displays as `host:port` (`[v6]:port` for IPv6), which is also what
/// [`crate::connect`] and [`crate::SyncOptions`] accept.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddr {
    /// A host name or an IP address, without brackets.
    host: String,
    port: u16,
}

impl ServerAddr {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One or more RPC addresses of one deployment (its nodes on one PostgreSQL), written
/// `host:port,host:port`. A client uses the first that answers and moves on to the next
/// when the one it uses cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerList(Vec<ServerAddr>);

impl ServerList {
    /// The addresses, in the order given (never empty).
    pub fn addrs(&self) -> &[ServerAddr] {
        &self.0
    }

    /// The first address given.
    pub fn first(&self) -> &ServerAddr {
        &self.0[0]
    }
}

impl From<ServerAddr> for ServerList {
    fn from(addr: ServerAddr) -> Self {
        Self(vec![addr])
    }
}

impl FromStr for ServerList {
    type Err = AddrError;

    fn from_str(text: &str) -> Result<Self, AddrError> {
        let addrs = text
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<ServerAddr>, _>>()?;
        Ok(Self(addrs))
    }
}

impl fmt::Display for ServerList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, addr) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{addr}")?;
        }
        Ok(())
    }
}

/// Why a text is not a server address. Its message says what to give instead and never
/// contains the text itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AddrError(String);

impl FromStr for ServerAddr {
    type Err = AddrError;

    fn from_str(text: &str) -> Result<Self, AddrError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(AddrError(format!(
                "the server address is empty; give the RPC address as HOST:PORT, e.g. 127.0.0.1:{DEFAULT_RPC_PORT}"
            )));
        }
        if let Some((scheme, rest)) = text.split_once("://") {
            return Err(url_error(scheme, rest));
        }
        if let Ok(ip) = text.parse::<std::net::IpAddr>() {
            return Err(missing_port(&Self::new(ip.to_string(), DEFAULT_RPC_PORT)));
        }
        let (host, port) = match text.strip_prefix('[') {
            Some(bracketed) => {
                let (host, port) = bracketed.split_once(']').ok_or_else(|| {
                    AddrError(format!(
                        "an IPv6 address needs its closing bracket: [ADDRESS]:PORT, e.g. [::1]:{DEFAULT_RPC_PORT}"
                    ))
                })?;
                if host.parse::<std::net::Ipv6Addr>().is_err() {
                    return Err(AddrError(
                        "the part in brackets is not an IPv6 address".into(),
                    ));
                }
                match port.strip_prefix(':') {
                    Some(port) => (host, port),
                    None if port.is_empty() => {
                        return Err(missing_port(&Self::new(host, DEFAULT_RPC_PORT)));
                    }
                    None => return Err(AddrError(form_error())),
                }
            }
            None => match text.rsplit_once(':') {
                Some((host, _)) if host.contains(':') => {
                    return Err(AddrError(format!(
                        "put an IPv6 address in brackets: [ADDRESS]:PORT, e.g. [::1]:{DEFAULT_RPC_PORT}"
                    )));
                }
                Some(split) => split,
                None => {
                    check_host(text)?;
                    return Err(missing_port(&Self::new(text, DEFAULT_RPC_PORT)));
                }
            },
        };
        check_host(host)?;
        let port = parse_port(port)?;
        Ok(Self::new(host, port))
    }
}

/// The answer for `scheme://...`: a URL, most likely a share-page link copied from a
/// browser. Only the host is taken from it; the rest (share id, token) is not repeated.
fn url_error(scheme: &str, rest: &str) -> AddrError {
    let scheme = scheme.to_ascii_lowercase();
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    // A `user:password@` part is a secret too.
    let authority = authority.rsplit('@').next().unwrap_or("");
    let host = match authority.parse::<ServerAddr>() {
        Ok(addr) => addr.host,
        Err(_) => authority
            .trim_start_matches('[')
            .split(']')
            .next()
            .unwrap_or("")
            .to_owned(),
    };
    let example = if host.is_empty() || check_host(&host).is_err() {
        format!("HOST:{DEFAULT_RPC_PORT}")
    } else {
        ServerAddr::new(host, DEFAULT_RPC_PORT).to_string()
    };
    let path = &rest[rest.find(['/', '?', '#']).unwrap_or(rest.len())..];
    let mut message = if scheme == "http" || scheme == "https" {
        format!(
            "this is a web address; the server takes the RPC address HOST:PORT, not a URL: e.g. {example} (the RPC port, {DEFAULT_RPC_PORT} by default; {DEFAULT_HTTP_PORT} is the share pages' HTTP port)"
        )
    } else {
        format!("give the RPC address as HOST:PORT, without a {scheme}:// prefix: e.g. {example}")
    };
    if path.starts_with("/s/") {
        message.push_str(
            ". Share-page links are for browsers; to read the share with capsync, use the RPC address and pass the viewer token that follows '#' in the link with --token or CAPSYNC_TOKEN",
        );
    } else if path.contains('#') {
        message.push_str(". The part after '#' is not shown here: it may be a token");
    }
    AddrError(message)
}

fn missing_port(example: &ServerAddr) -> AddrError {
    AddrError(format!(
        "the server address needs a port: HOST:PORT, e.g. {example} (the RPC port, {DEFAULT_RPC_PORT} by default)"
    ))
}

fn form_error() -> String {
    format!("give the RPC address as HOST:PORT, e.g. example.org:{DEFAULT_RPC_PORT}")
}

fn check_host(host: &str) -> Result<(), AddrError> {
    if host.is_empty() {
        return Err(AddrError(format!(
            "the server address has no host: give HOST:PORT, e.g. 127.0.0.1:{DEFAULT_RPC_PORT}"
        )));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':');
    if !host.chars().all(allowed) {
        return Err(AddrError(format!(
            "that is not a host name or IP address; {}",
            form_error()
        )));
    }
    Ok(())
}

fn parse_port(port: &str) -> Result<u16, AddrError> {
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(AddrError(format!(
            "the port must be a number from 1 to 65535 (the RPC port is {DEFAULT_RPC_PORT} by default); {}",
            form_error()
        ))),
        Ok(port) => Ok(port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_one_address_or_several_separated_by_commas() {
        let one: ServerList = "example:1".parse().unwrap();
        assert_eq!(one.addrs(), [ServerAddr::new("example", 1)]);
        let two: ServerList = "a:1, [::1]:2".parse().unwrap();
        assert_eq!(
            two.addrs(),
            [ServerAddr::new("a", 1), ServerAddr::new("::1", 2)]
        );
        assert_eq!(two.to_string(), "a:1,[::1]:2");
        assert!("a:1,".parse::<ServerList>().is_err(), "an empty entry");
        assert!("a:1,http://b:2".parse::<ServerList>().is_err());
    }

    fn error(text: &str) -> String {
        text.parse::<ServerAddr>().unwrap_err().to_string()
    }

    #[test]
    fn host_and_port_forms_parse_and_display_back() {
        for (text, host, port, shown) in [
            ("127.0.0.1:7420", "127.0.0.1", 7420, "127.0.0.1:7420"),
            (
                " example.org:9000 ",
                "example.org",
                9000,
                "example.org:9000",
            ),
            ("localhost:1", "localhost", 1, "localhost:1"),
            ("[::1]:7420", "::1", 7420, "[::1]:7420"),
            (
                "my_host-2.lan:65535",
                "my_host-2.lan",
                65535,
                "my_host-2.lan:65535",
            ),
        ] {
            let addr: ServerAddr = text.parse().unwrap();
            assert_eq!((addr.host(), addr.port()), (host, port), "{text}");
            assert_eq!(addr.to_string(), shown);
            assert_eq!(shown.parse::<ServerAddr>().unwrap(), addr);
        }
    }

    #[test]
    fn a_share_page_link_is_explained_without_its_token() {
        let link = "http://sync.example.org:7421/s/sh_0123#csviewer_00ff_topsecretvalue";
        let e = error(link);
        assert!(!e.contains("topsecret") && !e.contains("csviewer"), "{e}");
        assert!(!e.contains("sh_0123"), "{e}");
        assert!(e.contains("not a URL"), "{e}");
        assert!(e.contains("sync.example.org:7420"), "{e}");
        assert!(e.contains("7420 by default"), "{e}");
        assert!(e.contains("for browsers"), "{e}");
        assert!(e.contains("--token"), "{e}");

        let e = error("https://[::1]:7421/");
        assert!(e.contains("[::1]:7420") && e.contains("not a URL"), "{e}");
        let e = error("HTTP://user:pa55word@example.org/#x");
        assert!(!e.contains("pa55word"), "{e}");
        assert!(e.contains("example.org:7420"), "{e}");
        let e = error("tcp://example.org:7420");
        assert!(e.contains("without a tcp:// prefix"), "{e}");
    }

    #[test]
    fn a_missing_port_says_what_the_right_form_is() {
        assert!(error("example.org").contains("needs a port: HOST:PORT, e.g. example.org:7420"));
        assert!(error("10.0.0.2").contains("e.g. 10.0.0.2:7420"));
        assert!(error("::1").contains("e.g. [::1]:7420"));
        assert!(error("[::1]").contains("e.g. [::1]:7420"));
    }

    #[test]
    fn bad_ports_and_hosts_are_refused() {
        for bad in [
            "example.org:http",
            "example.org:",
            "example.org:0",
            "h:70000",
        ] {
            assert!(
                error(bad).contains("from 1 to 65535"),
                "{bad}: {}",
                error(bad)
            );
        }
        assert!(error(":7420").contains("no host"));
        assert!(error("").contains("empty"));
        assert!(error("fe80::1%eth0:7420").contains("in brackets"));
        // A valid IPv6 address on its own has no port, whatever its last group says.
        assert!(error("fe80::1:7420").contains("e.g. [fe80::1:7420]:7420"));
        assert!(error("[::1:7420").contains("closing bracket"));
        assert!(error("[nope]:7420").contains("not an IPv6 address"));
        assert!(error("host name:7420").contains("not a host name"));
        assert!(error("example.org:7421/s/sh_1").contains("from 1 to 65535"));
    }
}
