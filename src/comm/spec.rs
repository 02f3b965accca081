//! What every rank agrees a group is: its spec (name, creation index, role, members), the
//! standard groups in their one creation order, and where each rank's data plane listens. Both
//! the collective wrapper (`group.rs`) and the data planes (`plane.rs`) build on these; this
//! module imports neither.
use crate::fault;
use crate::ids::{GlobalRank, GroupRank};
use serde::{Deserialize, Serialize};

/// What a group is for; decides which ops the guard lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupRole {
    World,
    Pp,
    Mesh,
}

/// A group as every rank agrees on it: name, creation index, members (global ranks, in group-rank
/// order).
///
/// Group ranks and global ranks do not mix (docs/spec.md §1): translating takes the other type.
/// ```
/// use lockstep::comm::group::{GroupRole, GroupSpec};
/// use lockstep::ids::{GlobalRank, GroupRank};
/// let mesh = GroupSpec { name: "mesh".into(), id: 2, role: GroupRole::Mesh,
///                        members: vec![GlobalRank(1), GlobalRank(2)] };
/// assert_eq!(mesh.global_rank_of(GroupRank(0)), Some(GlobalRank(1)));
/// ```
/// Passing a global rank where a group rank is due is a type error (E0308), not a wrong peer; the
/// example above is the same code with the right type, so the mismatch is the only error:
/// ```compile_fail,E0308
/// use lockstep::comm::group::{GroupRole, GroupSpec};
/// use lockstep::ids::GlobalRank;
/// let mesh = GroupSpec { name: "mesh".into(), id: 2, role: GroupRole::Mesh,
///                        members: vec![GlobalRank(1), GlobalRank(2)] };
/// let _ = mesh.global_rank_of(GlobalRank(1));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSpec {
    pub name: String,
    pub id: u32,
    pub role: GroupRole,
    pub members: Vec<GlobalRank>,
}

impl GroupSpec {
    pub fn group_rank_of(&self, g: GlobalRank) -> Option<GroupRank> {
        self.members
            .iter()
            .position(|&m| m == g)
            .map(|i| GroupRank(i as u32))
    }
    pub fn global_rank_of(&self, r: GroupRank) -> Option<GlobalRank> {
        self.members.get(r.0 as usize).copied()
    }
    pub fn size(&self) -> u32 {
        self.members.len() as u32
    }
    /// `mesh[1,2]`
    pub fn describe(&self) -> String {
        let m: Vec<String> = self.members.iter().map(|g| g.0.to_string()).collect();
        format!("{}[{}]", self.name, m.join(","))
    }
}

/// The groups in creation order for a world of `world_size` (rank 0 + TP = world_size − 1).
/// The fault point `groups.reorder` swaps `pp` and `mesh` on the rank it targets (B3).
pub fn standard_groups(world_size: u32) -> Vec<GroupSpec> {
    let all: Vec<GlobalRank> = (0..world_size).map(GlobalRank).collect();
    let mut v = vec![
        GroupSpec {
            name: "world".into(),
            id: 0,
            role: GroupRole::World,
            members: all.clone(),
        },
        GroupSpec {
            name: "pp".into(),
            id: 1,
            role: GroupRole::Pp,
            members: vec![GlobalRank(0), GlobalRank(1)],
        },
        GroupSpec {
            name: "mesh".into(),
            id: 2,
            role: GroupRole::Mesh,
            members: all[1..].to_vec(),
        },
    ];
    if fault::hit(fault::points::GROUPS_REORDER) {
        v.swap(1, 2);
        for (i, g) in v.iter_mut().enumerate() {
            g.id = i as u32;
        }
    }
    v
}

/// Where each rank's data plane listens (filled by the rendezvous).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PeerTable {
    pub data_addrs: Vec<String>,
    /// Digest of the job token (data-plane connections present it).
    pub token_digest: u64,
}
