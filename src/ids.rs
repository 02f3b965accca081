//! Protocol identifiers as newtypes, so that mixing them does not compile.
//!
//! `GlobalRank` (position in the world) and `GroupRank` (position inside one process group) are
//! different types: a collective's `root`/`src` is a `GroupRank`, and only a `Group` can translate
//! between the two. `CallId`, `ChunkIndex` and `CacheEpoch` are the envelope's ids
//! (docs/spec.md §4).
use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_newtype {
    ($(#[$m:meta])* $name:ident($inner:ty), $prefix:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl $name {
            pub const fn get(self) -> $inner {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_newtype!(
    /// Rank in the world (0 = Stage 0 driver, 1..=T = mesh).
    GlobalRank(u32), "global-rank "
);
id_newtype!(
    /// Rank inside one process group (mesh leader = mesh group-rank 0).
    GroupRank(u32), "group-rank "
);
id_newtype!(
    /// Monotonic across every action rank 0 sends (INFER, NOOP, SHUTDOWN).
    CallId(u64), "call_id "
);
id_newtype!(
    /// Monotonic across INFERs.
    ChunkIndex(u64), "chunk_index "
);
id_newtype!(
    /// Fences cache worlds; bumped by a hard cut.
    CacheEpoch(u64), "cache_epoch "
);

impl CallId {
    pub const fn next(self) -> CallId {
        CallId(self.0 + 1)
    }
}

impl ChunkIndex {
    pub const fn next(self) -> ChunkIndex {
        ChunkIndex(self.0 + 1)
    }
}

impl CacheEpoch {
    pub const fn next(self) -> CacheEpoch {
        CacheEpoch(self.0 + 1)
    }
}

/// Global rank 0 is Stage 0, the driver.
pub const DRIVER: GlobalRank = GlobalRank(0);
/// Global rank 1 is the mesh leader (mesh group-rank 0).
pub const MESH_LEADER: GlobalRank = GlobalRank(1);
