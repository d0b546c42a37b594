//! Malformed configurations: each one exits 2 with one message that names the
//! file, the place and the problem, and never panics. No storage is needed:
//! configuration is checked before any target is contacted.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use common::{output_text, zonevault};

const ZONEMAP: &str = r#"version = 1

[zones.ch]
name = "Switzerland"
jurisdiction = "CH"
regions = ["ch-gva-2", "ch-dk-2"]
recipients = ["RECIPIENT_CH"]
cores = ["core-ch-1", "core-ch-2"]

[[zones.ch.targets]]
name = "ch-primary"
endpoint = "http://127.0.0.1:9"
region = "ch-gva-2"
bucket = "zv-ch"
prefix = "zonevault"

[zones.ch.retention]
keep_last = 3
max_age = "10y"

[zones.ch.schedule]
backup = "0 30 2 * * *"
timezone = "Europe/Zurich"

[zones.de]
name = "Germany"
jurisdiction = "DE"
regions = ["de-fra-1"]
recipients = ["RECIPIENT_DE"]
cores = ["core-de-1"]

[[zones.de.targets]]
name = "de-primary"
endpoint = "http://127.0.0.1:9"
region = "de-fra-1"
bucket = "zv-de"
"#;

const CORE: &str = r#"core_id = "core-ch-1"
zone_map = "zonemap.toml"
state_dir = "state"

[[volumes]]
name = "users"
path = "data/users"
layout = "pryv"
exclude = ["*.tmp"]

[[volumes]]
name = "etc"
path = "data/etc"
layout = "plain"

[credentials.ch-primary]
access_key_id_env = "ZV_TEST_KEY_ID"
secret_access_key_file = "secret.txt"
"#;

/// A directory with a valid core config, zone map, volumes and secret file.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let ch = zonevault::keys::generate().recipient;
        let de = zonevault::keys::generate().recipient;
        let map = ZONEMAP
            .replace("RECIPIENT_CH", &ch)
            .replace("RECIPIENT_DE", &de);
        std::fs::write(p.join("zonemap.toml"), map).unwrap();
        std::fs::write(p.join("core.toml"), CORE).unwrap();
        std::fs::create_dir_all(p.join("data/users/_shared")).unwrap();
        std::fs::create_dir_all(p.join("data/etc")).unwrap();
        let secret = p.join("secret.txt");
        std::fs::write(&secret, "s3cr3t-value\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        Setup { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn edit(&self, name: &str, from: &str, to: &str) {
        let path = self.path(name);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{name} has no {from:?}");
        std::fs::write(path, text.replacen(from, to, 1)).unwrap();
    }

    fn write(&self, name: &str, bytes: &[u8]) {
        std::fs::write(self.path(name), bytes).unwrap();
    }

    /// Runs `check` and asserts exit 2 and a message holding each of `expect`.
    fn expect_error(&self, expect: &[&str]) -> String {
        let out = zonevault()
            .arg("--config")
            .arg(self.path("core.toml"))
            .arg("check")
            .env("ZV_TEST_KEY_ID", "GK0123")
            .output()
            .unwrap();
        let (stdout, stderr) = output_text(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "stdout:\n{stdout}\nstderr:\n{stderr}"
        );
        assert!(stdout.is_empty(), "nothing is printed on stdout: {stdout}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        for e in expect {
            assert!(stderr.contains(e), "expected {e:?} in:\n{stderr}");
        }
        for bad in ["panicked", "RUST_BACKTRACE", "s3cr3t-value"] {
            assert!(!stderr.contains(bad), "{bad:?} in:\n{stderr}");
        }
        stderr
    }
}

#[test]
fn the_base_configuration_is_valid() {
    // The control: without an edit the same files load, so each case below
    // fails for its own reason.
    let s = Setup::new();
    // SAFETY: set before any other thread of this test reads the environment.
    unsafe { std::env::set_var("ZV_TEST_KEY_ID", "GK0123") };
    let config = zonevault::config::Config::load(&s.path("core.toml")).unwrap();
    assert_eq!(config.zone().id, "ch");
    assert_eq!(config.core.volumes.len(), 2);
}

/// One malformed configuration: an edit of one file, and what the message must say.
macro_rules! bad_config {
    ($name:ident, $file:literal, $from:expr => $to:expr, [$($expect:expr),+ $(,)?]) => {
        #[test]
        fn $name() {
            let s = Setup::new();
            s.edit($file, $from, $to);
            s.expect_error(&[$($expect),+]);
        }
    };
}

// --- syntax and types: line:column ---
bad_config!(zonemap_syntax_error, "zonemap.toml", "[zones.de]" => "[zones.de", ["zonemap.toml:25:10", "unclosed table"]);
bad_config!(core_syntax_error, "core.toml", "state_dir = \"state\"" => "state_dir = \"state", ["core.toml:3:"]);
bad_config!(retention_wrong_type, "zonemap.toml", "keep_last = 3" => "keep_last = \"three\"", ["zonemap.toml:18:", "invalid type"]);
bad_config!(negative_keep_count, "zonemap.toml", "keep_last = 3" => "keep_last = -3", ["zonemap.toml:18:"]);
bad_config!(path_style_wrong_type, "zonemap.toml", "prefix = \"zonevault\"" => "prefix = \"zonevault\"\npath_style = \"yes\"", ["zonemap.toml:16:", "invalid type"]);
bad_config!(regions_not_a_list, "zonemap.toml", "regions = [\"de-fra-1\"]" => "regions = \"de-fra-1\"", ["zonemap.toml:28:", "invalid type"]);
bad_config!(zstd_level_wrong_type, "core.toml", "state_dir = \"state\"" => "state_dir = \"state\"\nzstd_level = \"fast\"", ["core.toml:4:"]);
bad_config!(unknown_field_in_zone, "zonemap.toml", "jurisdiction = \"CH\"" => "jurisdiction = \"CH\"\nregoins = []", ["zonemap.toml:6:", "unknown field `regoins`"]);
bad_config!(unknown_field_in_target, "zonemap.toml", "bucket = \"zv-ch\"" => "bucket = \"zv-ch\"\nstorage_class = \"STANDARD\"", ["unknown field `storage_class`"]);
bad_config!(unknown_field_in_core, "core.toml", "state_dir = \"state\"" => "state_dir = \"state\"\nstat_dir = \"x\"", ["core.toml:4:", "unknown field `stat_dir`"]);
bad_config!(unknown_credential_field, "core.toml", "access_key_id_env" => "access_key_env", ["unknown field `access_key_env`"]);
bad_config!(missing_recipients, "zonemap.toml", "recipients = [\"age1" => "#recipients = [\"age1", ["missing field `recipients`"]);
bad_config!(missing_core_id, "core.toml", "core_id = \"core-ch-1\"" => "", ["core.toml", "missing field `core_id`"]);
bad_config!(unknown_layout, "core.toml", "layout = \"plain\"" => "layout = \"btrfs\"", ["core.toml:14:", "btrfs"]);
bad_config!(unsupported_version, "zonemap.toml", "version = 1" => "version = 2", ["zonemap.toml: version:", "not supported"]);

// --- semantic checks: field paths ---
bad_config!(invalid_recipient, "zonemap.toml", "recipients = [\"age1" => "recipients = [\"age1notakey\", \"age1", ["zones.ch.recipients[0]", "not a valid age X25519 recipient", "zonevault keygen"]);
bad_config!(core_in_two_zones, "zonemap.toml", "cores = [\"core-de-1\"]" => "cores = [\"core-de-1\", \"core-ch-2\"]", ["zones.de.cores[1]", "core \"core-ch-2\" is in zone ch and in zone de"]);
bad_config!(core_in_no_zone, "core.toml", "core_id = \"core-ch-1\"" => "core_id = \"core-xx-9\"", ["core.toml: core_id:", "\"core-xx-9\" is in no zone"]);
bad_config!(target_region_outside_zone, "zonemap.toml", "region = \"ch-gva-2\"" => "region = \"de-fra-1\"", ["zones.ch.targets[0].region", "\"de-fra-1\" is not one of zone ch's regions", "help:"]);
bad_config!(same_bucket_in_two_zones, "zonemap.toml", "bucket = \"zv-de\"" => "bucket = \"zv-ch\"\nprefix = \"/zonevault/\"", ["zones.de.targets[0].bucket", "of zone ch"]);
bad_config!(duplicate_target_name, "zonemap.toml", "name = \"de-primary\"" => "name = \"ch-primary\"", ["zones.de.targets[0].name", "already used in zone ch"]);
bad_config!(bad_endpoint, "zonemap.toml", "endpoint = \"http://127.0.0.1:9\"" => "endpoint = \"s3.example.com\"", ["zones.ch.targets[0].endpoint", "not of the form http(s)://host[:port]"]);
bad_config!(bad_bucket_name, "zonemap.toml", "bucket = \"zv-ch\"" => "bucket = \"ZV_CH\"", ["zones.ch.targets[0].bucket", "not a valid bucket name"]);
bad_config!(bad_cron, "zonemap.toml", "backup = \"0 30 2 * * *\"" => "backup = \"every night\"", ["zones.ch.schedule.backup", "not a valid cron expression"]);
bad_config!(five_field_cron, "zonemap.toml", "backup = \"0 30 2 * * *\"" => "backup = \"30 2 * * *\"", ["zones.ch.schedule.backup", "seconds first"]);
bad_config!(bad_timezone, "zonemap.toml", "timezone = \"Europe/Zurich\"" => "timezone = \"Europe/Zurch\"", ["zones.ch.schedule.timezone", "not a known timezone"]);
bad_config!(bad_duration, "zonemap.toml", "max_age = \"10y\"" => "max_age = \"ten years\"", ["zones.ch.retention.max_age", "not a duration"]);
bad_config!(zero_duration, "zonemap.toml", "max_age = \"10y\"" => "max_age = \"0s\"", ["zones.ch.retention.max_age", "is zero"]);
bad_config!(keep_rule_of_zero, "zonemap.toml", "keep_last = 3" => "keep_last = 0", ["zones.ch.retention.keep_last", "is 0", "remove the line"]);
bad_config!(schedule_never_fires, "zonemap.toml", "backup = \"0 30 2 * * *\"" => "backup = \"0 0 0 30 2 *\"", ["zones.ch.schedule.backup", "never fires"]);
bad_config!(overlapping_volumes, "core.toml", "path = \"data/etc\"" => "path = \"data/users/_shared\"", ["volumes[1].path", "overlaps volume \"users\""]);
bad_config!(missing_volume_path, "core.toml", "path = \"data/etc\"" => "path = \"data/nope\"", ["volumes[1].path", "does not exist"]);
bad_config!(duplicate_volume_name, "core.toml", "name = \"etc\"" => "name = \"users\"", ["volumes[1].name", "already used"]);
bad_config!(bad_exclude_glob, "core.toml", "exclude = [\"*.tmp\"]" => "exclude = [\"[unclosed\"]", ["volumes[0].exclude[0]", "not a valid glob"]);
bad_config!(zstd_level_out_of_range, "core.toml", "state_dir = \"state\"" => "state_dir = \"state\"\nzstd_level = 99", ["zstd_level", "out of range"]);
bad_config!(transfer_in_flight_not_a_size, "core.toml", "state_dir = \"state\"" => "state_dir = \"state\"\n[transfer]\nin_flight = \"lots\"", ["transfer.in_flight", "not a size", "64MiB"]);
bad_config!(transfer_in_flight_too_small, "core.toml", "state_dir = \"state\"" => "state_dir = \"state\"\n[transfer]\nin_flight = \"1kB\"", ["transfer.in_flight", "out of range", "1MiB and 4GiB"]);
bad_config!(transfer_pack_size_too_large, "core.toml", "state_dir = \"state\"" => "state_dir = \"state\"\n[transfer]\npack_size = \"64MiB\"", ["transfer.pack_size", "out of range", "64KiB and 8MiB", "\"0\" for one object per unit"]);
bad_config!(transfer_pack_size_not_a_size, "core.toml", "state_dir = \"state\"" => "state_dir = \"state\"\n[transfer]\npack_size = \"small\"", ["transfer.pack_size", "not a size", "8MiB"]);
bad_config!(transfer_requests_zero, "core.toml", "state_dir = \"state\"" => "state_dir = \"state\"\n[transfer]\nrequests = 0", ["transfer.requests", "out of range"]);
bad_config!(transfer_rate_without_unit_per_second, "core.toml", "state_dir = \"state\"" => "state_dir = \"state\"\n[transfer]\nupload_rate = \"20MB\"", ["transfer.upload_rate", "not a rate", "20MB/s"]);
bad_config!(transfer_unknown_field, "core.toml", "state_dir = \"state\"" => "state_dir = \"state\"\n[transfer]\nbandwidth = 3", ["unknown field `bandwidth`"]);
bad_config!(bad_metrics_listen, "core.toml", "state_dir = \"state\"" => "state_dir = \"state\"\nmetrics_listen = \"localhost\"", ["metrics_listen", "not an address:port"]);
bad_config!(credentials_for_unknown_target, "core.toml", "[credentials.ch-primary]" => "[credentials.ch-primray]", ["credentials.ch-primray", "no target named"]);
bad_config!(credentials_for_other_zone, "core.toml", "[credentials.ch-primary]" => "[credentials.de-primary]", ["credentials.de-primary", "belongs to zone de"]);
bad_config!(secret_env_not_set, "core.toml", "ZV_TEST_KEY_ID" => "ZV_TEST_UNSET_VARIABLE", ["credentials.ch-primary.access_key_id_env", "ZV_TEST_UNSET_VARIABLE is not set"]);
bad_config!(secret_env_and_file, "core.toml", "secret_access_key_file" => "secret_access_key_env = \"X\"\nsecret_access_key_file", ["credentials.ch-primary", "both secret_access_key_env and secret_access_key_file"]);
bad_config!(secret_file_missing, "core.toml", "secret.txt" => "nope.txt", ["credentials.ch-primary.secret_access_key_file", "nope.txt"]);

bad_config!(bad_signing_key, "zonemap.toml", "cores = [\"core-ch-1\", \"core-ch-2\"]" => "cores = [\"core-ch-1\", \"core-ch-2\"]\nsigning_keys = { core-ch-1 = \"RWnotakey\" }", ["zones.ch.signing_keys.core-ch-1[0]", "not a minisign public key", "keygen --signing"]);
bad_config!(signing_key_of_a_foreign_core, "zonemap.toml", "cores = [\"core-ch-1\", \"core-ch-2\"]" => "cores = [\"core-ch-1\", \"core-ch-2\"]\nsigning_keys = { core-de-1 = \"RWTISTFMMPUjQabw25fkpd+Yvcn2HrMNxyEXXgjZ4GUNEBHzP311j9i6\" }", ["zones.ch.signing_keys.core-de-1", "not a core of zone ch"]);
bad_config!(too_many_signing_keys, "zonemap.toml", "cores = [\"core-ch-1\", \"core-ch-2\"]" => "cores = [\"core-ch-1\", \"core-ch-2\"]\nsigning_keys = { core-ch-1 = [] }", ["zones.ch.signing_keys.core-ch-1", "lists 0 keys"]);

// --- whole files ---

#[test]
fn missing_core_config() {
    let s = Setup::new();
    std::fs::remove_file(s.path("core.toml")).unwrap();
    s.expect_error(&["core.toml: core config not found"]);
}

#[test]
fn missing_zone_map() {
    let s = Setup::new();
    std::fs::remove_file(s.path("zonemap.toml")).unwrap();
    s.expect_error(&["zonemap.toml: zone map not found"]);
}

#[test]
fn unreadable_core_config() {
    // Tests run as root, for whom mode bits do not deny reading: a directory
    // in place of the file is unreadable for everyone.
    let s = Setup::new();
    std::fs::remove_file(s.path("core.toml")).unwrap();
    std::fs::create_dir(s.path("core.toml")).unwrap();
    s.expect_error(&["core.toml: core config cannot be read"]);
}

#[test]
fn binary_garbage_core_config() {
    let s = Setup::new();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    s.write("core.toml", &garbage);
    s.expect_error(&["core.toml:1:", "not UTF-8 text"]);
}

#[test]
fn binary_garbage_zone_map() {
    let s = Setup::new();
    let mut text = b"version = 1\n".to_vec();
    text.extend_from_slice(&[0xff, 0xfe, 0x00, 0x9c, 0x80]);
    s.write("zonemap.toml", &text);
    s.expect_error(&["zonemap.toml:2:1", "not UTF-8 text"]);
}

#[test]
fn empty_core_config() {
    let s = Setup::new();
    s.write("core.toml", b"");
    s.expect_error(&["core.toml", "missing field"]);
}

#[test]
fn group_readable_secret_file() {
    let s = Setup::new();
    std::fs::set_permissions(s.path("secret.txt"), std::fs::Permissions::from_mode(0o640)).unwrap();
    s.expect_error(&[
        "credentials.ch-primary.secret_access_key_file",
        "readable by group or others (mode 0640)",
        "chmod 600",
    ]);
}

#[test]
fn world_readable_secret_file() {
    let s = Setup::new();
    std::fs::set_permissions(s.path("secret.txt"), std::fs::Permissions::from_mode(0o604)).unwrap();
    s.expect_error(&["readable by group or others (mode 0604)"]);
}

#[test]
fn empty_recipient_list() {
    let s = Setup::new();
    let map = std::fs::read_to_string(s.path("zonemap.toml")).unwrap();
    let start = map.find("recipients = [\"age1").unwrap();
    let end = start + map[start..].find('\n').unwrap();
    let edited = format!("{}recipients = []{}", &map[..start], &map[end..]);
    s.write("zonemap.toml", edited.as_bytes());
    s.expect_error(&["zones.ch.recipients", "lists no recipient"]);
}

#[test]
fn zone_without_targets() {
    let s = Setup::new();
    let map = std::fs::read_to_string(s.path("zonemap.toml")).unwrap();
    let cut = map.find("[[zones.de.targets]]").unwrap();
    s.write("zonemap.toml", &map.as_bytes()[..cut]);
    s.expect_error(&["zones.de.targets", "zone has no target"]);
}

#[test]
fn config_from_environment_variable() {
    let s = Setup::new();
    std::fs::remove_file(s.path("zonemap.toml")).unwrap();
    let out = zonevault()
        .env("ZONEVAULT_CONFIG", s.path("core.toml"))
        .env("ZV_TEST_KEY_ID", "GK0123")
        .arg("check")
        .output()
        .unwrap();
    let (_, stderr) = output_text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("zonemap.toml: zone map not found"),
        "{stderr}"
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["frobnicate"][..],
        &[][..],
        &["check", "--jsn"][..],
        &["keygen"][..],
    ] {
        let out = zonevault().args(args).output().unwrap();
        let (_, stderr) = output_text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn the_example_zone_map_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/zonemap.toml");
    let map = zonevault::config::ZoneMap::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(map.zones.len(), 2);
    assert_eq!(map.zone_of_core("core-ch-1").unwrap().targets.len(), 2);
}

// --- found by trying bad inputs as a new operator would ---
bad_config!(region_with_unicode_hyphen, "zonemap.toml", "regions = [\"ch-gva-2\"," => "regions = [\"ch\u{2010}gva\u{2010}2\", \"ch-gva-2\",", ["zones.ch.regions[0]", "not a region name"]);
bad_config!(region_with_trailing_space, "zonemap.toml", "regions = [\"ch-gva-2\"," => "regions = [\"ch-gva-2 \",", ["zones.ch.regions[0]", "not a region name"]);
bad_config!(region_in_two_zones, "zonemap.toml", "regions = [\"de-fra-1\"]" => "regions = [\"de-fra-1\", \"ch-dk-2\"]", ["zones.de.regions[1]", "also a region of zone ch"]);
bad_config!(endpoint_with_password, "zonemap.toml", "endpoint = \"http://127.0.0.1:9\"" => "endpoint = \"http://AKIA:supersecret@127.0.0.1:9\"", ["zones.ch.targets[0].endpoint", "holds credentials", "[credentials.<target>]"]);
bad_config!(endpoint_with_path, "zonemap.toml", "endpoint = \"http://127.0.0.1:9\"" => "endpoint = \"http://127.0.0.1:9/some/path\"", ["zones.ch.targets[0].endpoint", "http(s)://host[:port]"]);
bad_config!(nested_prefix_in_other_zone, "zonemap.toml", "bucket = \"zv-de\"" => "bucket = \"zv-ch\"\nprefix = \"zonevault/de\"", ["zones.de.targets[0].bucket", "nested prefixes", "zone ch"]);
bad_config!(prefix_with_control_character, "zonemap.toml", "prefix = \"zonevault\"" => "prefix = \"zone\\u0000vault\"", ["zones.ch.targets[0].prefix"]);
bad_config!(empty_volume_path, "core.toml", "path = \"data/etc\"" => "path = \"\"", ["volumes[1].path", "is empty"]);
bad_config!(empty_zone_map_path, "core.toml", "zone_map = \"zonemap.toml\"" => "zone_map = \"\"", ["zone_map", "is empty"]);
bad_config!(state_dir_is_a_file, "core.toml", "state_dir = \"state\"" => "state_dir = \"secret.txt\"", ["state_dir", "not a directory"]);
bad_config!(empty_env_var_name, "core.toml", "access_key_id_env = \"ZV_TEST_KEY_ID\"" => "access_key_id_env = \"\"", ["credentials.ch-primary.access_key_id_env", "names no environment variable"]);
bad_config!(zone_map_given_as_core_config, "core.toml", "core_id = \"core-ch-1\"" => "version = 1\ncore_id = \"core-ch-1\"", ["unknown field `version`", "looks like a zone map"]);

#[test]
fn pasted_secret_key_is_not_echoed() {
    let s = Setup::new();
    let secret = "AGE-SECRET-KEY-1MY66QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQKUT987";
    s.edit(
        "zonemap.toml",
        "recipients = [\"age1",
        &format!("recipients = [\"{secret}\", \"age1"),
    );
    let stderr = s.expect_error(&["zones.ch.recipients[0]", "SECRET key", "compromised"]);
    assert!(!stderr.contains("1MY66"), "{stderr}");
}

#[test]
fn device_as_zone_map_is_refused() {
    let s = Setup::new();
    s.edit(
        "core.toml",
        "zone_map = \"zonemap.toml\"",
        "zone_map = \"/dev/zero\"",
    );
    s.expect_error(&["/dev/zero: zone map is not a regular file"]);
}

// --- secret files, recipient lists and job counts with sane bounds ---

impl Setup {
    /// Runs `zonevault ARGS` and waits at most `secs` for it: a command
    /// that blocks fails the test instead of hanging it. Returns the exit
    /// code, stdout and stderr.
    fn run_within(&self, args: &[&str], secs: u64) -> (Option<i32>, String, String) {
        use std::io::Read;
        let mut child = common::process(&self.path("core.toml"))
            .args(args)
            .env("ZV_TEST_KEY_ID", "GK0123")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("zonevault {args:?} still runs after {secs} s: it blocks");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let (mut stdout, mut stderr) = (String::new(), String::new());
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        (status.code(), stdout, stderr)
    }

    /// [`Setup::run_within`] expecting exit 2 and each of `expect` in stderr.
    fn expect_usage_error(&self, args: &[&str], expect: &[&str]) -> String {
        let (code, stdout, stderr) = self.run_within(args, 20);
        assert_eq!(
            code,
            Some(2),
            "{args:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
        assert!(stdout.is_empty(), "{stdout}");
        for e in expect {
            assert!(stderr.contains(e), "{args:?}: expected {e:?} in:\n{stderr}");
        }
        for bad in ["panicked", "RUST_BACKTRACE", "s3cr3t-value"] {
            assert!(!stderr.contains(bad), "{bad:?} in:\n{stderr}");
        }
        stderr
    }
}

#[test]
fn a_fifo_as_secret_file_is_refused_without_blocking() {
    let s = Setup::new();
    let secret = s.path("secret.txt");
    std::fs::remove_file(&secret).unwrap();
    let c = std::ffi::CString::new(secret.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    s.expect_usage_error(
        &["check"],
        &[
            "credentials.ch-primary.secret_access_key_file",
            "secret.txt is a FIFO (named pipe), not a regular file",
        ],
    );
}

#[test]
fn a_huge_secret_file_is_refused_unread() {
    let s = Setup::new();
    // 100 MB (sparse): the wrong file, which today is read whole
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(s.path("secret.txt"))
        .unwrap();
    f.set_len(100_000_000).unwrap();
    s.expect_usage_error(
        &["check"],
        &[
            "credentials.ch-primary.secret_access_key_file",
            "is 100000000 bytes",
            "at most 4096 bytes",
        ],
    );
    // the cap is 4096 bytes: a key with a trailing comment line still fits
    f.set_len(4096).unwrap();
    let (_, _, stderr) = s.run_within(&["check"], 60);
    assert!(!stderr.contains("secret_access_key_file"), "{stderr}");
}

#[test]
fn a_directory_or_a_device_as_secret_file_is_refused() {
    let s = Setup::new();
    s.edit(
        "core.toml",
        "secret_access_key_file = \"secret.txt\"",
        "secret_access_key_file = \"/dev/zero\"",
    );
    s.expect_usage_error(
        &["check"],
        &[
            "secret_access_key_file",
            "/dev/zero is a device, not a regular file",
        ],
    );
    let s = Setup::new();
    std::fs::remove_file(s.path("secret.txt")).unwrap();
    std::fs::create_dir(s.path("secret.txt")).unwrap();
    std::fs::set_permissions(s.path("secret.txt"), std::fs::Permissions::from_mode(0o700)).unwrap();
    s.expect_usage_error(
        &["check"],
        &[
            "secret_access_key_file",
            "is a directory, not a regular file",
        ],
    );
}

#[test]
fn a_recipient_list_has_a_cap() {
    let s = Setup::new();
    let many: Vec<String> = (0..65)
        .map(|_| format!("{:?}", zonevault::keys::generate().recipient))
        .collect();
    let map = std::fs::read_to_string(s.path("zonemap.toml")).unwrap();
    let start = map.find("recipients = [\"age1").unwrap();
    let end = start + map[start..].find('\n').unwrap();
    let with = |n: usize| {
        format!(
            "{}recipients = [{}]{}",
            &map[..start],
            many[..n].join(", "),
            &map[end..]
        )
    };
    s.write("zonemap.toml", with(65).as_bytes());
    s.expect_error(&["zones.ch.recipients", "lists 65 recipients", "at most 64"]);
    // 64 is fine
    s.write("zonemap.toml", with(64).as_bytes());
    let map =
        zonevault::config::ZoneMap::load(&s.path("zonemap.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(map.zone_of_core("core-ch-1").unwrap().recipients.len(), 64);
}

#[test]
fn absurd_job_counts_are_usage_errors() {
    let s = Setup::new();
    for (args, flag) in [
        (&["backup", "--jobs", "0"][..], "--jobs"),
        (&["backup", "--jobs", "100000"][..], "--jobs"),
        (&["backup", "--jobs=-1"][..], "--jobs"),
        (&["backup", "--part-jobs", "0"][..], "--part-jobs"),
        (&["backup", "--part-jobs", "33"][..], "--part-jobs"),
        (
            &[
                "restore",
                "--snapshot",
                "latest",
                "--to",
                "/tmp/nowhere",
                "--identity",
                "k",
                "--jobs",
                "0",
            ][..],
            "--jobs",
        ),
        (
            &[
                "restore",
                "--snapshot",
                "latest",
                "--to",
                "/tmp/nowhere",
                "--identity",
                "k",
                "--jobs",
                "257",
            ][..],
            "--jobs",
        ),
    ] {
        let e = s.expect_usage_error(args, &[flag]);
        let range = if flag == "--jobs" {
            "1..=256"
        } else {
            "1..=32"
        };
        assert!(e.contains(range), "{args:?}: {e}");
    }
}

// --- command volumes and hooks ---
bad_config!(command_volume_with_path, "core.toml", "layout = \"plain\"" => "layout = \"command\"\ncommand = [\"pg_dump\"]\nfile = \"db.dump\"", ["volumes[1].path", "not used by a layout = \"command\" volume"]);
bad_config!(command_volume_without_command, "core.toml", "path = \"data/etc\"\nlayout = \"plain\"" => "layout = \"command\"\nfile = \"db.dump\"", ["volumes[1].command", "is missing"]);
bad_config!(command_volume_empty_command, "core.toml", "path = \"data/etc\"\nlayout = \"plain\"" => "layout = \"command\"\ncommand = []\nfile = \"db.dump\"", ["volumes[1].command", "is empty"]);
bad_config!(command_volume_without_file, "core.toml", "path = \"data/etc\"\nlayout = \"plain\"" => "layout = \"command\"\ncommand = [\"pg_dump\"]", ["volumes[1].file", "is missing"]);
bad_config!(command_volume_file_with_slash, "core.toml", "path = \"data/etc\"\nlayout = \"plain\"" => "layout = \"command\"\ncommand = [\"pg_dump\"]\nfile = \"../db.dump\"", ["volumes[1].file", "not a plain file name"]);
bad_config!(command_volume_bad_timeout, "core.toml", "path = \"data/etc\"\nlayout = \"plain\"" => "layout = \"command\"\ncommand = [\"pg_dump\"]\nfile = \"db.dump\"\ntimeout = \"soon\"", ["volumes[1].timeout", "not a duration"]);
bad_config!(command_on_a_plain_volume, "core.toml", "layout = \"plain\"" => "layout = \"plain\"\ncommand = [\"pg_dump\"]", ["volumes[1].command", "only for layout = \"command\""]);
bad_config!(empty_before_hook, "core.toml", "layout = \"plain\"" => "layout = \"plain\"\nbefore = []", ["volumes[1].before", "is empty"]);
bad_config!(bad_hook_timeout, "core.toml", "layout = \"plain\"" => "layout = \"plain\"\nhook_timeout = \"0s\"", ["volumes[1].hook_timeout", "not a duration"]);
