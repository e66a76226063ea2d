//! What a [`ShardStore`] tells the layers above about a full disk (see `commitlog`'s "A full
//! disk is not a poison").

use crate::storage::backend::StorageBackend;
use crate::storage::store::ShardStore;

impl<B: StorageBackend> ShardStore<B> {
    /// Why the disk refuses writes now (writes held back by ENOSPC, a segment that cannot be
    /// prepared, usage above `disk_reject_ratio`), or `None`. For messages: an ack that timed
    /// out while its bytes wait for space says so instead of a bare timeout.
    pub fn disk_full(&self) -> Option<String> {
        self.inner.log.disk_full_reason()
    }
}
