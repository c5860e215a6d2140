//! One pass for one instance: what it knows before its first step ([`PassInputs`]), reading the
//! world and driving the steps the decision asks for until a verdict ([`PassOutcome`]), the
//! initial status of a slow first pass, and following the previous token's use; then the status,
//! the Events, the metrics and the schedule of the next pass.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span};

use super::decide::{self, Facts, Findings, Verdict};
use super::publish::{observe, publish_events, write_status};
use super::{Context, Error, cleanup, previous_use, publish, report, schedule, secrets, steps};
use crate::crd::NetbirdInstance;
use crate::metrics::ResultLabels;

/// One pass for one NetbirdInstance.
pub async fn reconcile(nbi: Arc<NetbirdInstance>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = nbi.namespace().ok_or(Error::NoNamespace)?;
    let name = nbi.name_any();
    let generation = nbi.metadata.generation;
    let span = info_span!("reconcile", namespace = %ns, name = %name, generation);
    async move {
        let action = pass(&nbi, &ctx, &ns).await?;
        ctx.metrics
            .reconciles
            .get_or_create(&ResultLabels { result: "ok" })
            .inc();
        Ok(action)
    }
    .instrument(span)
    .await
}

async fn pass(nbi: &NetbirdInstance, ctx: &Context, ns: &str) -> Result<Action, Error> {
    let newer = ctx.memory.newer_own_status(nbi);
    let nbi = newer.as_ref().unwrap_or(nbi);
    let name = nbi.name_any();
    let uid = nbi.uid().unwrap_or_default();
    let api: Api<NetbirdInstance> = Api::namespaced(ctx.client.clone(), ns);
    let secrets = secrets::Secrets::new(ctx.client.clone(), ns, &ctx.secret_cache);
    let generation = nbi.metadata.generation;
    let started = ctx.now();

    ctx.memory.remember_key(&uid, ns, &name);
    if nbi.metadata.deletion_timestamp.is_some() {
        let attempt = ctx.memory.delete_attempt(&uid);
        return cleanup::on_delete(nbi, ctx, &api, &secrets, attempt).await;
    }
    // the pass goes on after adding the finalizer: what it reads next does not depend on it
    cleanup::ensure_finalizer(nbi, &api).await?;
    let (work, initial_rv) = first_status_if_slow(
        nbi,
        ctx,
        &api,
        started,
        read_and_drive(nbi, ctx, &secrets, started),
    )
    .await;
    // the pass's own failure first: it is the cause when both failed
    let work = work?;
    let initial_rv = initial_rv?;
    let (mut world, pass_inputs, outcome) = match work {
        Ok(done) => done,
        Err(wait) => return Ok(wait),
    };
    let (verdict, findings) = (&outcome.verdict, &outcome.findings);
    let watch = ctx.memory.previous_use_watch(&uid);
    let report_input = report::ReportInput {
        generation,
        previous: nbi.status.as_ref(),
        verdict,
        findings,
        token_secret: &world.token_secret,
        secret_name: &pass_inputs.secret_name,
        credentials_changed: outcome.credentials_changed,
        credentials_gone: matches!(world.credentials, decide::Input::Missing(_)),
        version_check_enabled: nbi.spec.version_check.enabled,
        rotation_enabled: nbi.spec.token.rotation.enabled,
        now: ctx.now(),
        verify_interval: pass_inputs.interval,
        previous_use: watch.as_ref().and_then(|w| w.seen.as_ref()),
        retire_after: nbi.spec.token.rotation.retire_after(),
    };
    let status = report::status(&report_input);
    let in_use = report::previous_still_in_use(&report_input);
    let previous = nbi.status.clone();
    if previous.as_ref() != Some(&status) {
        write_new_status(nbi, ctx, &api, &status, initial_rv, &world, &pass_inputs).await?;
    }
    publish_events(nbi, ctx, previous.as_ref(), &status, verdict, findings).await;
    steps::record_credentials_check(nbi, &secrets, &mut world).await;
    observe(nbi, ctx, ns, &status, &world, verdict, in_use);

    Ok(schedule::schedule(
        nbi,
        ctx,
        &pass_inputs,
        &outcome,
        &status,
        &world,
    ))
}

/// Writes the new status and remembers it; a failed write schedules the retry with backoff.
async fn write_new_status(
    nbi: &NetbirdInstance,
    ctx: &Context,
    api: &Api<NetbirdInstance>,
    status: &crate::crd::NetbirdInstanceStatus,
    initial_rv: Option<String>,
    world: &steps::World,
    pass_inputs: &PassInputs,
) -> Result<(), Error> {
    let uid = &pass_inputs.uid;
    let superseded = [nbi.metadata.resource_version.clone(), initial_rv]
        .into_iter()
        .flatten()
        .collect();
    if let Err(e) = write_status(api, &nbi.name_any(), status).await {
        // the pass is retried with backoff (error_policy); one woken sooner by an event that
        // changed nothing (a Secret write of this pass) waits for it too, instead of calling
        // NetBird and failing the same write again
        let after = ctx.memory.next_backoff(uid, ctx.settings.max_backoff);
        ctx.memory.schedule_retry(
            uid,
            Some(after),
            world.inputs_digest(pass_inputs.generation),
        );
        return Err(e);
    }
    ctx.memory
        .remember_own_status(uid, superseded, status.clone());
    Ok(())
}

/// Reads the world and drives the steps. `Err(action)`: a retry is already scheduled and nothing
/// this pass depends on changed, so it does nothing.
async fn read_and_drive(
    nbi: &NetbirdInstance,
    ctx: &Context,
    secrets: &secrets::Secrets<'_>,
    started: jiff::Timestamp,
) -> Result<Result<(steps::World, PassInputs, PassOutcome), Action>, Error> {
    let pass_inputs = PassInputs::new(nbi, started, &ctx.settings.refused_secret_key_prefixes);
    let mut world = steps::World::read(nbi, secrets, ctx).await?;
    if let Some(left) = ctx.memory.retry_pending(
        &pass_inputs.uid,
        &world.inputs_digest(pass_inputs.generation),
    ) {
        // woken by an event that changed nothing this pass depends on (typically its own status
        // write): the retry stays at its time, so a failing server is not called in a loop
        tracing::debug!(retry_in = ?left, "retry already scheduled and nothing changed");
        return Ok(Err(if left >= schedule::STALLED_UNTIL_CHANGED / 2 {
            Action::await_change()
        } else {
            Action::requeue(left)
        }));
    }
    let outcome = drive(nbi, ctx, secrets, &mut world, &pass_inputs).await?;
    Ok(Ok((world, pass_inputs, outcome)))
}

/// How long an instance's first pass may take before it writes the initial status (kstatus:
/// observedGeneration, and Ready Unknown) while it goes on; a first pass that ends sooner writes
/// its outcome only, one status write instead of two.
const INITIAL_STATUS_AFTER: Duration = Duration::from_secs(1);

/// Runs `work`. On an instance's first pass that takes longer than [`INITIAL_STATUS_AFTER`], writes
/// the initial status meanwhile and waits for that write to end before returning, so the pass's
/// outcome is written after it, never before; a first pass that fails sooner writes it when it
/// fails (the pass then writes no outcome, and the instance must not look done to kstatus).
/// Returns the work's result and the resourceVersion of the initial write, if any (see
/// `InstanceMemory::own_status`).
async fn first_status_if_slow<T>(
    nbi: &NetbirdInstance,
    ctx: &Context,
    api: &Api<NetbirdInstance>,
    started: jiff::Timestamp,
    work: impl std::future::Future<Output = Result<T, Error>>,
) -> (Result<T, Error>, Result<Option<String>, Error>) {
    let first = nbi
        .status
        .as_ref()
        .and_then(|s| s.observed_generation)
        .is_none()
        && !nbi.spec.suspend;
    if !first {
        return (work.await, Ok(None));
    }
    let gate = ctx.memory.side_status(&nbi.uid().unwrap_or_default());
    *gate.lock().await = false;
    let write_initial = || async {
        // a token held in memory already said so: that message stays (see report_storing_token)
        let urgent_tried = gate.lock().await;
        if *urgent_tried {
            return Ok(None);
        }
        let status = report::initial(nbi.metadata.generation, started);
        write_status(api, &nbi.name_any(), &status).await
    };
    let done = CancellationToken::new();
    let initial = async {
        tokio::select! {
            () = tokio::time::sleep(INITIAL_STATUS_AFTER) => Some(write_initial().await),
            () = done.cancelled() => None,
        }
    };
    let work = async {
        let out = work.await;
        done.cancel();
        out
    };
    match futures::join!(work, initial) {
        (Err(e), None) => (Err(e), write_initial().await),
        (out, written) => (out, written.unwrap_or(Ok(None))),
    }
}

/// What a pass knows before its first step and keeps for all of them.
pub(super) struct PassInputs {
    pub(super) started: jiff::Timestamp,
    pub(super) generation: Option<i64>,
    pub(super) uid: String,
    pub(super) interval: Duration,
    version_due: bool,
    setup_done_before: bool,
    secret_name: String,
    spec_problem: Option<String>,
}

impl PassInputs {
    fn new(nbi: &NetbirdInstance, started: jiff::Timestamp, refused_keys: &[String]) -> Self {
        let interval = nbi.version_interval();
        PassInputs {
            started,
            generation: nbi.metadata.generation,
            uid: nbi.uid().unwrap_or_default(),
            interval,
            version_due: nbi.spec.version_check.enabled
                && schedule::version_due(nbi, started, interval),
            setup_done_before: nbi
                .status
                .as_ref()
                .and_then(|s| s.setup.as_ref())
                .is_some_and(|s| s.state == crate::crd::SetupState::Completed),
            secret_name: nbi.token_secret_name(),
            spec_problem: nbi
                .spec
                .problem()
                .or_else(|| nbi.spec.refused_secret_key(refused_keys)),
        }
    }

    /// The facts the decision reads, as they stand.
    #[allow(clippy::too_many_arguments)]
    fn facts<'a>(
        &'a self,
        nbi: &'a NetbirdInstance,
        world: &'a steps::World,
        findings: &'a Findings,
        credentials_changed: bool,
        setup_server_errors: u32,
        previous_use_due: bool,
        now: jiff::Timestamp,
    ) -> Facts<'a> {
        Facts {
            generation: self.generation.unwrap_or_default(),
            credentials_unchanged: !credentials_changed,
            suspended: nbi.spec.suspend,
            spec_problem: self.spec_problem.as_deref(),
            credentials: &world.credentials,
            ca: &world.ca,
            token_secret: &world.token_secret,
            secret_metadata_in_sync: world.metadata_in_sync(nbi),
            setup_done_before: self.setup_done_before,
            setup_server_errors,
            version_due: self.version_due,
            rotation_enabled: nbi.spec.token.rotation.enabled,
            service_user: nbi
                .spec
                .token
                .service_user
                .as_ref()
                .map(|s| s.name.as_str()),
            retire_after_unused: nbi.spec.token.rotation.retire_after(),
            previous_use_due,
            now,
            findings,
            allowed_servers: world.allowed_servers.as_deref(),
            secret_name: &self.secret_name,
            secret_key: &nbi.spec.token.secret_key,
            management_url: &nbi.spec.management_url,
            insecure_skip_verify: nbi
                .spec
                .tls
                .as_ref()
                .is_some_and(|t| t.insecure_skip_verify),
        }
    }

    /// The key of a cached verification: it holds for this token, this spec and this server only.
    fn verification_key(&self, nbi: &NetbirdInstance, token: &secrecy::SecretString) -> [u8; 32] {
        digest(&format!(
            "{}\n{}\n{}",
            self.generation.unwrap_or_default(),
            crate::binding::normalize(&nbi.spec.management_url),
            token.expose_secret()
        ))
    }
}

/// What the steps of a pass came to.
pub(super) struct PassOutcome {
    pub(super) verdict: Verdict,
    pub(super) findings: Findings,
    credentials_changed: bool,
}

/// What a step says at once through its pass (see [`steps::UrgentReport`]).
struct Urgent<'a> {
    ctx: &'a Context,
    nbi: &'a NetbirdInstance,
}

impl steps::UrgentReport for Urgent<'_> {
    fn storing_token(&self, message: String) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move { publish::storing_token(self.ctx, self.nbi, &message).await })
    }
}

/// Asks the decision for the next step and does it, until the decision is a verdict.
async fn drive(
    nbi: &NetbirdInstance,
    ctx: &Context,
    secrets: &secrets::Secrets<'_>,
    world: &mut steps::World,
    pass_inputs: &PassInputs,
) -> Result<PassOutcome, Error> {
    let driver = Driver {
        nbi,
        ctx,
        secrets,
        pass_inputs,
    };
    let uid = &pass_inputs.uid;
    let (mut findings, mut credentials_changed) = match driver.prelude(world).await {
        ControlFlow::Continue(start) => start,
        ControlFlow::Break(outcome) => return Ok(outcome),
    };
    let watch = ctx.memory.previous_use_watch(uid);
    let verdict = driver
        .until_verdict(
            world,
            &mut findings,
            &mut credentials_changed,
            watch.as_ref(),
        )
        .await;
    // what the steps found out is remembered however the pass ends: a look at the previous
    // token's use followed by a failed read of a Secret is not made again at once (found by the
    // history explorer: seed 3, history 2161 of 5000, and seed 6, history 307)
    driver.remember_after_steps(world, watch, &findings);
    let verdict = verdict?;
    if findings.claimed {
        // the claim recorded the fingerprint of the credentials in use
        credentials_changed = steps::credentials_changed(nbi, ctx, world).await;
    }
    Ok(PassOutcome {
        verdict,
        findings,
        credentials_changed,
    })
}

/// What a pass drives its steps with: the instance, the context, the Secrets, its inputs.
#[derive(Clone, Copy)]
struct Driver<'a, 's> {
    nbi: &'a NetbirdInstance,
    ctx: &'a Context,
    secrets: &'a secrets::Secrets<'s>,
    pass_inputs: &'a PassInputs,
}

impl Driver<'_, '_> {
    /// Before the first decision: findings, credentials check, held write (`Break`: its verdict).
    async fn prelude(self, world: &mut steps::World) -> ControlFlow<PassOutcome, (Findings, bool)> {
        let Driver {
            nbi,
            ctx,
            secrets,
            pass_inputs,
        } = self;
        let uid = &pass_inputs.uid;
        let mut findings = Findings::default();
        if let Some(token) = world.token()
            && let Some(v) = ctx.memory.cached_verification(
                uid,
                &pass_inputs.verification_key(nbi, token),
                pass_inputs.interval,
                pass_inputs.started,
            )
        {
            findings.verify = Some(Ok(v));
        }
        let credentials_changed = steps::credentials_changed(nbi, ctx, world).await;
        // a token write an earlier pass could not make comes first
        if let Some(held) = ctx.memory.take_held_write(uid)
            && let Err(verdict) = steps::store_held(ctx, nbi, secrets, world, held).await
        {
            return ControlFlow::Break(PassOutcome {
                verdict,
                findings,
                credentials_changed,
            });
        }
        ControlFlow::Continue((findings, credentials_changed))
    }

    /// Decides and does the next step until a verdict (Progressing after 16 steps).
    async fn until_verdict(
        self,
        world: &mut steps::World,
        findings: &mut Findings,
        credentials_changed: &mut bool,
        watch: Option<&previous_use::Watch>,
    ) -> Result<Verdict, Error> {
        let Driver {
            nbi,
            ctx,
            secrets,
            pass_inputs,
        } = self;
        let (mut read_fresh_for_setup, mut read_fresh_for_deletion) = (false, false);
        for _ in 0..16 {
            let now = ctx.now();
            let previous_use_due = previous_use_due(ctx, world, watch, now);
            // counted for the credentials as this pass last read them: setup reads them fresh
            // before it calls, and a watch that delivers the same change later must find the
            // count there (found by the history explorer: a fourth try after a late watch event)
            let setup_server_errors = ctx
                .memory
                .setup_server_errors(&pass_inputs.uid, &world.setup_key(pass_inputs.generation));
            let facts = pass_inputs.facts(
                nbi,
                world,
                findings,
                *credentials_changed,
                setup_server_errors,
                previous_use_due,
                now,
            );
            let step = decide::decide(&facts);
            tracing::debug!(?step, "decided");
            let step = match step {
                ControlFlow::Break(v) => {
                    // a verdict never rests on an absence only the watch reported: read again
                    // first
                    if world.confirm(nbi, secrets, ctx).await? {
                        *credentials_changed = steps::credentials_changed(nbi, ctx, world).await;
                        // the world read anew holds the credentials as the watch has them: the
                        // way to setup reads them fresh again (found by the history explorer:
                        // seed 2, history 341, the password sent past an allow-list the fresh
                        // read had seen, after a confirmation read the watch's older copy)
                        (read_fresh_for_setup, read_fresh_for_deletion) = (false, false);
                        continue;
                    }
                    return Ok(v);
                }
                ControlFlow::Continue(step) => step,
            };
            // the password goes only where the credentials Secret allows: the way to setup (the
            // instance check, the claim that records the credentials' fingerprint, the call) is
            // decided again on the credentials Secret as the apiserver has it now, not as a
            // lagging watch cache may (an allow-list just added would otherwise be missed, and a
            // refusal recorded for the fresh credentials would look out of date; found by the
            // history explorer)
            if matches!(
                step,
                decide::Step::CheckInstance | decide::Step::ClaimSecret | decide::Step::Setup
            ) && !read_fresh_for_setup
            {
                read_fresh_for_setup = true;
                world.refresh_credentials(nbi, secrets).await?;
                *credentials_changed = steps::credentials_changed(nbi, ctx, world).await;
                continue;
            }
            // a replaced token is deleted on the token Secret as the apiserver has it now: when a
            // person changed it behind a lagging watch, what this pass found out about the token
            // it read (verified, listed, looked at) is about another token
            if matches!(
                step,
                decide::Step::DeletePreviousToken | decide::Step::RetirePreviousToken
            ) && !read_fresh_for_deletion
            {
                read_fresh_for_deletion = true;
                if world.confirm_token_secret(nbi, secrets, ctx).await? {
                    findings.forget_token_findings();
                    *credentials_changed = steps::credentials_changed(nbi, ctx, world).await;
                    continue;
                }
            }
            let urgent = Urgent { ctx, nbi };
            if let Err(v) = steps::run(step, nbi, ctx, secrets, world, findings, &urgent).await {
                return Ok(v);
            }
            self.remember_verification(world, findings);
        }
        Ok(Verdict::Waiting {
            reason: decide::Waiting::Progressing,
            message: "the pass took more steps than expected; continuing in the next pass".into(),
            retry: true,
        })
    }

    /// After a step: a successful verification of the token is remembered for the next passes.
    fn remember_verification(self, world: &steps::World, findings: &Findings) {
        if let Some(Ok(v)) = &findings.verify
            && let Some(token) = world.token()
        {
            self.ctx.memory.remember_verification(
                &self.pass_inputs.uid,
                self.pass_inputs.verification_key(self.nbi, token),
                v,
            );
        }
    }

    /// After the last step: forgets a failed verification, counts setup errors, moves the watch.
    fn remember_after_steps(
        self,
        world: &steps::World,
        watch: Option<previous_use::Watch>,
        findings: &Findings,
    ) {
        let (ctx, uid) = (self.ctx, &self.pass_inputs.uid);
        if matches!(&findings.verify, Some(Err(_))) {
            ctx.memory.forget_verification(uid);
        }
        // a server error of setup counts towards giving up on it (see decide's
        // SETUP_SERVER_ERRORS_LIMIT); any other answer starts the count again
        if let Some(decide::SetupOutcome::Failed(e)) = &findings.setup {
            ctx.memory.count_setup_server_error(
                uid,
                world.setup_key(self.pass_inputs.generation),
                matches!(e.status(), Some(500..=599)),
            );
        }
        ctx.memory.set_previous_use_watch(
            uid,
            follow_previous_use(self.nbi, ctx, world, watch, findings),
        );
    }
}

/// Whether the previous token's use is due for a look now (a followable previous token only).
fn previous_use_due(
    ctx: &Context,
    world: &steps::World,
    watch: Option<&previous_use::Watch>,
    now: jiff::Timestamp,
) -> bool {
    world.token_secret.owned().is_some_and(|s| {
        s.previous_use_followable()
            && previous_use::due(
                watch,
                s.annotation(crate::token_secret::ANN_PREVIOUS_TOKEN_ID)
                    .unwrap_or_default(),
                s.rotated_at(),
                now,
                ctx.settings.previous_use_interval,
            )
    })
}

/// What the passes keep about the previous token's use after this one: the watch moved on by this
/// pass's look (a failed look tries again in a minute), kept while a followable previous token is
/// pending, dropped once it is gone.
fn follow_previous_use(
    nbi: &NetbirdInstance,
    ctx: &Context,
    world: &steps::World,
    before: Option<previous_use::Watch>,
    findings: &Findings,
) -> Option<previous_use::Watch> {
    let s = world
        .token_secret
        .owned()
        .filter(|s| s.previous_use_followable())?;
    let previous = s.annotation(crate::token_secret::ANN_PREVIOUS_TOKEN_ID)?;
    let min = ctx.settings.previous_use_interval;
    let Some(look) = &findings.previous_use else {
        // the first look is scheduled a minute after the rotation
        return before.filter(|w| w.token_id == previous).or_else(|| {
            Some(previous_use::first_watch(
                previous,
                s.rotated_at(),
                ctx.now(),
                min,
            ))
        });
    };
    let warning_from = s
        .rotated_at()
        .zip(s.previous_delete_at())
        .map(|(rotated, delete_at)| previous_use::warning_from(rotated, delete_at));
    Some(previous_use::next_watch(
        before.as_ref(),
        previous,
        look.as_ref().ok().cloned(),
        ctx.now(),
        nbi.spec.token.rotation.retire_after(),
        warning_from,
        min,
    ))
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}
