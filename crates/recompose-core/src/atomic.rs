//! Atomic file output: write into a temporary file or folder beside the target, then rename it
//! into place, so an interrupted or failed run never leaves a half-written output.
//!
//! Temporaries are named `.recompose-tmp-<pid>-<random>` and registered while they exist:
//! [`abandon_unfinished`] (called on SIGINT/SIGTERM/SIGHUP by the binary) removes them, and what a
//! killed or aborted run still left behind is swept by the next run writing into the same folder.

use crate::error::{Error, Result};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// The prefix of every temporary this module creates.
pub const TMP_PREFIX: &str = ".recompose-tmp-";

/// This process's temporaries not yet in place.
static UNFINISHED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn unfinished() -> MutexGuard<'static, Vec<PathBuf>> {
    UNFINISHED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes this process's unfinished outputs and keeps new ones from starting: for a signal
/// handler that ends the process next.
pub fn abandon_unfinished() {
    let live = unfinished();
    for p in live.iter() {
        let _ = if p.is_dir() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) };
    }
    // Held until the process ends, so no temporary is created or renamed after this.
    std::mem::forget(live);
}

/// A registered temporary; dropping it unregisters it (the file or folder itself is removed by
/// its tempfile owner).
struct Pending(Option<PathBuf>);

impl Pending {
    /// Creates a temporary in `dir` through `make` (given the name prefix) and registers it, under
    /// the registry's lock so a handler sees it or it does not exist yet.
    fn create<T>(
        dir: &Path,
        make: impl FnOnce(&str) -> std::io::Result<T>,
        path: impl Fn(&T) -> &Path,
    ) -> Result<(T, Pending)> {
        let mut live = unfinished();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        sweep_stale(dir);
        let t = make(&format!("{TMP_PREFIX}{}-", std::process::id())).map_err(|e| Error::io(dir, e))?;
        let p = path(&t).to_path_buf();
        live.push(p.clone());
        Ok((t, Pending(Some(p))))
    }

    /// Runs the step that moves the output into place and unregisters it, under one lock.
    fn finish<R>(mut self, f: impl FnOnce() -> R) -> R {
        let mut live = unfinished();
        let r = f();
        if let Some(p) = self.0.take() {
            live.retain(|q| *q != p);
        }
        r
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            unfinished().retain(|q| *q != p);
        }
    }
}

/// Removes temporaries in `dir` left by runs of ours that are no longer alive (killed, or aborted
/// on a failed allocation). Others' files and names we did not make are never touched.
fn sweep_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(TMP_PREFIX)).and_then(|r| r.split_once('-')) else {
            continue;
        };
        let Ok(pid) = pid.0.parse::<u32>() else { continue };
        if pid != std::process::id() && !alive(pid) {
            let p = e.path();
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
    }
}

/// Whether a process exists; where that cannot be told (no /proc), every process is alive.
fn alive(pid: u32) -> bool {
    !Path::new("/proc/self").exists() || Path::new(&format!("/proc/{pid}")).exists()
}

fn parent(target: &Path) -> &Path {
    match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Writes `path` through `f`; on any error or interruption nothing appears at `path`.
pub fn write_with<F>(path: &Path, f: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<&mut std::fs::File>) -> Result<()>,
{
    let (mut tmp, pending) = Pending::create(
        parent(path),
        |prefix| tempfile::Builder::new().prefix(prefix).tempfile_in(parent(path)),
        |t| t.path(),
    )?;
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
    pending.finish(|| tmp.persist(path)).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Writes bytes atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |w| w.write_all(bytes).map_err(|e| Error::io(path, e)))
}

/// A scratch folder beside its target; it and whatever is left in it disappear when dropped.
pub struct Scratch {
    dir: tempfile::TempDir,
    pending: Pending,
}

impl Scratch {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A scratch folder beside `target` (same filesystem, so moving a result into place is a rename).
pub fn scratch_beside(target: &Path) -> Result<Scratch> {
    let dir = parent(target);
    let (dir, pending) =
        Pending::create(dir, |prefix| tempfile::Builder::new().prefix(prefix).tempdir_in(dir), |t| t.path())?;
    Ok(Scratch { dir, pending })
}

/// Moves a finished scratch folder to `target` with ordinary permissions.
pub fn publish_dir(tmp: Scratch, target: &Path) -> Result<()> {
    let Scratch { dir, pending } = tmp;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755));
    }
    pending.finish(|| {
        let kept = dir.keep();
        std::fs::rename(&kept, target).map_err(|e| {
            let _ = std::fs::remove_dir_all(&kept);
            Error::io(target, e)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temporaries_of_dead_runs_are_swept() {
        let d = tempfile::tempdir().unwrap();
        // A process that has exited: its pid names a dead run.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let dead_file = d.path().join(format!("{TMP_PREFIX}{dead}-abc"));
        let dead_dir = d.path().join(format!("{TMP_PREFIX}{dead}-def"));
        std::fs::write(&dead_file, b"half").unwrap();
        std::fs::create_dir(&dead_dir).unwrap();
        std::fs::write(dead_dir.join("model.safetensors"), b"half").unwrap();
        // Ours (alive), a name without a pid, and someone else's file stay.
        let kept = [
            d.path().join(format!("{TMP_PREFIX}{}-xyz", std::process::id())),
            d.path().join(format!("{TMP_PREFIX}abcdef")),
            d.path().join("notes.txt"),
        ];
        for k in &kept {
            std::fs::write(k, b"keep").unwrap();
        }
        write_bytes(&d.path().join("out.json"), b"{}").unwrap();
        assert!(!dead_file.exists() && !dead_dir.exists());
        assert!(kept.iter().all(|k| k.exists()));
        assert_eq!(std::fs::read(d.path().join("out.json")).unwrap(), b"{}");
    }

    #[test]
    fn abandoned_outputs_are_removed_and_finished_ones_unregistered() {
        let d = tempfile::tempdir().unwrap();
        write_bytes(&d.path().join("done.txt"), b"x").unwrap();
        let s = scratch_beside(&d.path().join("model")).unwrap();
        std::fs::write(s.path().join("part"), b"half").unwrap();
        // (Other tests write in parallel: look only for these two.)
        let live = unfinished().clone();
        assert!(live.iter().any(|p| p == s.path()), "the unfinished scratch folder is registered");
        assert!(!live.iter().any(|p| p.starts_with(d.path()) && p != s.path()), "the finished file is not");
        let path = s.path().to_path_buf();
        drop(s);
        assert!(!unfinished().contains(&path) && !path.exists());
    }
}
