//! What a pass reads: the credentials, CA and token Secrets as one [`World`] (read at once, an
//! absence the watch reports confirmed before a verdict rests on it), the NetBird client built for
//! the spec, the token as it may be sent to spec.managementURL, and the token Secret as this pass's
//! writes left it. Also the verdict a failed Kubernetes write becomes (`progressing`).

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use secrecy::SecretString;
use sha2::{Digest, Sha256};

use super::store::patch_token_secret;
use crate::controller::context::{Context, Error, lock};
use crate::controller::decide::{Input, Verdict, Waiting};
use crate::controller::secrets::{Lookup, Secrets};
use crate::crd::NetbirdInstance;
use crate::credentials::{self, Credentials};
use crate::netbird::{ClientOptions, NetbirdClient};
use crate::token_secret::{self, TokenSecret, TokenValue};

/// What a pass reads from Kubernetes besides the NetbirdInstance.
pub struct World {
    pub credentials: Input<Credentials>,
    pub ca: Input<Vec<u8>>,
    pub token_secret: TokenSecret,
    /// resourceVersion of the token Secret, for optimistic concurrency on the claim.
    pub token_secret_rv: Option<String>,
    /// resourceVersion of the credentials Secret as read.
    pub(super) credentials_rv: Option<String>,
    /// resourceVersion of the credentials Secret as the pass first read it (the watch's copy): what
    /// the retry gate's digest holds, so that a fresh read for setup does not make the next pass,
    /// which reads the same copy, look changed.
    first_read_credentials_rv: Option<String>,
    /// resourceVersion of the CA Secret as read.
    ca_rv: Option<String>,
    pub(super) client: Option<NetbirdClient>,
    /// A comparison of the credentials with the fingerprint made by this pass, to be recorded on
    /// the token Secret (see `token_secret::ANN_CREDENTIALS_CHECKED`).
    pub(super) unrecorded_check: Option<String>,
    /// The credentials Secret's allow-list of servers for its password, when it has one.
    pub allowed_servers: Option<String>,
    /// Which Secrets are absent only by the watch's word (not read).
    unseen: Unseen,
    /// spec.managementURL: the only server the client talks to.
    management_url: String,
    /// How the spec has that server trusted (spec.tls.insecureSkipVerify).
    trust: crate::binding::Trust,
}

/// The Secrets a pass did not read because the watch says they do not exist: a verdict resting on
/// such an absence is confirmed by reading them ([`World::confirm`]).
#[derive(Clone, Copy)]
struct Unseen {
    credentials: bool,
    ca: bool,
    token: bool,
}

impl Unseen {
    fn any(self) -> bool {
        self.credentials || self.ca || self.token
    }
}

impl World {
    /// Reads the Secrets. One the watch says does not exist is not read (before a bootstrap, the
    /// token Secret): the steps may go on from that absence, since the only write it leads to is
    /// a create, which fails if the Secret exists; a verdict does not (see [`World::confirm`]).
    pub async fn read(
        nbi: &NetbirdInstance,
        secrets: &Secrets<'_>,
        ctx: &Context,
    ) -> Result<Self, Error> {
        Self::read_with(nbi, secrets, ctx, true).await
    }

    /// Whether an absence known only from the watch was read again (the world is then read anew
    /// and the decision made again): a verdict never rests on a watch that lags a creation.
    pub async fn confirm(
        &mut self,
        nbi: &NetbirdInstance,
        secrets: &Secrets<'_>,
        ctx: &Context,
    ) -> Result<bool, Error> {
        if !self.unseen.any() {
            return Ok(false);
        }
        *self = Self::read_with(nbi, secrets, ctx, false).await?;
        Ok(true)
    }

    /// Whether the token Secret changed since this pass read it, as the apiserver has it now
    /// (never the watch cache, which may lag without knowing it); when it did, the world is read
    /// anew. Before a step deletes a replaced token on the server: a person may have put another
    /// token in, and the token verified before the deletion must be the one the Secret holds
    /// (found by the history explorer: seed 3, a hand token behind a held watch, and the rotation's
    /// previous token retired before it was verified).
    pub async fn confirm_token_secret(
        &mut self,
        nbi: &NetbirdInstance,
        secrets: &Secrets<'_>,
        ctx: &Context,
    ) -> Result<bool, Error> {
        let name = nbi.token_secret_name();
        let now = secrets
            .get_uncached(&name)
            .await
            .map_err(|error| Error::ReadSecret {
                name: name.clone(),
                error,
            })?;
        if resource_version(&now) == self.token_secret_rv {
            return Ok(false);
        }
        secrets.read_fresh_next(&name);
        *self = Self::read_with(nbi, secrets, ctx, false).await?;
        Ok(true)
    }

    /// Reads the credentials Secret again from the apiserver itself, never the watch cache (which
    /// may lag without knowing it): what setup decides on before it sends the password (an
    /// allow-list just added must not be missed).
    pub async fn refresh_credentials(
        &mut self,
        nbi: &NetbirdInstance,
        secrets: &Secrets<'_>,
    ) -> Result<(), Error> {
        let cref = &nbi.spec.credentials_secret_ref;
        let secret = secrets
            .get_uncached(&cref.name)
            .await
            .map_err(|error| Error::ReadSecret {
                name: cref.name.clone(),
                error,
            })?;
        self.credentials_rv = resource_version(&secret);
        self.allowed_servers = allow_list(&secret);
        self.credentials = credentials_input(cref, secret);
        // a comparison made on the cached copy is not the one to record: the pass records the
        // credentials as it last read them (else, behind a lagging watch, each pass would record
        // the cached and then the fresh comparison, and each write would wake the next pass)
        self.unrecorded_check = None;
        Ok(())
    }

    async fn read_with(
        nbi: &NetbirdInstance,
        secrets: &Secrets<'_>,
        ctx: &Context,
        trust_watch: bool,
    ) -> Result<Self, Error> {
        let get = |name: String| async move {
            let found = if trust_watch {
                secrets.lookup(&name).await
            } else {
                secrets.get(&name).await.map(|s| match s {
                    Some(s) => Lookup::Found(Box::new(s)),
                    None => Lookup::Gone,
                })
            };
            found.map_err(|error| Error::ReadSecret { name, error })
        };
        let cref = &nbi.spec.credentials_secret_ref;
        let ca_ref = nbi.spec.tls.as_ref().and_then(|t| t.ca_secret_ref.as_ref());
        // the three reads at once: a pass that has to read them waits for one round trip
        let (credentials_secret, ca_secret, secret) = futures::try_join!(
            get(cref.name.clone()),
            async {
                match ca_ref {
                    Some(r) => get(r.name.clone()).await,
                    None => Ok(Lookup::Gone),
                }
            },
            get(nbi.token_secret_name()),
        )?;
        let unseen = Unseen {
            credentials: matches!(credentials_secret, Lookup::Unseen),
            ca: matches!(ca_secret, Lookup::Unseen),
            token: matches!(secret, Lookup::Unseen),
        };
        let (credentials_secret, ca_secret, secret) = (
            credentials_secret.into_option(),
            ca_secret.into_option(),
            secret.into_option(),
        );
        let credentials_rv = resource_version(&credentials_secret);
        let allowed_servers = allow_list(&credentials_secret);
        let credentials = credentials_input(cref, credentials_secret);
        let ca_rv = resource_version(&ca_secret);
        let ca = ca_input(ca_ref, ca_secret);
        let token_secret_rv = resource_version(&secret);
        let token_secret =
            token_secret::classify(secret, &nbi.name_any(), &nbi.spec.token.secret_key);
        let mut world = World {
            credentials,
            ca,
            token_secret,
            token_secret_rv,
            first_read_credentials_rv: credentials_rv.clone(),
            credentials_rv,
            ca_rv,
            client: None,
            unrecorded_check: None,
            allowed_servers,
            unseen,
            management_url: nbi.spec.management_url.clone(),
            trust: token_secret::spec_trust(nbi),
        };
        world.build_client(nbi, ctx);
        Ok(world)
    }

    /// A digest of everything a pass depends on besides the clock: the spec's generation and the
    /// resourceVersions of the credentials, CA and token Secrets (after this pass's own writes).
    pub fn inputs_digest(&self, generation: Option<i64>) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(generation.unwrap_or_default().to_le_bytes());
        for rv in [
            &self.first_read_credentials_rv,
            &self.ca_rv,
            &self.token_secret_rv,
        ] {
            h.update(rv.as_deref().unwrap_or("-").as_bytes());
            h.update([0]);
        }
        h.finalize().into()
    }

    /// A digest of the spec's generation and the credentials Secret's resourceVersion: what a
    /// count of setup's server errors holds for.
    pub fn setup_key(&self, generation: Option<i64>) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(generation.unwrap_or_default().to_le_bytes());
        h.update(self.credentials_rv.as_deref().unwrap_or("-").as_bytes());
        h.finalize().into()
    }

    /// Builds the NetBird client once the CA (if any) is known; a bad CA bundle becomes
    /// InvalidSpec.
    fn build_client(&mut self, nbi: &NetbirdInstance, ctx: &Context) {
        let base = &ctx.settings.netbird;
        let extra_ca_pem = match &self.ca {
            Input::Ready(pem) => Some(pem.clone()),
            Input::NotNeeded => None,
            _ => return,
        };
        let opts = ClientOptions {
            extra_ca_pem,
            insecure_skip_verify: nbi
                .spec
                .tls
                .as_ref()
                .is_some_and(|t| t.insecure_skip_verify),
            ..base.clone()
        };
        if let Some(network) = &ctx.netbird_network {
            let built = NetbirdClient::simulated(&nbi.spec.management_url, network.clone(), &opts);
            match built {
                Ok(c) => self.client = Some(c),
                Err(e) => self.ca = Input::Invalid(format!("cannot connect as the spec says: {e}")),
            }
            return;
        }
        // the HTTP client (TLS roots, connection pool) is built once per TLS settings and shared by
        // every instance and pass: one per instance held ~270 KiB each (measured: 288 MiB for 1040)
        let key: [u8; 32] = {
            let mut h = Sha256::new();
            h.update([u8::from(opts.insecure_skip_verify)]);
            h.update(opts.extra_ca_pem.as_deref().unwrap_or_default());
            h.finalize().into()
        };
        let cached = lock(&ctx.clients).get(&key).cloned();
        let http = match cached {
            Some(http) => Ok(http),
            None => NetbirdClient::http(&opts).inspect(|http| {
                let mut clients = lock(&ctx.clients);
                if clients.len() >= 256 {
                    clients.clear();
                }
                clients.insert(key, http.clone());
            }),
        };
        match http.and_then(|http| NetbirdClient::with_http(&nbi.spec.management_url, http)) {
            Ok(c) => self.client = Some(c),
            Err(e) => self.ca = Input::Invalid(format!("cannot connect as the spec says: {e}")),
        }
    }

    /// The NetBird client for this spec (None while the CA is missing or invalid).
    pub fn client(&self) -> Option<&NetbirdClient> {
        self.client.as_ref()
    }

    /// The stored token, when it may be sent to spec.managementURL (the Secret records no other
    /// server for it). Every call that carries the token takes it from here.
    pub fn token(&self) -> Option<&SecretString> {
        let s = self.token_secret.owned()?;
        match &s.token {
            TokenValue::Present(t) if s.may_send_token(&self.management_url, self.trust) => Some(t),
            _ => None,
        }
    }

    /// The token a service-user exchange replaced, kept until it is deleted (same server rule).
    pub fn previous_token(&self) -> Option<&SecretString> {
        let s = self.token_secret.owned()?;
        s.previous_token
            .as_ref()
            .filter(|_| s.may_send_token(&self.management_url, self.trust))
    }

    pub fn metadata_in_sync(&self, nbi: &NetbirdInstance) -> bool {
        self.token_secret
            .owned()
            .is_none_or(|s| token_secret::metadata_in_sync(nbi, s))
    }

    /// The token Secret as a write returned it (saves reading it back).
    pub(super) fn set_token_secret(&mut self, nbi: &NetbirdInstance, secret: Option<Secret>) {
        self.unseen.token = false;
        self.token_secret_rv = resource_version(&secret);
        self.token_secret =
            token_secret::classify(secret, &nbi.name_any(), &nbi.spec.token.secret_key);
    }

    /// Patches the token Secret as this world read it (a Secret changed since is not written: the
    /// write fails with a conflict and the next pass reads it again), and takes the result as the
    /// new state (no read-back).
    pub(super) async fn patch(
        &mut self,
        nbi: &NetbirdInstance,
        secrets: &Secrets<'_>,
        patch: &serde_json::Value,
    ) -> Result<(), Verdict> {
        let patch = token_secret::guarded(patch, self.token_secret_rv.as_deref());
        let written = patch_token_secret(secrets, &nbi.token_secret_name(), &patch).await?;
        self.set_token_secret(nbi, Some(written));
        Ok(())
    }

    /// Takes the token Secret as a write returned it, or reads it again when there is no write
    /// result (a write that gave up at shutdown, an exchange that failed after its marker).
    pub(super) async fn written(
        &mut self,
        nbi: &NetbirdInstance,
        secrets: &Secrets<'_>,
        written: Option<Secret>,
    ) -> Result<(), Verdict> {
        let secret = match written {
            Some(s) => Some(s),
            None => secrets
                .get(&nbi.token_secret_name())
                .await
                .map_err(|e| progressing("failed to read back the token Secret", &e))?,
        };
        self.set_token_secret(nbi, secret);
        Ok(())
    }
}

fn resource_version(secret: &Option<Secret>) -> Option<String> {
    secret
        .as_ref()
        .and_then(|s| s.metadata.resource_version.clone())
}

pub(super) fn progressing(what: &str, e: &kube::Error) -> Verdict {
    // the apiserver refuses the Secret as the spec makes it: the same write fails until the spec
    // changes, so a person is needed, not a retry loop
    if let kube::Error::Api(s) = e
        && s.code == 422
    {
        return Verdict::Stalled {
            reason: crate::controller::decide::Stall::InvalidSpec,
            message: token_secret::invalid_write_message(what, &s.message),
        };
    }
    Verdict::Waiting {
        reason: Waiting::Progressing,
        message: format!("{what}: {e}; retrying with backoff"),
        retry: true,
    }
}

/// The credentials Secret's allow-list of servers for its password, when it has one.
fn allow_list(secret: &Option<Secret>) -> Option<String> {
    secret
        .as_ref()
        .and_then(|s| s.metadata.annotations.as_ref())
        .and_then(|a| a.get(crate::binding::ANN_ALLOWED_URLS))
        .cloned()
}

/// The CA bundle as the spec asks for it: not needed, waited for, invalid, or read.
fn ca_input(ca_ref: Option<&crate::crd::CaSecretRef>, secret: Option<Secret>) -> Input<Vec<u8>> {
    match (ca_ref, secret) {
        (None, _) => Input::NotNeeded,
        (Some(r), None) => Input::Missing(format!(
            "waiting for the CA Secret {} (key {})",
            r.name, r.key
        )),
        (Some(r), Some(s)) => match s.data.unwrap_or_default().remove(&r.key) {
            None => Input::Invalid(format!("CA Secret {} has no key {:?}", r.name, r.key)),
            Some(pem) => Input::Ready(pem.0),
        },
    }
}

/// The credentials as the decision reads them, from the credentials Secret (or its absence).
fn credentials_input(
    cref: &crate::crd::CredentialsSecretRef,
    secret: Option<Secret>,
) -> Input<crate::credentials::Credentials> {
    match secret {
        None => Input::Missing(format!(
            "waiting for the credentials Secret {} (keys {}, {} and optionally {}); the operator \
             continues as soon as it exists",
            cref.name, cref.email_key, cref.password_key, cref.name_key
        )),
        Some(s) => match credentials::parse(&cref.name, &s.data.unwrap_or_default(), cref) {
            Ok(c) => Input::Ready(c),
            Err(e) => Input::Invalid(e.to_string()),
        },
    }
}
