//! Property: over random snapshot histories (incremental snapshots sharing
//! objects at random) and random policies, what `forget` sweeps (every key
//! on the target minus `snapshot::references` of the kept snapshots) holds
//! no object a kept snapshot needs, and every object only forgotten ones did.

use std::collections::HashSet;

use chrono::{DateTime, Duration, Utc};
use proptest::prelude::*;
use zonevault::config::Retention;
use zonevault::repository::snapshot::{self, Index, IndexObject};
use zonevault::retention;

fn index(n: usize, time: DateTime<Utc>, objects: &[u8]) -> Index {
    let id = format!("{}-{n:04x}", time.format("%Y%m%dT%H%M%SZ"));
    Index {
        format: 1,
        id: id.clone(),
        time,
        core: "core-ch-1".into(),
        zone: "ch".into(),
        tool_version: "test".into(),
        manifest: IndexObject {
            key: format!("core-ch-1/snapshots/{id}.manifest.age"),
            size: 1,
            data_key: None,
        },
        objects: objects
            .iter()
            .map(|o| IndexObject {
                key: format!("core-ch-1/objects/{o:02x}.tar.zst.age"),
                size: 1,
                data_key: None,
            })
            .collect(),
        units: objects.len(),
        plain_bytes: 0,
        stored_bytes: 0,
    }
}

fn policy() -> impl Strategy<Value = Retention> {
    let rule = || proptest::option::of(0u32..6);
    (
        rule(),
        rule(),
        rule(),
        rule(),
        rule(),
        rule(),
        proptest::option::of(1u64..2000),
    )
        .prop_map(
            |(last, hourly, daily, weekly, monthly, yearly, max_age_h)| Retention {
                keep_last: last,
                keep_hourly: hourly,
                keep_daily: daily,
                keep_weekly: weekly,
                keep_monthly: monthly,
                keep_yearly: yearly,
                max_age: max_age_h.map(|h| std::time::Duration::from_secs(h * 3600)),
            },
        )
}

/// Snapshots spread over up to 3 years (gaps in minutes), each holding a
/// few of 40 objects (so that snapshots share objects, as incremental ones do).
fn history() -> impl Strategy<Value = Vec<(i64, Vec<u8>)>> {
    proptest::collection::vec(
        (1i64..60 * 24 * 60, proptest::collection::vec(0u8..40, 0..8)),
        0..25,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn forget_keeps_every_reference_of_every_kept_snapshot(history in history(), policy in policy(), tz in prop::sample::select(vec![chrono_tz::Tz::UTC, chrono_tz::Tz::Europe__Zurich, chrono_tz::Tz::America__New_York])) {
        let now: DateTime<Utc> = "2027-06-30T12:00:00Z".parse().unwrap();
        let mut time = now - Duration::days(3 * 365);
        let indexes: Vec<Index> = history
            .iter()
            .enumerate()
            .map(|(n, (gap, objects))| {
                time += Duration::minutes(*gap);
                index(n, time, objects)
            })
            .collect();
        let times: Vec<(String, DateTime<Utc>)> = indexes.iter().map(|i| (i.id.clone(), i.time)).collect();
        let decisions = retention::plan(&times, &policy, tz, now);
        prop_assert_eq!(decisions.len(), indexes.len());
        let forgotten: HashSet<&str> = decisions.iter().filter(|d| !d.keep).map(|d| d.id.as_str()).collect();
        // the target holds every key of every snapshot; the sweep deletes
        // what the kept snapshots do not reference
        let kept = snapshot::references(indexes.iter().filter(|i| !forgotten.contains(i.id.as_str())));
        let on_target = snapshot::references(&indexes);
        let deleted: HashSet<&str> = on_target.iter().map(String::as_str).filter(|k| !kept.contains(*k)).collect();

        // nothing a kept snapshot needs is deleted: every kept snapshot still restores
        for i in indexes.iter().filter(|i| !forgotten.contains(i.id.as_str())) {
            for key in i.references() {
                prop_assert!(!deleted.contains(key), "kept snapshot {} loses {}", i.id, key);
            }
        }
        // and nothing that only forgotten snapshots held stays behind
        let kept_refs: HashSet<&str> = indexes.iter().filter(|i| !forgotten.contains(i.id.as_str())).flat_map(|i| i.references()).collect();
        for i in indexes.iter().filter(|i| forgotten.contains(i.id.as_str())) {
            for o in &i.objects {
                prop_assert!(kept_refs.contains(o.key.as_str()) || deleted.contains(o.key.as_str()));
            }
        }
        // max_age overrides every rule
        if let Some(max_age) = policy.max_age {
            let limit = now - Duration::from_std(max_age).unwrap();
            for d in &decisions {
                if d.time < limit {
                    prop_assert!(!d.keep);
                }
            }
        }
        // an empty policy keeps everything
        if policy == Retention::default() {
            prop_assert!(forgotten.is_empty());
        }
        // keep_last keeps the newest (unless too old)
        if let Some(n) = policy.keep_last {
            for d in decisions.iter().take(n as usize) {
                let too_old = policy.max_age.is_some_and(|a| d.time < now - Duration::from_std(a).unwrap());
                prop_assert!(d.keep || too_old);
            }
        }
    }
}
