//! `zonevault snapshots`: the committed snapshots of a core, from the
//! cleartext indexes (no identity needed).

use crate::config::Config;
use crate::error::{Error, Reason, Result, reason_of};
use crate::repository::snapshot::Index;
use crate::storage::s3::S3Store;
use crate::targets;

/// Which core's snapshots: this one, or another core of the same zone. A core
/// of another zone is a residency refusal (its data is not ours to touch).
pub fn resolve_core(config: &Config, core: Option<&str>) -> Result<String> {
    let zone = config.zone();
    let Some(core) = core else {
        return Ok(config.core.core_id.clone());
    };
    if zone.cores.iter().any(|c| c == core) {
        return Ok(core.to_string());
    }
    match config.map.zone_of_core(core) {
        Some(other) => Err(Error::refused(format!(
            "core {core} belongs to zone {} ({}), not to this core's zone {} ({}): refused",
            other.id, other.name, zone.id, zone.name
        ))),
        None => Err(Error::Usage(format!(
            "the zone map has no core {core:?}; zone {} has {:?}",
            zone.id, zone.cores
        ))),
    }
}

/// The committed snapshots of `core`, oldest first, read from the first
/// target of the zone that answers; with the store they were read from.
pub async fn list(
    config: &Config,
    core: &str,
) -> Result<(Vec<Index>, S3Store, crate::config::Target)> {
    let (mut errors, mut reasons) = (Vec::new(), Vec::new());
    for (target, store) in targets::open(config).await {
        match crate::repository::indexes(&store, &target, core).await {
            Ok(indexes) => return Ok((indexes, store, target)),
            Err(e) => {
                reasons.push(reason_of(&e));
                errors.push(format!("target {}: {e:#}", target.name));
            }
        }
    }
    Err(Error::because(
        Reason::of_unusable_targets(reasons),
        format!(
            "no target of zone {} could be read: {}",
            config.zone().id,
            errors.join("; ")
        ),
    ))
}
