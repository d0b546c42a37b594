//! After a disk loss the volume paths of core.toml do not exist: the
//! machine that must restore has nothing but the two config files, the
//! credentials and an identity. Restore, snapshots and audit work there;
//! the commands that read live data say what is missing.

mod common;

use common::{backup, fleet_with_users, restore, run, zv};
use zonevault_testkit::fixture;

#[test]
fn restore_works_on_a_machine_without_the_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let (fleet, core, _) = fleet_with_users(dir.path(), 3, 2_000);
    let snapshot = backup(&core)["snapshot"].as_str().unwrap().to_string();
    // the disk is gone: no volume, no state dir (no audit log, no units.json)
    let volumes = fleet.volumes_dir("core-ch-1");
    let kept = dir.path().join("the-old-disk");
    std::fs::rename(&volumes, &kept).unwrap();
    std::fs::remove_dir_all(dir.path().join("state/core-ch-1")).unwrap();

    let (stdout, _) = run(zv(&core).args(["snapshots", "--json"]), 0);
    assert!(stdout.contains(&snapshot), "{stdout}");
    let to = dir.path().join("restored");
    restore(&core, &fleet.identity("ch"), &to, &[], 0);
    let mut expected = fixture::tree(&kept.join("users")).unwrap();
    expected.retain(|p, _| p.extension().is_none_or(|e| e != "tmp")); // excluded
    assert_eq!(fixture::tree(&to.join("users")).unwrap(), expected);
    assert_eq!(
        fixture::tree(&to.join("etc")).unwrap(),
        fixture::tree(&kept.join("etc")).unwrap()
    );
    run(zv(&core).args(["audit", "verify"]), 0);

    // backup and check need the live data, and say which path is missing
    for command in ["backup", "check"] {
        let (_, stderr) = run(zv(&core).arg(command), 2);
        assert!(
            stderr.contains("volumes[0].path") && stderr.contains("does not exist"),
            "{command}: {stderr}"
        );
    }
}
