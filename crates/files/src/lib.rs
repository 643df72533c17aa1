//! Files written whole or not at all, and secret files that nobody else
//! can read. Every file fedveil writes goes through here (net re-exports
//! this crate as `fedveil_net::files`; the model crate writes its exports
//! and caches with it).

use std::io::Write;
use std::path::{Path, PathBuf};

/// Who may read a file [`write_atomically`] writes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// The process's umask decides (certificates, allow-lists, checkpoints).
    Default,
    /// Only the owner (mode 0600): key material.
    OwnerOnly,
}

/// Writes `bytes` to `path` so that a reader sees the old file or the new
/// one, never a part, and a crash leaves no half-written file in its place:
/// a fresh temporary file beside it (created with `access`'s mode, never
/// reusing an existing file's permissions), written, flushed to disk,
/// renamed over `path`, and the directory flushed so that the rename is
/// durable. Every step's error is returned.
pub fn write_atomically(path: &Path, bytes: &[u8], access: Access) -> std::io::Result<()> {
    write_atomically_with(path, access, |f| f.write_all(bytes))
}

/// [`write_atomically`] for contents that are streamed rather than held in
/// memory: everything `reader` yields, to its end.
pub fn copy_atomically(
    path: &Path,
    reader: &mut dyn std::io::Read,
    access: Access,
) -> std::io::Result<()> {
    write_atomically_with(path, access, |f| std::io::copy(reader, f).map(drop))
}

/// The one atomic write: `fill` writes the temporary file's contents.
fn write_atomically_with(
    path: &Path,
    access: Access,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let tmp = temporary_beside(path);
    let result = (|| {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        if access == Access::OwnerOnly {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        fill(&mut f)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    sync_dir(&dir)
}

/// Flushes a directory's entries (a rename or a new file in it) to disk.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// A name beside `path` that no other writer uses.
fn temporary_beside(path: &Path) -> PathBuf {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}-{n}", std::process::id()));
    path.with_file_name(name)
}

/// Refuses a secret file that others than its owner may read or write: a
/// key that has been readable is no longer a secret, and the operator must
/// know it.
pub fn check_private(path: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| e.to_string())?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "this key file has mode {:o}: others can read or change it; \
                 run 'chmod 600 {}' if it was never exposed, or make a new key",
                mode & 0o777,
                path.display()
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fedveil-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_written_over_a_world_readable_file_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("mode");
        let path = d.join("key");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_private(&path).is_err());
        write_atomically(&path, b"secret", Access::OwnerOnly).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
        check_private(&path).unwrap();
        // Nothing is left beside it.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let d = dir("fail");
        let path = d.join("sub");
        // A directory in the way: the rename fails.
        std::fs::create_dir_all(path.join("x")).unwrap();
        assert!(write_atomically(&path, b"new", Access::Default).is_err());
        assert!(path.join("x").is_dir());
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_stream_is_copied_whole_and_a_failing_stream_leaves_nothing() {
        let d = dir("copy");
        let path = d.join("weights");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        copy_atomically(&path, &mut data.as_slice(), Access::Default).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);

        struct Failing(usize);
        impl std::io::Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0 == 0 {
                    return Err(std::io::Error::other("the archive is truncated"));
                }
                self.0 -= 1;
                buf[0] = 7;
                Ok(1)
            }
        }
        let err = copy_atomically(&path, &mut Failing(10), Access::Default).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        // The old file is intact and no temporary is left beside it.
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
