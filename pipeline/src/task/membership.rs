//! The membership contract of `runtime.tasks: partition`: a group member decides which tasks
//! (partition numbers) this process runs, and tells the runtime through [`Assignments`]. The
//! planner builds the member from the source's config (`SourceConfig::membership`); the Kafka
//! consumer group is the one implementation.

// only a Kafka source has a group to share tasks through
#![cfg_attr(not(feature = "kafka"), allow(dead_code))]

use std::sync::Arc;

/// What the member tells the process about its tasks. Called on the member's thread (inside
/// its poll): a call returns once the work is done.
pub(crate) trait Assignments: Send + Sync + 'static {
    /// These tasks are now ours: start them.
    fn assigned(&self, tasks: &[i32]);
    /// These tasks go to another process: checkpoint and stop them, then return.
    fn revoked(&self, tasks: &[i32]);
    /// The group moved these on without us (a session timeout): another process may already
    /// run them, so they must stop without committing anything.
    fn lost(&self, tasks: &[i32]);
}

/// A member of the group that shares a source's tasks between processes.
pub(crate) trait Membership: Send {
    /// Joins the group and serves its decisions until `leave` says so, then revokes every task
    /// it holds ([`Assignments::revoked`]) and leaves. Blocks: run it on a thread of its own.
    fn run(self: Box<Self>, tasks: Arc<dyn Assignments>, leave: Box<dyn Fn() -> bool + Send>) -> Result<(), String>;

    /// How long the group waits for a member that stopped answering before it hands that
    /// member's tasks on.
    fn session_timeout(&self) -> std::time::Duration;
}
