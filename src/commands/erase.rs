//! `zonevault erase`: users out of every backup of this core, provably.
//!
//! From the audit log (every object ever written for the user is on record,
//! from the intent of its write) and the local state, on every target:
//!
//! 1. the user's data key and unit state are dropped from the state dir
//!    first, so that no later backup encrypts to a key about to be shredded;
//! 2. their key objects are deleted (crypto-shredding: every copy of their
//!    units, wherever it is, is unreadable from then on);
//! 3. their unit objects are deleted; in a pack that also holds other
//!    users' units, their range is overwritten with zeros (same size, so
//!    every other unit stays where its manifest says);
//! 4. each of those is confirmed by reading back (a HEAD that finds
//!    nothing, a range that reads as zeros): a server's "200" is not proof;
//! 5. an entry goes to the erasure ledger on every target
//!    ([`crate::repository::erasures`]), which restores honour, and one
//!    `user_erased` record per user says what was shredded, deleted,
//!    scrubbed, or could not be done and why.
//!
//! Idempotent: a run that was killed is finished by the next one, which
//! finds on record what the first did and confirms it.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::audit::query::{self, Fate, Holding};
use crate::audit::{AuditLog, Erased, Event, NotErased, ObjectKind, UserRange};
use crate::config::{Config, Target};
use crate::datakeys::Identity;
use crate::datakeys::Keys;
use crate::error::{Error, Result};
use crate::repository::erasures;
use crate::residency::{Contents, Writable};
use crate::storage::{ReadBackend, s3::S3Store};

use super::session::Session;

/// What to erase.
#[derive(Debug, Clone)]
pub struct Options {
    pub users: Vec<String>,
    pub reason: String,
    /// Show the plan; change nothing.
    pub dry_run: bool,
    /// Wait for another run of this core to end (else fail as busy).
    pub wait: bool,
    /// `--all-cores --identity FILE`: also every other core's backups of
    /// the users, found in their manifests (decrypted with this identity).
    pub all_cores: Option<std::path::PathBuf>,
    pub cancel: CancellationToken,
}

/// The default `--reason`.
pub const DEFAULT_REASON: &str = "erasure requested (GDPR art. 17)";

/// What an erasure did (or, dry, would do).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub core: String,
    pub zone: String,
    pub dry_run: bool,
    pub users: Vec<UserOutcome>,
}

/// One user's erasure.
#[derive(Debug, Clone, Serialize)]
pub struct UserOutcome {
    pub user: String,
    /// Whether any backup of this core held the user.
    pub held: bool,
    /// Key objects deleted, confirmed absent.
    pub shredded: Vec<Erased>,
    /// Unit objects deleted, confirmed absent.
    pub deleted: Vec<Erased>,
    /// Packs whose range of the user's unit now reads as zeros.
    pub scrubbed: Vec<Erased>,
    /// What could not be done, and why.
    pub pending: Vec<NotErased>,
    /// The steps, for `--dry-run` (empty otherwise).
    pub plan: Vec<Step>,
}

/// One step of an erasure.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub target: String,
    pub key: String,
    pub action: &'static str,
}

impl Report {
    /// The error the erasure ends with when something is pending (exit 1).
    pub fn failure(&self) -> Option<Error> {
        let pending: Vec<String> = self
            .users
            .iter()
            .flat_map(|u| {
                u.pending.iter().map(move |p| {
                    format!("{}: {} on target {}: {}", u.user, p.key, p.target, p.reason)
                })
            })
            .collect();
        (!pending.is_empty() && !self.dry_run).then(|| {
            Error::failed(format!(
                "the erasure is incomplete: {} (run `zonevault erase` again once that is resolved)",
                pending.join("; ")
            ))
        })
    }
}

/// Checks the user ids given (exit 2 on a bad one).
pub fn check_users(users: &[String]) -> Result<()> {
    if users.is_empty() {
        return Err(Error::Usage(
            "erase needs at least one --user ID".to_string(),
        ));
    }
    if let Some(bad) = users.iter().find(|u| !crate::units::is_valid_user_id(u)) {
        return Err(Error::Usage(format!(
            "{bad:?} is not a user id (at least 3 characters: letters, digits, '.', '_', '-'; not starting with '.')"
        )));
    }
    Ok(())
}

/// What to do with one object.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    /// Delete a key object (then confirm it is gone).
    Shred,
    /// Delete a unit object that holds nothing readable but this user's
    /// units (then confirm).
    Delete,
    /// Overwrite the user's ranges of a pack with zeros (then confirm);
    /// the pack then holds `others` and `packed` readable units.
    Scrub {
        ranges: Vec<(u64, u64)>,
        bytes: u64,
        others: Vec<UserRange>,
        packed: u64,
    },
    /// Done by an earlier run: confirm it.
    Confirm(Done),
    /// Cannot be done; why.
    Pending(String),
}

/// What an earlier run did to an object.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Done {
    Shredded,
    Deleted,
    Scrubbed(Vec<(u64, u64)>),
}

/// One object of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    target: String,
    /// Full key.
    key: String,
    snapshot: Option<String>,
    action: Action,
}

impl Item {
    fn step(&self) -> Step {
        Step {
            target: self.target.clone(),
            key: self.key.clone(),
            action: match self.action {
                Action::Shred => "shred (delete the key object)",
                Action::Delete => "delete",
                Action::Scrub { .. } => "overwrite its range of the pack with zeros",
                Action::Confirm(_) => "confirm it is gone (done by an earlier run)",
                Action::Pending(_) => "cannot be done",
            },
        }
    }
}

/// The plan for one user, from what the log holds of them: pure, so it is
/// tested as a table.
fn plan(user: &str, holdings: &[Holding]) -> Vec<Item> {
    holdings
        .iter()
        .map(|h| {
            let pack = h.key.ends_with(".pack");
            let action = match (h.kind, h.fate) {
                (ObjectKind::Key, Fate::Gone) => Action::Confirm(Done::Shredded),
                (ObjectKind::Key, _) => Action::Shred,
                (_, Fate::Gone) => Action::Confirm(Done::Deleted),
                (_, Fate::Scrubbed) if h.mine.is_empty() => Action::Confirm(Done::Deleted),
                (_, Fate::Scrubbed) => Action::Confirm(Done::Scrubbed(h.mine.clone())),
                // a unit alone
                _ if !pack => Action::Delete,
                // a pack recorded before packs said where each unit is: it
                // may hold other users' units and the shared unit
                _ if h.mine.is_empty() => Action::Pending(
                    "a pack written before packs recorded where each unit is, which may hold other units too: it goes when no snapshot references it".into(),
                ),
                // nothing else readable in it
                _ if h.packed <= h.mine.len() as u64 => Action::Delete,
                _ => Action::Scrub {
                    ranges: h.mine.clone(),
                    bytes: h.bytes,
                    others: h.ranges.iter().filter(|r| r.user != user).cloned().collect(),
                    packed: h.packed - h.mine.len() as u64,
                },
            };
            Item {
                target: h.place.target.clone(),
                key: h.key.clone(),
                snapshot: h.snapshot.clone(),
                action,
            }
        })
        .collect()
}

/// The holdings of `user` on record, plus their key as the state dir knows
/// it when the log does not (a log rebuilt from copies that miss it).
async fn holdings_of(audit: &AuditLog, user: &str) -> Result<Vec<Holding>> {
    let (path, who) = (audit.path().to_path_buf(), user.to_string());
    let held = crate::blocking::run("reading the audit log", move || {
        query::holdings(&path, &who)
    })
    .await??;
    Ok(held)
}

/// The user's key object from the state dir, on every target, where the
/// log does not name it.
fn keys_from_state(config: &Config, keys: &Keys, user: &str, held: &[Holding]) -> Vec<Item> {
    let Some(k) = keys.users.get(user) else {
        return Vec::new();
    };
    config
        .zone()
        .targets
        .iter()
        .map(|t| (t.name.clone(), t.key(&k.object)))
        .filter(|(name, key)| {
            !held
                .iter()
                .any(|h| &h.place.target == name && &h.key == key)
        })
        .map(|(target, key)| Item {
            target,
            key,
            snapshot: None,
            action: Action::Shred,
        })
        .collect()
}

/// Everything to do for `user`: what the log records, the key the state
/// dir knows, and, with `--all-cores`, what every core's manifests name.
async fn items_of(
    config: &Config,
    audit: &AuditLog,
    keys: &Keys,
    everywhere: Option<&Everywhere>,
    stores: &[(Target, S3Store)],
    user: &str,
) -> Result<Vec<Item>> {
    let held = holdings_of(audit, user).await?;
    let mut items = plan(user, &held);
    items.extend(keys_from_state(config, keys, user, &held));
    if let Some(e) = everywhere {
        merge(&mut items, e.items(stores, user).0);
    }
    Ok(items)
}

/// Runs an erasure (or, with `dry_run`, shows its plan).
pub async fn run(config: &Config, audit: &Arc<AuditLog>, options: &Options) -> Result<Report> {
    check_users(&options.users)?;
    let core = config.core.core_id.clone();
    let state_dir = config.core.state_dir.clone();
    let keys = {
        let (dir, core) = (state_dir.clone(), core.clone());
        crate::blocking::run("reading the data keys", move || Keys::load(&dir, &core)).await??
    };
    let identities = match &options.all_cores {
        Some(path) => {
            Some(crate::keys::load_identities(path).map_err(|e| Error::Usage(format!("{e:#}")))?)
        }
        None => None,
    };
    let mut report = Report {
        core: core.clone(),
        zone: config.zone().id.clone(),
        dry_run: options.dry_run,
        users: Vec::new(),
    };
    if options.dry_run {
        let stores = crate::targets::open(config).await;
        let everywhere = match &identities {
            Some(ids) => Some(Everywhere::read(&stores, &config.zone().cores, ids).await?),
            None => None,
        };
        for user in &options.users {
            let items = items_of(config, audit, &keys, everywhere.as_ref(), &stores, user).await?;
            report.users.push(UserOutcome {
                user: user.clone(),
                held: !items.is_empty(),
                plan: items.iter().map(Item::step).collect(),
                ..outcome(user)
            });
        }
        return Ok(report);
    }
    let session = Session::begin(config, audit, "erase", options.wait, &options.cancel).await?;
    let result = async {
        let everywhere = match &identities {
            Some(ids) => {
                let stores = stores_of(session.targets());
                Some(Everywhere::read(&stores, &config.zone().cores, ids).await?)
            }
            None => None,
        };
        erase(
            config,
            audit,
            options,
            session.targets(),
            keys,
            everywhere,
            report,
        )
        .await
    }
    .await;
    session.finish(result).await
}

fn outcome(user: &str) -> UserOutcome {
    UserOutcome {
        user: user.to_string(),
        held: false,
        shredded: Vec::new(),
        deleted: Vec::new(),
        scrubbed: Vec::new(),
        pending: Vec::new(),
        plan: Vec::new(),
    }
}

async fn erase(
    config: &Config,
    audit: &Arc<AuditLog>,
    options: &Options,
    targets: &[Writable<S3Store>],
    mut keys: Keys,
    everywhere: Option<Everywhere>,
    mut report: Report,
) -> Result<Report> {
    let stores = stores_of(targets);
    // the cores whose backups held each user, for their ledgers
    let mut ledgers: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let state_dir = config.core.state_dir.clone();
    let reason = format!(
        "erasing user(s) {}: {}",
        options.users.join(", "),
        options.reason
    );
    // First the ledger, on every target of each core whose backups hold
    // the users: from then on no restore brings them back, also when this
    // run stops half way (the next one finishes it).
    for user in &options.users {
        if !items_of(config, audit, &keys, None, &stores, user)
            .await?
            .is_empty()
        {
            ledgers
                .entry(report.core.clone())
                .or_default()
                .push(user.clone());
        }
        if let Some(e) = &everywhere {
            for c in e.items(&stores, user).1 {
                let users = ledgers.entry(c).or_default();
                if !users.contains(user) {
                    users.push(user.clone());
                }
            }
        }
    }
    let mut ledger_failures: Vec<(Vec<String>, NotErased)> = Vec::new();
    let time = chrono::Utc::now();
    for (core, users) in ledgers {
        let entry = erasures::Entry {
            format: 1,
            core: core.clone(),
            zone: report.zone.clone(),
            time,
            users: users.clone(),
            reason: options.reason.clone(),
        };
        for t in targets {
            if let Err(e) = erasures::write(t, &entry, &config.zone().recipients).await {
                ledger_failures.push((
                    users.clone(),
                    NotErased {
                        target: t.target().name.clone(),
                        key: t.key(&crate::repository::layout::erasures_dir(&core)),
                        reason: format!("the erasure ledger could not be written: {e:#}"),
                    },
                ));
            }
        }
    }
    // Users one after the other: a pack that holds two of them is planned
    // for the second with what the first left on record.
    for user in &options.users {
        let mut items = items_of(config, audit, &keys, everywhere.as_ref(), &stores, user).await?;
        let mut done = outcome(user);
        done.held = !items.is_empty();
        for (users, failure) in &ledger_failures {
            if users.contains(user) {
                done.pending.push(failure.clone());
            }
        }
        // First the state: no backup may encrypt to this key again, and the
        // next one uploads the user anew.
        if keys.users.remove(user).is_some() {
            let (dir, saved) = (state_dir.clone(), keys.clone());
            crate::blocking::run("recording the data keys", move || saved.save(&dir)).await??;
        }
        let (dir, who) = (state_dir.clone(), vec![user.clone()]);
        crate::blocking::run("recording the unit state", move || {
            crate::incremental::forget_users(&dir, &who)
        })
        .await??;
        // keys first: once they are gone, nothing else of the user can be read
        items.sort_by_key(|i| !matches!(i.action, Action::Shred | Action::Confirm(Done::Shredded)));
        for item in items {
            apply(targets, &item, &reason, &mut done).await;
        }
        report.users.push(done);
    }
    let (os_user, host) = crate::audit::who();
    for u in &report.users {
        audit
            .record(Event::UserErased {
                users: vec![u.user.clone()],
                reason: options.reason.clone(),
                outcome: match (u.held, u.pending.is_empty()) {
                    (false, _) => "nothing_held",
                    (true, true) => "complete",
                    (true, false) => "incomplete",
                }
                .into(),
                shredded: u.shredded.clone(),
                deleted: u.deleted.clone(),
                scrubbed: u.scrubbed.clone(),
                pending: u.pending.clone(),
                os_user: os_user.clone(),
                host: host.clone(),
            })
            .await?;
    }
    Ok(report)
}

/// Carries out one item and confirms it; what it did goes to `done`.
async fn apply(targets: &[Writable<S3Store>], item: &Item, reason: &str, done: &mut UserOutcome) {
    let erased = Erased {
        target: item.target.clone(),
        key: item.key.clone(),
    };
    let pending = |why: String| NotErased {
        target: item.target.clone(),
        key: item.key.clone(),
        reason: why,
    };
    let Some(t) = targets.iter().find(|t| t.target().name == item.target) else {
        done.pending.push(pending(format!(
            "target {} is no longer in the zone map: erase it there by hand",
            item.target
        )));
        return;
    };
    let outcome: anyhow::Result<Done> = async {
        let rel = t
            .relative(&item.key)
            .with_context(|| format!("{} is not under the target's prefix", item.key))?;
        match &item.action {
            Action::Shred | Action::Delete => {
                if t.store().exists(&item.key).await? {
                    t.delete(&rel, reason).await?;
                    crate::failpoint::hit("erase-after-delete", true);
                } else {
                    // gone without a record of it (a crash between the
                    // deletion and its record, a write that never landed)
                    t.settle_absent(&rel, reason).await?;
                }
                confirm_gone(t, &item.key).await?;
                Ok(if item.action == Action::Shred {
                    Done::Shredded
                } else {
                    Done::Deleted
                })
            }
            Action::Scrub {
                ranges,
                bytes,
                others,
                packed,
            } => {
                let Some(body) = t.store().get(&item.key).await? else {
                    // gone already (forgotten meanwhile)
                    t.settle_absent(&rel, reason).await?;
                    return Ok(Done::Deleted);
                };
                let rest = Rest {
                    others,
                    packed: *packed,
                };
                scrub(t, &rel, item, body, ranges, *bytes, &rest).await?;
                confirm_zeros(t, &item.key, ranges).await?;
                Ok(Done::Scrubbed(ranges.clone()))
            }
            Action::Confirm(Done::Scrubbed(ranges)) => {
                confirm_zeros(t, &item.key, ranges).await?;
                Ok(Done::Scrubbed(ranges.clone()))
            }
            Action::Confirm(d) => {
                confirm_gone(t, &item.key).await?;
                Ok(d.clone())
            }
            Action::Pending(why) => anyhow::bail!("{why}"),
        }
    }
    .await;
    match outcome {
        Ok(Done::Shredded) => done.shredded.push(erased),
        Ok(Done::Deleted) => done.deleted.push(erased),
        Ok(Done::Scrubbed(_)) => done.scrubbed.push(erased),
        Err(e) => done.pending.push(pending(format!("{e:#}"))),
    }
}

/// What a pack holds once the user's ranges are zeroed.
struct Rest<'a> {
    others: &'a [UserRange],
    packed: u64,
}

/// The user's ranges of a pack, overwritten with zeros: the pack is written
/// again whole (same size, so every other unit stays where its manifest
/// says; on the record with what it still holds).
async fn scrub(
    t: &Writable<S3Store>,
    rel: &crate::repository::layout::Key,
    item: &Item,
    body: Vec<u8>,
    ranges: &[(u64, u64)],
    bytes: u64,
    rest: &Rest<'_>,
) -> anyhow::Result<()> {
    if body.len() as u64 != bytes {
        anyhow::bail!(
            "the pack is {} bytes, not the {bytes} its record says: not overwritten",
            body.len()
        );
    }
    let mut body = body;
    for &(at, len) in ranges {
        let end = at
            .checked_add(len)
            .filter(|e| *e <= bytes)
            .with_context(|| {
                format!("the user's range {at}+{len} is outside the pack of {bytes} bytes")
            })?;
        body[at as usize..end as usize].fill(0);
    }
    let users: Vec<String> = rest
        .others
        .iter()
        .map(|r| r.user.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let contents = Contents {
        kind: ObjectKind::Unit,
        snapshot: item.snapshot.as_deref(),
        users: &users,
        ranges: rest.others,
        packed: rest.packed,
    };
    t.put(rel, Bytes::from(body), &contents).await
}

/// Reads back that nothing is under `key`.
async fn confirm_gone(t: &Writable<S3Store>, key: &str) -> anyhow::Result<()> {
    if t.store().exists(key).await? {
        anyhow::bail!("the target still shows the object after its deletion");
    }
    Ok(())
}

/// Reads back each range and checks that it is all zeros (a pack that is
/// gone, forgotten meanwhile, holds nothing either).
async fn confirm_zeros(
    t: &Writable<S3Store>,
    key: &str,
    ranges: &[(u64, u64)],
) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    for &(at, len) in ranges {
        let Some(mut body) = t.store().get_stream(key, Some(at..at + len)).await? else {
            return Ok(());
        };
        let mut read = Vec::with_capacity(len as usize);
        body.read_to_end(&mut read).await?;
        if read.len() as u64 != len || read.iter().any(|b| *b != 0) {
            anyhow::bail!("the range of the user's unit does not read back as zeros");
        }
    }
    Ok(())
}

/// The stores of the session's targets, for reading.
fn stores_of(targets: &[Writable<S3Store>]) -> Vec<(Target, S3Store)> {
    targets
        .iter()
        .map(|t| (t.target().clone(), t.store().clone()))
        .collect()
}

/// Adds to `items` those of `more` for an object `items` does not name (the
/// log's plan knows more: intents of uncommitted runs, what is done).
fn merge(items: &mut Vec<Item>, more: Vec<Item>) {
    for item in more {
        if !items
            .iter()
            .any(|i| i.target == item.target && i.key == item.key)
        {
            items.push(item);
        }
    }
}

/// One unit as a manifest names it.
#[derive(Debug, Clone)]
struct Named {
    user: Option<String>,
    offset: Option<u64>,
    stored_size: u64,
    object_size: Option<u64>,
    data_key: Option<std::sync::Arc<str>>,
    snapshot: String,
}

/// What every core's manifests say (`--all-cores`): per core, per object
/// (relative key), the units in it.
struct Everywhere {
    cores: Vec<(String, std::collections::HashMap<String, Vec<Named>>)>,
}

impl Everywhere {
    /// Reads the manifests of every snapshot of `cores`, from the first
    /// target that lists each core's snapshots, decrypted with `identities`.
    async fn read(
        stores: &[(Target, S3Store)],
        cores: &[String],
        identities: &[Identity],
    ) -> Result<Everywhere> {
        let mut out = Vec::new();
        for core in cores {
            let mut objects: std::collections::HashMap<String, Vec<Named>> = Default::default();
            let (target, store) = stores
                .first()
                .ok_or_else(|| Error::failed("the zone has no target"))?;
            let indexes = crate::repository::indexes(store, target, core)
                .await
                .with_context(|| {
                    format!("listing the snapshots of {core} on target {}", target.name)
                })?;
            let mut keys: std::collections::HashMap<String, Vec<Identity>> = Default::default();
            for index in indexes {
                let manifest = read_manifest(store, target, &index, identities, &mut keys)
                    .await
                    .with_context(|| format!("the manifest of snapshot {} of {core}", index.id))?;
                for u in manifest.units {
                    let named = Named {
                        user: match &u.kind {
                            crate::units::UnitKind::User(id) => Some(id.clone()),
                            _ => None,
                        },
                        offset: u.offset,
                        stored_size: u.stored_size,
                        object_size: u.object_size,
                        data_key: u.data_key.clone(),
                        snapshot: index.id.clone(),
                    };
                    let units = objects.entry(u.object.to_string()).or_default();
                    if !units.iter().any(|n| n.offset == named.offset) {
                        units.push(named);
                    }
                }
            }
            out.push((core.clone(), objects));
        }
        Ok(Everywhere { cores: out })
    }

    /// The plan for `user` on every target, and the cores that held them.
    fn items(&self, stores: &[(Target, S3Store)], user: &str) -> (Vec<Item>, Vec<String>) {
        let mut items = Vec::new();
        let mut cores = Vec::new();
        for (core, objects) in &self.cores {
            let mut data_keys = std::collections::BTreeSet::new();
            let mut found = false;
            for (object, units) in objects {
                let Some(mine) = units.iter().find(|n| n.user.as_deref() == Some(user)) else {
                    continue;
                };
                found = true;
                data_keys.extend(mine.data_key.iter().map(|k| k.to_string()));
                let others: Vec<&Named> = units
                    .iter()
                    .filter(|n| n.user.as_deref() != Some(user))
                    .collect();
                let mine_ranges: Vec<(u64, u64)> = units
                    .iter()
                    .filter(|n| n.user.as_deref() == Some(user))
                    .filter_map(|n| Some((n.offset?, n.stored_size)))
                    .collect();
                let action = match mine.object_size {
                    Some(bytes) if !others.is_empty() && !mine_ranges.is_empty() => Action::Scrub {
                        ranges: mine_ranges,
                        bytes,
                        packed: others.len() as u64,
                        others: others
                            .iter()
                            .filter_map(|n| {
                                Some(UserRange {
                                    user: n.user.clone()?,
                                    at: n.offset?,
                                    len: n.stored_size,
                                })
                            })
                            .collect(),
                    },
                    _ => Action::Delete,
                };
                for (t, _) in stores {
                    items.push(Item {
                        target: t.name.clone(),
                        key: t.key(object),
                        snapshot: Some(mine.snapshot.clone()),
                        action: action.clone(),
                    });
                }
            }
            for k in data_keys {
                for (t, _) in stores {
                    items.push(Item {
                        target: t.name.clone(),
                        key: t.key(&k),
                        snapshot: None,
                        action: Action::Shred,
                    });
                }
            }
            if found {
                cores.push(core.clone());
            }
        }
        (items, cores)
    }
}

/// A snapshot's manifest, opened with its data key (unwrapped with
/// `identities`, cached in `keys`) or, older, with `identities` directly.
async fn read_manifest(
    store: &S3Store,
    target: &Target,
    index: &crate::repository::snapshot::Index,
    identities: &[Identity],
    keys: &mut std::collections::HashMap<String, Vec<Identity>>,
) -> anyhow::Result<crate::repository::snapshot::Manifest> {
    let get = |rel: &str| {
        let key = target.key(rel);
        async move {
            store
                .get(&key)
                .await?
                .with_context(|| format!("{key} is missing on target {}", target.name))
        }
    };
    let sealed = get(&index.manifest.key).await?;
    let plain = match &index.manifest.data_key {
        Some(k) => {
            if !keys.contains_key(k) {
                let wrapped = get(k).await?;
                let key = crate::datakeys::unwrap(&wrapped, identities)
                    .map_err(|e| anyhow::anyhow!("its data key {k}: {e}"))?;
                keys.insert(k.clone(), vec![Box::new(key)]);
            }
            crate::pipeline::decrypt_small(&sealed, &keys[k])
        }
        None => crate::pipeline::decrypt_small(&sealed, identities),
    }
    .map_err(|e| anyhow::anyhow!("cannot be opened: {e}"))?;
    Ok(serde_json::from_slice(&plain)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Place;

    /// A holding of `kind` in object `key`, holding `users` at 10 bytes
    /// each (ann first), `packed` units readable.
    fn holding(kind: ObjectKind, fate: Fate, key: &str, users: &[&str], packed: u64) -> Holding {
        let ranges: Vec<UserRange> = users
            .iter()
            .enumerate()
            .map(|(i, u)| UserRange {
                user: u.to_string(),
                at: i as u64 * 10,
                len: 10,
            })
            .collect();
        let pack = key.ends_with(".pack") && packed > 0;
        Holding {
            zone: "ch".into(),
            place: Place {
                target: "t".into(),
                endpoint: "e".into(),
                bucket: "b".into(),
                region: "r".into(),
            },
            key: key.into(),
            kind,
            snapshot: None,
            seq: 1,
            time: String::new(),
            bytes: 100,
            blake3: String::new(),
            users: users.iter().map(|u| u.to_string()).collect(),
            mine: if pack { vec![(0, 10)] } else { Vec::new() },
            ranges: if pack { ranges } else { Vec::new() },
            packed,
            fate,
            note: None,
        }
    }

    #[test]
    fn the_plan_of_each_kind_of_holding() {
        use Fate::*;
        use ObjectKind::{Key, Unit};
        const ALONE: &str = "k.tar.zst.age";
        const PACK: &str = "k.pack";
        let bob = vec![UserRange {
            user: "bob".into(),
            at: 10,
            len: 10,
        }];
        let scrub = |others: Vec<UserRange>, packed| Action::Scrub {
            ranges: vec![(0, 10)],
            bytes: 100,
            others,
            packed,
        };
        let table: Vec<(Holding, Action)> = vec![
            (holding(Key, Stored, "k.age", &["ann"], 0), Action::Shred),
            (
                holding(Key, Unconfirmed, "k.age", &["ann"], 0),
                Action::Shred,
            ),
            (holding(Key, Scrubbed, "k.age", &["ann"], 0), Action::Shred),
            (
                holding(Key, Gone, "k.age", &["ann"], 0),
                Action::Confirm(Done::Shredded),
            ),
            (holding(Unit, Stored, ALONE, &["ann"], 0), Action::Delete),
            (
                holding(Unit, Unconfirmed, ALONE, &["ann"], 0),
                Action::Delete,
            ),
            (holding(Unit, Shredded, ALONE, &["ann"], 0), Action::Delete),
            (
                holding(Unit, Gone, ALONE, &["ann"], 0),
                Action::Confirm(Done::Deleted),
            ),
            // a pack of ann alone goes whole
            (holding(Unit, Stored, PACK, &["ann"], 1), Action::Delete),
            // ann and the shared unit (no user): ann's range only
            (
                holding(Unit, Stored, PACK, &["ann"], 2),
                scrub(Vec::new(), 1),
            ),
            // ann, bob and the shared unit
            (
                holding(Unit, Stored, PACK, &["ann", "bob"], 3),
                scrub(bob.clone(), 2),
            ),
            (
                holding(Unit, Scrubbed, PACK, &["ann", "bob"], 3),
                Action::Confirm(Done::Scrubbed(vec![(0, 10)])),
            ),
        ];
        for (h, want) in table {
            let got = plan("ann", std::slice::from_ref(&h));
            assert_eq!(got[0].action, want, "{:?} {:?} {}", h.kind, h.fate, h.key);
        }
        // a pack recorded before ranges were: it may hold anyone
        let old_pack = plan("ann", &[holding(Unit, Stored, PACK, &["ann"], 0)]);
        assert!(
            matches!(&old_pack[0].action, Action::Pending(why) if why.contains("before packs recorded")),
            "{old_pack:?}"
        );
    }

    #[test]
    fn user_ids_are_checked() {
        assert!(matches!(check_users(&[]), Err(Error::Usage(m)) if m.contains("--user")));
        let bad = check_users(&["../x".into()]);
        assert!(matches!(bad, Err(Error::Usage(m)) if m.contains("is not a user id")));
        assert!(check_users(&["c123456789abc".into()]).is_ok());
    }
}
