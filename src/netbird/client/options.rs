//! How the client connects to the management server: timeouts, extra CA roots, certificate
//! verification, and the egress proxy (read from the environment by the binary, given
//! explicitly by a library user or a test).

use std::time::Duration;

use url::Url;

use super::ClientBuildError;

/// How the client connects to the management server.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    /// Whole-request timeout. The first version check can take ~10 s on a server without internet.
    pub request_timeout: Duration,
    /// Extra PEM roots (spec.tls.caSecretRef).
    pub extra_ca_pem: Option<Vec<u8>>,
    /// spec.tls.insecureSkipVerify.
    pub insecure_skip_verify: bool,
    /// The egress proxy. The default is none: the operator's binary reads it from its environment
    /// ([`ProxySettings::from_env`]); a library user or a test passes it explicitly, so the
    /// environment of a test run never reroutes calls made in-process.
    pub proxy: ProxySettings,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            extra_ca_pem: None,
            insecure_skip_verify: false,
            proxy: ProxySettings::default(),
        }
    }
}

/// The egress proxy for calls to NetBird, as `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY` (or their
/// lower-case spellings) give it: https:// servers through `https`, http:// servers through
/// `http`, and the hosts `no_proxy` names directly (comma-separated host names, domains matching
/// their subdomains, IP addresses, CIDRs; `*` for all).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ProxySettings {
    pub https: Option<String>,
    pub http: Option<String>,
    pub no_proxy: Option<String>,
}

impl std::fmt::Debug for ProxySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl ProxySettings {
    /// From the process environment: upper-case names first, then lower-case ones.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// From a lookup of environment variables (tests pass their own).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let var = |names: [&str; 2]| {
            names
                .iter()
                .filter_map(|n| get(n))
                .map(|v| v.trim().to_string())
                .find(|v| !v.is_empty())
        };
        Self {
            https: var(["HTTPS_PROXY", "https_proxy"]),
            http: var(["HTTP_PROXY", "http_proxy"]),
            no_proxy: var(["NO_PROXY", "no_proxy"]),
        }
    }

    /// Whether any proxy is set.
    pub fn is_set(&self) -> bool {
        self.https.is_some() || self.http.is_some()
    }

    /// Where calls go, for a log line: the proxies without any user:password.
    pub fn describe(&self) -> String {
        let shown = |v: &Option<String>| v.as_deref().map_or("none".to_string(), redact_proxy);
        format!(
            "HTTPS_PROXY={} HTTP_PROXY={} NO_PROXY={}",
            shown(&self.https),
            shown(&self.http),
            self.no_proxy.as_deref().unwrap_or("none")
        )
    }

    /// Checks that the proxies are URLs a client can use (at start-up, before any call).
    pub fn check(&self) -> Result<(), ClientBuildError> {
        self.apply(reqwest::Client::builder()).map(|_| ())
    }

    pub(super) fn apply(
        &self,
        builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, ClientBuildError> {
        // never the system's proxies, read behind the operator's back: these only
        let mut builder = builder.no_proxy();
        let no_proxy = || {
            self.no_proxy
                .as_deref()
                .and_then(reqwest::NoProxy::from_string)
        };
        let bad = |var: &str, url: &str| {
            ClientBuildError::Proxy(format!("{var} {} is not a proxy URL", redact_proxy(url)))
        };
        if let Some(url) = &self.https {
            let proxy = reqwest::Proxy::https(url).map_err(|_| bad("HTTPS_PROXY", url))?;
            builder = builder.proxy(proxy.no_proxy(no_proxy()));
        }
        if let Some(url) = &self.http {
            let proxy = reqwest::Proxy::http(url).map_err(|_| bad("HTTP_PROXY", url))?;
            builder = builder.proxy(proxy.no_proxy(no_proxy()));
        }
        Ok(builder)
    }
}

/// A proxy URL without its user:password (for logs and errors).
fn redact_proxy(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.as_str().trim_end_matches('/').to_string()
        }
        Err(_) => "(not a URL)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_come_from_either_spelling_of_the_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            ProxySettings::from_lookup(move |k| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            })
        };
        let p = env(&[
            ("HTTPS_PROXY", "http://user:pw@proxy:3128"),
            ("http_proxy", "http://proxy:3129"),
            ("NO_PROXY", " .svc,10.0.0.0/8 "),
        ]);
        assert_eq!(p.https.as_deref(), Some("http://user:pw@proxy:3128"));
        assert_eq!(p.http.as_deref(), Some("http://proxy:3129"));
        assert_eq!(p.no_proxy.as_deref(), Some(".svc,10.0.0.0/8"));
        assert!(p.check().is_ok());
        let shown = p.describe();
        assert!(!shown.contains("pw") && !shown.contains("user"), "{shown}");
        assert!(shown.contains("http://proxy:3128"), "{shown}");
        // upper case wins; empty means unset
        let p = env(&[("HTTP_PROXY", "http://a:1"), ("http_proxy", "http://b:1")]);
        assert_eq!(p.http.as_deref(), Some("http://a:1"));
        assert!(!env(&[("HTTPS_PROXY", " ")]).is_set());
        // a proxy that is not a URL is refused, without echoing it
        let e = env(&[("HTTPS_PROXY", "::not a url::secret")])
            .check()
            .unwrap_err()
            .to_string();
        assert!(e.contains("HTTPS_PROXY") && !e.contains("secret"), "{e}");
    }
}
