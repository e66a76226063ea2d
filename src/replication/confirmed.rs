//! The confirmed position of a shard, kept in `<shard dir>/confirmed` across restarts.
//!
//! "Confirmed" is what consumers of this shard may see: on a SYNC_MASTER master the log the
//! slave has acknowledged, on a slave what its master confirmed (RocketMQ 5's confirmOffset),
//! otherwise the durable log. After a restart a SYNC_MASTER master shows nothing beyond the
//! saved position until its slave acknowledges more, and a slave shows nothing beyond it until
//! its master says more: records the slave never had, or the master never confirmed, must not
//! appear just because the log holds them.
//!
//! The file is written lazily (at most every [`SAVE_INTERVAL`], off the executor, with tmp,
//! fsync and rename) and at a clean stop, so it may lag the real position: after a crash
//! visibility starts a little lower and catches up with the next acknowledgement, never higher.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use futures_lite::future;

use crate::replication::epoch::EpochError;
use crate::replication::state::Replication;

/// How often a moved confirmed position is saved.
pub const SAVE_INTERVAL: Duration = Duration::from_millis(200);

fn path(shard_dir: &Path) -> PathBuf {
    shard_dir.join("confirmed")
}

/// The saved position; `None` when there is no file (a log from before this file existed).
pub fn load(shard_dir: &Path) -> Result<Option<u64>, EpochError> {
    let path = path(shard_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| EpochError::Parse {
                path,
                line: 1,
                detail: "expected a log position".into(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(EpochError::Io { path, source }),
    }
}

fn save_blocking(shard_dir: &Path, pos: u64) -> std::io::Result<()> {
    let tmp = shard_dir.join("confirmed.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(format!("{pos}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path(shard_dir))?;
    std::fs::File::open(shard_dir)?.sync_all()
}

/// Saves the confirmed position if it moved since the last save (on the blocking pool).
pub async fn save_if_moved(repl: &Replication) {
    let pos = repl.confirmed();
    if pos == repl.confirmed_saved() {
        return;
    }
    let dir = repl.ctx.shard_dir();
    let shown = dir.display().to_string();
    match glommio::executor()
        .spawn_blocking(move || save_blocking(&dir, pos))
        .await
    {
        Ok(()) => repl.set_confirmed_saved(pos),
        Err(e) => log::warn!(
            "shard {}: cannot save the confirmed position in {shown}: {e}",
            repl.ctx.shard
        ),
    }
}

/// Saves the confirmed position as it moves, until shutdown (the last save is the shard's,
/// at its clean stop).
pub async fn keep_saved(repl: Rc<Replication>) {
    while !repl.ctx.is_shutting_down() {
        future::or(
            glommio::timer::sleep(SAVE_INTERVAL),
            repl.ctx.shutdown_requested(),
        )
        .await;
        if repl.ctx.is_shutting_down() {
            break;
        }
        save_if_moved(&repl).await;
    }
}
