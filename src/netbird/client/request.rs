//! One request and its answer, over either transport: the URL, the token header and the JSON
//! body built; the answer read up to `MAX_BODY_BYTES`, redirects refused, the server's `Date`
//! kept, the outcome reported to the observer.

use reqwest::{Method, StatusCode, header};
use secrecy::{ExposeSecret, SecretString};
use serde::{Serialize, de::DeserializeOwned};
use url::Url;

use super::failures::{api_error, decode_detail, redact_url, transport_error};
use super::{ClientOptions, NetbirdClient, SimRequest, SimulatedNetwork, Transport};
use crate::netbird::error::{Endpoint, NetbirdError, TransportKind};
use crate::netbird::pat;

/// Answers larger than this are refused: every NetBird answer the operator reads is a few KiB.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

impl NetbirdClient {
    pub(super) async fn call<T: DeserializeOwned, B: Serialize>(
        &self,
        endpoint: Endpoint,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<&B>,
    ) -> Result<T, NetbirdError> {
        self.call_dated(endpoint, method, path, token, body)
            .await
            .map(|(value, _)| value)
    }

    /// A call, with the time the server's answer carries (its `Date` header), when it has one.
    pub(super) async fn call_dated<T: DeserializeOwned, B: Serialize>(
        &self,
        endpoint: Endpoint,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<&B>,
    ) -> Result<(T, Option<jiff::Timestamp>), NetbirdError> {
        let result = self.call_inner(endpoint, method, path, token, body).await;
        if let Some(obs) = &self.observer {
            let status = match &result {
                Ok(_) => Some(200),
                Err(e) => e.status(),
            };
            obs.observe(endpoint, status);
        }
        result
    }

    async fn call_inner<T: DeserializeOwned, B: Serialize>(
        &self,
        endpoint: Endpoint,
        method: Method,
        path: &str,
        token: Option<&SecretString>,
        body: Option<&B>,
    ) -> Result<(T, Option<jiff::Timestamp>), NetbirdError> {
        let url = self.api.join(path).map_err(|e| NetbirdError::Transport {
            endpoint,
            kind: TransportKind::Other,
            detail: format!("cannot build the request URL: {e}"),
        })?;
        let auth = auth_header(token)?;
        let body = match body {
            Some(b) => Some(serde_json::to_vec(b).map_err(|e| NetbirdError::Transport {
                endpoint,
                kind: TransportKind::Other,
                detail: format!("cannot encode the request: {e}"),
            })?),
            None => None,
        };
        let outgoing = Outgoing {
            endpoint,
            method,
            url,
            auth,
            body,
        };
        let answer = match &self.http {
            Transport::Http(http) => send_http(http, outgoing).await?,
            Transport::Simulated { network, opts } => {
                send_simulated(network.as_ref(), opts, outgoing).await?
            }
        };
        answer.read(endpoint)
    }
}

/// A request ready to go: what it is for, its method and URL, its token header and JSON body.
struct Outgoing {
    endpoint: Endpoint,
    method: Method,
    url: Url,
    auth: Option<header::HeaderValue>,
    body: Option<Vec<u8>>,
}

/// An answer as it arrived, before it is judged: its status, the headers kept and its body.
struct Answer {
    status: StatusCode,
    request_id: Option<String>,
    location: Option<String>,
    date: Option<String>,
    body: Vec<u8>,
}

/// The `Authorization` header for `token` (checked for the PAT form first), marked sensitive.
fn auth_header(token: Option<&SecretString>) -> Result<Option<header::HeaderValue>, NetbirdError> {
    let Some(token) = token else {
        return Ok(None);
    };
    pat::check(token.expose_secret())?;
    let mut value = header::HeaderValue::from_str(&format!("Token {}", token.expose_secret()))
        .map_err(|_| NetbirdError::MalformedToken(pat::PatFormatError::Charset))?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// Sends over reqwest and reads the body (unless redirected) up to `MAX_BODY_BYTES`.
async fn send_http(http: &reqwest::Client, out: Outgoing) -> Result<Answer, NetbirdError> {
    let endpoint = out.endpoint;
    let mut req = http
        .request(out.method, out.url)
        .header(header::ACCEPT, "application/json");
    if let Some(value) = out.auth {
        req = req.header(header::AUTHORIZATION, value);
    }
    if let Some(body) = out.body {
        req = req
            .header(header::CONTENT_TYPE, "application/json")
            .body(body);
    }
    let mut resp = req
        .send()
        .await
        .map_err(|e| transport_error(endpoint, &e))?;
    let status = resp.status();
    let header = |name| {
        resp.headers()
            .get(name)
            .and_then(|v: &header::HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let (request_id, location) = (header("x-request-id"), header("location"));
    let date = header("date");
    let mut buf = Vec::new();
    if !status.is_redirection() {
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| transport_error(endpoint, &e))?
        {
            if buf.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(NetbirdError::TooLarge {
                    endpoint,
                    limit: MAX_BODY_BYTES,
                });
            }
            buf.extend_from_slice(&chunk);
        }
    }
    Ok(Answer {
        status,
        request_id,
        location,
        date,
        body: buf,
    })
}

/// Sends over the simulated network, with the headers and TLS settings it would go with.
async fn send_simulated(
    network: &dyn SimulatedNetwork,
    opts: &ClientOptions,
    out: Outgoing,
) -> Result<Answer, NetbirdError> {
    let endpoint = out.endpoint;
    let mut headers = vec![("accept".to_string(), "application/json".to_string())];
    if let Some(value) = out.auth {
        let value = value.to_str().unwrap_or_default().to_string();
        headers.push(("authorization".into(), value));
    }
    if out.body.is_some() {
        headers.push(("content-type".into(), "application/json".into()));
    }
    let resp = network
        .send(SimRequest {
            method: out.method.to_string(),
            url: out.url.to_string(),
            headers,
            body: out.body.unwrap_or_default(),
            insecure_skip_verify: opts.insecure_skip_verify,
            extra_ca_pem: opts.extra_ca_pem.clone(),
            request_timeout: opts.request_timeout,
        })
        .await
        .map_err(|kind| NetbirdError::Transport {
            endpoint,
            kind,
            detail: "simulated network failure".into(),
        })?;
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let (request_id, location) = (header("x-request-id"), header("location"));
    let date = header("date");
    if resp.body.len() > MAX_BODY_BYTES {
        return Err(NetbirdError::TooLarge {
            endpoint,
            limit: MAX_BODY_BYTES,
        });
    }
    let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok(Answer {
        status,
        request_id,
        location,
        date,
        body: resp.body,
    })
}

impl Answer {
    /// Judges the answer: a redirect or a failure status is an error, a success is decoded.
    fn read<T: DeserializeOwned>(
        self,
        endpoint: Endpoint,
    ) -> Result<(T, Option<jiff::Timestamp>), NetbirdError> {
        let Answer {
            status,
            request_id,
            location,
            date,
            body: buf,
        } = self;
        let request_id = request_id.map(|s| s.chars().take(128).collect::<String>());

        if status.is_redirection() {
            let location = location
                .as_deref()
                .map(redact_url)
                .unwrap_or_else(|| "(no location)".into());
            return Err(NetbirdError::Redirect {
                endpoint,
                status: status.as_u16(),
                location,
            });
        }

        if !status.is_success() {
            return Err(api_error(endpoint, status, &buf, request_id));
        }
        let value = serde_json::from_slice(&buf).map_err(|e| NetbirdError::Decode {
            endpoint,
            status: status.as_u16(),
            detail: decode_detail(&e),
            request_id,
        })?;
        Ok((value, date.as_deref().and_then(http_date)))
    }
}

/// An HTTP `Date` header (`Fri, 04 Dec 2026 12:25:43 GMT`, RFC 9110's IMF-fixdate, a form of RFC
/// 2822 that jiff reads), as a timestamp.
fn http_date(value: &str) -> Option<jiff::Timestamp> {
    jiff::fmt::rfc2822::parse(value).ok().map(|z| z.timestamp())
}
