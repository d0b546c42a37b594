//! Retention: which snapshots a zone's policy keeps, and why.
//!
//! A snapshot is kept if any rule keeps it, except that `max_age` removes
//! anything older, whatever the rules say. An empty policy keeps everything.
//!
//! - `keep_last = N`: the N newest snapshots.
//! - `keep_hourly/daily/weekly/monthly/yearly = N`: the newest snapshot of
//!   each of the last N periods *that have a snapshot* (as restic and borg
//!   count them), periods taken in the zone's timezone. Days, weeks (ISO,
//!   Monday first), months and years are calendar periods, so a day with a
//!   DST change lasts 23 or 25 hours; an hour is a real hour, so the hour
//!   repeated when clocks go back is two hours.
//! - `max_age`: a snapshot older than `now - max_age` is removed.
//!
//! Everything here is pure: the plan depends only on the snapshot times, the
//! policy, the timezone and `now`, which is what makes it testable as tables.

use std::time::Duration;

use chrono::{DateTime, Datelike, Offset, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use crate::config::Retention;

/// What the policy decides for one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub id: String,
    pub time: DateTime<Utc>,
    pub keep: bool,
    /// The rules that keep it (`last`, `hourly`, ...), or why it goes.
    pub reasons: Vec<String>,
}

/// The periods of the period rules, in the order they are listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Period {
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Period {
    fn name(self) -> &'static str {
        match self {
            Period::Hour => "hourly",
            Period::Day => "daily",
            Period::Week => "weekly",
            Period::Month => "monthly",
            Period::Year => "yearly",
        }
    }

    /// Which period `time` falls in, in `tz`.
    fn key(self, time: DateTime<Utc>, tz: Tz) -> (i32, u32, u32, i32) {
        let local = time.with_timezone(&tz);
        match self {
            // The UTC offset tells the two 02:00 hours of an autumn night apart.
            Period::Hour => (
                local.year(),
                local.ordinal(),
                local.hour(),
                local.offset().fix().local_minus_utc(),
            ),
            Period::Day => (local.year(), local.ordinal(), 0, 0),
            Period::Week => {
                let week = local.iso_week();
                (week.year(), week.week(), 0, 0)
            }
            Period::Month => (local.year(), local.month(), 0, 0),
            Period::Year => (local.year(), 0, 0, 0),
        }
    }

    /// How old, at the least, the newest snapshot of the n-th newest period
    /// is: n-2 whole periods of the shortest length they can have lie between
    /// it and now (the current period may have just begun).
    fn min_reach(self, n: u32) -> Duration {
        let hours = match self {
            Period::Hour => 1,
            Period::Day => 23,
            Period::Week => 7 * 24 - 1,
            Period::Month => 28 * 24,
            Period::Year => 365 * 24,
        };
        Duration::from_secs(3600 * hours * u64::from(n.saturating_sub(2)))
    }
}

fn rules(policy: &Retention) -> Vec<(Period, u32)> {
    [
        (Period::Hour, policy.keep_hourly),
        (Period::Day, policy.keep_daily),
        (Period::Week, policy.keep_weekly),
        (Period::Month, policy.keep_monthly),
        (Period::Year, policy.keep_yearly),
    ]
    .into_iter()
    .filter_map(|(p, n)| n.map(|n| (p, n)))
    .collect()
}

/// Whether the policy has any keep rule (`max_age` is not one).
fn has_keep_rule(policy: &Retention) -> bool {
    policy.keep_last.is_some() || !rules(policy).is_empty()
}

/// Decides for every snapshot `(id, time)`; the result is newest first.
pub fn plan(
    snapshots: &[(String, DateTime<Utc>)],
    policy: &Retention,
    tz: Tz,
    now: DateTime<Utc>,
) -> Vec<Decision> {
    let mut sorted: Vec<&(String, DateTime<Utc>)> = snapshots.iter().collect();
    // newest first; ids break ties (they sort by time too)
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    let mut decisions: Vec<Decision> = sorted
        .iter()
        .map(|(id, time)| Decision {
            id: id.clone(),
            time: *time,
            keep: false,
            reasons: Vec::new(),
        })
        .collect();

    if !has_keep_rule(policy) {
        for d in &mut decisions {
            d.keep = true;
            d.reasons.push("no keep rule: everything is kept".into());
        }
    }
    if let Some(n) = policy.keep_last {
        for d in decisions.iter_mut().take(n as usize) {
            d.keep = true;
            d.reasons.push("last".into());
        }
    }
    for (period, n) in rules(policy) {
        let mut seen = 0;
        let mut last_key = None;
        for d in &mut decisions {
            if seen == n {
                break;
            }
            let key = period.key(d.time, tz);
            if last_key != Some(key) {
                // newest first: the first snapshot met in a period is its newest
                last_key = Some(key);
                seen += 1;
                d.keep = true;
                d.reasons.push(period.name().into());
            }
        }
    }
    if let Some(max_age) = policy.max_age
        && let Ok(max_age) = chrono::Duration::from_std(max_age)
        && let Some(limit) = now.checked_sub_signed(max_age)
    {
        for d in &mut decisions {
            if d.time < limit {
                d.keep = false;
                d.reasons = vec![format!(
                    "older than max_age ({})",
                    humantime::format_duration(max_age.to_std().unwrap_or_default())
                )];
            }
        }
    }
    for d in &mut decisions {
        if !d.keep && d.reasons.is_empty() {
            d.reasons.push("no rule keeps it".into());
        }
    }
    decisions
}

/// Rules that `max_age` makes impossible to honour: each one reaches back
/// further than `max_age`, so its oldest snapshots are always removed.
pub fn never_honoured(policy: &Retention) -> Vec<String> {
    let Some(max_age) = policy.max_age else {
        return Vec::new();
    };
    rules(policy)
        .into_iter()
        .filter(|(period, n)| period.min_reach(*n) > max_age)
        .map(|(period, n)| {
            format!(
                "keep_{} = {n} reaches back further than max_age = {}: snapshots that rule would keep are removed",
                period.name(),
                humantime::format_duration(max_age)
            )
        })
        .collect()
}

/// The zone's retention timezone: the schedule's, else UTC.
pub fn timezone(zone: &crate::config::Zone) -> Tz {
    zone.schedule.as_ref().map_or(Tz::UTC, |s| s.timezone)
}

/// `time` in `tz`, for messages.
pub fn local(time: DateTime<Utc>, tz: Tz) -> String {
    tz.from_utc_datetime(&time.naive_utc())
        .format("%Y-%m-%d %H:%M %Z")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn policy(spec: &str) -> Retention {
        let mut p = Retention::default();
        for part in spec.split_whitespace() {
            let (k, v) = part.split_once('=').unwrap();
            match k {
                "last" => p.keep_last = Some(v.parse().unwrap()),
                "hourly" => p.keep_hourly = Some(v.parse().unwrap()),
                "daily" => p.keep_daily = Some(v.parse().unwrap()),
                "weekly" => p.keep_weekly = Some(v.parse().unwrap()),
                "monthly" => p.keep_monthly = Some(v.parse().unwrap()),
                "yearly" => p.keep_yearly = Some(v.parse().unwrap()),
                "max_age" => p.max_age = Some(humantime::parse_duration(v).unwrap()),
                other => panic!("unknown rule {other}"),
            }
        }
        p
    }

    /// Runs one table row: snapshots at `times` (ids s0, s1, ... in that
    /// order), returns the times kept, oldest first.
    fn kept(times: &[&str], spec: &str, tz: Tz, now: &str) -> Vec<String> {
        let snapshots: Vec<(String, DateTime<Utc>)> = times
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("s{i:03}"), at(t)))
            .collect();
        let mut kept: Vec<String> = plan(&snapshots, &policy(spec), tz, at(now))
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| d.time.format("%Y-%m-%dT%H:%M:%SZ").to_string())
            .collect();
        kept.reverse();
        kept
    }

    const NOW: &str = "2026-11-26T12:00:00Z";

    #[test]
    fn rules_as_a_table() {
        let days = [
            "2026-11-20T02:00:00Z",
            "2026-11-21T02:00:00Z",
            "2026-11-22T02:00:00Z",
            "2026-11-22T14:00:00Z",
            "2026-11-23T02:00:00Z",
            "2026-11-24T02:00:00Z",
            "2026-11-25T02:00:00Z",
            "2026-11-26T02:00:00Z",
        ];
        #[rustfmt::skip]
        let table: &[(&str, &[&str])] = &[
            // an empty policy keeps everything
            ("", &days),
            ("last=2", &["2026-11-25T02:00:00Z", "2026-11-26T02:00:00Z"]),
            ("last=0", &[]),
            // two on the 22nd: the newest of the day counts
            ("daily=6", &["2026-11-21T02:00:00Z", "2026-11-22T14:00:00Z", "2026-11-23T02:00:00Z",
                          "2026-11-24T02:00:00Z", "2026-11-25T02:00:00Z", "2026-11-26T02:00:00Z"]),
            // ISO weeks: Mon 23rd starts a week; the 20th..22nd are the week before
            ("weekly=2", &["2026-11-22T14:00:00Z", "2026-11-26T02:00:00Z"]),
            ("weekly=9", &["2026-11-22T14:00:00Z", "2026-11-26T02:00:00Z"]),
            ("monthly=1", &["2026-11-26T02:00:00Z"]),
            ("yearly=3", &["2026-11-26T02:00:00Z"]),
            // rules add up
            ("last=1 daily=2 weekly=2", &["2026-11-22T14:00:00Z", "2026-11-25T02:00:00Z", "2026-11-26T02:00:00Z"]),
            // max_age removes what rules keep
            ("last=8 max_age=3days", &["2026-11-24T02:00:00Z", "2026-11-25T02:00:00Z", "2026-11-26T02:00:00Z"]),
            ("max_age=1day", &["2026-11-26T02:00:00Z"]),
            ("yearly=10 max_age=1h", &[]),
        ];
        for (spec, expected) in table {
            assert_eq!(
                kept(&days, spec, Tz::UTC, NOW),
                *expected,
                "policy {spec:?}"
            );
        }
    }

    #[test]
    fn periods_are_taken_in_the_zones_timezone() {
        // 23:30 UTC on the 24th is already the 25th in Zurich (UTC+1)
        let times = ["2026-11-24T22:30:00Z", "2026-11-24T23:30:00Z"];
        assert_eq!(
            kept(&times, "daily=5", Tz::UTC, NOW),
            ["2026-11-24T23:30:00Z"]
        );
        assert_eq!(
            kept(&times, "daily=5", Tz::Europe__Zurich, NOW),
            ["2026-11-24T22:30:00Z", "2026-11-24T23:30:00Z"]
        );
        let times = ["2026-11-24T22:30:00Z", "2026-11-24T22:50:00Z"];
        assert_eq!(
            kept(&times, "daily=5", Tz::UTC, NOW),
            ["2026-11-24T22:50:00Z"]
        );
        // in Tokyo these are the 25th, both: one kept
        assert_eq!(
            kept(
                &["2026-11-24T16:00:00Z", "2026-11-25T14:00:00Z"],
                "daily=5",
                Tz::Asia__Tokyo,
                NOW
            ),
            ["2026-11-25T14:00:00Z"]
        );
        // but in UTC two days
        assert_eq!(
            kept(
                &["2026-11-24T16:00:00Z", "2026-11-25T14:00:00Z"],
                "daily=5",
                Tz::UTC,
                NOW
            )
            .len(),
            2
        );
    }

    #[test]
    fn dst_changes() {
        let zurich = Tz::Europe__Zurich;
        // 2026-10-25: clocks go back at 03:00 CEST → 02:00 CET. 02:30 happens
        // twice: 00:30Z (CEST) and 01:30Z (CET); two real hours.
        let autumn = ["2026-10-25T00:30:00Z", "2026-10-25T01:30:00Z"];
        assert_eq!(kept(&autumn, "hourly=5", zurich, NOW), autumn);
        // one calendar day of 25 hours: one daily snapshot
        let day = ["2026-10-24T22:10:00Z", "2026-10-25T22:50:00Z"];
        assert_eq!(kept(&day, "daily=1", zurich, NOW), ["2026-10-25T22:50:00Z"]);
        // 2026-03-29: 02:00 CET → 03:00 CEST; 00:59Z is 01:59 CET, 01:00Z is
        // 03:00 CEST: different hours, same 23-hour day
        let spring = ["2026-03-29T00:59:00Z", "2026-03-29T01:00:00Z"];
        assert_eq!(kept(&spring, "hourly=5", zurich, NOW), spring);
        assert_eq!(
            kept(&spring, "daily=5", zurich, NOW),
            ["2026-03-29T01:00:00Z"]
        );
        // Zurich's day of the 29th starts at 23:00Z on the 28th
        assert_eq!(
            kept(
                &["2026-03-28T22:59:00Z", "2026-03-28T23:00:00Z"],
                "daily=5",
                zurich,
                NOW
            )
            .len(),
            2
        );
    }

    #[test]
    fn leap_years() {
        // 2028 is a leap year: Feb 29 is its own day, and Dec 31 is day 366
        let times = [
            "2028-02-28T12:00:00Z",
            "2028-02-29T12:00:00Z",
            "2028-03-01T12:00:00Z",
        ];
        assert_eq!(
            kept(&times, "daily=3", Tz::UTC, "2028-03-02T00:00:00Z"),
            times
        );
        assert_eq!(
            kept(&times, "monthly=5", Tz::UTC, "2028-03-02T00:00:00Z"),
            ["2028-02-29T12:00:00Z", "2028-03-01T12:00:00Z"]
        );
        let new_year = ["2028-12-31T12:00:00Z", "2029-01-01T12:00:00Z"];
        assert_eq!(
            kept(&new_year, "yearly=2", Tz::UTC, "2029-01-02T00:00:00Z"),
            new_year
        );
        assert_eq!(
            kept(&new_year, "daily=2", Tz::UTC, "2029-01-02T00:00:00Z"),
            new_year
        );
        // ISO week 52 of 2028 runs into 2029? Dec 31 2028 is a Sunday (week 52),
        // Jan 1 2029 a Monday (week 1 of 2029): two weeks
        assert_eq!(
            kept(&new_year, "weekly=2", Tz::UTC, "2029-01-02T00:00:00Z"),
            new_year
        );
        // max_age counts real time across Feb 29
        assert_eq!(
            kept(
                &["2028-02-28T00:00:00Z", "2028-03-01T00:00:00Z"],
                "max_age=2days",
                Tz::UTC,
                "2028-03-02T00:00:00Z"
            ),
            ["2028-03-01T00:00:00Z"]
        );
    }

    #[test]
    fn decisions_say_why() {
        let snapshots = vec![
            ("a".to_string(), at("2026-11-25T02:00:00Z")),
            ("b".to_string(), at("2026-11-26T02:00:00Z")),
            ("old".to_string(), at("2016-01-01T00:00:00Z")),
        ];
        let d = plan(
            &snapshots,
            &policy("last=1 daily=1 yearly=5 max_age=5y"),
            Tz::UTC,
            at(NOW),
        );
        assert_eq!(d[0].id, "b");
        assert_eq!(d[0].reasons, ["last", "daily", "yearly"]);
        assert!(!d[1].keep);
        assert_eq!(d[1].reasons, ["no rule keeps it"]);
        assert!(!d[2].keep);
        assert!(
            d[2].reasons[0].starts_with("older than max_age"),
            "{:?}",
            d[2]
        );
    }

    #[test]
    fn rules_that_max_age_defeats_are_named() {
        assert!(
            never_honoured(&policy("daily=7 weekly=4 monthly=12 yearly=2 max_age=10y")).is_empty()
        );
        assert!(never_honoured(&policy("yearly=5")).is_empty());
        let w = never_honoured(&policy("last=100 daily=7 yearly=5 max_age=1y"));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("keep_yearly = 5"), "{w:?}");
        let w = never_honoured(&policy("daily=30 monthly=12 max_age=14days"));
        assert_eq!(w.len(), 2, "{w:?}");
        // 13 months can fit in a year (Jan 31 last year to Jan 1 this year);
        // 16 never can (14 whole months of at least 28 days between)
        assert!(never_honoured(&policy("monthly=13 max_age=1y")).is_empty());
        assert_eq!(never_honoured(&policy("monthly=16 max_age=1y")).len(), 1);
        // two days fit in 12 hours (23:59 and 00:01)
        assert!(never_honoured(&policy("daily=2 max_age=12h")).is_empty());
        assert_eq!(never_honoured(&policy("daily=3 max_age=12h")).len(), 1);
        assert!(never_honoured(&policy("yearly=2 max_age=1y")).is_empty());
    }
}
