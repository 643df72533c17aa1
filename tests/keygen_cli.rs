//! `fedveil keygen` (protocols/federation.md §2.1).

mod common;

use common::fedveil;
use fedveil_net::identity::load_allow_list;
use fedveil_net::{ClientIdentity, Fingerprint, ServerIdentity};

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fedveil-keygen-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn server_certificate_prints_the_fingerprint_of_what_it_wrote() {
    let dir = scratch("server");
    let d = dir.to_str().unwrap();
    let (code, out, err) = fedveil(&[
        "keygen",
        "server",
        "--dir",
        d,
        "--name",
        "fed.example",
        "--name",
        "127.0.0.1",
    ]);
    assert_eq!(code, 0, "{err}");
    let printed: Fingerprint = out.trim().parse().unwrap();
    let id = ServerIdentity::load(&dir.join("cert.pem"), &dir.join("key.pem")).unwrap();
    assert_eq!(id.fingerprint(), printed);

    let (code, _, err) = fedveil(&["keygen", "server", "--dir", d]);
    assert_eq!(code, 2);
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    let (code, out, _) = fedveil(&["keygen", "server", "--dir", d, "--force"]);
    assert_eq!(code, 0);
    assert_ne!(out.trim().parse::<Fingerprint>().unwrap(), printed);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn client_identities_land_in_the_allow_list() {
    let dir = scratch("client");
    let list = dir.join("allow.txt");
    let mut keys = Vec::new();
    for i in 0..3 {
        let key = dir.join(format!("client-{i}.key"));
        let (code, out, err) = fedveil(&[
            "keygen",
            "client",
            "--out",
            key.to_str().unwrap(),
            "--allow-list",
            list.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        let id = ClientIdentity::load(&key).unwrap();
        assert_eq!(out.trim(), id.public().to_string());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the private key is readable by others");
        }
        keys.push(id.public());
    }
    assert_eq!(load_allow_list(&list).unwrap(), keys);
    let (code, _, err) = fedveil(&[
        "keygen",
        "client",
        "--out",
        dir.join("client-0.key").to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("exists"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// Issue 17, finding 8: `--force` over a world-readable key file leaves an
// owner-only file (the secret never enters the old file), and a key file
// that others can read is refused with the fix in the message.
#[cfg(unix)]
#[test]
fn forced_keys_are_owner_only_and_exposed_keys_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("modes");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let key = dir.join("client.key");
    std::fs::write(&key, "placeholder\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = fedveil(&[
        "keygen",
        "client",
        "--out",
        key.to_str().unwrap(),
        "--force",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(mode(&key), 0o600);
    ClientIdentity::load(&key).unwrap();

    let d = dir.join("server");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("key.pem"), "placeholder\n").unwrap();
    std::fs::set_permissions(d.join("key.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = fedveil(&["keygen", "server", "--dir", d.to_str().unwrap(), "--force"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(mode(&d.join("key.pem")), 0o600);
    ServerIdentity::load(&d.join("cert.pem"), &d.join("key.pem")).unwrap();

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = ClientIdentity::load(&key).unwrap_err().to_string();
    assert!(e.contains("mode 640") && e.contains("chmod 600"), "{e}");
    std::fs::set_permissions(d.join("key.pem"), std::fs::Permissions::from_mode(0o604)).unwrap();
    let e = ServerIdentity::load(&d.join("cert.pem"), &d.join("key.pem"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("mode 604"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
