//! Following the use of the token a rotation replaced. NetBird records when each token was last
//! used (`last_used`), and after a rotation the operator never uses the previous token again: its
//! `last_used` tells whether some consumer still holds it. Pure: what a listing of the user's tokens
//! says, when to look again, whether to retire the token before its grace period ends, and whether
//! to warn that a consumer has not moved.
//!
//! Times of use are compared with the server's own clock (the `Date` of the same answer), never the
//! operator's: a skewed clock cannot retire a token in use.

use std::time::Duration;

use jiff::Timestamp;

use crate::netbird::PersonalAccessToken;

/// Not more than one look a minute per instance (the operator's setting
/// `Settings::previous_use_interval`; tests shorten it).
pub const MIN_INTERVAL: Duration = Duration::from_secs(60);

/// While nothing changes, the interval doubles up to this.
pub const MAX_INTERVAL: Duration = Duration::from_secs(15 * 60);

/// How recent a use counts as "still in use" for the warning when early retirement is off
/// (`retireAfterUnused: 0s`); otherwise `retireAfterUnused` itself.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(15 * 60);

/// One look at the previous token's use.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// The previous token's id.
    pub token_id: String,
    /// When the operator looked (its own clock).
    pub at: Timestamp,
    /// NetBird still lists the previous token (a person may have deleted it).
    pub listed: bool,
    /// When NetBird last saw it used (the server's clock).
    pub last_used: Option<Timestamp>,
    /// How long nothing had used it since the token Secret changed, when looked at: from the later
    /// of its last use and the new token's creation to the answer's time, all by the server's
    /// clock.
    pub idle: Duration,
    /// Used after the new token was created: a consumer still on the old one.
    pub used_since_change: bool,
}

/// What the operator keeps between passes about one previous token.
#[derive(Debug, Clone, PartialEq)]
pub struct Watch {
    pub token_id: String,
    /// The last successful look, if any.
    pub seen: Option<Observation>,
    /// The token was used between the last two looks (or, at the first look, since the change).
    pub active: bool,
    /// The interval that led to `next`.
    pub interval: Duration,
    /// The next look is due then (the operator's clock).
    pub next: Timestamp,
}

/// What a listing of the user's tokens says about the previous token. `changed_at` is when the
/// token Secret changed by the operator's clock, used only when the new token is not listed;
/// `server_now` the answer's `Date` (the operator's `now` when it has none).
pub fn observe(
    tokens: &[PersonalAccessToken],
    previous_id: &str,
    current_id: Option<&str>,
    changed_at: Option<Timestamp>,
    server_now: Option<Timestamp>,
    now: Timestamp,
) -> Observation {
    let previous = tokens.iter().find(|t| t.id == previous_id);
    let changed_at = current_id
        .and_then(|id| tokens.iter().find(|t| t.id == id))
        .map(|t| t.created_at)
        .or(changed_at);
    let last_used = previous.and_then(|t| t.last_used);
    let server_now = server_now.unwrap_or(now);
    let quiet_since = match (last_used, changed_at) {
        (Some(u), Some(c)) => Some(u.max(c)),
        (u, c) => u.or(c),
    };
    let idle = quiet_since
        .map(|q| server_now.duration_since(q))
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or_default();
    Observation {
        token_id: previous_id.to_string(),
        at: now,
        listed: previous.is_some(),
        last_used,
        idle,
        used_since_change: match (last_used, changed_at) {
            (Some(u), Some(c)) => u > c,
            (Some(_), None) => true,
            (None, _) => false,
        },
    }
}

/// Whether a look is due for the previous token `previous_id`: the first one a minute after the
/// rotation, then as the watch says.
pub fn due(
    watch: Option<&Watch>,
    previous_id: &str,
    rotated_at: Option<Timestamp>,
    now: Timestamp,
    min: Duration,
) -> bool {
    match watch.filter(|w| w.token_id == previous_id) {
        Some(w) => now >= w.next,
        None => rotated_at.is_none_or(|at| now >= add(at, min)),
    }
}

/// The watch of a previous token not looked at yet: the first look `min` (a minute) after the
/// rotation, or at once when the rotation time is unknown.
pub fn first_watch(
    previous_id: &str,
    rotated_at: Option<Timestamp>,
    now: Timestamp,
    min: Duration,
) -> Watch {
    Watch {
        token_id: previous_id.to_string(),
        seen: None,
        active: false,
        interval: min,
        next: rotated_at.map_or(now, |at| add(at, min)),
    }
}

/// The next look to take, and when, after one at `now` that found `seen` (None: the look
/// failed). The interval doubles (up to [`MAX_INTERVAL`]) while the token stays as it was, used
/// between looks or not, and goes back to `min` (a minute) when that changes: a consumer that keeps
/// using the old token costs a look (and a status write of `previousTokenLastUsedAt`) every 15
/// minutes, not every minute. The next look never comes later than the moment the token could be
/// retired (if nothing uses it meanwhile) or the warning window opens, and never sooner than
/// `min`.
pub fn next_watch(
    before: Option<&Watch>,
    previous_id: &str,
    seen: Option<Observation>,
    now: Timestamp,
    retire_after: Duration,
    warning_from: Option<Timestamp>,
    min: Duration,
) -> Watch {
    let before = before.filter(|w| w.token_id == previous_id);
    let last = before.and_then(|w| w.seen.as_ref());
    let active = match (last, &seen) {
        (Some(old), Some(new)) => old.last_used != new.last_used,
        (None, Some(new)) => new.used_since_change,
        (_, None) => before.is_some_and(|w| w.active),
    };
    let interval = match before {
        Some(w) if last.is_some() && seen.is_some() && active == w.active => {
            (w.interval * 2).clamp(min, MAX_INTERVAL.max(min))
        }
        _ => min,
    };
    let mut next = add(now, interval);
    let soonest = add(now, min);
    if let Some(s) = &seen
        && !retire_after.is_zero()
        && s.idle < retire_after
    {
        next = next.min(add(now, retire_after - s.idle).max(soonest));
    }
    if let Some(at) = warning_from.filter(|at| *at > now) {
        next = next.min(at.max(soonest));
    }
    Watch {
        token_id: previous_id.to_string(),
        seen: seen.or_else(|| before.and_then(|w| w.seen.clone())),
        active,
        interval,
        next,
    }
}

/// Whether the look of this pass allows retiring the previous token now: early retirement is on,
/// and nothing used the token for `retire_after` since the token Secret changed (or NetBird no
/// longer lists it).
pub fn retire(seen: &Observation, retire_after: Duration) -> bool {
    !retire_after.is_zero() && (!seen.listed || seen.idle >= retire_after)
}

/// When the warning window opens: the last quarter of the time the previous token was given.
pub fn warning_from(rotated_at: Timestamp, delete_at: Timestamp) -> Timestamp {
    let given = rotated_at.duration_until(delete_at);
    delete_at.checked_sub(given / 4).unwrap_or(delete_at)
}

/// Whether a consumer still uses the previous token near the end of its grace period: less than a
/// quarter of it left, and the last look saw it used after the Secret changed, within `window` of
/// that look (the verdict of a look holds until the next one: a pass between looks does not turn
/// it off and on again).
pub fn still_in_use(
    seen: &Observation,
    now: Timestamp,
    rotated_at: Timestamp,
    delete_at: Timestamp,
    window: Duration,
) -> bool {
    now >= warning_from(rotated_at, delete_at)
        && now < delete_at
        && seen.listed
        && seen.used_since_change
        && seen.idle < window
}

/// The window of [`still_in_use`] for a `retireAfterUnused`.
pub fn window(retire_after: Duration) -> Duration {
    if retire_after.is_zero() {
        DEFAULT_WINDOW
    } else {
        retire_after
    }
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    jiff::SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn pat(id: &str, created: &str, used: Option<&str>) -> PersonalAccessToken {
        PersonalAccessToken {
            id: id.into(),
            name: format!("netbird-operator.ns.nb.{id}"),
            expiration_date: t("2027-01-01T00:00:00Z"),
            created_by: "u".into(),
            created_at: t(created),
            last_used: used.map(t),
        }
    }

    const MIN15: Duration = Duration::from_secs(15 * 60);

    fn due(w: Option<&Watch>, id: &str, rotated: Option<Timestamp>, now: Timestamp) -> bool {
        super::due(w, id, rotated, now, MIN_INTERVAL)
    }

    fn next_watch(
        before: Option<&Watch>,
        id: &str,
        seen: Option<Observation>,
        now: Timestamp,
        retire_after: Duration,
        warning_from: Option<Timestamp>,
    ) -> Watch {
        super::next_watch(
            before,
            id,
            seen,
            now,
            retire_after,
            warning_from,
            MIN_INTERVAL,
        )
    }

    #[test]
    fn idle_time_is_measured_by_the_servers_clock_from_the_later_of_use_and_change() {
        let tokens = [
            pat("old", "2026-12-01T00:00:00Z", Some("2026-12-04T10:05:00Z")),
            pat("new", "2026-12-04T10:00:00Z", Some("2026-12-04T10:29:00Z")),
        ];
        // the operator's clock is a day ahead: it plays no part
        let seen = observe(
            &tokens,
            "old",
            Some("new"),
            None,
            Some(t("2026-12-04T10:30:00Z")),
            t("2026-12-05T10:30:00Z"),
        );
        assert!(seen.listed && seen.used_since_change);
        assert_eq!(seen.idle, Duration::from_secs(25 * 60));
        assert!(retire(&seen, MIN15));
        assert!(!retire(&seen, Duration::from_secs(26 * 60)));
        assert!(!retire(&seen, Duration::ZERO), "0s: never early");
    }

    #[test]
    fn a_token_used_only_before_the_change_is_idle_since_the_change() {
        let tokens = [
            pat("old", "2026-12-01T00:00:00Z", Some("2026-12-04T09:59:00Z")),
            pat("new", "2026-12-04T10:00:00Z", None),
        ];
        let now = t("2026-12-04T10:10:00Z");
        let seen = observe(&tokens, "old", Some("new"), None, Some(now), now);
        assert!(!seen.used_since_change);
        assert_eq!(seen.idle, Duration::from_secs(600));
        assert!(
            !retire(&seen, MIN15),
            "the consumers had 10 minutes, not 15"
        );
        let never = observe(
            &[pat("old", "2026-12-01T00:00:00Z", None)],
            "old",
            Some("new"),
            Some(t("2026-12-04T10:00:00Z")),
            None,
            t("2026-12-04T10:20:00Z"),
        );
        assert!(
            retire(&never, MIN15),
            "the operator's record of the change stands in"
        );
    }

    #[test]
    fn a_token_no_longer_listed_is_retired() {
        let now = t("2026-12-04T10:01:00Z");
        let seen = observe(&[], "old", Some("new"), None, Some(now), now);
        assert!(!seen.listed);
        assert!(retire(&seen, MIN15));
    }

    #[test]
    fn looks_are_a_minute_apart_at_least_and_back_off_while_nothing_changes() {
        let rotated = t("2026-12-04T10:00:00Z");
        assert!(!due(None, "old", Some(rotated), t("2026-12-04T10:00:59Z")));
        assert!(due(None, "old", Some(rotated), t("2026-12-04T10:01:00Z")));
        let seen = |at: &str, used: &str| Observation {
            token_id: "old".into(),
            at: t(at),
            listed: true,
            last_used: Some(t(used)),
            idle: Duration::ZERO,
            used_since_change: true,
        };
        let far = Duration::from_secs(24 * 3600);
        let w1 = next_watch(
            None,
            "old",
            Some(seen("2026-12-04T10:01:00Z", "2026-12-04T10:00:30Z")),
            t("2026-12-04T10:01:00Z"),
            far,
            None,
        );
        assert_eq!(w1.interval, MIN_INTERVAL);
        let mut w = w1.clone();
        let mut intervals = vec![];
        for _ in 0..8 {
            let now = w.next;
            w = next_watch(
                Some(&w),
                "old",
                Some(seen(&now.to_string(), "2026-12-04T10:00:30Z")),
                now,
                far,
                None,
            );
            intervals.push(w.interval.as_secs() / 60);
        }
        // the first repeat is a change (used at first, not since): back to a minute, then doubling
        assert_eq!(intervals, [1, 2, 4, 8, 15, 15, 15, 15]);
        // a new use: back to a minute
        let now = w.next;
        let w = next_watch(
            Some(&w),
            "old",
            Some(seen(&now.to_string(), &now.to_string())),
            now,
            far,
            None,
        );
        assert_eq!(w.interval, MIN_INTERVAL);
        // and a consumer that keeps using it backs off too: a look every 15 minutes at most
        let mut w = w;
        let mut intervals = vec![];
        for _ in 0..5 {
            let now = w.next;
            w = next_watch(
                Some(&w),
                "old",
                Some(seen(&now.to_string(), &now.to_string())),
                now,
                far,
                None,
            );
            intervals.push(w.interval.as_secs() / 60);
        }
        assert_eq!(intervals, [2, 4, 8, 15, 15]);
        // another previous token starts over
        assert!(due(
            Some(&w),
            "other",
            Some(rotated),
            t("2026-12-04T10:02:00Z")
        ));
        assert!(!due(Some(&w), "old", Some(rotated), now));
    }

    #[test]
    fn the_next_look_comes_when_retirement_or_the_warning_may_be_due() {
        let now = t("2026-12-04T10:01:00Z");
        let seen = Observation {
            token_id: "old".into(),
            at: now,
            listed: true,
            last_used: None,
            idle: Duration::from_secs(60),
            used_since_change: false,
        };
        let w = next_watch(
            None,
            "old",
            Some(seen.clone()),
            now,
            Duration::from_secs(90),
            None,
        );
        assert_eq!(w.next, add(now, MIN_INTERVAL), "never sooner than a minute");
        let mut before = w.clone();
        before.interval = MAX_INTERVAL;
        before.next = now;
        let w = next_watch(Some(&before), "old", Some(seen.clone()), now, MIN15, None);
        assert_eq!(
            w.next,
            add(now, Duration::from_secs(14 * 60)),
            "when idle reaches 15m"
        );
        let opens = t("2026-12-04T10:05:00Z");
        let w = next_watch(Some(&before), "old", Some(seen), now, MIN15, Some(opens));
        assert_eq!(w.next, opens);
        // a failed look keeps what was seen and tries again in a minute
        let failed = next_watch(Some(&w), "old", None, opens, MIN15, None);
        assert_eq!(failed.seen, w.seen);
        assert_eq!(failed.interval, MIN_INTERVAL);
    }

    #[test]
    fn the_warning_needs_the_last_quarter_a_use_after_the_change_and_a_recent_one() {
        let rotated = t("2026-12-04T10:00:00Z");
        let delete_at = t("2026-12-05T10:00:00Z");
        assert_eq!(warning_from(rotated, delete_at), t("2026-12-05T04:00:00Z"));
        let seen = Observation {
            token_id: "old".into(),
            at: t("2026-12-05T05:00:00Z"),
            listed: true,
            last_used: Some(t("2026-12-05T04:59:00Z")),
            idle: Duration::from_secs(60),
            used_since_change: true,
        };
        let w = window(MIN15);
        assert!(still_in_use(&seen, seen.at, rotated, delete_at, w));
        assert!(!still_in_use(
            &seen,
            t("2026-12-05T03:59:00Z"),
            rotated,
            delete_at,
            w
        ));
        // a pass between looks keeps the last look's verdict; the deletion ends it
        assert!(still_in_use(
            &seen,
            t("2026-12-05T05:20:00Z"),
            rotated,
            delete_at,
            w
        ));
        assert!(!still_in_use(&seen, delete_at, rotated, delete_at, w));
        let long_unused = Observation {
            idle: MIN15,
            ..seen.clone()
        };
        assert!(!still_in_use(&long_unused, seen.at, rotated, delete_at, w));
        let before_change = Observation {
            used_since_change: false,
            ..seen.clone()
        };
        assert!(!still_in_use(
            &before_change,
            seen.at,
            rotated,
            delete_at,
            w
        ));
        assert_eq!(window(Duration::ZERO), DEFAULT_WINDOW);
    }
}
