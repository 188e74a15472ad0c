//! A node's 32-byte secrets (the record-key secret, the pool key) kept in its state directory:
//! made once at first start, readable by the owner only, never replaced.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::path::Path;

use ring::rand::{SecureRandom, SystemRandom};
use trustql_audit::{sync_dir, temp_path};

use crate::engine::hex;
use crate::error::NodeError;

/// The secret in `path` (64 hex digits), made if there is none. A file that is not such a
/// secret is an error and is left as it is (`why_kept` says what replacing it would break).
pub(crate) fn load_or_create(
    path: &Path,
    what: &str,
    why_kept: &str,
) -> Result<[u8; 32], NodeError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text, what, why_kept),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io(dir))?;
            }
            create(path, what, why_kept)
        }
        Err(e) => Err(io(path)(e)),
    }
}

/// 32 bytes from the system's random source.
pub(crate) fn random() -> Result<[u8; 32], ()> {
    let mut bytes = [0u8; 32];
    SystemRandom::new().fill(&mut bytes).map_err(|_| ())?;
    Ok(bytes)
}

fn parse(path: &Path, text: &str, what: &str, why_kept: &str) -> Result<[u8; 32], NodeError> {
    let text = text.trim();
    (text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| {
            let mut bytes = [0u8; 32];
            for (i, byte) in bytes.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
            }
            Some(bytes)
        })
        .flatten()
        .ok_or_else(|| {
            NodeError::Config(format!(
                "{} is not a {what} of 64 hex digits; it is left as it is ({why_kept})",
                path.display()
            ))
        })
}

/// Writes a new secret to a private temporary file and links it into place, so a crash never
/// leaves a partial secret, and a secret already there is never replaced.
fn create(path: &Path, what: &str, why_kept: &str) -> Result<[u8; 32], NodeError> {
    let bytes = random().map_err(|()| NodeError::Io {
        path: path.to_path_buf(),
        reason: "the system random source failed".into(),
    })?;
    let temp = temp_path(path);
    match std::fs::remove_file(&temp) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io(&temp)(e)),
    }
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&temp).map_err(io(&temp))?;
    let mut text = hex(&bytes);
    text.push('\n');
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io(&temp))?;
    drop(file);
    let linked = std::fs::hard_link(&temp, path);
    std::fs::remove_file(&temp).map_err(io(&temp))?;
    match linked {
        Ok(()) => {}
        // Another start made it first: use that one.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            let text = std::fs::read_to_string(path).map_err(io(path))?;
            return parse(path, &text, what, why_kept);
        }
        Err(e) => return Err(io(path)(e)),
    }
    if let Some(dir) = path.parent() {
        sync_dir(dir).map_err(io(dir))?;
    }
    tracing::info!(path = %path.display(), "created the {what}");
    Ok(bytes)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError {
    let path = path.to_path_buf();
    move |e| NodeError::Io {
        path,
        reason: e.to_string(),
    }
}
