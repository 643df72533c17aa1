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
