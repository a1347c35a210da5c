//! Atomic file output: write into a temporary file beside the target, then rename it into place,
//! so an interrupted or failed run never leaves a half-written file.

use crate::error::{Error, Result};
use std::io::{BufWriter, Write};
use std::path::Path;

/// Writes `path` through `f`; on any error nothing appears at `path`.
pub fn write_with<F>(path: &Path, f: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<&mut std::fs::File>) -> Result<()>,
{
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tmp = tempfile::Builder::new().prefix(".recompose-tmp-").tempfile_in(dir).map_err(|e| Error::io(dir, e))?;
    {
        let mut w = BufWriter::new(tmp.as_file_mut());
        f(&mut w)?;
        w.flush().map_err(|e| Error::io(path, e))?;
    }
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    // Temporary files are created private; outputs get ordinary permissions.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644));
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Writes bytes atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |w| w.write_all(bytes).map_err(|e| Error::io(path, e)))
}

/// A scratch folder beside `target` (same filesystem, so moving a result into place is a
/// rename); it and whatever is left in it disappear when dropped.
pub fn scratch_beside(target: &Path) -> Result<tempfile::TempDir> {
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    tempfile::Builder::new().prefix(".recompose-tmp-").tempdir_in(dir).map_err(|e| Error::io(dir, e))
}

/// Moves a finished scratch folder to `target` with ordinary permissions.
pub fn publish_dir(tmp: tempfile::TempDir, target: &Path) -> Result<()> {
    let kept = tmp.keep();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o755));
    }
    std::fs::rename(&kept, target).map_err(|e| {
        let _ = std::fs::remove_dir_all(&kept);
        Error::io(target, e)
    })
}
