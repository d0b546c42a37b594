//! `zonevault keygen` and the reference `age` CLI read each other's keys.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{output_text, tool, zonevault};

fn keygen(path: &Path) -> String {
    let out = zonevault()
        .arg("keygen")
        .arg("--out")
        .arg(path)
        .output()
        .unwrap();
    let (stdout, stderr) = output_text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    stdout.trim().to_string()
}

#[test]
fn keygen_writes_a_private_file_and_prints_the_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zone.key");
    let recipient = keygen(&path);
    assert!(
        recipient.starts_with("age1") && !recipient.contains('\n'),
        "{recipient}"
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(&format!("# public key: {recipient}")));
    assert!(text.lines().any(|l| l.starts_with("AGE-SECRET-KEY-1")));
    // the reference tool derives the same recipient from the file
    let derived = tool("age-keygen", &["-y", path.to_str().unwrap()], b"");
    assert_eq!(String::from_utf8(derived).unwrap().trim(), recipient);
}

#[test]
fn keygen_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zone.key");
    std::fs::write(&path, "precious").unwrap();
    let out = zonevault()
        .arg("keygen")
        .arg("--out")
        .arg(&path)
        .output()
        .unwrap();
    let (stdout, stderr) = output_text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("already exists") && stderr.contains("never overwrites"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[test]
fn keygen_into_a_missing_directory_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/zone.key");
    let out = zonevault()
        .arg("keygen")
        .arg("--out")
        .arg(&path)
        .output()
        .unwrap();
    let (_, stderr) = output_text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot create") && stderr.contains("zone.key"),
        "{stderr}"
    );
}

#[test]
fn age_cli_uses_a_zonevault_identity() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zone.key");
    let recipient = keygen(&path);
    let plain = b"user data that must stay in the zone\n".repeat(100);
    let sealed = tool("age", &["-r", &recipient], &plain);
    let opened = tool("age", &["-d", "-i", path.to_str().unwrap()], &sealed);
    assert_eq!(opened, plain);
}

#[test]
fn zonevault_uses_an_age_keygen_identity() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("age.key");
    tool("age-keygen", &["-o", path.to_str().unwrap()], b"");
    let recipient = String::from_utf8(tool("age-keygen", &["-y", path.to_str().unwrap()], b""))
        .unwrap()
        .trim()
        .to_string();

    // age CLI encrypts to the age-keygen recipient; zonevault's identity loader decrypts.
    let plain = b"escrow drill\n".repeat(50);
    let sealed = tool("age", &["-r", &recipient], &plain);
    let identities = zonevault::keys::load_identities(&path).unwrap();
    let decryptor = age::Decryptor::new(&sealed[..]).unwrap();
    let mut reader = decryptor
        .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .unwrap();
    let mut opened = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut opened).unwrap();
    assert_eq!(opened, plain);

    // and what the age crate encrypts to that recipient (parsed as the zone
    // map parses recipients), the age CLI decrypts.
    let recipient: age::x25519::Recipient = recipient.parse().unwrap();
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
            .unwrap();
    let mut sealed = Vec::new();
    let mut w = encryptor.wrap_output(&mut sealed).unwrap();
    w.write_all(&plain).unwrap();
    w.finish().unwrap();
    let opened = tool("age", &["-d", "-i", path.to_str().unwrap()], &sealed);
    assert_eq!(opened, plain);
}

#[test]
fn a_signing_key_signs_what_the_minisign_tool_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("core.signing.key");
    let out = zonevault()
        .args(["keygen", "--signing", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    let (stdout, stderr) = output_text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("signing_keys"), "{stderr}");
    let public = stdout.trim();
    assert!(
        public.starts_with("RW") && !public.contains('\n'),
        "{public}"
    );
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // the reference tool signs with the key and checks with the printed public key
    let file = dir.path().join("index.json");
    std::fs::write(&file, b"{}").unwrap();
    tool(
        "minisign",
        &[
            "-S",
            "-s",
            key.to_str().unwrap(),
            "-m",
            file.to_str().unwrap(),
        ],
        b"",
    );
    tool(
        "minisign",
        &["-V", "-P", public, "-m", file.to_str().unwrap()],
        b"",
    );

    // never over an existing key
    let out = zonevault()
        .args(["keygen", "--signing", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    let (_, stderr) = output_text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("never overwrites"), "{stderr}");
}
