//! Small file steps that make a secret or a head durable, shared with the node's own secrets.

use std::fs::File;
use std::path::{Path, PathBuf};

/// `path` with `.tmp` appended to its file name: where a file is written before it is linked
/// or renamed into place.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Syncs directory `dir`, which makes a create, link or rename in it durable; only POSIX
/// systems can open a directory to sync it.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    File::open(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    })?
    .sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}
